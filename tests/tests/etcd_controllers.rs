//! User story: a fleet made with `fleetctl init --etcd URL` keeps its state in etcd; a second
//! controller started on the same config directory and CA with `--data-dir`, `--listen` and
//! `--http-listen` of its own writes its address file in its own data directory and serves the
//! same records (a release created through the first, once it sees the second, is listed by
//! the second); a third started
//! on the first one's data directory is refused with a message that says what to do.
//! (Without leader election both would run rollouts; this test only reads through the second.)

use fleet_tests::etcd::Etcd;
use fleet_tests::fleet::Fleet;
use fleet_tests::process::{run_with_deadline, ChildGuard};
use fleet_tests::{wait_for, wait_until};
use std::process::Command;
use std::time::Duration;

#[test]
fn two_controllers_share_one_fleet_in_etcd_and_a_shared_data_directory_is_refused() {
    let Some(etcd) = Etcd::single() else {
        return;
    };
    let url = etcd.urls().join(",");
    let fleet = Fleet::start_with_init_args(1, &["--etcd", &url, "--etcd-prefix", "/two"]);
    assert!(
        fleet.controller_log().contains("store: etcd at"),
        "{}",
        fleet.controller_log()
    );
    assert!(
        !fleet.controller_data_dir().join("fleet.redb").exists(),
        "a controller on etcd keeps no redb store"
    );

    let config = fleet.config_dir().join("controller.toml");
    let second_data = fleet.dir().join("second-data");
    let mut command = Command::new(&fleet.bins.controller);
    command
        .arg("--config")
        .arg(&config)
        .args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(&second_data)
        .current_dir(fleet.dir());
    let log = fleet.dir().join("logs/second-controller.log");
    let mut second = ChildGuard::spawn("second fleet-controller", command, &log);
    let addr = wait_for(
        Duration::from_secs(30),
        "the second controller to write its address in its own data directory",
        || {
            assert!(
                !second.has_exited(),
                "the second controller exited: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            let text = std::fs::read_to_string(second_data.join("controller.addr")).ok()?;
            text.trim().parse::<std::net::SocketAddr>().ok()
        },
    );
    assert_ne!(fleet.controller_url(), format!("https://{addr}"));
    // A release is acknowledged once two controllers hold it (`etcd_replicas.rs`): created
    // once the first controller, leading, lists the second.
    wait_until(
        Duration::from_secs(30),
        "the first controller to lead and list the second",
        || {
            let out = fleet.ctl(&["controllers"]);
            let controllers = out.json["controllers"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            out.code == 0
                && controllers.len() == 2
                && controllers
                    .iter()
                    .any(|c| c["url"] == fleet.controller_url() && c["leader"] == true)
        },
    );
    fleet.create_web_releases(&["1.0.0"]);
    let releases = fleet
        .ctl_in(
            &fleet.config_dir(),
            &[
                "--controller",
                &format!("https://{addr}"),
                "releases",
                "web",
            ],
        )
        .expect_code(0)
        .json;
    assert!(
        releases.to_string().contains("1.0.0"),
        "the second controller lists the release made through the first: {releases:#}"
    );

    // A third on the first one's data directory (no --data-dir): refused, says what to do.
    let mut third = Command::new(&fleet.bins.controller);
    third
        .arg("--config")
        .arg(&config)
        .args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .current_dir(fleet.dir());
    let refused = run_with_deadline(third, Duration::from_secs(30));
    assert_ne!(refused.code, 0);
    assert!(
        refused
            .stderr
            .contains("is in use by another fleet-controller (pid")
            && refused.stderr.contains("--data-dir DIR"),
        "{}",
        refused.stderr
    );
    second.kill_now();
    drop(fleet);
    drop(etcd);
}
