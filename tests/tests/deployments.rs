//! User story: the fleet's state stays true between rollouts. A completed rollout leaves a
//! standing deployment `(app, selector) -> release`; a host that joins later converges to it
//! by itself, as does a host whose labels move it to another deployment of the app (two
//! deployments side by side, staging and prod), and a host that no deployment selects any more
//! stops the app. `fleetctl deployments` shows them with their hosts, and `rollback` asks which
//! one when there are two. Hosts relabeled at once move no faster than the deployment's budget
//! allows, and every convergence is a row of `history`.

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

    // The convergence is in `history`, beside the rollout, and passed once h3 said so.
    let mut history = Value::Null;
    fleet_tests::wait_until(Duration::from_secs(20), "h3's convergence to pass", || {
        history = fleet.ctl_ok(&["history", "web"]);
        history["convergences"].as_array().is_some_and(|all| {
            all.iter()
                .any(|c| c["host"] == "h3" && c["result"] == "passed")
        })
    });
    let convergence = history["convergences"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["host"] == "h3")
        .unwrap();
    assert_eq!(convergence["app"], "web", "{history:#}");
    assert_eq!(convergence["to_version"], "1.0.0", "{history:#}");
    assert_eq!(convergence["from_version"], "", "{history:#}");
    assert_eq!(convergence["why"], "joined", "{history:#}");
    assert_eq!(convergence["deployment"], "(every host)", "{history:#}");
    assert!(
        convergence["finished_unix_ms"].as_i64().unwrap() > 0,
        "{history:#}"
    );
    assert_eq!(
        history["rollouts"].as_array().unwrap().len(),
        1,
        "{history:#}"
    );
    let text = fleet
        .ctl(&["history", "web", "--output", "text"])
        .expect_code(0);
    let line = text
        .stdout
        .lines()
        .find(|l| l.contains("on h3"))
        .unwrap_or_else(|| panic!("no line for h3's convergence: {}", text.stdout));
    assert!(
        line.contains("web none -> 1.0.0 on h3")
            && line.contains("passed")
            && line.contains("joined"),
        "{line}"
    );
}

#[test]
fn hosts_relabeled_at_once_converge_within_the_budget() {
    let fleet = Fleet::start(4);
    fleet.create_web_releases(&["1.0.0"]);
    // 2.0.0 must stay up 1 s after its check: each host is down that long as the controller
    // sees it, so hosts moved together would overlap.
    let manifest = fleet_tests::web_manifest("10s").replace(
        "stop_timeout = \"5s\"",
        "stop_timeout = \"5s\"\nmin_healthy = \"1s\"",
    );
    fleet
        .create_web_release("2.0.0", &manifest, &[])
        .expect_code(0);
    for host in ["h1", "h2", "h3"] {
        fleet.ctl_ok(&["label", host, "env=a"]);
    }
    fleet.ctl_ok(&["label", "h4", "env=b"]);
    fleet
        .ctl(&[
            "rollout",
            "web",
            "1.0.0",
            "--selector",
            "env=a",
            "--batch",
            "100%",
        ])
        .expect_code(0);
    fleet
        .ctl(&[
            "rollout",
            "web",
            "2.0.0",
            "--selector",
            "env=b",
            "--max-unavailable",
            "1",
        ])
        .expect_code(0);
    fleet.wait_all_serve_except("1.0.0", &["h4"], Duration::from_secs(20));
    wait_serves(&fleet, "h4", "2.0.0");

    // Three hosts move to env=b at once; its last rollout ran with a budget of 1. The
    // controller's view is sampled until all four run 2.0.0: never more than one down.
    let hosts = ["h1", "h2", "h3", "h4"];
    let mut worst = 0;
    let mut samples = 0;
    std::thread::scope(|scope| {
        for host in ["h1", "h2", "h3"] {
            let fleet = &fleet;
            scope.spawn(move || fleet.ctl_ok(&["label", host, "env=b"]));
        }
        fleet_tests::wait_until(Duration::from_secs(60), "h1..h4 to run 2.0.0", || {
            let status = fleet.status("web");
            let up: Vec<bool> = hosts
                .iter()
                .map(|host| {
                    Fleet::actual_of(&status, host, "web").is_some_and(|actual| {
                        actual["state"] == "running"
                            && actual["restarts"].as_u64().unwrap_or(0) == 0
                    })
                })
                .collect();
            worst = worst.max(up.iter().filter(|up| !**up).count());
            samples += 1;
            let on_2 = hosts.iter().all(|host| {
                Fleet::actual_of(&status, host, "web")
                    .is_some_and(|a| a["version"] == "2.0.0" && a["state"] == "running")
            });
            on_2 && up.iter().all(|up| *up)
        });
    });
    assert!(samples > 5, "the sampler must have run");
    assert_eq!(
        worst, 1,
        "with a budget of 1, relabeled hosts converge one at a time"
    );
    let history = fleet.ctl_ok(&["history", "web"]);
    for host in ["h1", "h2", "h3"] {
        assert!(
            history["convergences"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["host"] == host
                    && c["from_version"] == "1.0.0"
                    && c["to_version"] == "2.0.0"
                    && c["why"].as_str().unwrap().starts_with("relabeled by")),
            "{host}: {history:#}"
        );
    }
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
