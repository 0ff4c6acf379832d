//! The rollout planner: from the hosts a selector matched and the operator's policy, the
//! waves, canary first. Pure: it knows nothing of gRPC, agents or the store, so every rule is
//! a plain-value test.

use crate::model::Batch;
use std::collections::BTreeMap;

/// Whether a host's labels satisfy every `key=value` of the selector.
pub fn matches(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Splits `hosts` (already in rollout order) into waves: first `canary` hosts alone, then
/// waves of `batch` hosts, where a percentage is of all hosts, rounded up, at least one.
pub fn plan_waves(hosts: &[String], canary: u32, batch: Batch) -> Vec<Vec<String>> {
    let n_hosts = hosts.len();
    let mut waves = Vec::new();
    let n_canary = (canary as usize).min(n_hosts);
    if n_canary > 0 {
        waves.push(hosts[..n_canary].to_vec());
    }
    let wave_size = match batch {
        Batch::Hosts(n) => n as usize,
        Batch::Percent(p) => (n_hosts * p as usize).div_ceil(100),
    }
    .max(1);
    for chunk in hosts[n_canary..].chunks(wave_size) {
        waves.push(chunk.to_vec());
    }
    waves
}

/// Splits the hosts of a rollback (`hosts`, in rollout order) into waves: first every host in
/// `down` (it has no healthy instance: going back is its way up, and costs the budget
/// nothing more), then the others, `batch` at a time, as [`plan_waves`] does.
pub fn plan_rollback_waves(hosts: &[String], down: &[&str], batch: Batch) -> Vec<Vec<String>> {
    let (first, rest): (Vec<String>, Vec<String>) = hosts
        .iter()
        .cloned()
        .partition(|host| down.contains(&host.as_str()));
    let mut ordered = first.clone();
    ordered.extend(rest);
    plan_waves(&ordered, first.len() as u32, batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("h{i}")).collect()
    }

    fn sizes(waves: &[Vec<String>]) -> Vec<usize> {
        waves.iter().map(Vec::len).collect()
    }

    #[test]
    fn waves() {
        for (n_hosts, canary, batch, expect) in [
            (5, 1, Batch::Hosts(2), vec![1, 2, 2]),
            (20, 1, Batch::Percent(25), vec![1, 5, 5, 5, 4]),
            (3, 0, Batch::Percent(100), vec![3]),
            (1, 1, Batch::Hosts(5), vec![1]),
            (2, 5, Batch::Hosts(1), vec![2]),
            (10, 1, Batch::Percent(1), vec![1, 1, 1, 1, 1, 1, 1, 1, 1, 1]),
            (0, 1, Batch::Hosts(1), vec![]),
        ] {
            let waves = plan_waves(&hosts(n_hosts), canary, batch);
            assert_eq!(
                sizes(&waves),
                expect,
                "{n_hosts} hosts, canary {canary}, {batch:?}"
            );
            let flat: Vec<String> = waves.concat();
            assert_eq!(flat, hosts(n_hosts), "every host exactly once, in order");
        }
    }

    #[test]
    fn a_rollback_takes_the_hosts_that_are_down_first_then_the_budget_at_a_time() {
        let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        for (down, batch, expect) in [
            // Nothing down: the budget at a time, in order.
            (
                vec![],
                Batch::Hosts(1),
                vec![vec!["h1"], vec!["h2"], vec!["h3"], vec!["h4"]],
            ),
            (
                vec![],
                Batch::Hosts(2),
                vec![vec!["h1", "h2"], vec!["h3", "h4"]],
            ),
            // The hosts that are down go first, together, whatever the budget.
            (
                vec!["h3"],
                Batch::Hosts(1),
                vec![vec!["h3"], vec!["h1"], vec!["h2"], vec!["h4"]],
            ),
            (
                vec!["h2", "h4", "h3"],
                Batch::Hosts(1),
                vec![vec!["h2", "h3", "h4"], vec!["h1"]],
            ),
            // Every host down: one wave.
            (
                vec!["h1", "h2", "h3", "h4"],
                Batch::Hosts(1),
                vec![vec!["h1", "h2", "h3", "h4"]],
            ),
            // A host named down that the rollback does not cover changes nothing.
            (
                vec!["h9"],
                Batch::Hosts(4),
                vec![vec!["h1", "h2", "h3", "h4"]],
            ),
        ] {
            let waves = plan_rollback_waves(&hosts(4), &down, batch);
            let expect: Vec<Vec<String>> = expect.iter().map(|w| names(w)).collect();
            assert_eq!(waves, expect, "down {down:?}, {batch:?}");
        }
    }

    #[test]
    fn selectors() {
        let labels = BTreeMap::from([("env".to_string(), "prod".to_string())]);
        assert!(matches(&BTreeMap::new(), &labels));
        assert!(matches(&labels, &labels));
        let other = BTreeMap::from([("env".to_string(), "dev".to_string())]);
        assert!(!matches(&other, &labels));
    }
}
