//! Standing deployments between rollouts. A completed rollout of `APP` with selector `S`
//! leaves the deployment `(APP, S) -> release`; a host's desired release of an app is that of
//! the most recently updated deployment whose selector its labels match. The converger keeps
//! hosts there without anyone running `rollout`: a host that joins, is undrained, comes back
//! from lost or changes labels is given the deployment's current release (or, when no
//! deployment matches it any more, none).
//!
//! What it decides is [`wanted`], a plain function of the host and the deployments; [`run`] does
//! the I/O. It never takes an app's rollout lock: a host that a rollout under way has already
//! changed is the rollout's; any other host converges to the deployment's current release, and
//! the rollout takes it later like any other host. A host that a failed (no auto-rollback) or
//! aborted rollout left on its release stays held there, shown as drift, until the next rollout
//! of its deployment; one that a rolled-back rollout put back stays as it was before it.

use crate::fleet_state::{FleetState, InstanceStatus};
use crate::model::{DeploymentRecord, Desired, HostRecord, RolloutState};
use crate::planner;
use crate::rollout::Rollouts;
use crate::store::StoreError;
use fleet_proto::instance_state::InstanceState;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::watch;

/// What a host should do about one app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    /// Nothing to change.
    Keep,
    /// Run this version (of this deployment: its selector as text, and its key).
    Set {
        version: String,
        deployment: String,
        key: String,
    },
    /// Run the app no more: no deployment of it matches the host.
    Remove,
}

/// What host `labels`, which runs `desired` of an app, should do, given the app's
/// `deployments` (most recently updated first; empty for an app that has none, which the
/// converger leaves alone) and the state of the rollout that last set `desired`
/// (`set_by`; `None` when it was no rollout, or is gone).
pub fn wanted(
    labels: &BTreeMap<String, String>,
    desired: Option<&Desired>,
    deployments: &[DeploymentRecord],
    set_by: Option<RolloutState>,
) -> Want {
    if deployments.is_empty() {
        return Want::Keep;
    }
    // Under way: the rollout owns the host. Halted without rollback, or aborted: held there.
    // Rolled back: back as it was before that rollout, held or not, until the next one.
    if matches!(
        set_by,
        Some(
            RolloutState::Running
                | RolloutState::Paused
                | RolloutState::Failed
                | RolloutState::Aborted
                | RolloutState::RolledBack
        )
    ) {
        return Want::Keep;
    }
    match deployments
        .iter()
        .find(|d| planner::matches(&d.selector, labels))
    {
        Some(d) if desired.is_some_and(|desired| desired.version == d.version) => Want::Keep,
        Some(d) => Want::Set {
            version: d.version.clone(),
            deployment: d.selector_text(),
            key: DeploymentRecord::key(&d.app, &d.selector),
        },
        // Only what a deployment that exists gave is taken away when none selects the host any
        // more; what was set before deployments existed, or by a rollout that never completed
        // its deployment, stays.
        None if desired
            .and_then(|d| d.deployment.as_deref())
            .is_some_and(|key| {
                deployments
                    .iter()
                    .any(|d| DeploymentRecord::key(&d.app, &d.selector) == key)
            }) =>
        {
            Want::Remove
        }
        None => Want::Keep,
    }
}

/// Why a host that a deployment selects is not healthy on its release, if it is not.
pub fn drift(
    deployment: &DeploymentRecord,
    host: &HostRecord,
    instance: Option<&InstanceStatus>,
    lost: bool,
) -> Option<String> {
    let desired = host.desired.get(&deployment.app);
    if host.drain.is_some() {
        return Some("drained".to_string());
    }
    if lost {
        return Some("lost".to_string());
    }
    match desired {
        None => return Some("converging: not assigned yet".to_string()),
        Some(d) if d.version != deployment.version => {
            return Some(format!(
                "held on {} by {} (a rollout that did not complete)",
                d.version, d.rollout_id
            ))
        }
        Some(_) => {}
    }
    let Some(instance) = instance.filter(|i| i.version == deployment.version) else {
        return Some("converging".to_string());
    };
    match instance.state {
        InstanceState::Running if instance.restarts > 0 => Some(format!(
            "crash-looping: restarted {} time(s)",
            instance.restarts
        )),
        InstanceState::Running => None,
        InstanceState::Failed => Some(format!("failed: {}", instance.message)),
        InstanceState::Crashed => Some(format!(
            "crash-looping: {} ({} restarts)",
            instance.message, instance.restarts
        )),
        other => Some(format!("converging ({other})")),
    }
}

/// A deployment and how its hosts stand.
#[derive(Debug, Clone)]
pub struct DeploymentReport {
    pub deployment: DeploymentRecord,
    pub hosts_matching: u32,
    pub hosts_on_release: u32,
    pub hosts_healthy: u32,
    /// `(host, why)` for every matching host not healthy on the release.
    pub drift: Vec<(String, String)>,
}

