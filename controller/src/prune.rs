//! `fleetctl release prune APP --keep N`, decided: which releases of an app go and which stay,
//! and why. Pure: the store gathers what uses each release (standing deployments, hosts'
//! desired releases, rollouts under way and what they may roll back to, instances the agents
//! report running) in one transaction and deletes what [`plan`] returns; no I/O here.

use crate::model::{DeploymentRecord, HostRecord, ReleaseRecord, RolloutRecord};
use std::collections::BTreeMap;

/// What [`plan`] decided.
#[derive(Debug, Clone, PartialEq)]
pub struct PrunePlan {
    /// The releases to delete, oldest first.
    pub removed: Vec<ReleaseRecord>,
    /// The releases that stay, oldest first, each with why.
    pub kept: Vec<(ReleaseRecord, String)>,
}

/// Why each version of `app` is still in use, if it is: the first reason found per version.
/// `running` maps host names to the version of `app` their agents report running.
pub fn uses(
    app: &str,
    deployments: &[DeploymentRecord],
    hosts: &[HostRecord],
    rollouts: &[RolloutRecord],
    running: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut uses = BTreeMap::new();
    let mut add = |version: &str, why: String| {
        uses.entry(version.to_string()).or_insert(why);
    };
    for deployment in deployments.iter().filter(|d| d.app == app) {
        let selector = fleet_proto::names::format_labels(&deployment.selector);
        add(
            &deployment.version,
            format!("the standing deployment of {{{selector}}}"),
        );
    }
    for rollout in rollouts
        .iter()
        .filter(|r| r.app == app && !r.state.is_final())
    {
        add(
            &rollout.version,
            format!("rollout {} is under way", rollout.id),
        );
        for host in rollout.waves.iter().flat_map(|wave| &wave.hosts) {
            if let Some(previous) = &host.previous_version {
                add(
                    previous,
                    format!("rollout {} may roll {} back to it", rollout.id, host.host),
                );
            }
        }
    }
    for host in hosts {
        if let Some(desired) = host.desired.get(app) {
            add(&desired.version, format!("desired on {}", host.name));
        }
    }
    for (host, version) in running {
        add(version, format!("running on {host}"));
    }
    uses
}

/// Splits `releases` (one app's, oldest first) into those to delete and those to keep: the
/// newest `keep` stay, and so does every release in `in_use`.
pub fn plan(
    releases: Vec<ReleaseRecord>,
    keep: usize,
    in_use: &BTreeMap<String, String>,
) -> PrunePlan {
    let n_old = releases.len().saturating_sub(keep);
    let mut removed = Vec::new();
    let mut kept = Vec::new();
    for (idx, release) in releases.into_iter().enumerate() {
        if idx >= n_old {
            kept.push((release, format!("one of the newest {keep}")));
        } else if let Some(why) = in_use.get(&release.version) {
            kept.push((release, format!("in use: {why}")));
        } else {
            removed.push(release);
        }
    }
    PrunePlan { removed, kept }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(version: &str) -> ReleaseRecord {
        ReleaseRecord {
            app: "web".into(),
            version: version.into(),
            artifact_digest: format!("sha256:{version}"),
            artifact_size: 1,
            env: BTreeMap::new(),
            created_unix_ms: 0,
            created_by: "admin".into(),
            smoke_timeouts_ms: Vec::new(),
            has_release_hook: false,
            min_healthy_ms: 0,
            unpacked_size: 0,
            secrets_sha256: String::new(),
            secrets: Default::default(),
        }
    }

    /// (versions oldest first, keep, versions in use) -> (removed, kept with their reasons).
    fn check(versions: &[&str], keep: usize, in_use: &[&str], removed: &[&str], kept: &[&str]) {
        let in_use: BTreeMap<String, String> = in_use
            .iter()
            .map(|v| (v.to_string(), "desired on h1".to_string()))
            .collect();
        let outcome = plan(versions.iter().map(|v| release(v)).collect(), keep, &in_use);
        let got_removed: Vec<&str> = outcome.removed.iter().map(|r| r.version.as_str()).collect();
        let got_kept: Vec<String> = outcome
            .kept
            .iter()
            .map(|(r, why)| format!("{} ({why})", r.version))
            .collect();
        assert_eq!(got_removed, removed, "{versions:?} keep {keep}");
        assert_eq!(got_kept, kept, "{versions:?} keep {keep}");
    }

    #[test]
    fn keeps_the_newest_and_what_is_in_use() {
        check(&[], 1, &[], &[], &[]);
        check(&["1"], 1, &[], &[], &["1 (one of the newest 1)"]);
        check(
            &["1", "2", "3"],
            1,
            &[],
            &["1", "2"],
            &["3 (one of the newest 1)"],
        );
        check(
            &["1", "2", "3", "4"],
            2,
            &["1"],
            &["2"],
            &[
                "1 (in use: desired on h1)",
                "3 (one of the newest 2)",
                "4 (one of the newest 2)",
            ],
        );
        check(
            &["1", "2"],
            5,
            &[],
            &[],
            &["1 (one of the newest 5)", "2 (one of the newest 5)"],
        );
    }
}
