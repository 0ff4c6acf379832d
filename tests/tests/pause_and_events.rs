//! User story: an operator pauses a rollout while its canary bakes, sees it stop before the next
//! wave, and resumes it; meanwhile `fleetctl events --follow` shows each change as it happens.

use fleet_tests::fleet::Fleet;
use fleet_tests::process::ChildGuard;
use fleet_tests::wait_until;
use std::process::Command;
use std::time::Duration;

#[test]
fn a_paused_rollout_stops_before_its_next_wave_and_events_follow_it_live() {
    let fleet = Fleet::start(3);
    fleet.create_web_releases(&["1.0.0"]);

    // Follow the event log from now on, as an operator's second terminal would.
    let log = fleet.dir().join("logs/events-follow.log");
    let mut follow = Command::new(&fleet.bins.fleetctl);
    follow
        .arg("--config-dir")
        .arg(fleet.config_dir())
        .args(["--controller", &fleet.controller_url(), "--output", "json"])
        .args(["events", "--follow", "--limit", "1"])
        .env("HOME", fleet.dir());
    let _follow = ChildGuard::spawn("fleetctl events --follow", follow, &log);

    let started = fleet
        .ctl(&[
            "rollout",
            "web",
            "1.0.0",
            "--canary",
            "1",
            "--batch",
            "1",
            "--pause-after-canary",
            "2s",
            "--detach",
        ])
        .expect_code(0)
        .json;
    let id = started["id"].as_str().expect("a rollout id").to_string();
    let paused = fleet.ctl(&["rollout", "pause", &id]).expect_code(0).json;
    assert_eq!(paused["id"], id.as_str());

    // The canary wave finishes, the bake time runs out, and the rollout stops there.
    wait_until(Duration::from_secs(20), "the rollout to be paused", || {
        fleet.ctl_ok(&["rollout", "status", &id])["state"] == "paused"
    });
    let status = fleet.ctl_ok(&["rollout", "status", &id]);
    assert_eq!(status["waves"][0]["state"], "passed", "{status:#}");
    assert_eq!(status["waves"][1]["state"], "pending", "{status:#}");
    assert_eq!(
        fleet.web_get("h2", "/"),
        None,
        "no host past the canary took it while paused"
    );

    fleet.ctl(&["rollout", "resume", &id]).expect_code(0);
    let done = fleet.wait_rollout_ends(&id, Duration::from_secs(30));
    assert_eq!(done["state"], "succeeded", "{done:#}");
    fleet.wait_all_serve("1.0.0", Duration::from_secs(10));

    // The follower printed the changes as they happened, one JSON event per line.
    wait_until(
        Duration::from_secs(10),
        "events --follow to show the rollout's end",
        || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            [
                "rollout.started",
                "rollout.paused",
                "rollout.resumed",
                "rollout.succeeded",
            ]
            .iter()
            .all(|kind| text.contains(kind))
        },
    );
}