/// The deployments (of one app, when given) and their hosts: each host counts for the newest
/// deployment of an app that selects it.
pub fn report(fleet: &FleetState, app: Option<&str>) -> Result<Vec<DeploymentReport>, StoreError> {
    let deployments = fleet.deployments(app)?;
    let hosts = fleet.host_records()?;
    let mut reports = Vec::with_capacity(deployments.len());
    for deployment in &deployments {
        let mut report = DeploymentReport {
            deployment: deployment.clone(),
            hosts_matching: 0,
            hosts_on_release: 0,
            hosts_healthy: 0,
            drift: Vec::new(),
        };
        for host in &hosts {
            let owner = deployments
                .iter()
                .filter(|d| d.app == deployment.app)
                .find(|d| planner::matches(&d.selector, &host.labels));
            if owner != Some(deployment) {
                continue;
            }
            report.hosts_matching += 1;
            if host
                .desired
                .get(&deployment.app)
                .is_some_and(|d| d.version == deployment.version)
            {
                report.hosts_on_release += 1;
            }
            let instance = fleet.instance(&host.name, &deployment.app);
            match drift(deployment, host, instance.as_ref(), fleet.is_lost(host)) {
                None => report.hosts_healthy += 1,
                Some(why) => report.drift.push((host.name.clone(), why)),
            }
        }
        reports.push(report);
    }
    Ok(reports)
}

/// Keeps hosts on their deployments until `stop` turns true: after every change of the fleet's
/// shape (a host connects, is relabeled, drained, undrained or forgotten; a rollout ends), not
/// on every instance report, and once at start.
pub async fn run(fleet: Arc<FleetState>, rollouts: Arc<Rollouts>, mut stop: watch::Receiver<bool>) {
    let mut changes = fleet.topology_changes();
    loop {
        changes.borrow_and_update();
        if let Err(e) = converge_once(&fleet, &rollouts).await {
            tracing::error!("cannot converge hosts: {e}");
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = stop.wait_for(|stop| *stop) => return,
        }
    }
}

