//! The rollout engine: starts, runs, pauses, resumes, aborts and rolls back rollouts.
//!
//! A rollout is planned once (`planner`), persisted, then driven wave by wave by one task
//! (`execute`). For each wave it changes the hosts' desired release (persisted together with
//! the rollout record), waits until every host of the wave reported `running` for this
//! rollout (its smoke checks passed) or until one failed or the deadline passed, and only
//! then widens. A failure halts the rollout and, unless disabled, puts every host it touched
//! back on the release it ran before, in batches that keep to its unavailability budget (the
//! hosts already down first). A restarted controller finds running rollouts in the store and
//! continues them at the wave they stood at, or with their rollback where it stood; paused
//! ones stay paused.

use crate::budget;
use crate::fleet_state::{FleetState, NewEvent};
use crate::model::{
    Batch, DeploymentRecord, HostRecord, HostResult, RolloutPolicy, RolloutRecord, RolloutState,
    Wave, WaveHost, WaveState,
};
use crate::planner;
use crate::step::{self, FitWave, HostFacts, Observed, WaveEnd};
use crate::store::StoreError;
use fleet_proto::duration::format_duration;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::{broadcast, watch};

/// The tracing target of the executor's timing lines (debug): when a wave begins, when a look
/// at it saw hosts pass, when it settled. `fleet-bench pace` turns them into a breakdown per
/// wave (`RUST_LOG=info,fleet::timing=debug`).
pub const TIMING: &str = "fleet::timing";
/// How long a wave may take when the operator gave no `--smoke-timeout`.
const DEFAULT_WAVE_DEADLINE: Duration = Duration::from_secs(300);
/// Added to `--smoke-timeout` for the fetch and start before the checks.
const FETCH_AND_START_ALLOWANCE: Duration = Duration::from_secs(60);

#[derive(Debug, Error)]
pub enum RolloutError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// The unavailability budget asked for is spent before the rollout could start.
    #[error("{0}")]
    BudgetSpent(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the operator asked for.
#[derive(Debug, Clone)]
pub struct StartRequest {
    pub app: String,
    pub version: String,
    pub policy: RolloutPolicy,
    pub actor: String,
}

/// One step of a rollout, as shown live to the operator.
#[derive(Debug, Clone)]
pub struct Progress {
    /// The record as of the rollout's last change of state or wave (or its end): lines about
    /// single hosts share one snapshot instead of a copy each (every host of every wave: the
    /// 256 lines a follower may lag held 256 copies, hundreds of MB at 10,000 hosts).
    pub rollout: Arc<RolloutRecord>,
    pub line: String,
}

struct Handle {
    app: String,
    control: watch::Sender<(Control, String)>,
    progress: broadcast::Sender<Progress>,
}

/// The rollouts under way, by id. At most one per app.
#[derive(Default)]
pub struct Rollouts {
    active: Mutex<HashMap<String, Handle>>,
    /// The executors' tasks, to stop them on shutdown.
    executors: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Turns true when the controller shuts down: every executor stops where it stands.
    stopping: watch::Sender<bool>,
    /// The runtime executors run on (the agents' lane, `crate::lanes`), whichever runtime
    /// starts them; none: the caller's.
    home: Option<tokio::runtime::Handle>,
}

/// The key a rollout of `app` is held under in `Rollouts::active` while it is being started,
/// before it has its id.
fn reserved_key(app: &str) -> String {
    format!("reserved-{app}")
}

impl Rollouts {
    /// Rollouts whose executors run on `home`, also when a client's call (served on the
    /// clients' lane) starts them.
    pub fn on(home: tokio::runtime::Handle) -> Rollouts {
        Rollouts {
            home: Some(home),
            ..Rollouts::default()
        }
    }

    /// Spawns `task` on the executors' runtime.
    fn spawn_home<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match &self.home {
            Some(home) => home.spawn(task),
            None => tokio::spawn(task),
        }
    }

    /// Runs an executor until its rollout ends or the controller shuts down. Stopped, it leaves
    /// the rollout as its last committed record says (every step is one transaction), and the
    /// next controller start picks it up there (`recover`).
    fn spawn(&self, executor: Executor) {
        let mut stopping = self.stopping.subscribe();
        let id = executor.record.id.clone();
        let task = self.spawn_home(async move {
            tokio::select! {
                () = executor.run() => {}
                _ = stopping.wait_for(|stop| *stop) => {
                    tracing::info!("controller shutting down: rollout {id} stops here; the next start picks it up");
                }
            }
        });
        let mut executors = self.executors.lock().unwrap_or_else(|p| p.into_inner());
        executors.retain(|task| !task.is_finished());
        executors.push(task);
    }

    /// Stops every executor and waits for them, at most until `deadline`; returns how many
    /// had not stopped by then.
    pub async fn shut_down(&self, deadline: tokio::time::Instant) -> usize {
        self.stopping.send_replace(true);
        let tasks = std::mem::take(&mut *self.executors.lock().unwrap_or_else(|p| p.into_inner()));
        let mut late = 0;
        for task in tasks {
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                late += 1;
            }
        }
        late
    }

    /// Stops every executor, as at shutdown, because this controller no longer leads; then
    /// forgets them and is ready to run rollouts again should it lead again (`recover` picks
    /// them up from the store, where the leader that came between left them). Returns how many
    /// executors had not stopped by `deadline`.
    pub async fn stand_down(&self, deadline: tokio::time::Instant) -> usize {
        let late = self.shut_down(deadline).await;
        self.active().clear();
        self.stopping.send_replace(false);
        late
    }

    fn active(&self) -> std::sync::MutexGuard<'_, HashMap<String, Handle>> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether rollout `id` is under way on this controller.
    pub fn is_active(&self, id: &str) -> bool {
        self.active().contains_key(id)
    }

    /// The running rollout of `app`, if any.
    pub fn active_for_app(&self, app: &str) -> Option<String> {
        self.active()
            .iter()
            .find(|(_, h)| h.app == app)
            .map(|(id, _)| id.clone())
    }

    /// Follows an active rollout's progress; None when it is not running.
    pub fn subscribe(&self, id: &str) -> Option<broadcast::Receiver<Progress>> {
        self.active().get(id).map(|h| h.progress.subscribe())
    }

    /// Like [`Rollouts::subscribe`], also in the moment between a new rollout's first commit
    /// (which announces it, `rollout.started`) and its handle taking its id: the handle is then
    /// still reserved under its app, with the same progress.
    pub fn subscribe_new(&self, id: &str, app: &str) -> Option<broadcast::Receiver<Progress>> {
        let active = self.active();
        active
            .get(id)
            .or_else(|| active.get(&reserved_key(app)))
            .map(|h| h.progress.subscribe())
    }

    fn control(&self, id: &str, control: Control, actor: &str) -> bool {
        match self.active().get(id) {
            Some(handle) => {
                handle.control.send_replace((control, actor.to_string()));
                true
            }
            None => false,
        }
    }
}

