//! User story: one budget bounds what is down. With one of five hosts drained, a rollout with
//! `--max-unavailable 2` never has more than one other host without a healthy instance (every
//! host's health is sampled while it runs), because its waves shrink to what the budget
//! leaves. A budget already spent before the start is refused, naming the hosts that spend it.

use fleet_tests::fleet::Fleet;
use fleet_tests::sampler::Sampler;
use std::time::Duration;

#[test]
fn a_budget_of_two_with_one_host_drained_takes_one_host_down_at_a_time() {
    let fleet = Fleet::start(5);
    fleet.create_web_releases(&["1.0.0", "1.1.0"]);
    fleet
        .ctl(&["rollout", "web", "1.0.0", "--batch", "100%"])
        .expect_code(0);
    fleet.wait_all_serve("1.0.0", Duration::from_secs(20));
    fleet.ctl(&["drain", "h5"]).expect_code(0);

    // The sampler: the most of h1..h4 seen unhealthy at once.
    let addrs: Vec<String> = ["h1", "h2", "h3", "h4"]
        .iter()
        .map(|h| fleet.agent(h).advertise.clone())
        .collect();
    let sampler = Sampler::start(addrs);
    let out = fleet.ctl(&[
        "rollout",
        "web",
        "1.1.0",
        "--canary",
        "1",
        "--batch",
        "2",
        "--max-unavailable",
        "2",
    ]);
    let seen = sampler.finish();
    let (worst, samples) = (seen.most_down, seen.samples);
    let rollout = out.expect_code(0).json;
    assert!(samples > 10, "the sampler must have run");
    assert_eq!(
        worst, 1,
        "with h5 drained and a budget of 2, at most one other host may be down: {rollout:#}"
    );
    assert_eq!(rollout["max_unavailable"], 2, "{rollout:#}");
    assert!(
        rollout["unavailable_at_start"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h == "h5: drained"),
        "{rollout:#}"
    );
    for wave in rollout["waves"].as_array().unwrap() {
        assert_eq!(wave["hosts"].as_array().unwrap().len(), 1, "{rollout:#}");
    }
    for host in ["h1", "h2", "h3", "h4"] {
        assert_eq!(
            fleet.web_get(host, "/").as_deref(),
            Some(format!("web 1.1.0 on {host}\n").as_str())
        );
    }

    // A budget spent before the start: refused, naming what spends it.
    let spent = fleet.ctl(&["rollout", "web", "1.0.0", "--max-unavailable", "1"]);
    assert_eq!(spent.code, 1, "{spent:?}");
    assert!(spent.stderr.contains("h5: drained"), "{}", spent.stderr);
    // Bad budgets say what to write.
    for bad in ["0", "150%", "some"] {
        let out = fleet.ctl(&["rollout", "web", "1.0.0", "--max-unavailable", bad]);
        assert_eq!(out.code, 2, "{bad}: {out:?}");
        assert!(out.stderr.contains("--max-unavailable"), "{}", out.stderr);
    }
}
