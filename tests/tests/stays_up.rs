//! User story: "passed" means the app stays up. A release with no smoke checks whose process
//! exits a second after it started, and a release that answers its checks and dies 1.5 s
//! later when the rollout asks for `--min-healthy 3s`, both fail at the canary, and every host
//! serves the previous release again.

use fleet_tests::fleet::Fleet;
use fleet_tests::WEB_PORT;
use std::time::Duration;

/// The example app with no `[[smoke]]` at all: staying up is the only signal.
fn no_checks_manifest() -> String {
    format!(
        "[process]\ncommand = [\"bin/web\", \"--listen\", \"${{FLEET_ADDR}}:{WEB_PORT}\"]\nstop_timeout = \"5s\"\n"
    )
}

fn canary_fails_and_everyone_is_back_on_1_0_0(fleet: &Fleet, args: &[&str], why: &str) {
    let out = fleet.ctl(args);
    assert_eq!(out.code, 1, "the rollout must fail: {out:?}");
    let rollout = &out.json;
    assert_eq!(rollout["state"], "rolled_back", "{rollout:#}");
    let canary = &rollout["waves"][0]["hosts"][0];
    assert_eq!(canary["result"], "rolled_back", "{rollout:#}");
    assert!(
        rollout["message"]
            .as_str()
            .unwrap_or_default()
            .contains(why),
        "{rollout:#}"
    );
    // Only the canary was touched, and it is back.
    for wave in rollout["waves"].as_array().unwrap().iter().skip(1) {
        for host in wave["hosts"].as_array().unwrap() {
            assert_eq!(host["result"], "pending", "{rollout:#}");
        }
    }
    fleet.wait_all_serve("1.0.0", Duration::from_secs(20));
}

/// Three hosts that run web 1.0.0.
fn three_hosts_on_1_0_0() -> Fleet {
    let fleet = Fleet::start(3);
    fleet.create_web_releases(&["1.0.0"]);
    fleet
        .ctl(&["rollout", "web", "1.0.0", "--batch", "100%"])
        .expect_code(0);
    fleet
}

#[test]
fn a_release_without_checks_that_dies_after_a_second_fails_at_the_canary() {
    let fleet = three_hosts_on_1_0_0();
    fleet
        .create_web_release("2.0.0", &no_checks_manifest(), &["WEB_EXIT_AFTER_MS=1000"])
        .expect_code(0);
    canary_fails_and_everyone_is_back_on_1_0_0(
        &fleet,
        &[
            "rollout", "web", "2.0.0", "--canary", "1", "--batch", "100%",
        ],
        "before it had stayed up for 5.0s",
    );
}

#[test]
fn a_release_that_dies_inside_min_healthy_fails_at_the_canary() {
    let fleet = three_hosts_on_1_0_0();
    fleet
        .create_web_release(
            "2.0.0",
            &fleet_tests::web_manifest("10s"),
            &["WEB_EXIT_AFTER_MS=1500"],
        )
        .expect_code(0);
    canary_fails_and_everyone_is_back_on_1_0_0(
        &fleet,
        &[
            "rollout",
            "web",
            "2.0.0",
            "--canary",
            "1",
            "--batch",
            "100%",
            "--min-healthy",
            "3s",
        ],
        "before it had stayed up for 3.0s",
    );
    // Refused input says what to write.
    let bad = fleet.ctl(&["rollout", "web", "2.0.0", "--min-healthy", "soon"]);
    assert_eq!(bad.code, 2, "{bad:?}");
    let bad = fleet.ctl(&["rollout", "web", "2.0.0", "--min-healthy", "2h"]);
    assert_eq!(bad.code, 2, "{bad:?}");
    assert!(bad.stderr.contains("over 1h"), "{}", bad.stderr);
}