/// How often a wave under way writes its hosts' results (its end is written at once).
const SAVE_DURING_WAVE: Duration = Duration::from_secs(1);

/// Starts a rollout; returns its record and a receiver of its progress.
pub async fn start(
    fleet: &Arc<FleetState>,
    rollouts: &Arc<Rollouts>,
    request: StartRequest,
) -> Result<(RolloutRecord, broadcast::Receiver<Progress>), RolloutError> {
    start_on(fleet, rollouts, request, None).await
}

/// A rollout as planned before anything is written: its waves and budget.
struct Planned {
    waves: Vec<Wave>,
    /// The hosts it goes to, in rollout order.
    host_names: Vec<String>,
    /// Matching hosts left out because they are drained.
    drained: Vec<String>,
    max_unavailable: usize,
    /// The selected hosts without a healthy instance already, each with why.
    unavailable_at_start: Vec<String>,
    /// Each selected host's desired release of the app now, by host.
    desired_now: HashMap<String, String>,
}

/// Plans a rollout over the hosts the selector matches, narrowed to `only` when given (a
/// rollback goes only to the hosts that run the app). Reads only: a dry run shows this plan.
fn plan(
    fleet: &FleetState,
    app: &str,
    version: &str,
    policy: &RolloutPolicy,
    only: Option<&[String]>,
) -> Result<Planned, RolloutError> {
    let is_rollback = only.is_some();
    if fleet.release(app, version)?.is_none() {
        return Err(RolloutError::NotFound(format!(
            "release {app}@{version} does not exist: create it with `fleetctl release create {app} {version} ARTIFACT`"
        )));
    }
    // Drained hosts take no new releases: they are left out of the plan, and the plan says so.
    let all_selected: Vec<_> = fleet
        .host_records()?
        .into_iter()
        .filter(|h| planner::matches(&policy.selector, &h.labels))
        .filter(|h| only.is_none_or(|only| only.contains(&h.name)))
        .collect();
    // What already spends the unavailability budget: (host, why).
    let down_at_start: Vec<(String, String)> = all_selected
        .iter()
        .filter_map(|h| {
            let instance = fleet.instance(&h.name, app);
            budget::unavailable(h, app, instance.as_ref(), fleet.is_lost(h))
                .map(|why| (h.name.clone(), why))
        })
        .collect();
    let unavailable_at_start: Vec<String> = down_at_start
        .iter()
        .map(|(host, why)| format!("{host}: {why}"))
        .collect();
    let desired_now: HashMap<String, String> = all_selected
        .iter()
        .filter_map(|h| Some((h.name.clone(), h.desired.get(app)?.version.clone())))
        .collect();
    let n_selected = all_selected.len();
    let (drained, selected): (Vec<_>, Vec<_>) =
        all_selected.into_iter().partition(|h| h.drain.is_some());
    let mut host_names: Vec<String> = selected.into_iter().map(|h| h.name).collect();
    fleet_proto::names::sort_naturally(&mut host_names);
    let drained: Vec<String> = drained.into_iter().map(|h| h.name).collect();
    if host_names.is_empty() && !drained.is_empty() {
        return Err(RolloutError::Invalid(format!(
            "every matching host is drained ({}): undrain one with `fleetctl undrain HOST`",
            drained.join(", ")
        )));
    }
    if host_names.is_empty() {
        return Err(RolloutError::Invalid(if policy.selector.is_empty() {
            "no hosts are registered: start fleet-agent on your hosts first".to_string()
        } else {
            format!(
                "no host matches the selector {}: see `fleetctl hosts` for their labels",
                selector_text(&policy.selector)
            )
        }));
    }
    let planned = if is_rollback {
        let down: Vec<&str> = down_at_start
            .iter()
            .map(|(host, _)| host.as_str())
            .collect();
        planner::plan_rollback_waves(&host_names, &down, policy.batch)
    } else {
        planner::plan_waves(&host_names, policy.canary, policy.batch)
    };
    let batch_hosts = planned.iter().map(Vec::len).max().unwrap_or(1);
    let max_unavailable = budget::effective(
        policy.max_unavailable,
        n_selected,
        batch_hosts,
        unavailable_at_start.len(),
    );
    // A rollback records the budget it keeps to (its batch), which its deployment keeps after it.
    let max_unavailable = match (is_rollback, policy.batch) {
        (true, Batch::Hosts(n)) => n as usize,
        _ => max_unavailable,
    };
    if policy.max_unavailable.is_some() && unavailable_at_start.len() >= max_unavailable {
        return Err(RolloutError::BudgetSpent(format!(
            "--max-unavailable {} is spent before the rollout starts: {} of the {n_selected} selected hosts have no healthy instance of {app} ({}); bring them back, or allow more",
            max_unavailable,
            unavailable_at_start.len(),
            unavailable_at_start.join(", ")
        )));
    }
    let waves: Vec<Wave> = planned
        .into_iter()
        .map(|hosts| Wave {
            hosts: hosts
                .into_iter()
                .map(|host| WaveHost {
                    host,
                    previous_version: None,
                    previous_deployment: None,
                    rollback: None,
                    result: HostResult::Pending,
                    message: String::new(),
                })
                .collect(),
            state: WaveState::Pending,
        })
        .collect();
    Ok(Planned {
        waves,
        host_names,
        drained,
        max_unavailable,
        unavailable_at_start,
        desired_now,
    })
}

/// The id a dry run's record carries: it is never stored.
pub const DRY_RUN_ID: &str = "dry-run";

/// `rollout --dry-run`: the plan a start would make now (waves, hosts, budget), refused for
/// the same reasons a start would be, and nothing written, reserved or sent. Each wave host's
/// `previous_version` is the release it runs now.
pub fn dry_run(
    fleet: &FleetState,
    rollouts: &Rollouts,
    request: StartRequest,
) -> Result<Progress, RolloutError> {
    let StartRequest {
        app,
        version,
        policy,
        actor,
    } = request;
    let mut planned = plan(fleet, &app, &version, &policy, None)?;
    if let Some(id) = rollouts.active_for_app(&app) {
        return Err(RolloutError::Conflict(format!(
            "rollout {id} of {app} is still under way: wait for it (`fleetctl rollout status {id}`) or stop it with `fleetctl rollout abort {id}`"
        )));
    }
    for wave_host in planned.waves.iter_mut().flat_map(|w| w.hosts.iter_mut()) {
        wave_host.previous_version = planned.desired_now.get(&wave_host.host).cloned();
    }
    let record = RolloutRecord {
        id: DRY_RUN_ID.to_string(),
        app: app.clone(),
        version: version.clone(),
        // Not started; the API answers with the state "planned".
        state: RolloutState::Running,
        started_by: actor,
        started_unix_ms: fleet_proto::now_unix_ms(),
        finished_unix_ms: 0,
        waves: planned.waves,
        current_wave: 0,
        message: String::new(),
        policy,
        is_rollback: false,
        seq: 0,
        hold_until_unix_ms: 0,
        max_unavailable: planned.max_unavailable as u32,
        unavailable_at_start: planned.unavailable_at_start,
    };
    let line = format!(
        "dry run: {app} {version} would go to {} hosts: {}{}; nothing was changed",
        planned.host_names.len(),
        plan_text(&record),
        if planned.drained.is_empty() {
            String::new()
        } else {
            format!(" (left out, drained: {})", planned.drained.join(", "))
        },
    );
    Ok(Progress {
        rollout: Arc::new(record),
        line,
    })
}

