//! User story: the controller is SIGKILLed in the middle of a rollout, while it holds after its
//! canary (`--pause-after-canary`), and started again on the same data directory: the rollout
//! is still known, the rest of the canary pause is still honoured (the other hosts keep the old
//! version until it is over), and then the rollout completes and every host serves the new
//! version.

use fleet_tests::fleet::Fleet;
use fleet_tests::{http, wait_for};
use serde_json::Value;
use std::time::Duration;

const PAUSE_MS: i64 = 10_000;

/// Starts `rollout web 1.1.0 --canary 1 --batch 100% --pause-after-canary PAUSE --detach` and
/// waits until the canary passed and the pause began; the started rollout and the pause's end.
fn roll_out_1_1_0_and_wait_for_the_canary_pause(fleet: &Fleet, pause: &str) -> (Value, i64) {
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
            pause,
            "--detach",
        ])
        .expect_code(0)
        .json;
    let id = started["id"].as_str().expect("a rollout id").to_string();
    let hold_until = wait_for(
        Duration::from_secs(20),
        "the canary to pass and the canary pause to begin",
        || {
            let rollout = fleet.ctl_ok(&["rollout", "status", &id]);
            rollout["hold_until_unix_ms"]
                .as_i64()
                .filter(|&until| until > 0)
        },
    );
    (started, hold_until)
}

#[test]
fn a_rollout_survives_a_controller_crash_and_keeps_its_canary_pause() {
    let mut fleet = Fleet::start(3);
    fleet.create_web_releases(&["1.0.0", "1.1.0"]);
    fleet
        .ctl(&[
            "rollout", "web", "1.0.0", "--canary", "1", "--batch", "100%",
        ])
        .expect_code(0);
    fleet.wait_all_serve("1.0.0", Duration::from_secs(10));

    let (started, hold_until) =
        roll_out_1_1_0_and_wait_for_the_canary_pause(&fleet, &format!("{}s", PAUSE_MS / 1000));
    let id = started["id"].as_str().expect("a rollout id").to_string();
    let canary = started["waves"][0]["hosts"][0]["host"]
        .as_str()
        .expect("the canary host")
        .to_string();
    let others: Vec<_> = fleet
        .agents()
        .iter()
        .filter(|agent| agent.name != canary)
        .map(|agent| (agent.name.clone(), agent.advertise.clone()))
        .collect();
    assert_eq!(others.len(), 2, "{started:#}");

    fleet.kill_controller();
    fleet.restart_controller();
    fleet.wait_hosts_ready(3);

    let known = fleet.ctl(&["rollout", "status", &id]).expect_code(0).json;
    assert_eq!(known["id"], id.as_str());
    assert_eq!(
        known["hold_until_unix_ms"].as_i64(),
        Some(hold_until),
        "the pause's end survives the crash: {known:#}"
    );
    // Still inside the pause: the other hosts have not been touched.
    if fleet_proto::now_unix_ms() < hold_until - 1_000 {
        for (name, addr) in &others {
            assert_eq!(
                http::get_ok(addr, "/"),
                Some(format!("web 1.0.0 on {name}\n")),
                "{name} must keep 1.0.0 during the canary pause"
            );
        }
    }

    let finished = fleet.wait_rollout_ends(&id, Duration::from_secs(40));
    assert_eq!(finished["state"], "succeeded", "{finished:#}");
    let finished_at = finished["finished_unix_ms"].as_i64().unwrap_or(0);
    assert!(
        finished_at >= hold_until,
        "the rollout widened at {finished_at}, before its canary pause ended at {hold_until}"
    );
    fleet.wait_all_serve("1.1.0", Duration::from_secs(10));
}

/// User story: the controller is asked to stop (SIGTERM, as systemd does) while a rollout holds
/// after its canary. It exits 0 within its shutdown grace, saying the rollout stops where it
/// stands rather than dropping it, and the next start completes the rollout.
#[test]
fn a_controller_asked_to_stop_mid_rollout_stops_its_rollout_within_the_grace() {
    let mut fleet = Fleet::start(2);
    fleet.create_web_releases(&["1.0.0", "1.1.0"]);
    fleet
        .ctl(&["rollout", "web", "1.0.0", "--batch", "100%"])
        .expect_code(0);
    let (started, _) = roll_out_1_1_0_and_wait_for_the_canary_pause(&fleet, "4s");
    let id = started["id"].as_str().expect("a rollout id").to_string();

    // The grace is 5 s; a controller that waited on its executors to the end would take the
    // whole pause and more.
    let status = fleet
        .stop_controller(Duration::from_secs(8))
        .expect("the controller exits within its shutdown grace");
    assert!(status.success(), "the controller exited with {status}");
    let log = fleet.controller_log();
    assert!(
        log.contains(&format!("rollout {id} stops here")),
        "the executor must be stopped, not dropped with the runtime; log:\n{log}"
    );
    assert!(!log.contains("did not stop within"), "{log}");

    fleet.restart_controller();
    fleet.wait_hosts_ready(2);
    let finished = fleet.wait_rollout_ends(&id, Duration::from_secs(40));
    assert_eq!(finished["state"], "succeeded", "{finished:#}");
    fleet.wait_all_serve("1.1.0", Duration::from_secs(10));
}
