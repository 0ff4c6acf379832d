//! The systemd units in `packaging/systemd/` are valid: `systemd-analyze verify` accepts them
//! (no unknown keys, executables that exist) once templated the way `fleetctl bootstrap` and an
//! operator install them. Skipped, saying why, where systemd-analyze does not exist.

use fleet_tests::bins::Bins;
use fleet_tests::process;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn packaging_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("packaging")
        .join("systemd")
}

fn find_systemd_analyze() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("systemd-analyze"))
        .find(|candidate| candidate.is_file())
}

#[test]
fn the_systemd_units_pass_systemd_analyze_verify() {
    let Some(analyze) = find_systemd_analyze() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "systemd-analyze is missing under CI: scripts/test.sh installs systemd"
        );
        eprintln!("skipping: systemd-analyze is not installed on this machine");
        return;
    };
    let bins = Bins::locate();
    let dir = tempfile::tempdir().expect("a temp dir");

    // The agent unit as bootstrap installs it: @REMOTE_DIR@ is the remote dir, which holds
    // bin/fleet-agent.
    let remote_dir = dir.path().join("opt-fleet");
    std::fs::create_dir_all(remote_dir.join("bin")).unwrap();
    std::os::unix::fs::symlink(&bins.agent, remote_dir.join("bin/fleet-agent")).unwrap();
    let agent_template =
        std::fs::read_to_string(packaging_dir().join("fleet-agent.service")).unwrap();
    assert!(agent_template.contains("@REMOTE_DIR@"));
    let agent_unit = agent_template.replace("@REMOTE_DIR@", &remote_dir.display().to_string());

    // The controller unit with its binary where this build put it.
    let controller_template =
        std::fs::read_to_string(packaging_dir().join("fleet-controller.service")).unwrap();
    assert!(controller_template.contains("/usr/local/bin/fleet-controller"));
    let controller_unit = controller_template.replace(
        "/usr/local/bin/fleet-controller",
        &bins.controller.display().to_string(),
    );

    let agent_path = dir.path().join("fleet-agent.service");
    let controller_path = dir.path().join("fleet-controller.service");
    std::fs::write(&agent_path, agent_unit).unwrap();
    std::fs::write(&controller_path, controller_unit).unwrap();

    let mut command = Command::new(analyze);
    command.arg("verify").arg(&agent_path).arg(&controller_path);
    let finished = process::run_with_deadline(command, Duration::from_secs(60));
    // Warnings about the units (an unknown key, say) go to stderr with exit 0: none allowed.
    let about_ours: Vec<&str> = finished
        .stderr
        .lines()
        .filter(|line| line.contains("fleet-agent") || line.contains("fleet-controller"))
        .collect();
    assert!(
        finished.code == 0 && about_ours.is_empty(),
        "systemd-analyze verify refused the units (exit {}):\n{}",
        finished.code,
        finished.stderr
    );

    // The hardening the units promise is there.
    for (unit, keys) in [
        (
            &agent_path,
            &[
                "NoNewPrivileges=yes",
                "ProtectSystem=strict",
                "PrivateTmp=yes",
                "Restart=on-failure",
                // A removed host's agent exits with this and is not restarted; it disables the
                // unit it names.
                "RestartPreventExitStatus=78",
                "Environment=FLEET_AGENT_UNIT=%n",
                // READY=1 once its session is up (tests/tests/systemd_notify.rs).
                "Type=notify",
                "TimeoutStartSec=infinity",
            ][..],
        ),
        (
            &controller_path,
            &[
                "NoNewPrivileges=yes",
                "ProtectSystem=strict",
                "PrivateTmp=yes",
                "Restart=on-failure",
                "DynamicUser=yes",
                // READY=1 once it listens (tests/tests/systemd_notify.rs).
                "Type=notify",
            ][..],
        ),
    ] {
        let text = std::fs::read_to_string(unit).unwrap();
        for key in keys {
            assert!(
                text.lines().any(|l| l.trim() == *key),
                "{} lacks {key}",
                unit.display()
            );
        }
    }
    let agent_text = std::fs::read_to_string(&agent_path).unwrap();
    assert!(agent_text.contains(&format!(
        "RestartPreventExitStatus={}",
        fleet_agent::removal::EXIT_REVOKED
    )));
    assert!(agent_text.contains(&format!("ReadWritePaths={}", remote_dir.display())));
}