/// Starts a rollout over the hosts the selector matches, narrowed to `only` when given (a
/// rollback goes only to the hosts that run the app).
async fn start_on(
    fleet: &Arc<FleetState>,
    rollouts: &Arc<Rollouts>,
    request: StartRequest,
    only: Option<Vec<String>>,
) -> Result<(RolloutRecord, broadcast::Receiver<Progress>), RolloutError> {
    let is_rollback = only.is_some();
    let StartRequest {
        app,
        version,
        policy,
        actor,
    } = request;
    let Planned {
        waves,
        host_names,
        drained,
        max_unavailable,
        unavailable_at_start,
        desired_now: _,
    } = plan(fleet, &app, &version, &policy, only.as_deref())?;

    // Reserve the app before anything is written, so two starts cannot both pass the check.
    let (control, control_rx) = watch::channel((Control::Run, String::new()));
    let (progress, progress_rx) = broadcast::channel(256);
    {
        let mut active = rollouts.active();
        if let Some((id, _)) = active.iter().find(|(_, h)| h.app == app) {
            return Err(RolloutError::Conflict(format!(
                "rollout {id} of {app} is still under way: wait for it (`fleetctl rollout status {id}`) or stop it with `fleetctl rollout abort {id}`"
            )));
        }
        active.insert(
            reserved_key(&app),
            Handle {
                app: app.clone(),
                control: control.clone(),
                progress: progress.clone(),
            },
        );
    }
    let reserved = reserved_key(&app);
    // Its number, its record and the event that says it started: one commit.
    let kind = if is_rollback {
        "rollback.started"
    } else {
        "rollout.started"
    };
    let make = {
        let (app, version, actor) = (app.clone(), version.clone(), actor.clone());
        move |seq: u64| RolloutRecord {
            id: format!("r{seq}"),
            app: app.clone(),
            version: version.clone(),
            state: RolloutState::Running,
            started_by: actor.clone(),
            started_unix_ms: fleet_proto::now_unix_ms(),
            finished_unix_ms: 0,
            waves: waves.clone(),
            current_wave: 0,
            message: String::new(),
            policy: policy.clone(),
            is_rollback,
            seq,
            hold_until_unix_ms: 0,
            max_unavailable: max_unavailable as u32,
            unavailable_at_start: unavailable_at_start.clone(),
        }
    };
    let started = {
        let (app, version, actor) = (app.clone(), version.clone(), actor.clone());
        move |record: &RolloutRecord| {
            NewEvent::new(
                &actor,
                kind,
                &app,
                "",
                format!(
                    "{} {} of {app}@{version} started by {actor}: {}",
                    if is_rollback { "rollback" } else { "rollout" },
                    record.id,
                    plan_text(record)
                ),
            )
        }
    };
    let record = match fleet.begin_rollout(make, started).await {
        Ok(record) => record,
        Err(e) => {
            rollouts.active().remove(&reserved);
            return Err(e.into());
        }
    };
    {
        let mut active = rollouts.active();
        if let Some(handle) = active.remove(&reserved) {
            active.insert(record.id.clone(), handle);
        }
    }
    let first = Progress {
        rollout: Arc::new(record.clone()),
        line: format!(
            "{} {}: {app} {version} on {} hosts: {}",
            if is_rollback { "rollback" } else { "rollout" },
            record.id,
            host_names.len(),
            plan_text(&record)
        ) + &if drained.is_empty() {
            String::new()
        } else {
            format!(" (left out, drained: {})", drained.join(", "))
        },
    };
    let _ = progress.send(first);
    let executor = Executor {
        fleet: fleet.clone(),
        rollouts: rollouts.clone(),
        record: record.clone(),
        control: control_rx,
        progress,
        snapshot: Default::default(),
    };
    rollouts.spawn(executor);
    Ok((record, progress_rx))
}

/// What `fleetctl rollback` asks for.
#[derive(Debug, Clone)]
pub struct RollbackRequest {
    pub app: String,
    /// The deployment, by its selector (may be left out when the app has one).
    pub selector: Option<std::collections::BTreeMap<String, String>>,
    /// The release to go back to; by default the one before the current one.
    pub to_version: Option<String>,
    /// The budget asked for; by default the deployment's ([`budget::default_budget`]).
    pub max_unavailable: Option<Batch>,
    pub actor: String,
}

