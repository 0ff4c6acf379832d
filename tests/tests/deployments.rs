//! User story: the fleet's state stays true between rollouts. A completed rollout leaves a
//! standing deployment `(app, selector) -> release`; a host that joins later converges to it
//! by itself, as does a host whose labels move it to another deployment of the app (two
//! deployments side by side, staging and prod), and a host that no deployment selects any more
//! stops the app. `fleetctl deployments` shows them with their hosts, and `rollback` asks which
//! one when there are two.

use fleet_tests::fleet::Fleet;
use serde_json::Value;
use std::time::Duration;

fn serves(fleet: &Fleet, host: &str, version: &str) -> bool {
    fleet.web_get(host, "/").as_deref() == Some(format!("web {version} on {host}\n").as_str())
}

fn wait_serves(fleet: &Fleet, host: &str, version: &str) {
    fleet_tests::wait_until(
        Duration::from_secs(20),
        &format!("{host} to serve {version}"),
        || serves(fleet, host, version),
    );
}

fn deployment(list: &Value, selector: Value) -> &Value {
    list["deployments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["selector"] == selector)
        .unwrap_or_else(|| panic!("no deployment {selector}: {list:#}"))
}

#[test]
fn a_late_joiner_converges_to_the_deployment_without_a_rollout() {
    let mut fleet = Fleet::start(2);
    fleet.create_web_releases(&["1.0.0"]);
    fleet
        .ctl(&["rollout", "web", "1.0.0", "--batch", "100%"])
        .expect_code(0);
    fleet.start_agent("h3");
    wait_serves(&fleet, "h3", "1.0.0");
    let events = fleet.ctl(&["events"]).expect_code(0).json_lines();
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "host.converging" && e["host"] == "h3"),
        "the convergence is an event: {events:#?}"
    );
    let list = fleet.ctl_ok(&["deployments", "web"]);
    let d = deployment(&list, serde_json::json!({}));
    assert_eq!(d["version"], "1.0.0");
    fleet_tests::wait_until(Duration::from_secs(20), "3 healthy hosts", || {
        fleet.ctl_ok(&["deployments", "web"])["deployments"][0]["hosts_healthy"] == 3
    });
}

#[test]
fn two_deployments_side_by_side_and_hosts_that_change_labels() {
    let fleet = Fleet::start(3);
    fleet.create_web_releases(&["1.0.0", "2.0.0"]);
    fleet.ctl_ok(&["label", "h1", "env=staging"]);
    fleet.ctl_ok(&["label", "h2", "env=prod"]);
    fleet.ctl_ok(&["label", "h3", "env=prod"]);
    fleet
        .ctl(&["rollout", "web", "1.0.0", "--selector", "env=prod"])
        .expect_code(0);
    fleet
        .ctl(&["rollout", "web", "2.0.0", "--selector", "env=staging"])
        .expect_code(0);
    wait_serves(&fleet, "h1", "2.0.0");
    wait_serves(&fleet, "h2", "1.0.0");
    wait_serves(&fleet, "h3", "1.0.0");

    let list = fleet.ctl_ok(&["deployments", "web"]);
    assert_eq!(
        deployment(&list, serde_json::json!({"env": "prod"}))["version"],
        "1.0.0"
    );
    assert_eq!(
        deployment(&list, serde_json::json!({"env": "staging"}))["version"],
        "2.0.0"
    );
    // Which deployment to roll back is not guessed.
    let ambiguous = fleet.ctl(&["rollback", "web"]);
    assert_eq!(ambiguous.code, 2, "{ambiguous:?}");
    assert!(
        ambiguous.stderr.contains("--selector") && ambiguous.stderr.contains("env=staging"),
        "{}",
        ambiguous.stderr
    );

    // h3 moves to staging: it converges to staging's release by itself.
    fleet.ctl_ok(&["label", "h3", "env=staging"]);
    wait_serves(&fleet, "h3", "2.0.0");
    assert!(serves(&fleet, "h2", "1.0.0"), "prod is left alone");

    // h2 leaves every deployment of web: it stops web.
    let pid = fleet.web_pid("h2").expect("h2 serves");
    fleet.ctl_ok(&["label", "h2", "env=dev"]);
    fleet_tests::wait_until(Duration::from_secs(20), "h2 to stop web", || {
        !fleet_tests::process::pid_is_alive(pid)
    });

    // The named deployment rolls back, and only its hosts move.
    fleet
        .ctl(&[
            "rollback",
            "web",
            "--selector",
            "env=staging",
            "--to",
            "1.0.0",
        ])
        .expect_code(0);
    wait_serves(&fleet, "h1", "1.0.0");
    wait_serves(&fleet, "h3", "1.0.0");
    let list = fleet.ctl_ok(&["deployments", "web"]);
    assert_eq!(
        deployment(&list, serde_json::json!({"env": "staging"}))["version"],
        "1.0.0"
    );
}
