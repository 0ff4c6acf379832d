//! User story: the controller is SIGKILLed in the middle of a rollout (held after its canary by
//! `--pause-after-canary`) and started again on the same data directory: the rollout is still
//! known, and after a resume it completes and every host serves the new version.

use fleet_tests::fleet::Fleet;
use fleet_tests::wait_for;
use std::time::Duration;

#[test]
fn a_rollout_survives_a_controller_crash() {
    let mut fleet = Fleet::start(3);
    fleet.create_web_releases(&["1.0.0", "1.1.0"]);
    fleet
        .ctl(&[
            "rollout", "web", "1.0.0", "--canary", "1", "--batch", "100%",
        ])
        .expect_code(0);
    fleet.wait_all_serve("1.0.0", Duration::from_secs(10));

    let started = fleet
        .ctl(&[
            "rollout",
            "web",
            "1.1.0",
            "--canary",
            "1",
            "--batch",
            "100%",
            "--pause-after-canary",
            "30s",
            "--detach",
        ])
        .expect_code(0)
        .json;
    let id = started["id"].as_str().expect("a rollout id").to_string();
    wait_for(
        Duration::from_secs(20),
        "the canary to pass and the rollout to pause",
        || {
            let rollout = fleet.ctl_ok(&["rollout", "status", &id]);
            (rollout["state"] == "paused" || rollout["waves"][0]["state"] == "passed").then_some(())
        },
    );

    fleet.kill_controller();
    fleet.restart_controller();
    fleet.wait_hosts_ready(3);

    let known = fleet.ctl(&["rollout", "status", &id]).expect_code(0).json;
    assert_eq!(known["id"], id.as_str());
    let state = known["state"].as_str().unwrap_or("");
    eprintln!("rollout {id} after the controller restart: {state}");
    assert!(
        ["running", "paused", "succeeded"].contains(&state),
        "the rollout record survives the crash, got state {state:?}: {known:#}"
    );
    if state == "paused" {
        fleet.ctl(&["rollout", "resume", &id]).expect_code(0);
    }
    let finished = fleet.wait_rollout_ends(&id, Duration::from_secs(25));
    assert_eq!(finished["state"], "succeeded", "{finished:#}");
    fleet.wait_all_serve("1.1.0", Duration::from_secs(10));
}
