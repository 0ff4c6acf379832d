//! Host lifecycle operations beyond a rollout: drain and undrain (in `FleetState`), and
//! converging a new host to everything an old one runs, the first half of `replace`. Each
//! operation is a change of desired state plus a condition the caller waits on; the waiting
//! (and streaming to the operator) is the API's. A converge-like is recorded as a convergence
//! per app (`history` shows it) and wakes the converger.

use crate::fleet_state::FleetState;
use crate::model::{ConvergenceRecord, ConvergenceResult, DeploymentRecord, Desired, HostState};
use crate::store::StoreError;
use fleet_proto::instance_state::InstanceState;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum LifecycleError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where a waited-on host operation stands.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    Waiting,
    Done,
    Failed(String),
}

/// Whether a draining host is drained yet.
pub fn drain_progress(fleet: &FleetState, host: &str) -> Result<Progress, StoreError> {
    Ok(match fleet.host_record(host)? {
        None => Progress::Failed(format!("host {host} was removed")),
        Some(record) => match fleet.host_state(&record) {
            HostState::Drained => Progress::Done,
            HostState::Draining => Progress::Waiting,
            _ => Progress::Failed(format!("host {host} was undrained meanwhile")),
        },
    })
}

/// The releases a converge assigned, to wait on.
#[derive(Debug, Clone)]
pub struct Convergence {
    pub host: String,
    pub id: String,
    pub apps: Vec<(String, String)>,
}

/// Gives `host` every release `like` should run, each as a fresh start. `rollout_of(app)`
/// names a rollout under way for an app: a convergence then waits, since the rollout is the
/// one writer of that app's desired releases.
pub async fn converge_like(
    fleet: &FleetState,
    host: &str,
    like: &str,
    actor: &str,
    rollout_of: impl Fn(&str) -> Option<String>,
) -> Result<Convergence, LifecycleError> {
    if host == like {
        return Err(LifecycleError::Invalid(format!(
            "host {host} cannot replace itself: name a new host"
        )));
    }
    let source = fleet
        .host_record(like)?
        .ok_or_else(|| LifecycleError::NotFound(format!("no host {like}: see `fleetctl hosts`")))?;
    let target = fleet
        .host_record(host)?
        .ok_or_else(|| LifecycleError::NotFound(format!(
            "no host {host}: it has not registered; see `fleetctl hosts` and the agent's log on that host"
        )))?;
    if target.drain.is_some() {
        return Err(LifecycleError::Invalid(format!(
            "host {host} is drained: undrain it first"
        )));
    }
    for app in source.desired.keys() {
        if let Some(id) = rollout_of(app) {
            return Err(LifecycleError::Invalid(format!(
                "rollout {id} of {app} is under way: wait for it (`fleetctl rollout status {id}`), then replace"
            )));
        }
    }
    let seq = fleet.next_seq("converge").await?;
    let id = format!("converge{seq}");
    let apps: Vec<(String, String)> = source
        .desired
        .iter()
        .map(|(app, d)| (app.clone(), d.version.clone()))
        .collect();
    let desired = source.desired.clone();
    let converge_id = id.clone();
    let why = format!("replaces {like}");
    let deployments = fleet.deployments(None)?;
    let selector_of = |key: &Option<String>| {
        deployments
            .iter()
            .find(|d| Some(DeploymentRecord::key(&d.app, &d.selector)) == *key)
            .map(|d| d.selector_text())
            .unwrap_or_default()
    };
    fleet
        .converge_hosts(&[host.to_string()], |record| {
            let mut made = Vec::with_capacity(desired.len());
            for (app, d) in &desired {
                let before = record.desired.insert(
                    app.clone(),
                    Desired {
                        version: d.version.clone(),
                        rollout_id: converge_id.clone(),
                        generation: seq,
                        smoke_timeout_ms: d.smoke_timeout_ms,
                        run_release_hook: false,
                        min_healthy_ms: d.min_healthy_ms,
                        deployment: d.deployment.clone(),
                    },
                );
                made.push(ConvergenceRecord {
                    id: converge_id.clone(),
                    seq,
                    app: app.clone(),
                    host: host.to_string(),
                    from_version: before.map(|b| b.version),
                    to_version: Some(d.version.clone()),
                    deployment: selector_of(&d.deployment),
                    deployment_key: d.deployment.clone().unwrap_or_default(),
                    why: why.clone(),
                    actor: actor.to_string(),
                    started_unix_ms: fleet_proto::now_unix_ms(),
                    finished_unix_ms: 0,
                    result: ConvergenceResult::Converging,
                    message: String::new(),
                });
            }
            made
        })
        .await?;
    // The converger looks at the host again (its labels may select other deployments).
    fleet.desired_changed();
    let list: Vec<String> = apps.iter().map(|(a, v)| format!("{a}@{v}")).collect();
    fleet
        .event(
            actor,
            "host.converging",
            "",
            host,
            format!(
                "host {host} takes what {like} runs: {}, asked by {actor}",
                if list.is_empty() {
                    "nothing".to_string()
                } else {
                    list.join(", ")
                }
            ),
        )
        .await;
    Ok(Convergence {
        host: host.to_string(),
        id,
        apps,
    })
}

/// Whether every release of a convergence runs on its host and passed its smoke checks.
pub fn converge_progress(fleet: &FleetState, convergence: &Convergence) -> Progress {
    let mut waiting = false;
    for (app, version) in &convergence.apps {
        let instance = fleet
            .instance(&convergence.host, app)
            .filter(|i| &i.version == version && i.rollout_id == convergence.id);
        match instance {
            Some(i) if i.state == InstanceState::Running => {}
            Some(i) if i.state == InstanceState::Failed => {
                return Progress::Failed(format!(
                    "{app}@{version} failed on {}: {}",
                    convergence.host, i.message
                ))
            }
            _ => waiting = true,
        }
    }
    if waiting {
        Progress::Waiting
    } else {
        Progress::Done
    }
}
