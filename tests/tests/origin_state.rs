//! User story: every start of an instance begins from the pristine release. The example app
//! writes `scratch.txt` at start and says "dirty" when it found one; it must say "fresh" after
//! the first start, after a redeploy, after a rollback to a release that ran before, and after
//! the agent restarts a SIGKILLed instance (which `status` counts as a restart). What it keeps
//! in `FLEET_STATE_DIR` survives all of these.

use fleet_tests::fleet::Fleet;
use fleet_tests::process::signal_pid;
use fleet_tests::wait_for;
use nix::sys::signal::Signal;
use std::time::Duration;

#[test]
fn every_start_begins_from_origin_state() {
    let fleet = Fleet::start(1);
    fleet.create_web_releases(&["1.0.0", "1.1.0"]);

    fleet.ctl(&["rollout", "web", "1.0.0"]).expect_code(0);
    fleet.wait_all_serve("1.0.0", Duration::from_secs(10));
    assert_eq!(fleet.web_get("h1", "/origin").as_deref(), Some("fresh\n"));
    let first_pid = fleet.web_pid("h1").unwrap();

    // A redeploy: a new version starts from its own pristine copy.
    fleet.ctl(&["rollout", "web", "1.1.0"]).expect_code(0);
    fleet.wait_all_serve("1.1.0", Duration::from_secs(10));
    assert_eq!(fleet.web_get("h1", "/origin").as_deref(), Some("fresh\n"));
    let second_pid = fleet.web_pid("h1").unwrap();
    assert_ne!(first_pid, second_pid);

    // A rollback to 1.0.0, whose earlier instance wrote scratch.txt: fresh again.
    let rollback = fleet.ctl(&["rollback", "web"]).expect_code(0).json;
    assert_eq!(rollback["version"], "1.0.0", "{rollback:#}");
    fleet.wait_all_serve("1.0.0", Duration::from_secs(10));
    assert_eq!(fleet.web_get("h1", "/origin").as_deref(), Some("fresh\n"));
    let third_pid = fleet.web_pid("h1").unwrap();

    // SIGKILL the instance: the agent starts a new one, from origin state.
    signal_pid(third_pid, Signal::SIGKILL);
    let fourth_pid = wait_for(
        Duration::from_secs(20),
        "the agent to restart the killed instance",
        || fleet.web_pid("h1").filter(|pid| *pid != third_pid),
    );
    assert_ne!(fourth_pid, third_pid);
    assert_eq!(fleet.web_get("h1", "/origin").as_deref(), Some("fresh\n"));
    assert_eq!(
        fleet.web_get("h1", "/").as_deref(),
        Some("web 1.0.0 on h1\n")
    );
    let actual = wait_for(
        Duration::from_secs(10),
        "status to show the restarted instance running",
        || {
            let status = fleet.status("web");
            let actual = Fleet::actual_of(&status, "h1", "web")?.clone();
            (actual["state"] == "running" && actual["restarts"].as_u64().unwrap_or(0) >= 1)
                .then_some(actual)
        },
    );
    assert_eq!(actual["version"], "1.0.0", "{actual:#}");
    // What the app keeps in FLEET_STATE_DIR outlives origin state: four starts (two releases,
    // a rollback, a restart after a crash) all counted there.
    assert_eq!(fleet.web_get("h1", "/starts").as_deref(), Some("4\n"));
}
