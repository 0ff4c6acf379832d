//! Standing deployments between rollouts. A completed rollout of `APP` with selector `S`
//! leaves the deployment `(APP, S) -> release`; a host's desired release of an app is that of
//! the most recently updated deployment whose selector its labels match. The converger keeps
//! hosts there without anyone running `rollout`: a host that joins, is undrained, comes back
//! from lost or changes labels is given the deployment's current release (or, when no
//! deployment matches it any more, none).
//!
//! What it decides are plain functions: [`wanted`] (what a host should run of an app, from its
//! labels and the app's deployments), [`converge_now`] (which of the hosts that should change
//! go now, under the budget) and [`settled`] (how a convergence ended); [`run`] does the I/O.
//!
//! **The budget.** A host that converges counts against the unavailability budget like a
//! rollout's hosts: per deployment, no more of the hosts it selects may be unavailable
//! ([`budget::unavailable`], plus the hosts still converging) than its budget, which is the
//! `max_unavailable` its last rollout ran with (`RolloutRecord::max_unavailable`), or 1 for a
//! rollout from before budgets. A host that serves the app healthy goes only within that
//! budget; a host that is down already goes at once (converging is its way up), and so does a
//! host never given the app, such as a fresh joiner (starting it takes nothing down; it counts
//! as down from then until it is healthy). A host that waits is taken when the converger wakes
//! again: it wakes on reports that end a transition while anything waits. A convergence that
//! fails leaves its host failed (and so down, holding the budget) and touches no other host.
//!
//! **History.** Every convergence is a [`ConvergenceRecord`], written with the desired state it
//! sets, shown by `history APP` and settled (passed, failed, stopped, superseded) once its host
//! reports; it says why the host moved (`joined`, `relabeled by ann`, ...) as `FleetState`
//! noted it. It never takes an app's rollout lock: a host that a rollout under way has already
//! changed is the rollout's; any other host converges to the deployment's current release, and
//! the rollout takes it later like any other host. A host that a failed (no auto-rollback) or
//! aborted rollout left on its release stays held there, shown as drift, until the next rollout
//! of its deployment; one that a rolled-back rollout put back stays as it was before it.

use crate::budget;
use crate::fleet_state::{FleetState, InstanceStatus};
use crate::model::{
    ConvergenceRecord, ConvergenceResult, DeploymentRecord, Desired, HostRecord, RolloutState,
};
use crate::planner;
use crate::rollout::Rollouts;
use crate::store::StoreError;
use fleet_proto::instance_state::InstanceState;
use std::collections::{BTreeMap, BTreeSet};
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

/// How a host that should converge stands now, for the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// It runs a healthy instance of the app: converging it takes that down.
    Serving,
    /// It has no healthy instance and already counts as down for its deployment.
    Down,
    /// It has no healthy instance and does not count yet (a host never given the app, such as
    /// a fresh joiner): converging it takes nothing down, but it counts once given the app.
    Idle,
}

/// A host that should change one app now (its [`Want`] is not `Keep`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub host: String,
    pub app: String,
    /// The deployment it counts against (`DeploymentRecord::key`): the one that selects it,
    /// or, for an app taken away, the one that gave it.
    pub deployment: String,
    pub standing: Standing,
}

/// Which of `candidates` converge now; the others wait until the converger is woken again.
/// `down` counts, per deployment, the hosts it selects that are unavailable now (see
/// [`budget::unavailable`]) or still converging; `budgets` is each deployment's budget (one
/// missing counts as 1). The rules, in order:
///
/// - a host that is `Down` always goes: it is down already, and converging it is the way up;
/// - a host that is `Idle` always goes (starting it takes nothing down), and counts as down
///   from then on, so it is taken before the serving ones;
/// - a `Serving` host goes only while fewer of its deployment's hosts are down than the
///   budget allows, and counts as down from then on;
/// - within each kind, in the order given.
pub fn converge_now(
    candidates: &[Candidate],
    down: &BTreeMap<String, usize>,
    budgets: &BTreeMap<String, usize>,
) -> Vec<Candidate> {
    let mut down = down.clone();
    let mut chosen = Vec::with_capacity(candidates.len());
    for candidate in candidates
        .iter()
        .filter(|c| c.standing != Standing::Serving)
    {
        if candidate.standing == Standing::Idle {
            *down.entry(candidate.deployment.clone()).or_default() += 1;
        }
        chosen.push(candidate.clone());
    }
    for candidate in candidates
        .iter()
        .filter(|c| c.standing == Standing::Serving)
    {
        let budget = budgets
            .get(&candidate.deployment)
            .copied()
            .unwrap_or_else(|| budget::default_budget(None));
        let down = down.entry(candidate.deployment.clone()).or_default();
        if *down < budget {
            *down += 1;
            chosen.push(candidate.clone());
        }
    }
    chosen
}

