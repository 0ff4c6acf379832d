//! User story: a rollback keeps to the budget. Three hosts run an app that takes two seconds to
//! start; a release that fails its check on the last host (`h3`) is rolled out with
//! `--max-unavailable 1`. The rollback puts the failed host back first (it is down already),
//! then one serving host at a time: a sampler of every host's `/healthz` never sees more than
//! one host down beyond the failed one, and every host ends on the old release, serving it.
//! A controller killed in the middle of such a rollback goes on from where it stood. And
//! `fleetctl rollback` keeps to the deployment's budget the same way.

use fleet_tests::fleet::Fleet;
use fleet_tests::sampler::Sampler;
use fleet_tests::{web_manifest, WEB_PORT};
use std::time::Duration;

/// The example app, started two seconds late: long enough for a sampler to see every host
/// that is down at the same time.
fn slow_start_manifest() -> String {
    web_manifest("30s").replace(
        &format!("command = [\"bin/web\", \"--listen\", \"${{FLEET_ADDR}}:{WEB_PORT}\"]"),
        &format!(
            "command = [\"/bin/sh\", \"-c\", \"sleep 2 && exec bin/web --listen ${{FLEET_ADDR}}:{WEB_PORT}\"]"
        ),
    )
}

/// Three hosts on 1.0.0 (slow to start), and 1.1.0, which fails its check on h3 only.
fn fleet_with_a_release_failing_on_h3() -> Fleet {
    let fleet = Fleet::start(3);
    let manifest = slow_start_manifest();
    fleet
        .create_web_release("1.0.0", &manifest, &[])
        .expect_code(0);
    let fails_on_h3 = format!(
        "{manifest}\n[[smoke]]\nexec = [\"/bin/sh\", \"-c\", \"test \\\"$FLEET_HOST\\\" != h3\"]\ntimeout = \"2s\"\n"
    );
    fleet
        .create_web_release("1.1.0", &fails_on_h3, &[])
        .expect_code(0);
    fleet
        .ctl(&["rollout", "web", "1.0.0", "--batch", "100%"])
        .expect_code(0);
    fleet.wait_all_serve("1.0.0", Duration::from_secs(30));
    fleet
}

fn sampler_of(fleet: &Fleet) -> Sampler {
    Sampler::start(
        fleet
            .host_names()
            .iter()
            .map(|h| fleet.agent(h).advertise.clone())
            .collect(),
    )
}

const ROLLOUT: [&str; 9] = [
    "rollout",
    "web",
    "1.1.0",
    "--canary",
    "1",
    "--batch",
    "1",
    "--max-unavailable",
    "1",
];

/// Every host serves 1.0.0 again, and `status` says it runs it.
fn assert_all_back_on_1_0_0(fleet: &Fleet) {
    fleet.wait_all_serve("1.0.0", Duration::from_secs(30));
    let status = fleet.status("web");
    for name in fleet.host_names() {
        let actual = Fleet::actual_of(&status, &name, "web").expect("an instance report");
        assert_eq!(actual["version"], "1.0.0", "{name}: {actual:#}");
        assert_eq!(actual["state"], "running", "{name}: {actual:#}");
    }
}