/// Starts a rollback of one deployment of `app` (the one `selector` names; it may be left out
/// when the app has one deployment): a rollout of an earlier release to every host of that
/// deployment that runs `app`, the hosts that are down first, then the others at most the
/// budget at a time ([`planner::plan_rollback_waves`]). Completed, it moves the deployment back.
pub async fn start_rollback(
    fleet: &Arc<FleetState>,
    rollouts: &Arc<Rollouts>,
    request: RollbackRequest,
) -> Result<(RolloutRecord, broadcast::Receiver<Progress>), RolloutError> {
    let RollbackRequest {
        app,
        selector,
        to_version,
        max_unavailable,
        actor,
    } = request;
    let app = app.as_str();
    let deployments = fleet.deployments(Some(app))?;
    let no_deployments = deployments.is_empty();
    let selector = match selector {
        Some(selector) => {
            if !deployments.is_empty() && !deployments.iter().any(|d| d.selector == selector) {
                return Err(RolloutError::Invalid(format!(
                    "{app} has no deployment with selector {}: its deployments are {}",
                    selector_text(&selector),
                    deployments_text(&deployments)
                )));
            }
            selector
        }
        None if deployments.len() > 1 => {
            return Err(RolloutError::Invalid(format!(
                "{app} has {} deployments ({}): name the one to roll back with --selector",
                deployments.len(),
                deployments_text(&deployments)
            )))
        }
        None => deployments
            .first()
            .map(|d| d.selector.clone())
            .unwrap_or_default(),
    };
    let hosts: Vec<_> = fleet
        .host_records()?
        .into_iter()
        .filter(|h| h.desired.contains_key(app) && planner::matches(&selector, &h.labels))
        .collect();
    if hosts.is_empty() {
        return Err(RolloutError::Invalid(format!(
            "no host runs {app}: there is nothing to roll back"
        )));
    }
    let current = most_common(hosts.iter().map(|h| h.desired[app].version.clone()));
    let target = match to_version {
        Some(version) => version,
        None => fleet
            .rollouts(Some(app))?
            .into_iter()
            .filter(|r| {
                r.state == RolloutState::Succeeded
                    && r.version != current
                    && (no_deployments || r.policy.selector == selector)
            })
            .map(|r| r.version)
            .next()
            .ok_or_else(|| {
                RolloutError::Invalid(format!(
                    "{app} has no earlier release that a rollout completed: name one with `fleetctl rollback {app} --to VERSION`"
                ))
            })?,
    };
    // The budget: what was asked, or what the deployment's last rollout ran with, or 1.
    let budget = match max_unavailable {
        Some(asked) => budget::effective(Some(asked), hosts.len(), 0, 0),
        None => {
            let completed_by = deployments
                .iter()
                .find(|d| d.selector == selector)
                .map(|d| d.rollout_id.clone());
            let last = match completed_by {
                Some(id) => fleet.rollout(&id)?,
                None => None,
            };
            budget::default_budget(last.map(|r| r.max_unavailable))
        }
    };
    let policy = RolloutPolicy {
        selector,
        canary: 0,
        batch: Batch::Hosts(budget.max(1) as u32),
        pause_after_canary_ms: 0,
        smoke_timeout_ms: 0,
        auto_rollback: false,
        skip_lost: false,
        min_healthy_ms: None,
        max_unavailable: None,
    };
    let request = StartRequest {
        app: app.to_string(),
        version: target,
        policy,
        actor,
    };
    start_on(
        fleet,
        rollouts,
        request,
        Some(hosts.into_iter().map(|h| h.name).collect()),
    )
    .await
}

/// A rollout's record, or a not-found error that says where to look.
pub fn get(fleet: &FleetState, id: &str) -> Result<RolloutRecord, RolloutError> {
    fleet.rollout(id)?.ok_or_else(|| {
        RolloutError::NotFound(format!(
            "no rollout {}: see `fleetctl history APP`",
            fleet_proto::names::quoted(id)
        ))
    })
}

/// What an operator asks of a running rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Go on (resume a paused rollout).
    Run,
    /// Pause before the next wave.
    Pause,
    /// Stop where it stands; hosts keep what they run.
    Abort,
}

/// Passes an operator's pause, resume or abort to a running rollout.
pub fn control(
    fleet: &FleetState,
    rollouts: &Rollouts,
    id: &str,
    control: Control,
    actor: &str,
) -> Result<RolloutRecord, RolloutError> {
    let record = get(fleet, id)?;
    if record.state.is_final() {
        return Err(RolloutError::Conflict(format!(
            "rollout {id} has already ended ({})",
            record.state.as_str()
        )));
    }
    if !rollouts.control(id, control, actor) {
        return Err(RolloutError::Conflict(format!(
            "rollout {id} is not under way on this controller (it may be ending right now): check `fleetctl rollout status {id}`"
        )));
    }
    Ok(record)
}

/// Picks up the rollouts a previous controller process left under way.
pub async fn recover(
    fleet: &Arc<FleetState>,
    rollouts: &Arc<Rollouts>,
) -> Result<usize, StoreError> {
    let mut n = 0;
    for record in fleet.rollouts(None)? {
        if record.state.is_final() {
            continue;
        }
        let initial = if record.state == RolloutState::Paused {
            Control::Pause
        } else {
            Control::Run
        };
        let (control, control_rx) = watch::channel((initial, "controller".to_string()));
        let (progress, _) = broadcast::channel(256);
        rollouts.active().insert(
            record.id.clone(),
            Handle {
                app: record.app.clone(),
                control,
                progress: progress.clone(),
            },
        );
        fleet
            .event(
                "controller",
                "rollout.recovered",
                &record.app,
                "",
                format!(
                    "controller restarted: rollout {} of {}@{} continues at wave {}/{} ({})",
                    record.id,
                    record.app,
                    record.version,
                    record.current_wave + 1,
                    record.waves.len(),
                    record.state.as_str()
                ),
            )
            .await;
        let executor = Executor {
            fleet: fleet.clone(),
            rollouts: rollouts.clone(),
            record,
            control: control_rx,
            progress,
            snapshot: Default::default(),
        };
        rollouts.spawn(executor);
        n += 1;
    }
    Ok(n)
}

fn selector_text(selector: &std::collections::BTreeMap<String, String>) -> String {
    fleet_proto::names::format_labels(selector)
}

fn deployments_text(deployments: &[DeploymentRecord]) -> String {
    deployments
        .iter()
        .map(|d| format!("{} on {}", d.version, d.selector_text()))
        .collect::<Vec<_>>()
        .join("; ")
}

fn plan_text(record: &RolloutRecord) -> String {
    record
        .waves
        .iter()
        .enumerate()
        .map(|(idx, wave)| {
            let names: Vec<&str> = wave.hosts.iter().map(|h| h.host.as_str()).collect();
            let label = if idx == 0 && record.policy.canary > 0 {
                "canary "
            } else {
                ""
            };
            format!("{label}[{}]", names.join(" "))
        })
        .collect::<Vec<_>>()
        .join(" -> ")
}

