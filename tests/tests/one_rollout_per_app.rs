//! User story: while a rollout of an app is under way, a second one (or a rollback) is refused
//! with exit 2 and a message naming the running rollout; once that one is aborted, a new
//! rollout goes through.

use fleet_tests::fleet::{is_end_state, Fleet};
use fleet_tests::wait_until;
use std::time::Duration;

#[test]
fn a_second_rollout_of_the_same_app_is_refused() {
    let fleet = Fleet::start(2);
    fleet.create_web_releases(&["1.0.0", "1.1.0", "1.2.0"]);
    fleet.ctl(&["rollout", "web", "1.0.0"]).expect_code(0);

    let running = fleet
        .ctl(&[
            "rollout",
            "web",
            "1.1.0",
            "--canary",
            "1",
            "--pause-after-canary",
            "30s",
            "--detach",
        ])
        .expect_code(0)
        .json;
    let id = running["id"].as_str().expect("a rollout id").to_string();
    assert!(
        !is_end_state(running["state"].as_str().unwrap_or("")),
        "{running:#}"
    );

    let refused = fleet.ctl(&["rollout", "web", "1.2.0"]).expect_code(2);
    assert!(
        refused.stderr.contains(&id),
        "the refusal should name the running rollout {id}: {}",
        refused.stderr
    );
    let refused = fleet
        .ctl(&["rollback", "web", "--to", "1.0.0"])
        .expect_code(2);
    assert!(refused.stderr.contains(&id), "{}", refused.stderr);

    let aborted = fleet.ctl(&["rollout", "abort", &id]).expect_code(0).json;
    wait_until(
        Duration::from_secs(20),
        "the aborted rollout to end",
        || {
            let rollout = fleet.ctl_ok(&["rollout", "status", &id]);
            rollout["state"] == "aborted"
        },
    );
    assert_eq!(aborted["id"], id.as_str());

    fleet.ctl(&["rollout", "web", "1.2.0"]).expect_code(0);
    fleet.wait_all_serve("1.2.0", Duration::from_secs(10));
}