/// One pass: every host, every app that has deployments.
async fn converge_once(fleet: &FleetState, rollouts: &Rollouts) -> Result<(), StoreError> {
    let mut by_app: BTreeMap<String, Vec<DeploymentRecord>> = BTreeMap::new();
    for deployment in fleet.deployments(None)? {
        by_app
            .entry(deployment.app.clone())
            .or_default()
            .push(deployment);
    }
    if by_app.is_empty() {
        return Ok(());
    }
    let set_by = |desired: Option<&Desired>| -> Option<RolloutState> {
        let id = &desired?.rollout_id;
        if rollouts.is_active(id) {
            return Some(RolloutState::Running);
        }
        fleet.rollout(id).ok().flatten().map(|r| r.state)
    };
    for host in fleet.host_records()? {
        for (app, deployments) in &by_app {
            let desired = host.desired.get(app);
            let want = wanted(&host.labels, desired, deployments, set_by(desired));
            if want == Want::Keep {
                continue;
            }
            // Written under the host lock from the record as it is then: a rollout that wrote
            // meanwhile wins.
            let seq = fleet.next_seq("converge").await?;
            let id = format!("converge{seq}");
            let mut applied = Want::Keep;
            fleet
                .update_hosts(
                    std::slice::from_ref(&host.name),
                    |record| {
                        let desired = record.desired.get(app);
                        applied = wanted(&record.labels, desired, deployments, set_by(desired));
                        match &applied {
                            Want::Keep => {}
                            Want::Remove => {
                                record.desired.remove(app);
                            }
                            Want::Set { version, key, .. } => {
                                record.desired.insert(
                                    app.clone(),
                                    Desired {
                                        version: version.clone(),
                                        rollout_id: id.clone(),
                                        generation: seq,
                                        smoke_timeout_ms: 0,
                                        run_release_hook: false,
                                        min_healthy_ms: None,
                                        deployment: Some(key.clone()),
                                    },
                                );
                            }
                        }
                    },
                    None,
                )
                .await?;
            let message = match &applied {
                Want::Keep => continue,
                Want::Set {
                    version,
                    deployment,
                    ..
                } => format!(
                    "host {} converges to {app}@{version}, the release of its deployment {deployment} ({id})",
                    host.name
                ),
                Want::Remove => format!(
                    "host {} stops {app}: no deployment of it selects the host any more ({id})",
                    host.name
                ),
            };
            fleet
                .event("controller", "host.converging", app, &host.name, message)
                .await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::fleet_state::tests::labels;

    fn deployment(selector: &str, version: &str) -> DeploymentRecord {
        DeploymentRecord {
            app: "web".into(),
            selector: labels(selector),
            version: version.into(),
            rollout_id: "r1".into(),
            updated_unix_ms: 0,
            updated_by: "ci".into(),
            seq: 1,
        }
    }

    fn desired(version: &str) -> Desired {
        Desired {
            deployment: Some("web/env=prod".into()),
            version: version.into(),
            rollout_id: "r0".into(),
            generation: 1,
            smoke_timeout_ms: 0,
            run_release_hook: false,
            min_healthy_ms: None,
        }
    }

    fn set(version: &str, deployment: &str) -> Want {
        let selector = if deployment == "(every host)" {
            String::new()
        } else {
            deployment.to_string()
        };
        Want::Set {
            version: version.into(),
            deployment: deployment.into(),
            key: format!("web/{selector}"),
        }
    }

    #[test]
    fn a_host_runs_the_release_of_the_newest_deployment_that_selects_it() {
        use RolloutState::*;
        let prod = deployment("env=prod", "1.1");
        let staging = deployment("env=staging", "2.0");
        let everyone = deployment("", "0.9");
        let newest_first = [prod.clone(), staging.clone()];
        // (labels, runs, deployments, set by a rollout in state, wanted)
        type Case<'a> = (
            &'a str,
            Option<&'a str>,
            &'a [DeploymentRecord],
            Option<RolloutState>,
            Want,
        );
        let cases: Vec<Case> = vec![
            // A late joiner converges; one already there stays.
            (
                "env=prod",
                None,
                &newest_first,
                None,
                set("1.1", "env=prod"),
            ),
            (
                "env=prod",
                Some("1.1"),
                &newest_first,
                Some(Succeeded),
                Want::Keep,
            ),
            // Back from drain or lost on an old release: to the current one.
            (
                "env=prod",
                Some("1.0"),
                &newest_first,
                Some(Succeeded),
                set("1.1", "env=prod"),
            ),
            (
                "env=staging",
                Some("1.1"),
                &newest_first,
                None,
                set("2.0", "env=staging"),
            ),
            // Labels that no deployment selects any more: stop the app.
            ("env=dev", Some("1.1"), &newest_first, None, Want::Remove),
            ("env=dev", None, &newest_first, None, Want::Keep),
            // An app with no deployment is left alone (fleets from before deployments).
            ("env=prod", Some("1.0"), &[], None, Want::Keep),
            // A rollout under way owns its hosts; a failed or aborted one holds them.
            (
                "env=prod",
                Some("1.2"),
                &newest_first,
                Some(Running),
                Want::Keep,
            ),
            (
                "env=prod",
                Some("1.2"),
                &newest_first,
                Some(Paused),
                Want::Keep,
            ),
            (
                "env=prod",
                Some("1.2"),
                &newest_first,
                Some(Failed),
                Want::Keep,
            ),
            (
                "env=prod",
                Some("1.2"),
                &newest_first,
                Some(Aborted),
                Want::Keep,
            ),
            // Rolled back: as it was before that rollout (here held on 1.0), until the next one.
            (
                "env=prod",
                Some("1.0"),
                &newest_first,
                Some(RolledBack),
                Want::Keep,
            ),
        ];
        for (host_labels, runs, deployments, state, expect) in cases {
            let runs = runs.map(desired);
            assert_eq!(
                wanted(&labels(host_labels), runs.as_ref(), deployments, state),
                expect,
                "{host_labels} {runs:?} {state:?}"
            );
        }
        // What was set before deployments existed is never taken away.
        let legacy = Desired {
            deployment: None,
            ..desired("0.1")
        };
        assert_eq!(
            wanted(&labels("env=dev"), Some(&legacy), &newest_first, None),
            Want::Keep
        );
        // Given for a deployment that never came to exist (its rollout failed, was aborted,
        // rolled back): kept.
        let never = Desired {
            deployment: Some("web/env=dev".into()),
            ..desired("0.1")
        };
        assert_eq!(
            wanted(
                &labels("env=dev"),
                Some(&never),
                &newest_first,
                Some(RolloutState::RolledBack)
            ),
            Want::Keep
        );
        // The most recently updated deployment that matches wins.
        let both = [everyone.clone(), prod.clone()];
        assert_eq!(
            wanted(&labels("env=prod"), None, &both, None),
            set("0.9", "(every host)")
        );
    }

    #[test]
    fn drift_says_why_a_host_is_not_healthy_on_its_release() {
        let d = deployment("env=prod", "1.1");
        let mut host = HostRecord {
            name: "h1".into(),
            labels: labels("env=prod"),
            advertise_addr: "127.0.0.2".into(),
            registered_unix_ms: 0,
            last_seen_unix_ms: 0,
            desired: [("web".to_string(), desired("1.1"))].into(),
            drain: None,
        };
        let running = |restarts| InstanceStatus {
            app: "web".into(),
            version: "1.1".into(),
            state: InstanceState::Running,
            message: String::new(),
            since_unix_ms: 0,
            restarts,
            rollout_id: "r0".into(),
        };
        assert_eq!(drift(&d, &host, Some(&running(0)), false), None);
        assert!(drift(&d, &host, Some(&running(3)), false)
            .unwrap()
            .contains("crash-looping"));
        assert_eq!(drift(&d, &host, None, true).as_deref(), Some("lost"));
        assert!(drift(&d, &host, None, false)
            .unwrap()
            .contains("converging"));
        host.desired.insert("web".into(), desired("1.0"));
        assert!(drift(&d, &host, None, false)
            .unwrap()
            .contains("held on 1.0"));
    }
}
