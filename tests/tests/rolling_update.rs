//! User story: an operator rolls a new version of the web app out to five hosts, canary first
//! and then two hosts per wave; afterwards every host serves the new version and `history` says
//! who did it, when, and that every host passed.

use fleet_tests::fleet::Fleet;
use serde_json::Value;
use std::collections::BTreeSet;
use std::time::Duration;

#[test]
fn a_rolling_update_goes_canary_first_then_wave_by_wave_to_every_host() {
    let fleet = Fleet::start(5);
    fleet.create_web_releases(&["1.0.0", "1.1.0"]);

    let first = fleet
        .ctl(&["rollout", "web", "1.0.0", "--canary", "1", "--batch", "2"])
        .expect_code(0)
        .json;
    assert_eq!(first["state"], "succeeded", "{first:#}");
    fleet.wait_all_serve("1.0.0", Duration::from_secs(10));

    let before_ms = fleet_proto::now_unix_ms();
    let second = fleet
        .ctl(&["rollout", "web", "1.1.0", "--canary", "1", "--batch", "2"])
        .expect_code(0)
        .json;
    assert_eq!(second["state"], "succeeded", "{second:#}");
    assert_eq!(second["version"], "1.1.0");

    // Canary of one, then waves of two: 1 + 2 + 2, every host exactly once, every one passed.
    let waves = second["waves"].as_array().expect("waves");
    let sizes: Vec<usize> = waves
        .iter()
        .map(|w| w["hosts"].as_array().map_or(0, Vec::len))
        .collect();
    assert_eq!(sizes, vec![1, 2, 2], "{second:#}");
    let mut seen = BTreeSet::new();
    for wave in waves {
        assert_eq!(wave["state"], "passed", "{wave:#}");
        for host in wave["hosts"].as_array().unwrap() {
            assert_eq!(host["result"], "passed", "{host:#}");
            assert_eq!(host["previous_version"], "1.0.0", "{host:#}");
            assert!(seen.insert(host["host"].as_str().unwrap().to_string()));
        }
    }
    assert_eq!(seen, fleet.host_names().into_iter().collect());

    // Every host serves the new version over HTTP, and status agrees.
    fleet.wait_all_serve("1.1.0", Duration::from_secs(5));
    let status = fleet.status("web");
    for name in fleet.host_names() {
        let actual = Fleet::actual_of(&status, &name, "web").expect("an instance report");
        assert_eq!(actual["version"], "1.1.0", "{name}: {actual:#}");
        assert_eq!(actual["state"], "running", "{name}: {actual:#}");
    }

    // History: both rollouts, who started them, when, and each host's result.
    let history = fleet.ctl_ok(&["history", "web"]);
    let rollouts = history["rollouts"].as_array().expect("rollouts");
    assert!(rollouts.len() >= 2, "{history:#}");
    let recorded: &Value = rollouts
        .iter()
        .find(|r| r["id"] == second["id"])
        .expect("the second rollout in history");
    assert_eq!(recorded["state"], "succeeded");
    let who = recorded["started_by"].as_str().unwrap_or("");
    assert!(
        who.starts_with("admin (") && who.contains('@'),
        "started_by {who:?} should be the credential's name and the operator: admin (USER@HOSTNAME)"
    );
    let started = recorded["started_unix_ms"].as_i64().unwrap_or(0);
    let finished = recorded["finished_unix_ms"].as_i64().unwrap_or(0);
    assert!(
        started >= before_ms - 1000,
        "started {started} before {before_ms}"
    );
    assert!(
        finished >= started,
        "finished {finished} before started {started}"
    );
    let passed: usize = recorded["waves"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|w| w["hosts"].as_array().unwrap())
        .filter(|h| h["result"] == "passed")
        .count();
    assert_eq!(passed, 5, "{recorded:#}");
}
