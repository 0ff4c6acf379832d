//! User story: a release carries a migration as its `[hooks] release` command. It runs once per
//! rollout, on the first host, before that host's instance is replaced; a failing hook stops
//! the rollout at the canary and leaves every host on the old release.

use fleet_tests::fleet::Fleet;
use fleet_tests::web_manifest;
use std::time::Duration;

fn manifest_with_hook(hook: &str) -> String {
    format!(
        "{}\n[hooks]\nrelease = [\"/bin/sh\", \"-c\", {hook:?}]\n",
        web_manifest("10s")
    )
}

#[test]
fn the_release_hook_runs_once_per_rollout_and_a_failing_one_halts_it() {
    let fleet = Fleet::start(3);
    let hook_log = fleet.dir().join("hook.log");
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
}
