//! User story: on-call drains a sick host. Its instance stops gracefully and the host reports
//! drained only when the process is gone; a rollout meanwhile leaves it out and says so;
//! undrain brings it back on the current release of its deployment; remove forgets a host for
//! good.

use fleet_tests::fleet::Fleet;
use fleet_tests::process::pid_is_alive;
use fleet_tests::wait_until;
use std::time::Duration;

fn host_state(fleet: &Fleet, name: &str) -> Option<String> {
    let hosts = fleet.ctl_ok(&["hosts"]);
    hosts["hosts"]
        .as_array()?
        .iter()
        .find(|h| h["name"] == name)
        .and_then(|h| h["state"].as_str().map(str::to_string))
}

#[test]
fn drain_undrain_and_remove_with_a_rollout_in_between() {
    let fleet = Fleet::start(3);
    fleet.create_web_releases(&["1.0.0", "1.1.0"]);
    fleet
        .ctl(&["rollout", "web", "1.0.0", "--batch", "100%"])
        .expect_code(0);
    fleet.wait_all_serve("1.0.0", Duration::from_secs(10));
    let h2_pid = fleet.web_pid("h2").expect("h2 serves its pid");

    // Drain: the command returns only once the instance's process is gone.
    let drained = fleet
        .ctl(&["drain", "h2", "--deadline", "30s"])
        .expect_code(0)
        .json;
    assert_eq!(drained["state"], "drained", "{drained:#}");
    assert!(
        !pid_is_alive(h2_pid),
        "h2's instance (pid {h2_pid}) must be gone once drained"
    );
    assert_eq!(
        fleet.web_get("h2", "/"),
        None,
        "a drained host serves nothing"
    );
    assert_eq!(host_state(&fleet, "h2").as_deref(), Some("drained"));

    // A rollout leaves the drained host out and says so.
    let out = fleet
        .ctl(&[
            "rollout", "web", "1.1.0", "--canary", "1", "--batch", "100%",
        ])
        .expect_code(0);
    let planned: Vec<&str> = out.json["waves"]
        .as_array()
        .expect("waves")
        .iter()
        .flat_map(|w| w["hosts"].as_array().unwrap())
        .map(|h| h["host"].as_str().unwrap())
        .collect();
    assert_eq!(planned, vec!["h1", "h3"], "{:#}", out.json);
    assert!(
        out.stderr.contains("drained: h2"),
        "the plan names the drained host: {}",
        out.stderr
    );
    for name in ["h1", "h3"] {
        assert_eq!(
            fleet.web_get(name, "/").as_deref(),
            Some(format!("web 1.1.0 on {name}\n").as_str())
        );
    }
    assert_eq!(
        fleet.web_get("h2", "/"),
        None,
        "the drained host took nothing"
    );

    // Undrain: the rollout left it out, and it comes back on the deployment's current release
    // (1.1.0), not the one it ran before.
    let undrained = fleet.ctl(&["undrain", "h2"]).expect_code(0).json;
    assert_eq!(undrained["name"], "h2");
    wait_until(Duration::from_secs(15), "h2 to serve 1.1.0", || {
        fleet.web_get("h2", "/").as_deref() == Some("web 1.1.0 on h2\n")
    });
    assert_eq!(fleet.web_get("h2", "/origin").as_deref(), Some("fresh\n"));
    assert_eq!(host_state(&fleet, "h2").as_deref(), Some("ready"));

    // Remove: drained, then forgotten.
    let h3_pid = fleet.web_pid("h3").expect("h3 serves its pid");
    fleet.ctl(&["remove", "h3"]).expect_code(0);
    assert!(
        !pid_is_alive(h3_pid),
        "h3's instance must be stopped by remove"
    );
    assert_eq!(
        host_state(&fleet, "h3"),
        None,
        "a removed host is forgotten"
    );
    // Its certificate is revoked: the agent, still running, is refused when it reconnects and
    // the host never comes back.
    let log = fleet.dir().join("logs/agent-h3.log");
    wait_until(
        Duration::from_secs(20),
        "h3's agent to be refused as revoked",
        || std::fs::read_to_string(&log).is_ok_and(|text| text.contains("revoked")),
    );
    assert_eq!(
        host_state(&fleet, "h3"),
        None,
        "a revoked host does not re-register"
    );

    // Unknown hosts are a clear usage error.
    let out = fleet.ctl(&["drain", "nope"]).expect_code(2);
    assert!(out.stderr.contains("no host nope"), "{}", out.stderr);
}