/// How a convergence under way ended, if it has: from its host's record (`None` once the host
/// is forgotten) and the instance the host last reported of the app.
pub fn settled(
    convergence: &ConvergenceRecord,
    host: Option<&HostRecord>,
    instance: Option<&InstanceStatus>,
) -> Option<(ConvergenceResult, String)> {
    let Some(host) = host else {
        return Some((
            ConvergenceResult::Superseded,
            format!("host {} was removed", convergence.host),
        ));
    };
    let desired = host.desired.get(&convergence.app);
    match &convergence.to_version {
        Some(version) => {
            match desired {
                Some(d) if d.rollout_id == convergence.id => {}
                Some(d) => {
                    return Some((
                        ConvergenceResult::Superseded,
                        format!(
                            "{} gave it {}@{} since",
                            d.rollout_id, convergence.app, d.version
                        ),
                    ))
                }
                None => {
                    return Some((
                        ConvergenceResult::Superseded,
                        format!("{} was taken away from it since", convergence.app),
                    ))
                }
            }
            let instance = instance.filter(|i| i.rollout_id == convergence.id)?;
            match instance.state {
                InstanceState::Running => Some((
                    ConvergenceResult::Passed,
                    format!("{}@{version} runs and passed its checks", convergence.app),
                )),
                InstanceState::Failed => Some((
                    ConvergenceResult::Failed,
                    format!("{}@{version} failed: {}", convergence.app, instance.message),
                )),
                // On its way, or crashed and restarting: not settled yet.
                _ => None,
            }
        }
        None => {
            if let Some(d) = desired {
                return Some((
                    ConvergenceResult::Superseded,
                    format!(
                        "{} gave it {}@{} again",
                        d.rollout_id, convergence.app, d.version
                    ),
                ));
            }
            match instance {
                None => Some((ConvergenceResult::Stopped, "stopped".to_string())),
                Some(i) if matches!(i.state, InstanceState::Stopped | InstanceState::Failed) => {
                    Some((ConvergenceResult::Stopped, "stopped".to_string()))
                }
                Some(_) => None,
            }
        }
    }
}

/// Keeps hosts on their deployments until `stop` turns true: once at start, after every change
/// of the fleet's shape (a host connects, is relabeled, drained, undrained or forgotten; a
/// rollout ends; `replace` gives a host releases), and, while hosts wait for the budget or
/// convergences for their result, after every report that ends a transition (an instance
/// running, failed, crashed or stopped), which is what frees budget. Not on every report.
pub async fn run(fleet: Arc<FleetState>, rollouts: Arc<Rollouts>, mut stop: watch::Receiver<bool>) {
    let mut changes = fleet.topology_changes();
    let mut settled = fleet.settled_changes();
    loop {
        changes.borrow_and_update();
        settled.borrow_and_update();
        let busy = match converge_once(&fleet, &rollouts).await {
            Ok(busy) => busy,
            Err(e) => {
                tracing::error!("cannot converge hosts: {e}");
                // Tried again on the next report or change.
                true
            }
        };
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            changed = settled.changed(), if busy => if changed.is_err() { return },
            _ = stop.wait_for(|stop| *stop) => return,
        }
    }
}

/// Records the result of every convergence whose host has said how it went.
async fn settle(fleet: &FleetState) -> Result<(), StoreError> {
    for mut convergence in fleet.pending_convergences() {
        let host = fleet.host_record(&convergence.host)?;
        let instance = fleet.instance(&convergence.host, &convergence.app);
        let Some((result, message)) = settled(&convergence, host.as_ref(), instance.as_ref())
        else {
            continue;
        };
        convergence.result = result;
        convergence.message = message;
        convergence.finished_unix_ms = fleet_proto::now_unix_ms();
        let (host, app) = (convergence.host.clone(), convergence.app.clone());
        let text = format!(
            "convergence {} of host {host} {}: {}",
            convergence.id,
            result.as_str(),
            convergence.message
        );
        fleet.finish_convergence(convergence).await?;
        fleet
            .event(
                "controller",
                &format!("host.converge_{}", result.as_str()),
                &app,
                &host,
                text,
            )
            .await;
    }
    Ok(())
}

