//! User story: a host cannot choose its own labels. A host that joins with a token naming
//! `zone=a` is `zone=a` whatever its agent claims, and a rollout selecting `zone=b` does not
//! pick it; a host whose token names none keeps its first claim. Afterwards labels change only
//! through `fleetctl label` (admin), and an ignored claim is an event.

use fleet_tests::fleet::Fleet;
use serde_json::Value;
use std::time::Duration;

fn labels_of(fleet: &Fleet, host: &str) -> Option<Value> {
    let hosts = fleet.ctl_ok(&["hosts"]);
    hosts["hosts"]
        .as_array()?
        .iter()
        .find(|h| h["name"] == host && h["connected"] == true)
        .map(|h| h["labels"].clone())
}

fn wait_labels(fleet: &Fleet, host: &str) -> Value {
    fleet_tests::wait_for(Duration::from_secs(20), "the host to register", || {
        labels_of(fleet, host)
    })
}

#[test]
fn a_host_keeps_the_labels_it_joined_with_until_an_admin_changes_them() {
    let mut fleet = Fleet::start(0);
    fleet.create_web_releases(&["1.0.0"]);
    let token = fleet.ctl_ok(&["join-token", "create", "--labels", "zone=a"])["token"]
        .as_str()
        .unwrap()
        .to_string();
    // h1 joins with a zone=a token and claims zone=b.
    fleet.start_agent_claiming("h1", &token, "zone=b");
    assert_eq!(wait_labels(&fleet, "h1"), serde_json::json!({"zone": "a"}));
    let refused = fleet.ctl(&["rollout", "web", "1.0.0", "--selector", "zone=b"]);
    assert_eq!(refused.code, 2, "{refused:?}");
    assert!(
        refused.stderr.contains("no host matches"),
        "{}",
        refused.stderr
    );

    // h2's token names no labels: its first claim is kept, a later one ignored.
    let token = fleet.ctl_ok(&["join-token", "create"])["token"]
        .as_str()
        .unwrap()
        .to_string();
    fleet.start_agent_claiming("h2", &token, "zone=c");
    assert_eq!(wait_labels(&fleet, "h2"), serde_json::json!({"zone": "c"}));
    fleet.set_claimed_labels("h2", "zone=b");
    fleet.restart_agent("h2");
    fleet_tests::wait_until(Duration::from_secs(20), "the ignored claim's event", || {
        fleet
            .ctl(&["events"])
            .expect_code(0)
            .json_lines()
            .iter()
            .any(|e| e["kind"] == "host.labels_ignored" && e["host"] == "h2")
    });
    assert_eq!(wait_labels(&fleet, "h2"), serde_json::json!({"zone": "c"}));

    // An admin moves h1 to zone=b: now the rollout picks it, and only it.
    let labeled = fleet.ctl_ok(&["label", "h1", "zone=b,tier=web"]);
    assert_eq!(
        labeled["labels"],
        serde_json::json!({"zone": "b", "tier": "web"})
    );
    fleet.ctl_ok(&["label", "h1", "tier-"]);
    assert_eq!(wait_labels(&fleet, "h1"), serde_json::json!({"zone": "b"}));
    let rollout = fleet
        .ctl(&["rollout", "web", "1.0.0", "--selector", "zone=b"])
        .expect_code(0)
        .json;
    let hosts: Vec<&str> = rollout["waves"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|w| w["hosts"].as_array().unwrap())
        .map(|h| h["host"].as_str().unwrap())
        .collect();
    assert_eq!(hosts, ["h1"]);
    let unknown = fleet.ctl(&["label", "h9", "zone=b"]);
    assert_eq!(unknown.code, 2, "{unknown:?}");
    assert!(unknown.stderr.contains("h9"), "{}", unknown.stderr);
    assert_eq!(fleet.ctl(&["label", "h1", "Zone=b"]).code, 2);
}
