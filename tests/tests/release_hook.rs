//! User story: a release carries a migration as its `[hooks] release` command. It runs once per
//! rollout, on the first host, before that host's instance is replaced; a failing hook stops
//! the rollout at the canary and leaves every host on the old release; and a failed hook is
//! never run twice for one rollout, nor its release started without it, even after the agent's
//! SIGKILL.

use fleet_tests::fleet::Fleet;
use fleet_tests::web_manifest;
use std::time::Duration;

fn manifest_with_hook(hook: &str) -> String {
    format!(
        "{}\n[hooks]\nrelease = [\"/bin/sh\", \"-c\", {hook:?}]\n",
        web_manifest("10s")
    )
}

/// Two hosts serving web 1.0.0 (no hook).
fn two_hosts_serving_1_0_0() -> Fleet {
    let fleet = Fleet::start(2);
    fleet
        .create_web_release("1.0.0", &web_manifest("10s"), &[])
        .expect_code(0);
    fleet
        .ctl(&["rollout", "web", "1.0.0", "--batch", "100%"])
        .expect_code(0);
    fleet.wait_all_serve("1.0.0", Duration::from_secs(10));
    fleet
}

#[test]
fn the_release_hook_runs_once_per_rollout_and_a_failing_one_halts_it() {
    let fleet = Fleet::start(3);
    let hook_log = fleet.outbox().join("hook.log");
    let hook_env = format!("HOOK_LOG={}", hook_log.display());
    let good = manifest_with_hook("echo \"$FLEET_HOST $FLEET_VERSION\" >> \"$HOOK_LOG\"");
    fleet
        .create_web_release("1.0.0", &good, &[&hook_env])
        .expect_code(0);
    fleet
        .ctl(&[
            "rollout", "web", "1.0.0", "--canary", "1", "--batch", "100%",
        ])
        .expect_code(0);
    fleet.wait_all_serve("1.0.0", Duration::from_secs(10));
    let ran = std::fs::read_to_string(&hook_log).expect("the hook wrote its log");
    assert_eq!(
        ran, "h1 1.0.0\n",
        "once, on the canary host, with the release's env"
    );

    // An agent restart is not a new rollout: the hook does not run again.
    let mut fleet = fleet;
    fleet.restart_agent("h1");
    fleet.wait_hosts_ready(3);
    fleet.wait_all_serve("1.0.0", Duration::from_secs(15));
    assert_eq!(std::fs::read_to_string(&hook_log).unwrap(), "h1 1.0.0\n");

    let failing = manifest_with_hook("echo migration failed >&2; exit 3");
    fleet
        .create_web_release("1.1.0", &failing, &[])
        .expect_code(0);
    let out = fleet
        .ctl(&[
            "rollout", "web", "1.1.0", "--canary", "1", "--batch", "100%",
        ])
        .expect_code(1);
    let canary = &out.json["waves"][0]["hosts"][0];
    assert!(
        canary["message"]
            .as_str()
            .unwrap_or("")
            .contains("release hook"),
        "the canary's result names the hook: {:#}",
        out.json
    );
    assert_eq!(out.json["waves"][1]["state"], "pending", "{:#}", out.json);
    fleet.wait_all_serve("1.0.0", Duration::from_secs(15));

    // Left failed (--no-auto-rollback), then the canary's agent is SIGKILLed and comes back:
    // the failed hook is not run again, and the release is not started without it.
    let runs_log = fleet.outbox().join("failing-hook.log");
    let counted = manifest_with_hook("echo run >> \"$HOOK_LOG\"; exit 3");
    let runs_env = format!("HOOK_LOG={}", runs_log.display());
    fleet
        .create_web_release("1.2.0", &counted, &[&runs_env])
        .expect_code(0);
    let out = fleet
        .ctl(&[
            "rollout",
            "web",
            "1.2.0",
            "--canary",
            "1",
            "--batch",
            "100%",
            "--no-auto-rollback",
        ])
        .expect_code(1);
    let canary = out.json["waves"][0]["hosts"][0]["host"]
        .as_str()
        .expect("the canary host")
        .to_string();
    assert_eq!(std::fs::read_to_string(&runs_log).unwrap(), "run\n");
    fleet.restart_agent(&canary);
    fleet.wait_hosts_ready(3);
    fleet_tests::wait_until(
        Duration::from_secs(15),
        "the restarted canary to report its release refused",
        || {
            let status = fleet.status("web");
            Fleet::actual_of(&status, &canary, "web").is_some_and(|actual| {
                actual["version"] == "1.2.0"
                    && actual["state"] == "failed"
                    && actual["message"]
                        .as_str()
                        .unwrap_or("")
                        .contains("not run twice")
            })
        },
    );
    assert_eq!(
        std::fs::read_to_string(&runs_log).unwrap(),
        "run\n",
        "the failed hook ran once"
    );
    let advertise = &fleet.agent(&canary).advertise;
    assert_ne!(
        fleet_tests::http::get_ok(advertise, "/"),
        Some(format!("web 1.2.0 on {canary}\n")),
        "1.2.0 must not run without its hook"
    );
}

