//! User story: a script drives fleet with `--output json`; `hosts`, `releases`, `status`,
//! `history` and `events` print the documented messages as JSON on stdout.

use fleet_tests::fleet::Fleet;
use fleet_tests::web_manifest;

#[test]
fn every_read_verb_prints_json() {
    let fleet = Fleet::start(2);
    fleet
        .create_web_release("1.0.0", &web_manifest("10s"), &[])
        .expect_code(0);
    fleet.ctl(&["rollout", "web", "1.0.0"]).expect_code(0);

    let hosts = fleet.ctl_ok(&["hosts"]);
    let list = hosts["hosts"].as_array().expect("ListHostsResponse.hosts");
    assert_eq!(list.len(), 2, "{hosts:#}");
    for agent in fleet.agents() {
        let host = list
            .iter()
            .find(|h| h["name"] == agent.name.as_str())
            .unwrap_or_else(|| panic!("{} in {hosts:#}", agent.name));
        assert_eq!(host["advertise_addr"], agent.advertise.as_str());
        assert_eq!(host["state"], "ready");
        assert_eq!(host["connected"], true);
        assert!(host["last_seen_unix_ms"].as_i64().unwrap_or(0) > 0);
        // What the agent said of itself: the workspace's version, built for this machine.
        assert_eq!(host["agent_version"], env!("CARGO_PKG_VERSION"), "{host:#}");
        assert_eq!(host["agent_arch"], std::env::consts::ARCH, "{host:#}");
        let app = &host["apps"][0];
        assert_eq!(app["app"], "web", "{host:#}");
        assert_eq!(app["desired_version"], "1.0.0", "{host:#}");
    }

    let releases = fleet.ctl_ok(&["releases", "web"]);
    let release = &releases["releases"][0];
    assert_eq!(release["app"], "web", "{releases:#}");
    assert_eq!(release["version"], "1.0.0");
    assert!(release["artifact_digest"]
        .as_str()
        .is_some_and(fleet_proto::artifact::check_digest));
    assert!(release["artifact_size"].as_u64().unwrap_or(0) > 0);
    let created_by = release["created_by"].as_str().unwrap_or("");
    assert!(
        created_by.starts_with("admin (") && created_by.contains('@'),
        "{created_by:?}"
    );

    let status = fleet.status("web");
    assert_eq!(
        status["hosts"].as_array().map(Vec::len),
        Some(2),
        "{status:#}"
    );
    assert!(status["active_rollouts"].is_array(), "{status:#}");
    let actual = Fleet::actual_of(&status, "h1", "web").expect("an instance report");
    assert_eq!(actual["state"], "running");
    assert_eq!(actual["version"], "1.0.0");

    let history = fleet.ctl_ok(&["history", "web"]);
    let rollout = &history["rollouts"][0];
    assert_eq!(rollout["app"], "web", "{history:#}");
    assert_eq!(rollout["version"], "1.0.0");
    assert_eq!(rollout["state"], "succeeded");
    assert!(rollout["id"].as_str().is_some_and(|id| !id.is_empty()));

    // One controller on the embedded store: it leads, since it started.
    let controllers = fleet.ctl_ok(&["controllers"]);
    let listed = controllers["controllers"].as_array().expect("a list");
    assert_eq!(listed.len(), 1, "{controllers:#}");
    assert_eq!(listed[0]["url"], fleet.controller_url().as_str());
    assert_eq!(listed[0]["leader"], true);
    assert!(
        listed[0]["leading_since_unix_ms"].as_i64() > Some(0),
        "{controllers:#}"
    );
    assert!(
        controllers["store"]
            .as_str()
            .is_some_and(|s| s.contains("redb")),
        "{controllers:#}"
    );

    let events = fleet.ctl(&["events"]).expect_code(0);
    let events = events.json_lines();
    assert!(!events.is_empty(), "events prints one JSON event per line");
    assert!(events
        .iter()
        .all(|e| e["kind"].is_string() && e["seq"].is_u64()));
    assert!(events.iter().any(|e| e["app"] == "web"), "{events:#?}");
}
