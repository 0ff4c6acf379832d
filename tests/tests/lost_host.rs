//! User story: an agent freezes (SIGSTOP), so its heartbeats stop. The controller marks the
//! host lost while its app keeps serving the last release; a rollout that meets the lost host
//! halts with a message naming it, and with `--skip-lost` goes on without it; when the agent
//! wakes up (SIGCONT) the host is ready again.

use fleet_tests::fleet::Fleet;
use fleet_tests::wait_until;
use std::time::Duration;

/// Heartbeats every 200 ms, lost after 1.5 s of silence, so the test runs in seconds.
const FAST_LOST: &str = "heartbeat_interval_ms = 200\nlost_after_ms = 1500";

fn state_of(fleet: &Fleet, name: &str) -> String {
    let hosts = fleet.ctl_ok(&["hosts"]);
    hosts["hosts"]
        .as_array()
        .and_then(|hosts| hosts.iter().find(|h| h["name"] == name))
        .and_then(|h| h["state"].as_str())
        .unwrap_or("")
        .to_string()
}

#[test]
fn a_lost_host_halts_a_rollout_unless_skipped_and_comes_back() {
    let fleet = Fleet::start_with_controller_config(3, FAST_LOST);
    fleet.create_web_releases(&["1.0.0", "1.1.0"]);
    fleet
        .ctl(&["rollout", "web", "1.0.0", "--batch", "100%"])
        .expect_code(0);

    fleet.pause_agent("h3", true);
    wait_until(Duration::from_secs(15), "h3 to be marked lost", || {
        state_of(&fleet, "h3") == "lost"
    });
    assert_eq!(
        fleet.web_get("h3", "/").as_deref(),
        Some("web 1.0.0 on h3\n"),
        "an agent cut off from the controller keeps its last release running"
    );

    // Without --skip-lost the rollout halts on the lost host, with a message that names it.
    let halted = fleet
        .ctl(&[
            "rollout", "web", "1.1.0", "--canary", "1", "--batch", "100%",
        ])
        .expect_code(1);
    let message = halted.json["message"].as_str().unwrap_or("");
    assert!(
        message.contains("h3") && message.contains("lost") && message.contains("--skip-lost"),
        "{:#}",
        halted.json
    );
    let h2 = halted.json["waves"][1]["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == "h2")
        .expect("h2 is in the wave with h3");
    assert_eq!(
        h2["result"], "pending",
        "nothing of a wave with a lost host is deployed: {:#}",
        halted.json
    );
    fleet.wait_all_serve_except("1.0.0", &["h3"], Duration::from_secs(15));

    // With --skip-lost it goes on without h3.
    let done = fleet
        .ctl(&[
            "rollout",
            "web",
            "1.1.0",
            "--canary",
            "1",
            "--batch",
            "100%",
            "--skip-lost",
        ])
        .expect_code(0)
        .json;
    let h3 = done["waves"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|w| w["hosts"].as_array().unwrap())
        .find(|h| h["host"] == "h3")
        .expect("h3 is in the plan");
    assert_eq!(h3["result"], "skipped", "{done:#}");
    for name in ["h1", "h2"] {
        assert_eq!(
            fleet.web_get(name, "/").as_deref(),
            Some(format!("web 1.1.0 on {name}\n").as_str())
        );
    }
    assert_eq!(
        fleet.web_get("h3", "/").as_deref(),
        Some("web 1.0.0 on h3\n")
    );

    fleet.pause_agent("h3", false);
    fleet.wait_hosts_ready(3);
}