/// One pass: settles what it can, then moves, under each deployment's budget, every host of
/// every app that has deployments. Returns whether anything waits (hosts for the budget, or
/// convergences for their result).
async fn converge_once(fleet: &FleetState, rollouts: &Rollouts) -> Result<bool, StoreError> {
    settle(fleet).await?;
    let mut by_app: BTreeMap<String, Vec<DeploymentRecord>> = BTreeMap::new();
    for deployment in fleet.deployments(None)? {
        by_app
            .entry(deployment.app.clone())
            .or_default()
            .push(deployment);
    }
    let pending = fleet.pending_convergences();
    if by_app.is_empty() {
        return Ok(!pending.is_empty());
    }
    let set_by = |desired: Option<&Desired>| -> Option<RolloutState> {
        let id = &desired?.rollout_id;
        if rollouts.is_active(id) {
            return Some(RolloutState::Running);
        }
        fleet.rollout(id).ok().flatten().map(|r| r.state)
    };
    let mut budgets = BTreeMap::new();
    for deployment in by_app.values().flatten() {
        let rollout = fleet.rollout(&deployment.rollout_id)?;
        budgets.insert(
            DeploymentRecord::key(&deployment.app, &deployment.selector),
            budget::default_budget(rollout.map(|r| r.max_unavailable)),
        );
    }
    // Who is down per deployment: what the budget counts, and the convergences under way.
    let mut down: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for convergence in &pending {
        down.entry(convergence.deployment_key.clone())
            .or_default()
            .insert(convergence.host.clone());
    }
    let hosts = fleet.host_records()?;
    let mut candidates = Vec::new();
    for host in &hosts {
        let lost = fleet.is_lost(host);
        let mut needs_nothing = true;
        for (app, deployments) in &by_app {
            let instance = fleet.instance(&host.name, app);
            let unavailable = budget::unavailable(host, app, instance.as_ref(), lost).is_some();
            let owner = deployments
                .iter()
                .find(|d| planner::matches(&d.selector, &host.labels));
            if let (Some(owner), true) = (owner, unavailable) {
                down.entry(DeploymentRecord::key(&owner.app, &owner.selector))
                    .or_default()
                    .insert(host.name.clone());
            }
            let desired = host.desired.get(app);
            let (deployment, removes) =
                match wanted(&host.labels, desired, deployments, set_by(desired)) {
                    Want::Keep => continue,
                    Want::Set { key, .. } => (key, false),
                    Want::Remove => (
                        desired
                            .and_then(|d| d.deployment.clone())
                            .unwrap_or_default(),
                        true,
                    ),
                };
            needs_nothing = false;
            let serving = host.drain.is_none()
                && !lost
                && instance.is_some_and(|i| i.state == InstanceState::Running);
            // Not serving: counted already (given the app, and down), or taking an app away
            // from a host that does not serve it (which takes nothing down and adds nothing),
            // or idle (never given the app: a fresh joiner).
            let standing = if serving {
                Standing::Serving
            } else if unavailable || removes {
                Standing::Down
            } else {
                Standing::Idle
            };
            candidates.push(Candidate {
                host: host.name.clone(),
                app: app.clone(),
                deployment,
                standing,
            });
        }
        if needs_nothing {
            fleet.forget_why(&host.name);
        }
    }
    let down: BTreeMap<String, usize> = down.into_iter().map(|(k, v)| (k, v.len())).collect();
    let chosen = converge_now(&candidates, &down, &budgets);
    let waiting = candidates.len() - chosen.len();
    if waiting > 0 {
        tracing::debug!("{waiting} host(s) wait for their deployment's unavailability budget");
    }
    for candidate in &chosen {
        converge_host(fleet, candidate, &by_app[&candidate.app], &set_by).await?;
    }
    Ok(waiting > 0 || !fleet.pending_convergences().is_empty())
}