#[test]
fn a_rollback_takes_no_more_hosts_down_than_the_budget() {
    let fleet = fleet_with_a_release_failing_on_h3();
    let sampler = sampler_of(&fleet);
    // Generous: five starts of two seconds each, one after another, on a loaded machine.
    let out = fleet.ctl_with_deadline(&ROLLOUT, Duration::from_secs(180));
    let seen = sampler.finish();
    let (worst, samples) = (seen.most_down, seen.samples);
    let rollout = out.expect_code(1).json;
    assert_eq!(rollout["state"], "rolled_back", "{rollout:#}");
    assert!(samples > 10, "the sampler must have run");
    assert!(
        worst <= 2,
        "with --max-unavailable 1, at most one host may be down beyond the failed one; {worst} were down at once: {rollout:#}"
    );
    // Each host the rollout changed is recorded as rolled back.
    let results: Vec<(String, String)> = rollout["waves"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|w| w["hosts"].as_array().unwrap())
        .map(|h| {
            (
                h["host"].as_str().unwrap().to_string(),
                h["result"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (host, result) in &results {
        assert_eq!(result, "rolled_back", "{host}: {rollout:#}");
    }
    assert_all_back_on_1_0_0(&fleet);
}

#[test]
fn a_controller_killed_during_a_rollback_goes_on_from_where_it_was() {
    let mut fleet = fleet_with_a_release_failing_on_h3();
    let sampler = sampler_of(&fleet);
    let mut args = ROLLOUT.to_vec();
    args.push("--detach");
    let started = fleet.ctl(&args).expect_code(0).json;
    let id = started["id"].as_str().expect("a rollout id").to_string();
    // Kill it in the middle of the rollback: the failed host is back (recorded in the same
    // write that gives the next host its old release), the others not yet.
    fleet_tests::wait_for(
        Duration::from_secs(120),
        "the failed host to be rolled back first",
        || {
            let rollout = fleet.ctl_ok(&["rollout", "status", &id]);
            let back: Vec<&str> = rollout["waves"]
                .as_array()?
                .iter()
                .flat_map(|w| w["hosts"].as_array().into_iter().flatten())
                .filter(|h| h["result"] == "rolled_back")
                .filter_map(|h| h["host"].as_str())
                .collect();
            assert!(
                back.is_empty() || back[0] == "h3",
                "the failed host goes back first: {rollout:#}"
            );
            (back == ["h3"]).then_some(())
        },
    );
    fleet.kill_controller();
    fleet.restart_controller();
    let ended = fleet.wait_rollout_ends(&id, Duration::from_secs(120));
    let worst = sampler.finish().most_down;
    assert_eq!(ended["state"], "rolled_back", "{ended:#}");
    assert!(
        worst <= 2,
        "at most one host may be down beyond the failed one, across the restart; {worst} were: {ended:#}"
    );
    assert_all_back_on_1_0_0(&fleet);
}

#[test]
fn a_manual_rollback_keeps_to_the_deployments_budget() {
    let fleet = Fleet::start(3);
    let manifest = slow_start_manifest();
    for version in ["1.0.0", "1.2.0"] {
        fleet
            .create_web_release(version, &manifest, &[])
            .expect_code(0);
    }
    fleet
        .ctl(&["rollout", "web", "1.0.0", "--batch", "100%"])
        .expect_code(0);
    fleet.wait_all_serve("1.0.0", Duration::from_secs(30));
    fleet
        .ctl_with_deadline(
            &[
                "rollout",
                "web",
                "1.2.0",
                "--batch",
                "1",
                "--max-unavailable",
                "1",
            ],
            Duration::from_secs(180),
        )
        .expect_code(0);
    fleet.wait_all_serve("1.2.0", Duration::from_secs(30));
    // Back to 1.0.0 with no flag: the deployment's budget (1, from its last rollout) holds.
    let sampler = sampler_of(&fleet);
    let out = fleet.ctl_with_deadline(&["rollback", "web"], Duration::from_secs(180));
    let seen = sampler.finish();
    let (worst, samples) = (seen.most_down, seen.samples);
    let rollback = out.expect_code(0).json;
    assert_eq!(rollback["state"], "succeeded", "{rollback:#}");
    assert!(samples > 10, "the sampler must have run");
    assert!(
        worst <= 1,
        "the deployment's budget is 1: {worst} hosts were down at once: {rollback:#}"
    );
    assert_eq!(
        rollback["waves"].as_array().map(Vec::len),
        Some(3),
        "one host per wave: {rollback:#}"
    );
    assert_all_back_on_1_0_0(&fleet);
}
