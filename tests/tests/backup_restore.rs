//! User story: an operator backs up a running controller (`fleet-controller backup`), loses it,
//! restores the backup into an empty data directory (`fleet-controller restore`) and starts a
//! controller on it with the same config: every release, deployment, rollout and host is there,
//! the agents reconnect by themselves, and a new rollout works. The refusals of bad input
//! (an existing backup file, a data directory that is not empty) are checked on the way; the
//! rest (unwritable target, not a backup, damaged, truncated, newer format) are unit tests of
//! `fleet_controller::backup`.

use fleet_tests::fleet::Fleet;
use fleet_tests::process::{run_with_deadline, Finished};
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const COMMAND_DEADLINE: Duration = Duration::from_secs(60);

fn fleet_controller(fleet: &Fleet, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Finished {
    let mut command = Command::new(&fleet.bins.controller);
    for arg in args {
        command.arg(arg);
    }
    command.current_dir(fleet.dir());
    run_with_deadline(command, COMMAND_DEADLINE)
}

/// What the read verbs show that a restore must keep: releases, history and deployments as
/// they are; each host's name, labels and the release it should run.
fn state_of(fleet: &Fleet) -> Value {
    let hosts: Vec<Value> = fleet.ctl_ok(&["hosts"])["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .map(|h| serde_json::json!({ "name": h["name"], "labels": h["labels"] }))
        .collect();
    let deployments: Vec<Value> = fleet.ctl_ok(&["deployments"])["deployments"]
        .as_array()
        .expect("deployments")
        .iter()
        .map(|d| {
            serde_json::json!({
                "app": d["app"], "selector": d["selector"], "version": d["version"],
                "rollout_id": d["rollout_id"],
            })
        })
        .collect();
    let status = fleet.status("web");
    let desired: Vec<Value> = status["hosts"]
        .as_array()
        .expect("status hosts")
        .iter()
        .map(|host| {
            let web = host["apps"]
                .as_array()
                .and_then(|apps| apps.iter().find(|a| a["app"] == "web"));
            serde_json::json!({
                "host": host["name"],
                "desired": web.map(|a| a["desired_version"].clone()),
            })
        })
        .collect();
    serde_json::json!({
        "releases": fleet.ctl_ok(&["releases", "web"]),
        "history": fleet.ctl_ok(&["history", "web"]),
        "deployments": deployments,
        "hosts": hosts,
        "desired": desired,
    })
}

#[test]
fn a_backup_of_a_running_controller_restores_the_whole_fleet() {
    let mut fleet = Fleet::start(2);
    fleet.create_web_releases(&["1.0.0", "1.1.0"]);
    fleet
        .ctl(&[
            "rollout", "web", "1.0.0", "--canary", "1", "--batch", "100%",
        ])
        .expect_code(0);
    fleet.wait_all_serve("1.0.0", Duration::from_secs(20));
    let before = state_of(&fleet);
    assert_eq!(
        before["deployments"].as_array().map(Vec::len),
        Some(1),
        "{before:#}"
    );
    assert_eq!(
        before["hosts"].as_array().map(Vec::len),
        Some(2),
        "{before:#}"
    );
    assert!(
        before["releases"].to_string().contains("1.1.0"),
        "{before:#}"
    );
    assert!(
        before["history"].to_string().contains("1.0.0"),
        "{before:#}"
    );

    let config = fleet.config_dir().join("controller.toml");
    let backup = fleet.dir().join("backups").join("fleet.tar.gz");
    std::fs::create_dir_all(backup.parent().unwrap()).unwrap();
    let taken = fleet_controller(&fleet, &[&"backup", &"--config", &config, &"--to", &backup]);
    assert_eq!(taken.code, 0, "backup failed:\n{}", taken.stderr);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&backup).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the backup holds the CA key");
    }
    // A second backup to the same path is refused; the first stays.
    let again = fleet_controller(&fleet, &[&"backup", &"--config", &config, &"--to", &backup]);
    assert_eq!(again.code, 2, "{}", again.stderr);
    assert!(
        again.stderr.contains("choose a new name"),
        "{}",
        again.stderr
    );

    // The controller and its data are gone.
    fleet.stop_controller(Duration::from_secs(20));
    let restored_data = fleet.dir().join("restored-data");
    let restored_config = fleet.dir().join("restored-config");
    let restored = fleet_controller(
        &fleet,
        &[
            &"restore",
            &"--from",
            &backup,
            &"--data-dir",
            &restored_data,
            &"--config-dir",
            &restored_config,
        ],
    );
    assert_eq!(restored.code, 0, "restore failed:\n{}", restored.stderr);
    for name in ["ca.pem", "ca.key", "controller.pem", "controller.key"] {
        assert_eq!(
            std::fs::read(restored_config.join(name)).unwrap(),
            std::fs::read(fleet.config_dir().join(name)).unwrap(),
            "{name} comes back as it was"
        );
    }
    // Restoring over the restored data is refused, and leaves it alone.
    let over = fleet_controller(
        &fleet,
        &[
            &"restore",
            &"--from",
            &backup,
            &"--data-dir",
            &restored_data,
        ],
    );
    assert_eq!(over.code, 2, "{}", over.stderr);
    assert!(over.stderr.contains("is not empty"), "{}", over.stderr);

    // The same config, its data_dir pointed at the restored data.
    point_data_dir_at(&config, &restored_data);
    fleet.restart_controller();
    fleet.wait_hosts_ready(2);
    let after = state_of(&fleet);
    assert_eq!(
        after, before,
        "the restored controller shows the same fleet"
    );
    let events = fleet.ctl(&["events", "--limit", "200"]).expect_code(0);
    assert!(
        events.stdout.contains("store.exported"),
        "the backup is in the event log it copied:\n{}",
        events.stdout
    );

    // The restored fleet deploys.
    fleet
        .ctl(&[
            "rollout", "web", "1.1.0", "--canary", "1", "--batch", "100%",
        ])
        .expect_code(0);
    fleet.wait_all_serve("1.1.0", Duration::from_secs(20));
}

fn point_data_dir_at(config: &Path, data_dir: &Path) {
    let text = std::fs::read_to_string(config).unwrap();
    let lines: Vec<String> = text
        .lines()
        .map(|line| {
            if line.trim_start().starts_with("data_dir") {
                format!(
                    "data_dir = {}",
                    toml_string(&data_dir.display().to_string())
                )
            } else {
                line.to_string()
            }
        })
        .collect();
    std::fs::write(config, lines.join("\n") + "\n").unwrap();
}

fn toml_string(text: &str) -> String {
    serde_json::to_string(text).unwrap()
}
