//! User story: a release whose health check fails (`--env WEB_BROKEN=1`) is rolled out; the
//! canary fails its smoke check, the rollout stops there and exits 1, the canary goes back to
//! the previous release, and no other host ever took the broken one. And when even the way back
//! is broken, on-call can abort the waiting rollback and move on at once.

use fleet_tests::fleet::Fleet;
use fleet_tests::web_manifest;
use std::collections::BTreeMap;
use std::time::Duration;

#[test]
fn a_broken_release_stops_at_the_canary_and_rolls_it_back() {
    let fleet = Fleet::start(4);
    let manifest = web_manifest("10s");
    fleet
        .create_web_release("1.0.0", &manifest, &[])
        .expect_code(0);
    fleet
        .create_web_release("1.1.0", &manifest, &["WEB_BROKEN=1"])
        .expect_code(0);
    fleet
        .ctl(&["rollout", "web", "1.0.0", "--canary", "1", "--batch", "2"])
        .expect_code(0);
    fleet.wait_all_serve("1.0.0", Duration::from_secs(10));
    let pids_before: BTreeMap<String, u32> = fleet
        .host_names()
        .into_iter()
        .map(|name| {
            let pid = fleet.web_pid(&name).expect("a pid");
            (name, pid)
        })
        .collect();

    let out = fleet
        .ctl(&[
            "rollout",
            "web",
            "1.1.0",
            "--canary",
            "1",
            "--batch",
            "2",
            "--smoke-timeout",
            "3s",
        ])
        .expect_code(1);
    let rollout = out.json;
    assert_eq!(rollout["state"], "rolled_back", "{rollout:#}");
    let waves = rollout["waves"].as_array().expect("waves");
    assert_eq!(waves.len(), 3, "1 canary + 2 + 1: {rollout:#}");
    assert_eq!(waves[0]["state"], "failed", "{rollout:#}");
    let canary_host = waves[0]["hosts"][0]["host"].as_str().unwrap().to_string();
    let canary_result = waves[0]["hosts"][0]["result"].as_str().unwrap();
    assert!(
        ["failed", "rolled_back"].contains(&canary_result),
        "canary result {canary_result}"
    );
    for wave in &waves[1..] {
        assert_eq!(
            wave["state"], "pending",
            "later waves never start: {wave:#}"
        );
        for host in wave["hosts"].as_array().unwrap() {
            let result = host["result"].as_str().unwrap();
            assert!(
                ["pending", "skipped"].contains(&result),
                "host {} of a later wave has result {result}",
                host["host"]
            );
        }
    }

    // Every host serves 1.0.0 again; only the canary was ever restarted.
    fleet.wait_all_serve("1.0.0", Duration::from_secs(15));
    for (name, pid_before) in &pids_before {
        let pid_now = fleet.web_pid(name).expect("a pid");
        if *name == canary_host {
            assert_ne!(pid_now, *pid_before, "the canary took 1.1.0 and came back");
            assert_eq!(fleet.web_get(name, "/origin").as_deref(), Some("fresh\n"));
        } else {
            assert_eq!(pid_now, *pid_before, "{name} must never have been touched");
        }
    }
    let status = fleet.status("web");
    for name in fleet.host_names() {
        let actual = Fleet::actual_of(&status, &name, "web").expect("an instance report");
        assert_eq!(actual["version"], "1.0.0", "{name}: {actual:#}");
        assert_eq!(actual["state"], "running", "{name}: {actual:#}");
    }
    let history = fleet.ctl_ok(&["history", "web"]);
    let recorded = history["rollouts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == rollout["id"])
        .expect("the failed rollout is in history");
    assert_eq!(recorded["state"], "rolled_back");
}

#[test]
fn a_rollback_that_cannot_finish_can_be_aborted() {
    let fleet = Fleet::start(2);
    // 1.0.0 passes its checks only while this file exists.
    let healthy = fleet.dir().join("healthy");
    std::fs::write(&healthy, "").unwrap();
    let gated = format!(
        "{}\n[[smoke]]\nexec = [\"/bin/sh\", \"-c\", \"test -e {}\"]\ntimeout = \"60s\"\n",
        web_manifest("60s"),
        healthy.display()
    );
    fleet
        .create_web_release("1.0.0", &gated, &[])
        .expect_code(0);
    fleet
        .ctl(&["rollout", "web", "1.0.0", "--batch", "100%"])
        .expect_code(0);
    fleet.wait_all_serve("1.0.0", Duration::from_secs(10));
    // 1.1.0 exits at once: its canary fails without waiting out its 60 s of checks.
    let exits = web_manifest("60s").replace(
        "command = [\"bin/web\"",
        "command = [\"/bin/sh\", \"-c\", \"exit 1\", \"bin/web\"",
    );
    fleet
        .create_web_release("1.1.0", &exits, &[])
        .expect_code(0);

    // The way back is broken too: the canary cannot pass 1.0.0's checks again, and the
    // rollback would wait for it up to its deadline (a minute).
    std::fs::remove_file(&healthy).unwrap();
    let started = fleet
        .ctl(&[
            "rollout", "web", "1.1.0", "--canary", "1", "--batch", "100%", "--detach",
        ])
        .expect_code(0)
        .json;
    let id = started["id"].as_str().expect("a rollout id").to_string();
    fleet_tests::wait_for(
        Duration::from_secs(30),
        "the canary to fail and the rollback to begin",
        || {
            let rollout = fleet.ctl_ok(&["rollout", "status", &id]);
            (rollout["state"] == "running" && rollout["waves"][0]["state"] == "failed")
                .then_some(())
        },
    );

    // On-call gives up waiting: abort ends the rollout now, and says the hosts still go back.
    fleet.ctl(&["rollout", "abort", &id]).expect_code(0);
    let ended = fleet.wait_rollout_ends(&id, Duration::from_secs(15));
    assert_eq!(ended["state"], "aborted", "{ended:#}");
    let message = ended["message"].as_str().unwrap_or_default();
    assert!(message.contains("while rolling back"), "{message}");
    // The app is free for the next rollout at once.
    fleet
        .ctl(&["rollout", "web", "1.0.0", "--batch", "100%", "--detach"])
        .expect_code(0);
}