#[test]
fn a_rollback_to_the_release_whose_hook_just_failed_is_not_refused() {
    let fleet = two_hosts_serving_1_0_0();
    // A migration that succeeds once and refuses to run twice.
    let marker = fleet.outbox().join("migrated");
    let once = manifest_with_hook(
        "if [ -e \"$MARKER\" ]; then echo already migrated >&2; exit 3; fi; touch \"$MARKER\"",
    );
    fleet
        .create_web_release("2.0.0", &once, &[&format!("MARKER={}", marker.display())])
        .expect_code(0);

    // 2.0.0 reaches the canary h1 (its hook runs), and the rollout is aborted in its canary
    // pause: h1 keeps 2.0.0, h2 keeps 1.0.0.
    let started = fleet
        .ctl(&[
            "rollout",
            "web",
            "2.0.0",
            "--canary",
            "1",
            "--batch",
            "100%",
            "--pause-after-canary",
            "60s",
            "--detach",
        ])
        .expect_code(0)
        .json;
    let id = started["id"].as_str().expect("a rollout id").to_string();
    fleet_tests::wait_for(Duration::from_secs(20), "the canary to pass", || {
        let rollout = fleet.ctl_ok(&["rollout", "status", &id]);
        (rollout["waves"][0]["state"] == "passed").then_some(())
    });
    fleet.ctl(&["rollout", "abort", &id]).expect_code(0);
    let ended = fleet.wait_rollout_ends(&id, Duration::from_secs(20));
    assert_eq!(ended["state"], "aborted", "{ended:#}");
    assert!(marker.exists());
    fleet.wait_all_serve_except("2.0.0", &["h2"], Duration::from_secs(10));

    // 2.0.0 again: on the canary h1 its hook now fails, and the automatic rollback puts h1
    // back on what it ran before, which is 2.0.0 itself. That rollback carries no hook and
    // must not be refused for the hook that just failed.
    let out = fleet
        .ctl(&[
            "rollout", "web", "2.0.0", "--canary", "1", "--batch", "100%",
        ])
        .expect_code(1);
    assert_eq!(out.json["state"], "rolled_back", "{:#}", out.json);
    fleet.wait_all_serve_except("2.0.0", &["h2"], Duration::from_secs(10));
    fleet.wait_all_serve_except("1.0.0", &["h1"], Duration::from_secs(10));
}

#[test]
fn the_instance_a_failed_hook_left_running_is_restarted_when_it_crashes() {
    let fleet = two_hosts_serving_1_0_0();
    let failing = manifest_with_hook("echo migration failed >&2; exit 3");
    fleet
        .create_web_release("1.1.0", &failing, &[])
        .expect_code(0);
    // The hook fails on the canary h1 before its 1.0.0 instance is touched; with
    // --no-auto-rollback the host is left as it is, 1.0.0 still serving.
    fleet
        .ctl(&[
            "rollout",
            "web",
            "1.1.0",
            "--canary",
            "1",
            "--batch",
            "100%",
            "--no-auto-rollback",
        ])
        .expect_code(1);
    let h1 = fleet.agent("h1").advertise.clone();
    assert_eq!(
        fleet_tests::http::get_ok(&h1, "/").as_deref(),
        Some("web 1.0.0 on h1\n")
    );
    let pid: i32 = fleet_tests::http::get_ok(&h1, "/pid")
        .expect("the instance's pid")
        .trim()
        .parse()
        .expect("a pid");

    // That instance still has a supervisor: killed, it comes back from origin.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    fleet_tests::wait_until(
        Duration::from_secs(20),
        "h1's 1.0.0 instance to be restarted",
        || {
            fleet_tests::http::get_ok(&h1, "/").as_deref() == Some("web 1.0.0 on h1\n")
                && fleet_tests::http::get_ok(&h1, "/pid")
                    .and_then(|p| p.trim().parse::<i32>().ok())
                    .is_some_and(|new_pid| new_pid != pid)
        },
    );
}