fn most_common(values: impl Iterator<Item = String>) -> String {
    let mut counts: HashMap<String, usize> = HashMap::new();
    for v in values {
        *counts.entry(v).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
        .map(|(v, _)| v)
        .unwrap_or_default()
}

/// How long a wave may take: the fetch-and-start allowance, plus the smoke checks one after
/// another (each capped by `--smoke-timeout` when given, `cap_ms` > 0), the time an instance
/// must then stay up (`min_healthy`), and the release hook when it runs in this wave; without
/// `--smoke-timeout`, never less than the default deadline.
fn wave_deadline_for(
    checks_ms: &[u64],
    runs_hook: bool,
    cap_ms: u64,
    min_healthy: Duration,
) -> Duration {
    let smoke_ms: u64 = checks_ms
        .iter()
        .map(|&t| if cap_ms > 0 { t.min(cap_ms) } else { t })
        .sum();
    let mut deadline = Duration::from_millis(smoke_ms) + FETCH_AND_START_ALLOWANCE + min_healthy;
    if runs_hook {
        deadline += fleet_proto::manifest::RELEASE_HOOK_TIMEOUT;
    }
    if cap_ms > 0 {
        deadline.max(Duration::from_millis(cap_ms) + FETCH_AND_START_ALLOWANCE)
    } else {
        deadline.max(DEFAULT_WAVE_DEADLINE)
    }
}

/// What the budget lets a wave do.
enum Fit {
    Go,
    /// The budget stayed spent until the wave's deadline; its hosts are failed.
    Spent,
    Aborted(String),
}

enum WaitEnd {
    Done,
    Deadline,
    Aborted(String),
}

/// Drives one rollout from where its record stands to its end.
struct Executor {
    fleet: Arc<FleetState>,
    rollouts: Arc<Rollouts>,
    record: RolloutRecord,
    control: watch::Receiver<(Control, String)>,
    progress: broadcast::Sender<Progress>,
    /// The record the last progress line carried ([`Progress::rollout`]).
    snapshot: std::sync::Mutex<Option<Arc<RolloutRecord>>>,
}

impl Executor {
    async fn run(mut self) {
        let result = self.drive().await;
        if let Err(e) = result {
            self.record.message = format!("halted: the store failed: {e}");
            self.record.state = RolloutState::Failed;
            self.finish(format!("rollout {} halted: {e}", self.record.id))
                .await;
        }
        self.rollouts.active().remove(&self.record.id);
        // No longer under way: the hosts it held or left may converge now.
        self.fleet.rollout_ended();
    }

    fn emit(&self, line: String) {
        tracing::info!(rollout = %self.record.id, "{line}");
        let rollout = {
            let mut snapshot = self.snapshot.lock().unwrap_or_else(|e| e.into_inner());
            match &*snapshot {
                Some(last)
                    if last.state == self.record.state
                        && last.current_wave == self.record.current_wave
                        && !self.record.state.is_final() =>
                {
                    last.clone()
                }
                _ => snapshot.insert(Arc::new(self.record.clone())).clone(),
            }
        };
        let _ = self.progress.send(Progress { rollout, line });
    }

    async fn save(&self) -> Result<(), StoreError> {
        self.fleet.save_rollout(&self.record).await
    }

    fn wave_label(&self, idx: usize) -> String {
        step::wave_label(&self.record, idx)
    }

    /// How long wave `idx` may take (see [`wave_deadline_for`]).
    fn wave_deadline(&self, idx: usize) -> Result<Duration, StoreError> {
        let release = self.fleet.release(&self.record.app, &self.record.version)?;
        let (checks_ms, hook, min_healthy_ms) = release
            .map(|r| (r.smoke_timeouts_ms, r.has_release_hook, r.min_healthy_ms))
            .unwrap_or_default();
        let runs_hook = hook && idx == 0 && !self.record.is_rollback;
        let min_healthy = self.record.policy.min_healthy_ms.unwrap_or(min_healthy_ms);
        Ok(wave_deadline_for(
            &checks_ms,
            runs_hook,
            self.record.policy.smoke_timeout_ms,
            Duration::from_millis(min_healthy),
        ))
    }

    async fn drive(&mut self) -> Result<(), StoreError> {
        // A controller restarted during a rollback goes on with it where the record stands.
        if step::is_rolling_back(&self.record) {
            self.emit(format!(
                "rollout {} halted before the controller restarted: continuing its rollback",
                self.record.id
            ));
            let idx = self
                .record
                .current_wave
                .min(self.record.waves.len().saturating_sub(1));
            let deadline = self.wave_deadline(idx)?;
            return self.roll_back(deadline).await;
        }
        // A controller restarted during the canary pause waits out the rest of it.
        if self.record.hold_until_unix_ms > 0 {
            let left = self.record.hold_until_unix_ms - fleet_proto::now_unix_ms();
            if left > 0 {
                self.emit(format!(
                    "controller restarted during the canary pause: waiting the remaining {} before widening",
                    format_duration(Duration::from_millis(left as u64))
                ));
            }
            if let Some(actor) = self.hold_recorded().await? {
                return self.aborted(actor).await;
            }
        }
        if self.record.state == RolloutState::Paused {
            self.emit(format!(
                "rollout {} is paused at wave {}/{}: `fleetctl rollout resume {}` to go on",
                self.record.id,
                self.record.current_wave + 1,
                self.record.waves.len(),
                self.record.id
            ));
        }
        while self.record.current_wave < self.record.waves.len() {
            // Between waves: honour pause and abort.
            if let Some(actor) = self.gate().await? {
                return self.aborted(actor).await;
            }
            let idx = self.record.current_wave;
            if self.record.waves[idx].state == WaveState::Pending {
                // The budget first (it may wait for hosts to come back); the wave's clock
                // starts once its hosts are given the release.
                match self.fit_wave_to_budget(idx).await? {
                    Fit::Go => self.begin_wave(idx).await?,
                    Fit::Spent => {}
                    Fit::Aborted(actor) => return self.aborted(actor).await,
                }
            } else {
                self.emit(format!(
                    "{}: continuing after a controller restart",
                    self.wave_label(idx)
                ));
            }
            let started = Instant::now();
            let wave_deadline = self.wave_deadline(idx)?;
            match self.wait_wave(idx, started + wave_deadline).await {
                WaitEnd::Aborted(actor) => return self.aborted(actor).await,
                WaitEnd::Done | WaitEnd::Deadline => {}
            }
            let end = step::settle_wave(&mut self.record, idx, fleet_proto::now_unix_ms());
            tracing::debug!(target: TIMING, rollout = %self.record.id, wave = idx + 1, "wave settled");
            match end {
                WaveEnd::Passed { pause } => {
                    // The pause's end is in this save, with the canary's pass: a restart in
                    // between cannot skip it. Without a pause the pass needs no commit of its
                    // own: every host's pass is saved already (`wait_wave`), so a restart in
                    // between settles the wave again, the same way, and the next commit (the
                    // next wave's hosts with the record, or the rollout's end) writes it.
                    if pause.is_some() {
                        self.save().await?;
                    }
                    self.emit(format!(
                        "{} passed in {}",
                        self.wave_label(idx),
                        format_duration(started.elapsed())
                    ));
                    if let Some(pause) = pause {
                        self.emit(format!(
                            "canary passed: waiting {} before widening",
                            format_duration(pause)
                        ));
                        if let Some(actor) = self.hold_recorded().await? {
                            return self.aborted(actor).await;
                        }
                    }
                }
                WaveEnd::Halted { why, roll_back } => {
                    self.save().await?;
                    self.emit(format!("{} failed: {why}", self.wave_label(idx)));
                    self.fleet
                        .event(
                            &self.record.started_by,
                            "rollout.halted",
                            &self.record.app,
                            "",
                            format!(
                                "rollout {} of {}@{} halted: {}",
                                self.record.id,
                                self.record.app,
                                self.record.version,
                                self.record.message
                            ),
                        )
                        .await;
                    return if roll_back {
                        self.roll_back(wave_deadline).await
                    } else {
                        self.record.state = RolloutState::Failed;
                        self.record.message.push_str(&format!(
                            "; auto-rollback is off: hosts keep what they run; roll back with `fleetctl rollback {}`",
                            self.record.app
                        ));
                        let line = format!("rollout {} failed", self.record.id);
                        self.finish(line).await;
                        Ok(())
                    };
                }
            }
        }
        // The deployment `(app, selector)` now stands at this release, written with the
        // rollout's end: hosts that join, return or change labels converge to it.
        let deployments = self.fleet.deployments(Some(&self.record.app))?;
        let deployment = step::succeed(&mut self.record, &deployments, fleet_proto::now_unix_ms());
        let line = format!(
            "rollout {} succeeded: {}",
            self.record.id, self.record.message
        );
        self.finish_leaving(line, deployment).await;
        Ok(())
    }

    /// Waits while paused; returns the actor who aborted, if someone did.
    async fn gate(&mut self) -> Result<Option<String>, StoreError> {
        loop {
            let (control, actor) = self.control.borrow_and_update().clone();
            match control {
                Control::Abort => return Ok(Some(actor)),
                Control::Run => {
                    if self.record.state == RolloutState::Paused {
                        self.record.state = RolloutState::Running;
                        self.save().await?;
                        self.fleet
                            .event(
                                &actor,
                                "rollout.resumed",
                                &self.record.app,
                                "",
                                format!("rollout {} resumed by {actor}", self.record.id),
                            )
                            .await;
                        self.emit(format!("resumed by {actor}"));
                    }
                    return Ok(None);
                }
                Control::Pause => {
                    if self.record.state != RolloutState::Paused {
                        self.record.state = RolloutState::Paused;
                        self.save().await?;
                        self.fleet
                            .event(
                                &actor,
                                "rollout.paused",
                                &self.record.app,
                                "",
                                format!(
                                    "rollout {} paused by {actor} before wave {}",
                                    self.record.id,
                                    self.record.current_wave + 1
                                ),
                            )
                            .await;
                        self.emit(format!("paused by {actor} before wave {}/{}: `fleetctl rollout resume {}` to go on", self.record.current_wave + 1, self.record.waves.len(), self.record.id));
                    }
                    if self.control.changed().await.is_err() {
                        return Ok(Some("controller".to_string()));
                    }
                }
            }
        }
    }

    /// Waits until the end the record holds (`hold_until_unix_ms`, already saved) unless
    /// aborted meanwhile, then clears it; returns the aborting actor.
    async fn hold_recorded(&mut self) -> Result<Option<String>, StoreError> {
        let left = (self.record.hold_until_unix_ms - fleet_proto::now_unix_ms()).max(0);
        let aborted_by = tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(left as u64)) => None,
            actor = abort_requested(&mut self.control) => Some(actor),
        };
        self.record.hold_until_unix_ms = 0;
        self.save().await?;
        Ok(aborted_by)
    }

    /// The facts about `host` the steps decide from, from its record (`None`: removed).
    fn host_facts(&self, host: &str, record: Option<HostRecord>) -> HostFacts {
        HostFacts {
            instance: self.fleet.instance(host, &self.record.app),
            registered: record.is_some(),
            drained: record.as_ref().is_some_and(|r| r.drain.is_some()),
            lost_for_secs: record
                .as_ref()
                .filter(|r| self.fleet.is_lost(r))
                .map(|r| self.fleet.silent_for_secs(r)),
            desired: record.and_then(|mut r| r.desired.remove(&self.record.app)),
            connected: self.fleet.is_connected(host),
        }
    }

    /// The facts about `hosts`, as they stand now.
    fn observe<'a>(
        &self,
        hosts: impl IntoIterator<Item = &'a str>,
    ) -> Result<Observed, StoreError> {
        let mut observed = Observed::default();
        for host in hosts {
            let record = self.fleet.host_record(host)?;
            observed
                .hosts
                .insert(host.to_string(), self.host_facts(host, record));
        }
        Ok(observed)
    }

    /// The facts about `hosts` while waiting on them: a host whose record cannot be read counts
    /// as removed (a wait has no way to fail).
    fn observe_waiting<'a>(&self, hosts: impl IntoIterator<Item = &'a str>) -> Observed {
        let mut observed = Observed::default();
        for host in hosts {
            let record = self.fleet.host_record(host).ok().flatten();
            observed
                .hosts
                .insert(host.to_string(), self.host_facts(host, record));
        }
        observed
    }

    /// The hosts of wave `idx` by their result.
    fn wave_hosts(&self, idx: usize, result: HostResult) -> Vec<String> {
        self.record.waves[idx]
            .hosts
            .iter()
            .filter(|h| h.result == result)
            .map(|h| h.host.clone())
            .collect()
    }

    /// The selected hosts outside wave `idx` that have no healthy instance of the app now,
    /// each as `host: why`.
    fn down_outside_wave(&self, idx: usize) -> Result<Vec<String>, StoreError> {
        let mut down = Vec::new();
        for name in step::outside_wave(&self.record, idx) {
            let Some(host) = self.fleet.host_record(&name)? else {
                continue;
            };
            let instance = self.fleet.instance(&name, &self.record.app);
            if let Some(why) = budget::unavailable(
                &host,
                &self.record.app,
                instance.as_ref(),
                self.fleet.is_lost(&host),
            ) {
                down.push(format!("{name}: {why}"));
            }
        }
        Ok(down)
    }

    /// Fits wave `idx` to an explicit unavailability budget (`--max-unavailable`,
    /// [`step::fit_wave`]); while it leaves nothing, waits for hosts to come back until the
    /// wave's deadline, or an abort. `Spent` when the budget stayed spent: the wave's hosts are
    /// then failed, and the rollout halts.
    async fn fit_wave_to_budget(&mut self, idx: usize) -> Result<Fit, StoreError> {
        if step::explicit_budget(&self.record).is_none() {
            return Ok(Fit::Go);
        }
        let until = tokio::time::Instant::now() + self.wave_deadline(idx)?;
        let mut changes = self.fleet.changes();
        loop {
            changes.borrow_and_update();
            let down = self.down_outside_wave(idx)?;
            match step::fit_wave(&mut self.record, idx, &down) {
                FitWave::Go => return Ok(Fit::Go),
                FitWave::Shrunk(line) => {
                    self.emit(line);
                    return Ok(Fit::Go);
                }
                FitWave::Wait => {}
            }
            let waited = tokio::select! {
                _ = changes.changed() => true,
                _ = tokio::time::sleep_until(until) => false,
                actor = abort_requested(&mut self.control) => return Ok(Fit::Aborted(actor)),
            };
            if !waited {
                step::wave_budget_spent(&mut self.record, idx, &down);
                self.save().await?;
                return Ok(Fit::Spent);
            }
        }
    }

    /// Starts wave `idx` ([`step::start_wave`]): points the hosts that take the release at it
    /// and records what each ran before, read under the host lock in the same transaction
    /// that writes the new desired release and the record ([`step::give_release`]).
    async fn begin_wave(&mut self, idx: usize) -> Result<(), StoreError> {
        let names: Vec<String> = self.record.waves[idx]
            .hosts
            .iter()
            .map(|h| h.host.clone())
            .collect();
        tracing::debug!(target: TIMING, rollout = %self.record.id, wave = idx + 1, "wave begins");
        let observed = self.observe(names.iter().map(String::as_str))?;
        let start = step::start_wave(&mut self.record, idx, &observed);
        if start.halted {
            self.save().await?;
            return Ok(());
        }
        let hook_host = start.hook_host.as_deref();
        self.fleet
            .update_hosts_for_rollout(
                &start.deploy,
                |host, record| step::give_release(record, idx, host, hook_host),
                &mut self.record,
            )
            .await?;
        if !start.skipped.is_empty() {
            self.emit(format!(
                "{}: skipping {}",
                self.wave_label(idx),
                start.skipped.join(", ")
            ));
        }
        if !start.deploy.is_empty() {
            self.emit(format!(
                "{}: deploying {}@{} to {}",
                self.wave_label(idx),
                self.record.app,
                self.record.version,
                start.deploy.join(", ")
            ));
        }
        Ok(())
    }

    /// What one look at wave `idx` reads: the full facts of its hosts still deploying, and
    /// the instance of each host that passed (it must stay up).
    fn observe_wave(&self, idx: usize) -> Observed {
        let deploying = self.wave_hosts(idx, HostResult::Deploying);
        let mut observed = self.observe_waiting(deploying.iter().map(String::as_str));
        for entry in self.record.waves[..=idx].iter().flat_map(|w| &w.hosts) {
            if entry.result == HostResult::Passed {
                let facts = HostFacts {
                    instance: self.fleet.instance(&entry.host, &self.record.app),
                    ..HostFacts::default()
                };
                observed.hosts.insert(entry.host.clone(), facts);
            }
        }
        observed
    }

    /// Waits until every host of the wave passed or failed, the deadline passed, or an abort.
    async fn wait_wave(&mut self, idx: usize, deadline: Instant) -> WaitEnd {
        let mut changes = self.fleet.changes();
        let deadline = tokio::time::Instant::from_std(deadline);
        // Hosts' results are written at most every SAVE_DURING_WAVE (the whole record, every
        // host of every wave, is one store value: a write per report made a 10,000-host
        // rollout rewrite it 10,000 times); the wave's end is written when it settles.
        let mut saved_at: Option<tokio::time::Instant> = None;
        let mut unsaved = false;
        loop {
            changes.borrow_and_update();
            let observed = self.observe_wave(idx);
            let progress = step::observe_wave(&mut self.record, idx, &observed);
            if !progress.lines.is_empty() {
                tracing::debug!(target: TIMING, rollout = %self.record.id, wave = idx + 1, done = progress.done, "wave observed");
            }
            unsaved |= !progress.lines.is_empty();
            let save_due = saved_at.map_or(tokio::time::Instant::now(), |at| at + SAVE_DURING_WAVE);
            if unsaved && !progress.done && tokio::time::Instant::now() >= save_due {
                if let Err(e) = self.save().await {
                    tracing::error!("cannot save rollout {}: {e}", self.record.id);
                }
                saved_at = Some(tokio::time::Instant::now());
                unsaved = false;
            }
            for line in progress.lines {
                self.emit(line);
            }
            if progress.done {
                return WaitEnd::Done;
            }
            let deadline_passed = tokio::select! {
                _ = tokio::time::sleep_until(deadline) => true,
                _ = changes.changed() => false,
                _ = tokio::time::sleep_until(save_due), if unsaved => false,
                changed = self.control.changed() => {
                    if changed.is_ok() {
                        if let (Control::Abort, actor) = self.control.borrow().clone() {
                            return WaitEnd::Aborted(actor);
                        }
                    }
                    false
                }
            };
            if deadline_passed {
                let deploying = self.wave_hosts(idx, HostResult::Deploying);
                let observed = self.observe_waiting(deploying.iter().map(String::as_str));
                step::wave_deadline_passed(&mut self.record, idx, &observed);
                return WaitEnd::Deadline;
            }
        }
    }

    /// Puts every host this rollout changed back on the release it ran before, in the batches
    /// [`step::next_rollback_step`] decides (the hosts already down first, then at most the
    /// budget at a time), each handed back in one write with the record that says so
    /// ([`step::send_back`]), and waits for each batch before the next. A controller restarted
    /// meanwhile comes back here and goes on from the record.
    async fn roll_back(&mut self, deadline: Duration) -> Result<(), StoreError> {
        let app = self.record.app.clone();
        let names: Vec<String> = self
            .record
            .waves
            .iter()
            .flat_map(|w| &w.hosts)
            .map(|h| h.host.clone())
            .collect();
        // Bounded: every round settles at least one host (sent back, then back, failed, lost
        // or past the deadline), and a round with nothing sent ends the rollback.
        let rounds = 2 * names.len() + 2;
        for _ in 0..rounds {
            let observed = self.observe(names.iter().map(String::as_str))?;
            match step::next_rollback_step(&self.record, &observed) {
                step::RollbackStep::NothingToUndo => {
                    self.record.state = RolloutState::RolledBack;
                    let line = format!(
                        "rollout {} halted: no host had taken {}",
                        self.record.id, self.record.version
                    );
                    self.finish(line).await;
                    return Ok(());
                }
                step::RollbackStep::Done => break,
                step::RollbackStep::Wait => {}
                step::RollbackStep::Send(batch) => {
                    let restore = batch.restore;
                    self.fleet
                        .update_hosts_for_rollout(
                            &batch.hosts,
                            |host, record| {
                                let back = restore.get(&host.name).cloned().flatten();
                                step::send_back(record, host, back.as_ref());
                            },
                            &mut self.record,
                        )
                        .await?;
                    self.emit(batch.line);
                }
            }
            // Wait until each host of the batch runs its previous release again (or has
            // stopped the app, failed, or was lost), or its deadline, or an abort: the hosts
            // sent back still go back, the rollout stops waiting for them.
            let fleet = self.fleet.clone();
            let until = tokio::time::Instant::now() + deadline;
            let mut control = self.control.clone();
            let settled = tokio::select! {
                settled = fleet.wait_until(until, || self.note_hosts_back()) => Ok(settled),
                actor = abort_requested(&mut control) => Err(actor),
            };
            match settled {
                Ok(true) => {}
                Ok(false) => {
                    let late = step::rollback_deadline_passed(&mut self.record);
                    self.save().await?;
                    self.emit(format!(
                        "{} not back before the deadline: the rollback goes on without them",
                        late.join(", ")
                    ));
                }
                Err(actor) => {
                    self.record.state = RolloutState::Aborted;
                    self.record.message.push_str(&format!(
                        "; aborted by {actor} while rolling back: the hosts sent back still go back to their previous releases, nobody waits for them, and the others keep {}: check `fleetctl status {app}`",
                        self.record.version
                    ));
                    let line = format!("rollout {} {}", self.record.id, self.record.message);
                    self.finish(line).await;
                    return Ok(());
                }
            }
        }
        self.record.state = RolloutState::RolledBack;
        if let Some(note) = step::rollback_end_note(&self.record) {
            self.record.message.push_str(&note);
        }
        let line = format!(
            "rollout {} rolled back: {}",
            self.record.id, self.record.message
        );
        self.finish(line).await;
        Ok(())
    }

    /// One look at the hosts a rollback waits on ([`step::note_rollback_progress`]); says
    /// whether every one is settled (what settled is saved with the next batch, or the end).
    fn note_hosts_back(&mut self) -> bool {
        let waiting: Vec<String> = self
            .record
            .waves
            .iter()
            .flat_map(|w| &w.hosts)
            .filter(|e| {
                e.rollback == Some(crate::model::RollbackMark::Sent)
                    && e.result != HostResult::RolledBack
            })
            .map(|e| e.host.clone())
            .collect();
        let observed = self.observe_waiting(waiting.iter().map(String::as_str));
        let progress = step::note_rollback_progress(&mut self.record, &observed);
        for line in progress.lines {
            self.emit(line);
        }
        progress.all_back
    }

    async fn aborted(&mut self, actor: String) -> Result<(), StoreError> {
        self.record.state = RolloutState::Aborted;
        self.record.message = format!(
            "aborted by {actor} at wave {}/{}: hosts keep what they run; roll back with `fleetctl rollback {}`",
            (self.record.current_wave + 1).min(self.record.waves.len()),
            self.record.waves.len(),
            self.record.app
        );
        let line = format!("rollout {} {}", self.record.id, self.record.message);
        self.finish(line).await;
        Ok(())
    }

    async fn finish(&mut self, line: String) {
        self.finish_leaving(line, None).await;
    }

    /// Ends the rollout: its record, the deployment it leaves when it completed and the event
    /// that says how it ended, in one commit ([`FleetState::end_rollout`]); then the last line.
    async fn finish_leaving(&mut self, line: String, deployment: Option<DeploymentRecord>) {
        self.record.finished_unix_ms = fleet_proto::now_unix_ms();
        let ended = NewEvent::new(
            &self.record.started_by,
            &format!("rollout.{}", self.record.state.as_str()),
            &self.record.app,
            "",
            format!(
                "rollout {} of {}@{}: {}",
                self.record.id, self.record.app, self.record.version, self.record.message
            ),
        );
        // The end must be written: a rollout whose record still says `running` with no executor
        // behind it would hold its app until the next controller start. A store that failed
        // (a full disk) works again once the cause is gone, so try again until then.
        let mut pause = END_SAVE_FIRST_PAUSE;
        for attempt in 1..=END_SAVE_ATTEMPTS {
            let written = self
                .fleet
                .end_rollout(&self.record, deployment.clone(), ended.clone())
                .await;
            let Err(e) = written else {
                break;
            };
            if attempt == END_SAVE_ATTEMPTS {
                tracing::error!(
                    "cannot save the end of rollout {} after {attempt} attempts: {e}; the next controller start picks it up",
                    self.record.id
                );
                break;
            }
            if attempt == 1 {
                tracing::error!(
                    "cannot save the end of rollout {}: {e}; trying again until it is written",
                    self.record.id
                );
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(END_SAVE_MAX_PAUSE);
        }
        self.emit(line);
    }
}