/// Moves one host's app to what its deployments want, recorded as a convergence.
async fn converge_host(
    fleet: &FleetState,
    candidate: &Candidate,
    deployments: &[DeploymentRecord],
    set_by: &impl Fn(Option<&Desired>) -> Option<RolloutState>,
) -> Result<(), StoreError> {
    let (host, app) = (&candidate.host, &candidate.app);
    let seq = fleet.next_seq("converge").await?;
    let id = format!("converge{seq}");
    let why = fleet.why(host);
    // Written under the host lock from the record as it is then: a rollout that wrote
    // meanwhile wins.
    let written = fleet
        .converge_hosts(std::slice::from_ref(host), |record| {
            let desired = record.desired.get(app);
            let want = wanted(&record.labels, desired, deployments, set_by(desired));
            let from_version = desired.map(|d| d.version.clone());
            let fallback = match (&want, desired) {
                (_, None) => "not given the app yet".to_string(),
                (Want::Remove, Some(_)) => "no deployment selects it any more".to_string(),
                (_, Some(_)) => "drifted from its deployment".to_string(),
            };
            let convergence =
                |to_version: Option<String>, deployment: String, key: String| ConvergenceRecord {
                    id: id.clone(),
                    seq,
                    app: app.clone(),
                    host: host.clone(),
                    from_version: from_version.clone(),
                    to_version,
                    deployment,
                    deployment_key: key,
                    why: why.clone().unwrap_or(fallback.clone()),
                    actor: "controller".to_string(),
                    started_unix_ms: fleet_proto::now_unix_ms(),
                    finished_unix_ms: 0,
                    result: ConvergenceResult::Converging,
                    message: String::new(),
                };
            match want {
                Want::Keep => Vec::new(),
                Want::Remove => {
                    let key = desired
                        .and_then(|d| d.deployment.clone())
                        .unwrap_or_default();
                    let selector = deployments
                        .iter()
                        .find(|d| DeploymentRecord::key(&d.app, &d.selector) == key)
                        .map(|d| d.selector_text())
                        .unwrap_or_default();
                    record.desired.remove(app);
                    vec![convergence(None, selector, key)]
                }
                Want::Set {
                    version,
                    deployment,
                    key,
                } => {
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
                    vec![convergence(Some(version), deployment, key)]
                }
            }
        })
        .await?;
    for convergence in written {
        let message = match &convergence.to_version {
            Some(version) => format!(
                "host {host} converges to {app}@{version}, the release of its deployment {} ({why}; {id})",
                convergence.deployment,
                why = convergence.why,
            ),
            None => format!(
                "host {host} stops {app}: no deployment of it selects the host any more ({why}; {id})",
                why = convergence.why,
            ),
        };
        fleet
            .event("controller", "host.converging", app, host, message)
            .await;
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
    fn hosts_converge_now_within_their_deployments_budget() {
        use Standing::*;
        let candidate = |host: &str, deployment: &str, standing| Candidate {
            host: host.into(),
            app: "web".into(),
            deployment: deployment.into(),
            standing,
        };
        let counts = |pairs: &[(&str, usize)]| -> BTreeMap<String, usize> {
            pairs.iter().map(|(k, n)| (k.to_string(), *n)).collect()
        };
        // (candidates (host, deployment, standing), down per deployment, budgets, who goes)
        type Case<'a> = (
            &'a [(&'a str, &'a str, Standing)],
            &'a [(&'a str, usize)],
            &'a [(&'a str, usize)],
            &'a [&'a str],
        );
        let cases: Vec<Case> = vec![
            // Ten hosts relabeled at once, a budget of 1: one restarts, nine wait.
            (
                &[
                    ("h1", "prod", Serving),
                    ("h2", "prod", Serving),
                    ("h3", "prod", Serving),
                ],
                &[],
                &[("prod", 1)],
                &["h1"],
            ),
            // A budget of 2 with one host already down: one more.
            (
                &[("h1", "prod", Serving), ("h2", "prod", Serving)],
                &[("prod", 1)],
                &[("prod", 2)],
                &["h1"],
            ),
            // The budget is spent: every serving host waits.
            (
                &[("h1", "prod", Serving)],
                &[("prod", 2)],
                &[("prod", 2)],
                &[],
            ),
            // A host that is down already goes, whatever is spent.
            (
                &[("h1", "prod", Down)],
                &[("prod", 5)],
                &[("prod", 1)],
                &["h1"],
            ),
            // A fresh joiner goes (it takes nothing down), and then counts: the serving host
            // behind it waits.
            (
                &[("h1", "prod", Serving), ("h9", "prod", Idle)],
                &[],
                &[("prod", 1)],
                &["h9"],
            ),
            // Two idle joiners both go, even past the budget.
            (
                &[("h8", "prod", Idle), ("h9", "prod", Idle)],
                &[],
                &[("prod", 1)],
                &["h8", "h9"],
            ),
            // Budgets are per deployment.
            (
                &[("h1", "prod", Serving), ("h2", "staging", Serving)],
                &[("prod", 1)],
                &[("prod", 1), ("staging", 1)],
                &["h2"],
            ),
            // A deployment with no budget given gets 1.
            (
                &[("h1", "prod", Serving), ("h2", "prod", Serving)],
                &[],
                &[],
                &["h1"],
            ),
        ];
        for (candidates, down, budgets, expect) in cases {
            let candidates: Vec<Candidate> = candidates
                .iter()
                .map(|(host, deployment, standing)| candidate(host, deployment, *standing))
                .collect();
            let chosen: Vec<String> = converge_now(&candidates, &counts(down), &counts(budgets))
                .into_iter()
                .map(|c| c.host)
                .collect();
            assert_eq!(
                chosen, expect,
                "{candidates:?} down {down:?} budgets {budgets:?}"
            );
        }
        // The default budget: what the deployment's last rollout ran with, or 1.
        for (recorded, expect) in [(Some(3), 3), (Some(0), 1), (None, 1)] {
            assert_eq!(budget::default_budget(recorded), expect, "{recorded:?}");
        }
    }

    #[test]
    fn a_convergence_settles_when_its_host_says_how_it_went() {
        use ConvergenceResult::*;
        let convergence = |to: Option<&str>| ConvergenceRecord {
            id: "converge7".into(),
            seq: 7,
            app: "web".into(),
            host: "h1".into(),
            from_version: None,
            to_version: to.map(String::from),
            deployment: "env=prod".into(),
            deployment_key: "web/env=prod".into(),
            why: "joined".into(),
            actor: "controller".into(),
            started_unix_ms: 0,
            finished_unix_ms: 0,
            result: Converging,
            message: String::new(),
        };
        let host = |desired_by: Option<&str>| HostRecord {
            name: "h1".into(),
            labels: labels("env=prod"),
            advertise_addr: "127.0.0.2".into(),
            registered_unix_ms: 0,
            last_seen_unix_ms: 0,
            desired: desired_by
                .map(|id| {
                    let d = Desired {
                        rollout_id: id.into(),
                        ..desired("1.1")
                    };
                    [("web".to_string(), d)].into()
                })
                .unwrap_or_default(),
            drain: None,
            agent: Default::default(),
        };
        let instance = |state, rollout_id: &str| InstanceStatus {
            app: "web".into(),
            version: "1.1".into(),
            state,
            message: "exit status 1".into(),
            since_unix_ms: 0,
            restarts: 0,
            rollout_id: rollout_id.into(),
        };
        use InstanceState as S;
        // (to version, host desired by, instance reported, result)
        type Case<'a> = (
            Option<&'a str>,
            Option<Option<&'a str>>,
            Option<InstanceStatus>,
            Option<ConvergenceResult>,
        );
        let cases: Vec<Case> = vec![
            // Given a release: passed once it runs for this convergence, failed when it fails.
            (
                Some("1.1"),
                Some(Some("converge7")),
                Some(instance(S::Running, "converge7")),
                Some(Passed),
            ),
            (
                Some("1.1"),
                Some(Some("converge7")),
                Some(instance(S::Failed, "converge7")),
                Some(Failed),
            ),
            // On its way, or still the old instance: not yet.
            (
                Some("1.1"),
                Some(Some("converge7")),
                Some(instance(S::Checking, "converge7")),
                None,
            ),
            (
                Some("1.1"),
                Some(Some("converge7")),
                Some(instance(S::Running, "r1")),
                None,
            ),
            (Some("1.1"), Some(Some("converge7")), None, None),
            // Crashed and restarting: not yet (it still counts as down).
            (
                Some("1.1"),
                Some(Some("converge7")),
                Some(instance(S::Crashed, "converge7")),
                None,
            ),
            // A rollout or another convergence wrote the host since, or took the app away.
            (
                Some("1.1"),
                Some(Some("r9")),
                Some(instance(S::Running, "r9")),
                Some(Superseded),
            ),
            (Some("1.1"), Some(None), None, Some(Superseded)),
            // The host was forgotten.
            (Some("1.1"), None, None, Some(Superseded)),
            // Taken away: stopped once the instance is gone or stopped.
            (None, Some(None), Some(instance(S::Stopping, "r1")), None),
            (
                None,
                Some(None),
                Some(instance(S::Stopped, "r1")),
                Some(Stopped),
            ),
            (None, Some(None), None, Some(Stopped)),
            (None, Some(Some("r9")), None, Some(Superseded)),
        ];
        for (to, desired_by, reported, expect) in cases {
            let record = desired_by.map(host);
            let got = settled(&convergence(to), record.as_ref(), reported.as_ref());
            assert_eq!(
                got.as_ref().map(|(result, _)| *result),
                expect,
                "{to:?} {desired_by:?} {reported:?}: {got:?}"
            );
        }
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
            agent: Default::default(),
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
