//! User story: a team started with one controller on its embedded store, ran rollouts, and
//! moves the fleet's state into etcd with `fleet-controller migrate --to-etcd`: after adding
//! the `[etcd]` table migrate prints to controller.toml, the controller starts on etcd (the redb
//! file moved away, so every record shown comes from etcd), `fleetctl history`, `hosts`,
//! `releases` and `deployments` show what they showed before, and a new rollout works. Running
//! migrate again is refused as "already migrated".

use fleet_tests::etcd::Etcd;
use fleet_tests::fleet::Fleet;
use serde_json::Value;
use std::time::Duration;

const COMMAND_DEADLINE: Duration = Duration::from_secs(60);

/// What the read verbs show that a migrate must keep.
fn state_of(fleet: &Fleet) -> Value {
    let hosts: Vec<Value> = fleet.ctl_ok(&["hosts"])["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .map(|h| serde_json::json!({ "name": h["name"], "labels": h["labels"] }))
        .collect();
    serde_json::json!({
        "hosts": hosts,
        "releases": fleet.ctl_ok(&["releases", "web"]),
        "history": fleet.ctl_ok(&["history", "web"]),
        "deployments": fleet.ctl_ok(&["deployments"]),
    })
}

#[test]
fn a_redb_fleet_with_history_moves_into_etcd_and_keeps_deploying() {
    let Some(etcd) = Etcd::single() else {
        return;
    };
    let mut fleet = Fleet::start(2);
    fleet.create_web_releases(&["1.0.0", "1.1.0"]);
    fleet
        .ctl(&[
            "rollout", "web", "1.0.0", "--canary", "1", "--batch", "100%",
        ])
        .expect_code(0);
    fleet.wait_all_serve("1.0.0", Duration::from_secs(20));
    let before = state_of(&fleet);
    assert!(
        before["history"].to_string().contains("1.0.0"),
        "{before:#}"
    );
    assert_eq!(before["hosts"].as_array().map(Vec::len), Some(2));

    let config = fleet.config_dir().join("controller.toml");
    let config_arg = config.display().to_string();
    let url = etcd.urls().join(",");
    let migrate = ["migrate", "--config", &config_arg, "--to-etcd", &url];

    // The store is in use while the controller runs.
    let refused = fleet.controller_command(&migrate, COMMAND_DEADLINE);
    assert_eq!(refused.code, 1, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("stop the fleet-controller first"),
        "{}",
        refused.stderr
    );

    fleet.stop_controller(Duration::from_secs(20));
    let migrated = fleet.controller_command(&migrate, COMMAND_DEADLINE);
    assert_eq!(migrated.code, 0, "migrate failed:\n{}", migrated.stderr);
    let table = migrated
        .stdout
        .split_once("\n\n[etcd]")
        .map(|(_, table)| format!("[etcd]{table}"))
        .unwrap_or_else(|| panic!("no [etcd] table in:\n{}", migrated.stdout));
    assert!(table.contains(&url), "{table}");

    // Again: refused, nothing changed.
    let again = fleet.controller_command(&migrate, COMMAND_DEADLINE);
    assert_eq!(again.code, 1, "{}", again.stdout);
    assert!(again.stderr.contains("it was migrated"), "{}", again.stderr);

    // The redb file goes away: whatever the controller shows now comes from etcd.
    let store_file = fleet.controller_data_dir().join("fleet.redb");
    std::fs::rename(&store_file, store_file.with_extension("redb.migrated")).unwrap();
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{text}\n{table}")).unwrap();
    fleet.restart_controller();
    fleet.wait_hosts_ready(2);
    assert!(
        fleet.controller_log().contains("store: etcd at"),
        "{}",
        fleet.controller_log()
    );
    assert!(!store_file.exists(), "the controller made a new redb store");
    let after = state_of(&fleet);
    assert_eq!(after, before, "what the fleet showed before the migrate");

    fleet
        .ctl(&[
            "rollout", "web", "1.1.0", "--canary", "1", "--batch", "100%",
        ])
        .expect_code(0);
    fleet.wait_all_serve("1.1.0", Duration::from_secs(20));
    let history = fleet.ctl_ok(&["history", "web"]).to_string();
    assert!(
        history.contains("1.1.0") && history.contains("1.0.0"),
        "{history}"
    );
    drop(fleet);
    drop(etcd);
}