/// How often, and how far apart, the executor tries again to write a rollout's end that the
/// store refused (a full disk): about 15 minutes in all; a shutdown stops it sooner.
const END_SAVE_ATTEMPTS: u32 = 200;
const END_SAVE_FIRST_PAUSE: Duration = Duration::from_millis(100);
const END_SAVE_MAX_PAUSE: Duration = Duration::from_secs(5);

/// Resolves with the actor once the rollout's control says abort (at once if it already does);
/// never, if the control goes away.
async fn abort_requested(control: &mut watch::Receiver<(Control, String)>) -> String {
    loop {
        if let (Control::Abort, actor) = control.borrow_and_update().clone() {
            return actor;
        }
        if control.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_executor_started_from_a_clients_call_runs_on_the_agents_runtime() {
        let runtime = |name: &str| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name(name)
                .build()
                .unwrap()
        };
        let (agents, clients) = (runtime("agents-lane"), runtime("clients-lane"));
        let rollouts = Arc::new(Rollouts::on(agents.handle().clone()));
        let thread_name = || std::thread::current().name().map(str::to_string);
        // Started by a call served on the clients' runtime, as `rollout start` is.
        let ran_on = clients
            .block_on(clients.spawn({
                let rollouts = rollouts.clone();
                async move {
                    assert_eq!(thread_name().as_deref(), Some("clients-lane"));
                    rollouts.spawn_home(async move { thread_name() }).await
                }
            }))
            .unwrap()
            .unwrap();
        assert_eq!(ran_on.as_deref(), Some("agents-lane"));
    }

    #[test]
    fn a_wave_waits_as_long_as_the_release_may_take() {
        let s = Duration::from_secs;
        for (checks_ms, runs_hook, cap_ms, expect) in [
            (vec![], false, 0, DEFAULT_WAVE_DEADLINE),
            (vec![30_000], false, 0, DEFAULT_WAVE_DEADLINE),
            (
                vec![600_000, 300_000],
                false,
                0,
                s(900) + FETCH_AND_START_ALLOWANCE,
            ),
            (
                vec![600_000, 300_000],
                false,
                20_000,
                s(40) + FETCH_AND_START_ALLOWANCE,
            ),
            (vec![], false, 20_000, s(20) + FETCH_AND_START_ALLOWANCE),
            (
                vec![10_000],
                true,
                0,
                s(10) + FETCH_AND_START_ALLOWANCE + fleet_proto::manifest::RELEASE_HOOK_TIMEOUT,
            ),
        ] {
            assert_eq!(
                wave_deadline_for(&checks_ms, runs_hook, cap_ms, Duration::ZERO),
                expect,
                "{checks_ms:?} hook {runs_hook} cap {cap_ms}"
            );
        }
        // The time an instance must stay up after its checks comes on top.
        assert_eq!(
            wave_deadline_for(&[10_000], false, 0, s(600)),
            s(610) + FETCH_AND_START_ALLOWANCE
        );
    }
}
