//! The supervisor: one task per app, each running the instance lifecycle state machine, and a
//! manager task that turns each `DesiredState` (always the full set) into commands for them.
//!
//! ```text
//!  assignment ──> fetching ──> unpacking ──> starting ──> checking ──> running
//!                    │             │            │            │           │ exits on its own
//!                    └─────────────┴──── failed ┴────────────┘           v
//!                                                     starting <──── crashed (backoff)
//!  unassigned (drain, remove, a new assignment elsewhere):  (any) ──> stopping ──> stopped
//! ```
//!
//! The agent's own stop does not stop its apps: the instances keep running, `state.json` keeps
//! their pids and tokens, and the agent's next run (a restart, an upgrade, after a SIGKILL)
//! adopts each one that still runs its app's assigned release, without a restart, and watches
//! it through a pidfd (it is no longer its child). Only `--stop-apps-on-exit` (a local fleet)
//! stops them with the agent.
//!
//! What each transition guarantees:
//! - **fetching**: the artifact is downloaded (or found in the cache) and verified against its
//!   digest before the next state; the old instance still runs meanwhile.
//! - **unpacking**: the release directory exists whole and its manifest parses; the old
//!   instance still runs. Only after this is the old instance stopped (reported as
//!   `stopping`/`stopped` with the *old* version).
//! - **starting**: the instance directory was wiped and copied afresh from the release (for a
//!   replacement, made beside the old one while it stopped, then renamed into place) and the
//!   process spawned in its own group; its pid and token are being written to `state.json`
//!   while the checks run (done before `running`).
//! - **checking**: the process is up; every smoke check runs in order. The process exiting
//!   meanwhile fails the checks at once with its exit status.
//! - **running**: every smoke check passed, and `state.json` holds the assignment and the
//!   instance: a write takes every change made before it, so the instance's write, awaited
//!   here, takes the new assignments too (they are not written on their own before the apps
//!   begin converging, only half a second later if nothing wrote them by then: one fsynced
//!   write per deploy instead of two). Only now does the instance count as deployed; old
//!   releases beyond the kept ones are pruned.
//! - **failed** (from any state before running): the reason is in the message and no process
//!   of the new release is left; the app stays failed until the controller sends an assignment
//!   again (even the same one: a failed app is always retried).
//! - **crashed** (the process exited on its own while running): its group is cleaned up, the
//!   restart counter grows and the instance is started again from origin after a backoff of 1s,
//!   doubling to 30s (reset after a minute of stable running), smoke checks included. A restart
//!   whose checks fail counts as another crash.
//! - **stopping → stopped**: stop signal to the group, `stop_timeout`, SIGKILL; nothing of the
//!   group is left when `stopped` is reported.
//!
//! An assignment equal to the current one (version, generation, rollout id and digest) changes
//! nothing unless the app failed, so a reconnect that resends the same state is harmless. After
//! a failed deploy, an assignment of the release the old instance still runs (the rollback of a
//! host whose new release failed before replacing it) keeps that instance as it is: it is
//! reported running under the new assignment, with nothing fetched, written or restarted (so a
//! host whose disk filled up mid-unpack goes back at once, full disk or not). A new
//! command arriving while fetching or checking interrupts that step (a download resumes later).

use crate::fetch::Fetcher;
use crate::instance::{Exit, Instance, InstanceVars, Staged};
use crate::model::{
    digest_hex, release_dir_name, Assignment, DataLayout, InstanceState, Report, Reporter,
};
use crate::releases::Release;
use crate::smoke::{run_checks, CheckContext};
use crate::state::{HookRun, StateStore};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// The first restart delay after a crash; it doubles up to [`MAX_CRASH_BACKOFF`].
pub const MIN_CRASH_BACKOFF: Duration = Duration::from_secs(1);
pub const MAX_CRASH_BACKOFF: Duration = Duration::from_secs(30);
/// An instance that ran this long before crashing starts the backoff afresh.
const STABLE_RUN: Duration = Duration::from_secs(60);
/// New assignments are on disk at the latest this long after they arrive, when no write of an
/// instance (which takes them too) came first.
const ASSIGNMENTS_WRITTEN_WITHIN: Duration = Duration::from_millis(500);

/// What every app task shares.
pub struct Context {
    pub layout: DataLayout,
    pub host_name: String,
    pub advertise: String,
    pub fetcher: Fetcher,
    pub reporter: Arc<Reporter>,
    pub store: Arc<StateStore>,
    /// Stop every instance when the agent stops (`--stop-apps-on-exit`, for a local fleet);
    /// by default they keep running and the agent's next run adopts them.
    pub stop_apps_on_exit: bool,
}

/// Commands to the manager.
pub enum SupervisorCommand {
    /// The full desired state; apps in neither list are stopped and forgotten.
    Desired(Desired),
    /// The agent is stopping: leave the instances running for its next run (or, with
    /// `stop_apps_on_exit`, stop each gracefully), then answer.
    Shutdown(oneshot::Sender<()>),
    /// The host was removed: stop every instance gracefully (those adopted too), forget every
    /// assignment, then answer. Nothing is started again by this run or the next.
    StopAll(oneshot::Sender<()>),
}

/// What the controller wants the host to run.
#[derive(Debug, Default)]
pub struct Desired {
    pub assignments: Vec<Assignment>,
    /// Apps whose assignment was invalid: they keep their last valid assignment (and what runs
    /// of them), rather than being stopped as if unassigned.
    pub refused: BTreeSet<String>,
}

/// Commands to one app task.
#[derive(Debug)]
enum AppCommand {
    Assign(Assignment),
    Remove,
    Shutdown,
}

/// What an app task does with a new assignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Already running (or converging to, or restarting) exactly this: nothing to do.
    Keep,
    /// The target failed before replacing the instance that runs, and the new assignment is
    /// that instance's release: it becomes the target's instance as it is.
    KeepLive,
    /// Fetch, unpack, replace the instance, check.
    Converge,
}

/// Decides on a new assignment given the current one, the app's last state and the
/// assignment of the instance that runs (`live`: the target's own, or the one a failed deploy
/// left in place). Pure.
pub fn decide(
    current: Option<&Assignment>,
    state: Option<InstanceState>,
    live: Option<&Assignment>,
    new: &Assignment,
) -> Decision {
    match current {
        Some(current)
            if current.same_deployment(new)
                && !matches!(
                    state,
                    Some(InstanceState::Failed) | Some(InstanceState::Stopped) | None
                ) =>
        {
            Decision::Keep
        }
        // A failed target leaves no process of its own: what runs is the instance before it.
        _ if state == Some(InstanceState::Failed)
            && live.is_some_and(|live| live.same_release(new)) =>
        {
            Decision::KeepLive
        }
        _ => Decision::Converge,
    }
}

/// The apps among `running` to stop and forget: those neither assigned nor refused (an app
/// whose new assignment was invalid keeps running what it ran). Pure.
pub fn unassigned<'a>(
    running: impl Iterator<Item = &'a String>,
    desired: &BTreeMap<String, Assignment>,
    refused: &BTreeSet<String>,
) -> Vec<String> {
    running
        .filter(|app| !desired.contains_key(*app) && !refused.contains(*app))
        .cloned()
        .collect()
}

/// The delay before restart number `consecutive` (1-based) of a crashing instance. Pure.
pub fn crash_backoff(consecutive: u32) -> Duration {
    let doublings = consecutive.saturating_sub(1).min(16);
    (MIN_CRASH_BACKOFF * 2u32.pow(doublings)).min(MAX_CRASH_BACKOFF)
}

/// The manager: owns the app tasks.
pub struct Supervisor {
    context: Arc<Context>,
    apps: BTreeMap<String, AppHandle>,
    /// Tasks of apps being removed; a new task for the same app waits for its predecessor.
    retiring: BTreeMap<String, JoinHandle<()>>,
    /// Instances an earlier run of the agent left running, by app, each with the record it
    /// was found by: the app's task takes its instance over when its first assignment is the
    /// release the instance runs.
    adopted: BTreeMap<String, (crate::state::SavedInstance, Instance)>,
}

struct AppHandle {
    tx: mpsc::UnboundedSender<AppCommand>,
    task: JoinHandle<()>,
}

impl Supervisor {
    /// Starts the manager task, with the instances an earlier run left running (see
    /// [`Instance::adopt`]); send it commands through the returned sender.
    pub fn spawn(
        context: Arc<Context>,
        adopted: BTreeMap<String, (crate::state::SavedInstance, Instance)>,
    ) -> (mpsc::UnboundedSender<SupervisorCommand>, JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let supervisor = Supervisor {
            context,
            apps: BTreeMap::new(),
            retiring: BTreeMap::new(),
            adopted,
        };
        (tx, tokio::spawn(supervisor.run(rx)))
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<SupervisorCommand>) {
        while let Some(command) = rx.recv().await {
            match command {
                SupervisorCommand::Desired(desired) => self.apply(desired),
                SupervisorCommand::Shutdown(done) => {
                    self.shutdown().await;
                    let _ = done.send(());
                    return;
                }
                SupervisorCommand::StopAll(done) => {
                    self.stop_all().await;
                    let _ = done.send(());
                    return;
                }
            }
        }
        self.shutdown().await;
    }

    fn apply(&mut self, update: Desired) {
        let desired: BTreeMap<String, Assignment> = update
            .assignments
            .into_iter()
            .map(|a| (a.app.clone(), a))
            .collect();
        // A refused app keeps the assignment the state holds for it, its last valid one.
        let mut kept = desired.clone();
        for last in self.context.store.snapshot().assignments {
            if update.refused.contains(&last.app) {
                kept.insert(last.app.clone(), last);
            }
        }
        // Not written before the apps begin converging: a `running` report waits for its
        // instance's write, which takes this change too (it is staged first), a report of
        // `running` without a start waits for it ([`AppTask::durable_so_far`]), and what is
        // left is written [`ASSIGNMENTS_WRITTEN_WITHIN`] from now, on the blocking pool (at
        // once a no-op when an instance's write took it meanwhile, as in a rollout).
        let change = self
            .context
            .store
            .stage_assignments(kept.into_values().collect());
        let store = self.context.store.clone();
        tokio::spawn(async move {
            tokio::time::sleep(ASSIGNMENTS_WRITTEN_WITHIN).await;
            let written = tokio::task::spawn_blocking(move || store.flush_to(change)).await;
            if let Ok(Err(e)) = written {
                tracing::error!("{e}");
            }
        });
        self.retiring.retain(|_, task| !task.is_finished());
        let unassigned = unassigned(self.apps.keys(), &desired, &update.refused);
        for app in unassigned {
            if let Some(handle) = self.apps.remove(&app) {
                let _ = handle.tx.send(AppCommand::Remove);
                self.retiring.insert(app, handle.task);
            }
        }
        for (app, assignment) in desired {
            let handle = self.apps.entry(app.clone()).or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                let task = AppTask {
                    app: app.clone(),
                    context: self.context.clone(),
                    rx,
                    target: None,
                    state: None,
                    restarts: 0,
                    consecutive_crashes: 0,
                    live: None,
                    adopted: self.adopted.remove(&app),
                };
                let predecessor = self.retiring.remove(&app);
                AppHandle {
                    tx,
                    task: tokio::spawn(task.run(predecessor)),
                }
            });
            let _ = handle.tx.send(AppCommand::Assign(assignment));
        }
    }

    /// Stops every instance through the same path as an unassigned app (graceful stop, the
    /// instance directory removed), and the adopted instances no task took over.
    async fn stop_all(&mut self) {
        if let Err(e) = self.context.store.set_assignments(Vec::new()) {
            tracing::error!("{e}");
        }
        let mut tasks: Vec<JoinHandle<()>> = Vec::new();
        for (_, handle) in std::mem::take(&mut self.apps) {
            let _ = handle.tx.send(AppCommand::Remove);
            tasks.push(handle.task);
        }
        tasks.extend(std::mem::take(&mut self.retiring).into_values());
        futures::future::join_all(tasks).await;
        for (app, (_, mut instance)) in std::mem::take(&mut self.adopted) {
            instance.stop().await;
            if let Err(e) = self.context.store.set_instance(&app, None) {
                tracing::error!("{e}");
            }
        }
    }

    async fn shutdown(&mut self) {
        let mut tasks: Vec<JoinHandle<()>> = Vec::new();
        for (_, handle) in std::mem::take(&mut self.apps) {
            let _ = handle.tx.send(AppCommand::Shutdown);
            tasks.push(handle.task);
        }
        tasks.extend(std::mem::take(&mut self.retiring).into_values());
        futures::future::join_all(tasks).await;
        // Assignments that arrived in the last half second, not yet written: the next run
        // starts from them.
        let store = self.context.store.clone();
        let written = tokio::task::spawn_blocking(move || store.flush_to(store.last_change()));
        if let Ok(Err(e)) = written.await {
            tracing::error!("{e}");
        }
    }
}

/// The instance that is up (or just crashed) and what it was started from.
struct Live {
    assignment: Assignment,
    release: Release,
    instance: Instance,
}

/// One app's state machine.
struct AppTask {
    app: String,
    context: Arc<Context>,
    rx: mpsc::UnboundedReceiver<AppCommand>,
    /// The latest assignment, the one being converged to or run.
    target: Option<Assignment>,
    /// The last state reported for `target`.
    state: Option<InstanceState>,
    /// Restarts after crashes since the target was deployed.
    restarts: u32,
    /// Crashes in a row without a stable run in between; sets the backoff.
    consecutive_crashes: u32,
    live: Option<Live>,
    /// The instance an earlier run of the agent left running, until the first assignment.
    adopted: Option<(crate::state::SavedInstance, Instance)>,
}

enum Event {
    Command(AppCommand),
    Exited(Exit),
}

/// How starting and checking a fresh instance ended.
enum Started {
    Running(Instance, String),
    Failed(String),
    Interrupted(AppCommand),
}

impl AppTask {
    async fn run(mut self, predecessor: Option<JoinHandle<()>>) {
        if let Some(task) = predecessor {
            let _ = task.await;
        }
        let mut next: Option<AppCommand> = None;
        loop {
            let event = match next.take() {
                Some(command) => Event::Command(command),
                None => self.next_event().await,
            };
            match event {
                Event::Command(AppCommand::Assign(assignment)) => {
                    if let Some((saved, instance)) = self.adopted.take() {
                        self.take_over(saved, instance, &assignment).await;
                    }
                    let live = self.live.as_ref().map(|live| &live.assignment);
                    match decide(self.target.as_ref(), self.state, live, &assignment) {
                        Decision::Keep => continue,
                        Decision::KeepLive => self.keep_live(assignment).await,
                        Decision::Converge => next = self.converge(assignment).await,
                    }
                }
                Event::Command(AppCommand::Remove) => {
                    self.stop_live("no longer assigned to this host").await;
                    self.context.reporter.forget(&self.app);
                    // Nothing of a stopped instance is ever reused; its releases stay cached.
                    let _ = tokio::fs::remove_dir_all(self.context.layout.instance_dir(&self.app))
                        .await;
                    return;
                }
                Event::Command(AppCommand::Shutdown) if self.context.stop_apps_on_exit => {
                    self.stop_live("the agent is shutting down").await;
                    if let Some((_, mut instance)) = self.adopted.take() {
                        instance.stop().await;
                        self.record_instance(None);
                    }
                    return;
                }
                Event::Command(AppCommand::Shutdown) => {
                    // Apps outlive their agent: its next run adopts them. Stopping them is
                    // for drain, remove and new assignments.
                    if let Some(live) = self.live.as_mut() {
                        live.instance.detach();
                        tracing::info!(app = %self.app, pid = live.instance.pid(), "the agent is stopping: leaving the instance running for its next run");
                    }
                    if let Some((_, instance)) = self.adopted.as_mut() {
                        instance.detach();
                    }
                    return;
                }
                Event::Exited(exit) => next = self.after_crash(exit).await,
            }
        }
    }

    /// The next command, or the running instance's exit.
    async fn next_event(&mut self) -> Event {
        let rx = &mut self.rx;
        // The live instance is watched whether it is the target's (running) or the one a
        // failed converge left in place (its target failed before replacing it).
        match &mut self.live {
            Some(live) => {
                tokio::select! {
                    command = rx.recv() => Event::Command(command.unwrap_or(AppCommand::Shutdown)),
                    exit = live.instance.wait() => Event::Exited(exit),
                }
            }
            _ => Event::Command(rx.recv().await.unwrap_or(AppCommand::Shutdown)),
        }
    }

    /// Unpacks the release while the download runs, from the reader the fetch hands over as it
    /// starts ([`crate::follow`]): the answer is `None` when no download ran (nothing was sent),
    /// the release is unpacked already, or the download is checked only whole, at its end.
    /// It ends on its own with the download, whichever way that ends, also when the deploy is
    /// given up meanwhile.
    fn unpack_alongside(
        &self,
        assignment: &Assignment,
        following: tokio::sync::oneshot::Receiver<crate::follow::Following>,
    ) -> tokio::task::JoinHandle<
        Option<Result<crate::releases::Release, crate::releases::ReleaseError>>,
    > {
        let layout = self.context.layout.clone();
        let (app, version, digest) = (
            self.app.clone(),
            assignment.version.clone(),
            assignment.artifact_digest.clone(),
        );
        tokio::spawn(async move {
            let mut following = following.await.ok()?;
            // A release still unpacked from an earlier fetch needs no unpack at all.
            let unpacked = layout.release_dir(&app, &version, crate::model::digest_hex(&digest));
            if unpacked.is_dir() || !following.by_chunks().await {
                return None;
            }
            tokio::task::spawn_blocking(move || {
                crate::releases::ensure_unpacked_from(&layout, &app, &version, &digest, || {
                    Ok(following)
                })
            })
            .await
            .ok()
        })
    }

    fn report(&mut self, state: InstanceState, message: impl Into<String>) {
        let (version, rollout_id) = match &self.target {
            Some(a) => (a.version.clone(), a.rollout_id.clone()),
            None => Default::default(),
        };
        self.state = Some(state);
        self.publish(state, version, rollout_id, message.into());
    }

    fn publish(&self, state: InstanceState, version: String, rollout_id: String, message: String) {
        // A report leaves the host: no secret value of the app's release may be in it (an
        // exec check or a hook could have printed one).
        let message = match &self.target {
            Some(target) => target.secrets.redact(&message),
            None => message,
        };
        self.context.reporter.publish(Report {
            app: self.app.clone(),
            version,
            state,
            message,
            since_unix_ms: fleet_proto::now_unix_ms(),
            restarts: self.restarts,
            rollout_id,
        });
    }

    /// A failed check's message with the last lines of the app's log on this host (bounded:
    /// [`crate::app_log::FAILED_REPORT_LINES`] lines of at most 200 bytes), for the rollout's
    /// output and `history`.
    async fn with_log_tail(&self, message: String) -> String {
        let log = self.context.layout.log_file(&self.app);
        let tail = tokio::task::spawn_blocking(move || {
            crate::app_log::tail(&log, crate::app_log::FAILED_REPORT_LINES)
        })
        .await;
        let Ok(Ok(Some(lines))) = tail else {
            return message;
        };
        let lines: Vec<String> = lines
            .iter()
            .map(|line| {
                let mut end = line.len().min(200);
                while !line.is_char_boundary(end) {
                    end -= 1;
                }
                let cut = if end < line.len() { "…" } else { "" };
                format!("  | {}{cut}", &line[..end])
            })
            .collect();
        if lines.is_empty() {
            return message;
        }
        format!(
            "{message}\nthe app's last log lines on this host:\n{}",
            lines.join("\n")
        )
    }

    fn record_instance(&self, saved: Option<crate::state::SavedInstance>) {
        if let Err(e) = self.context.store.set_instance(&self.app, saved) {
            tracing::error!(app = %self.app, "{e}");
        }
    }

    /// Makes the instance that runs (left in place by a failed deploy) the instance of
    /// `assignment`, which asks for its release: nothing is fetched, written or restarted.
    async fn keep_live(&mut self, assignment: Assignment) {
        if self.live.is_none() {
            return;
        }
        self.durable_so_far().await;
        let Some(live) = self.live.as_mut() else {
            return;
        };
        live.assignment = assignment.clone();
        let pid = live.instance.pid();
        self.target = Some(assignment.clone());
        self.restarts = 0;
        self.consecutive_crashes = 0;
        self.report(
            InstanceState::Running,
            format!(
                "pid {pid}: kept running {} (the failed deploy before never replaced it)",
                assignment.version
            ),
        );
    }

    /// Like [`AppTask::record_instance`], on the blocking pool: the caller awaits the handle
    /// when the write must be done (before the next write of this app's instance, which then
    /// cannot be overtaken by it).
    fn record_instance_meanwhile(
        &self,
        saved: Option<crate::state::SavedInstance>,
    ) -> JoinHandle<()> {
        let change = self.context.store.stage_instance(&self.app, saved);
        let (store, app) = (self.context.store.clone(), self.app.clone());
        tokio::task::spawn_blocking(move || {
            if let Err(e) = store.flush_to(change) {
                tracing::error!(%app, "{e}");
            }
        })
    }

    /// Waits until every change of `state.json` staged so far is on disk (at once when it is
    /// already): before a `running` that no write of the instance precedes, so what it
    /// reports (the assignment) survives the agent's crash.
    async fn durable_so_far(&self) {
        let store = self.context.store.clone();
        let app = self.app.clone();
        let written = tokio::task::spawn_blocking(move || store.flush_to(store.last_change()));
        match written.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(%app, "{e}"),
            Err(e) => tracing::error!(%app, "the write of state.json crashed: {e}"),
        }
    }

    /// Brings `assignment` up: fetch, unpack, replace the old instance, start, check.
    /// Returns a command that interrupted it, to be handled next.
    async fn converge(&mut self, assignment: Assignment) -> Option<AppCommand> {
        self.target = Some(assignment.clone());
        self.restarts = 0;
        self.consecutive_crashes = 0;

        let fetcher = self.context.fetcher.clone();
        // Does it fit? Checked before a byte is written.
        let cached = fetcher.cached(&assignment.artifact_digest).is_some();
        let unpacked = self
            .context
            .layout
            .release_dir(
                &self.app,
                &assignment.version,
                digest_hex(&assignment.artifact_digest),
            )
            .is_dir();
        let mut need = crate::disk::Need::of(
            assignment.artifact_size,
            assignment.unpacked_size,
            cached,
            unpacked,
        );
        if crate::app_user::drops_privileges() {
            need = need.linking();
        }
        let root = self.context.layout.root().to_path_buf();
        let instance_dir = self.context.layout.instance_dir(&self.app);
        // A walk of the instance directory and a statvfs: off the agent's one runtime thread.
        let measured = tokio::task::spawn_blocking({
            let root = root.clone();
            // Starting removes the app's current instance directory before it copies the
            // release: those bytes come back.
            move || {
                crate::disk::free_bytes(&root)
                    .map(|free| (need.replacing(crate::disk::tree_bytes(&instance_dir)), free))
            }
        })
        .await;
        match measured {
            Ok(Ok((need, free))) => {
                if let Some(why) =
                    crate::disk::shortfall(&self.context.host_name, &root, &need, free)
                {
                    self.report(InstanceState::Failed, why);
                    return None;
                }
            }
            Ok(Err(e)) => tracing::warn!("cannot tell the free space of {}: {e}", root.display()),
            Err(e) => tracing::warn!("the free-space check crashed: {e}"),
        }
        let mut alongside = None;
        let artifact = match fetcher.cached(&assignment.artifact_digest) {
            Some(path) => {
                self.report(InstanceState::Fetching, "artifact is in the local cache");
                path
            }
            None => {
                self.report(
                    InstanceState::Fetching,
                    format!(
                        "fetching {} ({} bytes)",
                        assignment.artifact_digest, assignment.artifact_size
                    ),
                );
                let (follow, following) = tokio::sync::oneshot::channel();
                alongside = Some(self.unpack_alongside(&assignment, following));
                let fetch = fetcher.fetch_followed(
                    &assignment.artifact_digest,
                    assignment.artifact_size,
                    Some(follow),
                );
                match interruptible(&mut self.rx, &assignment, fetch).await {
                    Err(command) => return Some(command),
                    Ok(Err(e)) => {
                        crate::memory::give_back_soon();
                        self.report(InstanceState::Failed, e.to_string());
                        return None;
                    }
                    Ok(Ok(path)) => path,
                }
            }
        };

        self.report(InstanceState::Unpacking, "unpacking the release");
        let layout = self.context.layout.clone();
        let (app, version, digest) = (
            self.app.clone(),
            assignment.version.clone(),
            assignment.artifact_digest.clone(),
        );
        // Unpacked while it was fetched, or else (that unpack could not follow the download to
        // its end) from the verified file, which also says what is wrong with an artifact.
        let followed = match alongside {
            Some(unpack) => match unpack.await {
                Ok(Some(Ok(release))) => Some(release),
                Ok(Some(Err(e))) => {
                    tracing::info!(app = %self.app, "unpacking while fetching did not complete, unpacking the file: {e}");
                    None
                }
                _ => None,
            },
            None => None,
        };
        let unpacked = match followed {
            Some(release) => {
                tracing::info!(app = %self.app, version = %assignment.version, "release unpacked while it was fetched");
                crate::memory::give_back_soon();
                Ok(Ok(release))
            }
            None => {
                tokio::task::spawn_blocking(move || {
                    let unpacked = crate::releases::ensure_unpacked(
                        &layout, &app, &version, &digest, &artifact,
                    );
                    // The fetch's and the unpack's buffers are free now.
                    crate::memory::give_back();
                    unpacked
                })
                .await
            }
        };
        let release = match unpacked {
            Ok(Ok(release)) => release,
            Ok(Err(e)) => {
                // Nothing of a release that could not be unpacked stays (its unpack directory
                // is gone already): not its artifact either, which may be what filled the disk.
                if let Some(path) = fetcher.cached(&assignment.artifact_digest) {
                    let _ = std::fs::remove_file(path);
                }
                self.report(
                    InstanceState::Failed,
                    format!("cannot unpack {}: {e}", assignment.version),
                );
                return None;
            }
            Err(e) => {
                self.report(InstanceState::Failed, format!("unpacking crashed: {e}"));
                return None;
            }
        };

        // A hook runs once per rollout: what is resent or restarted after it never runs it
        // again, and never starts a release whose hook did not complete. (A rollback within the
        // rollout carries no hook and is never refused, even to the same release.)
        let last_hook = self
            .context
            .store
            .hook_run(&self.app)
            .filter(|run| run.is_for(&assignment));
        match last_hook {
            Some(run) if !run.succeeded && assignment.run_release_hook => {
                self.report(
                    InstanceState::Failed,
                    format!(
                        "the release hook of {} did not complete in rollout {} (it failed, or the agent stopped during it); it is not run twice and the release is not started without it: start a new rollout or roll back",
                        assignment.version, assignment.rollout_id
                    ),
                );
                return None;
            }
            Some(_) => {}
            None if assignment.run_release_hook && release.manifest.release_hook.is_some() => {
                // Recorded as failed until it succeeds: an agent killed during the hook does
                // not start the release without it when it comes back.
                let mut run = HookRun {
                    assignment: assignment.clone(),
                    succeeded: false,
                };
                self.record_hook_run(&run);
                self.report(InstanceState::Starting, "running the release hook");
                let vars = match self.instance_vars(&assignment, &release.manifest).await {
                    Ok(vars) => vars,
                    Err(message) => {
                        self.report(InstanceState::Failed, message);
                        return None;
                    }
                };
                let hook = crate::hook::run_release_hook(
                    &self.context.layout,
                    &release.dir,
                    &release.manifest,
                    &vars,
                    crate::hook::HOOK_TIMEOUT,
                );
                let outcome = match interruptible(&mut self.rx, &assignment, hook).await {
                    Err(command) => return Some(command),
                    Ok(outcome) => outcome,
                };
                if outcome.is_ok() {
                    run.succeeded = true;
                    self.record_hook_run(&run);
                }
                if let Err(message) = outcome {
                    self.report(InstanceState::Failed, message);
                    return None;
                }
            }
            None => {}
        }

        let mut staged = None;
        if let Some(mut old) = self.live.take() {
            let why = format!("replacing it with {}", assignment.version);
            self.publish(
                InstanceState::Stopping,
                old.assignment.version.clone(),
                old.assignment.rollout_id.clone(),
                why,
            );
            // While the old instance stops, the new one's directory is made beside it, so the
            // start after the stop only renames it into place and spawns.
            let (outcome, next) = tokio::join!(
                old.instance.stop(),
                self.stage(&assignment, &release.manifest, &release.dir)
            );
            staged = next;
            // state.json keeps naming the old instance until the new one replaces it there
            // (or a failed start clears it): one fsynced write fewer between the old instance's
            // stop and the new one's start. After a crash in between, the old pid no longer
            // carries its token, so the next run neither adopts nor signals it.
            self.publish(
                InstanceState::Stopped,
                old.assignment.version.clone(),
                old.assignment.rollout_id.clone(),
                outcome,
            );
        }

        match self.start_and_check(&assignment, &release, staged).await {
            Started::Running(instance, message) => {
                self.live = Some(Live {
                    assignment: assignment.clone(),
                    release: release.clone(),
                    instance,
                });
                self.report(InstanceState::Running, message);
                self.prune(&assignment).await;
                None
            }
            Started::Failed(message) => {
                self.report(InstanceState::Failed, message);
                None
            }
            Started::Interrupted(command) => Some(command),
        }
    }

    /// The variables an instance of `assignment` sees, and who it runs as (its lasting
    /// directory made for that user).
    async fn instance_vars(
        &self,
        assignment: &Assignment,
        manifest: &fleet_proto::manifest::Manifest,
    ) -> Result<InstanceVars, String> {
        let (layout, app, user) = (
            self.context.layout.clone(),
            self.app.clone(),
            manifest.process.user.clone(),
        );
        let run_as = tokio::task::spawn_blocking(move || {
            crate::app_user::prepare(&layout, &app, user.as_deref())
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()))?;
        Ok(InstanceVars {
            app: self.app.clone(),
            version: assignment.version.clone(),
            host_name: self.context.host_name.clone(),
            advertise: self.context.advertise.clone(),
            release_env: assignment.env.clone(),
            secrets: assignment.secrets.clone(),
            state_dir: std::path::absolute(self.context.layout.app_state_dir(&self.app))
                .unwrap_or_else(|_| self.context.layout.app_state_dir(&self.app)),
            run_as,
        })
    }

    /// The next instance's variables and its directory made beside the live one
    /// ([`Instance::stage`]), for an app that runs as a user of its own; `None` otherwise or
    /// when either fails (the start then does both again, and reports what failed).
    async fn stage(
        &self,
        assignment: &Assignment,
        manifest: &fleet_proto::manifest::Manifest,
        release_dir: &std::path::Path,
    ) -> Option<(InstanceVars, Staged)> {
        let vars = self.instance_vars(assignment, manifest).await.ok()?;
        match Instance::stage(&self.context.layout, release_dir, &vars).await? {
            Ok(staged) => Some((vars, staged)),
            Err(e) => {
                tracing::warn!(app = %self.app, "cannot make the next instance's directory beside the live one, making it in place: {e}");
                None
            }
        }
    }

    /// Starts a fresh instance from origin and runs the smoke checks against it. On anything
    /// but success no process of it is left.
    async fn start_and_check(
        &mut self,
        assignment: &Assignment,
        release: &Release,
        staged: Option<(InstanceVars, Staged)>,
    ) -> Started {
        self.report_for(
            assignment,
            InstanceState::Starting,
            "starting a fresh instance from the release".to_string(),
        );
        crate::releases::touch(&release.dir);
        let (vars, staged) = match staged {
            Some((vars, staged)) => (vars, Some(staged)),
            None => match self.instance_vars(assignment, &release.manifest).await {
                Ok(vars) => (vars, None),
                Err(message) => {
                    self.record_instance(None);
                    return Started::Failed(message);
                }
            },
        };
        let layout = &self.context.layout;
        let started = match staged {
            Some(staged) => Instance::start_staged(layout, staged, &release.manifest, &vars).await,
            None => Instance::start(layout, &release.dir, &release.manifest, &vars).await,
        };
        let mut instance = match started {
            Ok(instance) => instance,
            Err(e) => {
                self.record_instance(None);
                return Started::Failed(e.to_string());
            }
        };
        // The pid and token are written (fsynced) while the checks run, and the write is
        // waited for before anything else: before `running` is reported, and before any later
        // write of the app's instance.
        let recorded = self.record_instance_meanwhile(Some(
            instance.saved(&assignment.version, &assignment.artifact_digest),
        ));

        let checks = &release.manifest.smoke;
        self.report_for(
            assignment,
            InstanceState::Checking,
            format!(
                "pid {}: running {} smoke checks",
                instance.pid(),
                checks.len()
            ),
        );
        let context = CheckContext {
            instance_dir: std::path::absolute(self.context.layout.instance_dir(&self.app))
                .unwrap_or_else(|_| self.context.layout.instance_dir(&self.app)),
            env: crate::instance::instance_env(&vars, &release.manifest),
            smoke_timeout: Duration::from_millis(assignment.smoke_timeout_ms),
            run_as: vars.run_as.clone(),
        };
        let min_healthy = assignment
            .min_healthy_ms
            .map(Duration::from_millis)
            .unwrap_or(release.manifest.process.min_healthy);
        let began = tokio::time::Instant::now();
        let outcome = {
            let instance = &mut instance;
            let race = async move {
                tokio::select! {
                    checked = run_checks(checks, &context) => checked?,
                    exit = instance.wait() => return Err(format!(
                        "the instance {} while the smoke checks ran (see the app's log)",
                        exit.describe()
                    )),
                }
                let checked_in = began.elapsed();
                // Passing means staying up: the instance must then run `min_healthy` more.
                if !min_healthy.is_zero() {
                    tokio::select! {
                        () = tokio::time::sleep(min_healthy) => {}
                        exit = instance.wait() => return Err(format!(
                            "the instance {} {} after its smoke checks passed, before it had stayed up for {} (min_healthy; see the app's log)",
                            exit.describe(),
                            fleet_proto::duration::format_duration(began.elapsed() - checked_in),
                            fleet_proto::duration::format_duration(min_healthy)
                        )),
                    }
                }
                Ok(checked_in)
            };
            interruptible(&mut self.rx, assignment, race).await
        };
        if recorded.await.is_err() {
            tracing::error!(app = %self.app, "the write of state.json crashed");
        }
        match outcome {
            Ok(Ok(checked_in)) => Started::Running(
                instance,
                if min_healthy.is_zero() {
                    format!(
                        "{} smoke checks passed in {}",
                        checks.len(),
                        fleet_proto::duration::format_duration(checked_in)
                    )
                } else {
                    format!(
                        "{} smoke checks passed in {}, and it stayed up for {}",
                        checks.len(),
                        fleet_proto::duration::format_duration(checked_in),
                        fleet_proto::duration::format_duration(min_healthy)
                    )
                },
            ),
            Ok(Err(message)) => {
                instance.stop().await;
                self.record_instance(None);
                Started::Failed(self.with_log_tail(message).await)
            }
            Err(command) => {
                let outcome = instance.stop().await;
                self.record_instance(None);
                self.report(
                    InstanceState::Stopped,
                    format!("superseded by a newer command while checking: {outcome}"),
                );
                Started::Interrupted(command)
            }
        }
    }

    /// Takes over the instance an earlier run of the agent left running when it runs
    /// `assignment`'s release (same version and artifact) and that release is still unpacked
    /// here: it is then the running instance, with no restart. Otherwise it is stopped, and the
    /// assignment is deployed as usual.
    async fn take_over(
        &mut self,
        saved: crate::state::SavedInstance,
        mut instance: Instance,
        assignment: &Assignment,
    ) {
        let same_release = saved.version == assignment.version
            && saved.artifact_digest == assignment.artifact_digest;
        let release_dir = self.context.layout.release_dir(
            &self.app,
            &assignment.version,
            digest_hex(&assignment.artifact_digest),
        );
        let release = if same_release {
            crate::releases::load(&release_dir).ok()
        } else {
            None
        };
        let Some(release) = release else {
            let outcome = instance.stop().await;
            self.record_instance(None);
            tracing::info!(app = %self.app, "the instance left by the last run is not the assigned release: {outcome}");
            return;
        };
        let pid = instance.pid();
        self.live = Some(Live {
            assignment: assignment.clone(),
            release,
            instance,
        });
        self.target = Some(assignment.clone());
        self.durable_so_far().await;
        self.report(
            InstanceState::Running,
            format!("pid {pid}: adopted after the agent's restart (it kept running)"),
        );
    }

    /// Reports about an instance of `assignment`: as the target's state when it is the
    /// target's deployment; under its own version, leaving the target's state alone, when it
    /// is the instance a failed converge left running (restarted after a crash).
    fn report_for(&mut self, assignment: &Assignment, state: InstanceState, message: String) {
        let is_target = self
            .target
            .as_ref()
            .is_some_and(|target| target.same_deployment(assignment));
        if is_target {
            self.report(state, message);
        } else {
            let (version, rollout_id) = (assignment.version.clone(), assignment.rollout_id.clone());
            self.publish(state, version, rollout_id, message);
        }
    }

    /// The live instance exited on its own: report, back off, start again from origin.
    async fn after_crash(&mut self, exit: Exit) -> Option<AppCommand> {
        let live = self.live.as_mut()?;
        let stable = live.instance.started_at.elapsed() >= STABLE_RUN;
        live.instance.stop().await;
        let (assignment, release) = (live.assignment.clone(), live.release.clone());
        self.record_instance(None);
        if stable {
            self.consecutive_crashes = 0;
        }
        let mut message = format!("the instance {}", exit.describe());
        loop {
            self.restarts += 1;
            self.consecutive_crashes += 1;
            let delay = crash_backoff(self.consecutive_crashes);
            self.report_for(
                &assignment,
                InstanceState::Crashed,
                format!(
                    "{message}; restarting from origin in {}",
                    fleet_proto::duration::format_duration(delay)
                ),
            );
            let sleep = tokio::time::sleep(delay);
            if let Err(command) = interruptible(&mut self.rx, &assignment, sleep).await {
                return Some(command);
            }
            match self.start_and_check(&assignment, &release, None).await {
                Started::Running(instance, checked) => {
                    if let Some(live) = self.live.as_mut() {
                        live.instance = instance;
                    }
                    self.report_for(
                        &assignment,
                        InstanceState::Running,
                        format!("restarted after a crash; {checked}"),
                    );
                    return None;
                }
                Started::Failed(why) => {
                    message = format!("the restart failed: {why}");
                }
                Started::Interrupted(command) => return Some(command),
            }
        }
    }

    /// Stops the live instance (if any) and reports it, for unassignment and shutdown.
    async fn stop_live(&mut self, why: &str) {
        match self.live.take() {
            Some(mut live) => {
                self.target = Some(live.assignment.clone());
                self.report(InstanceState::Stopping, why);
                let outcome = live.instance.stop().await;
                self.record_instance(None);
                self.report(InstanceState::Stopped, outcome);
            }
            None => {
                if self.target.is_some() && self.state != Some(InstanceState::Stopped) {
                    self.report(InstanceState::Stopped, why);
                }
            }
        }
    }

    fn record_hook_run(&self, run: &HookRun) {
        if let Err(e) = self.context.store.record_hook_run(&self.app, run.clone()) {
            tracing::error!(app = %self.app, "{e}");
        }
    }

    /// Prunes this app's old releases, keeping the one just deployed.
    async fn prune(&self, assignment: &Assignment) {
        let layout = self.context.layout.clone();
        let app = self.app.clone();
        let keep = BTreeSet::from([release_dir_name(
            &assignment.version,
            digest_hex(&assignment.artifact_digest),
        )]);
        let pruned =
            tokio::task::spawn_blocking(move || crate::releases::prune(&layout, &app, &keep)).await;
        if let Ok(pruned) = pruned {
            if !pruned.is_empty() {
                tracing::info!(app = %self.app, ?pruned, "pruned old releases");
            }
        }
    }
}

/// Runs `work` until it finishes or a command arrives that changes something. A resent
/// identical assignment does not interrupt; anything else does and is returned.
async fn interruptible<F: Future>(
    rx: &mut mpsc::UnboundedReceiver<AppCommand>,
    current: &Assignment,
    work: F,
) -> Result<F::Output, AppCommand> {
    tokio::pin!(work);
    loop {
        tokio::select! {
            output = &mut work => return Ok(output),
            command = rx.recv() => match command {
                Some(AppCommand::Assign(new)) if current.same_deployment(&new) => continue,
                Some(command) => return Err(command),
                None => return Err(AppCommand::Shutdown),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment(version: &str, generation: u64, rollout_id: &str) -> Assignment {
        Assignment {
            app: "web".into(),
            version: version.into(),
            artifact_digest: format!("sha256:{}", "a".repeat(64)),
            artifact_size: 0,
            env: BTreeMap::new(),
            secrets: Default::default(),
            min_healthy_ms: None,
            unpacked_size: 0,
            rollout_id: rollout_id.into(),
            generation,
            smoke_timeout_ms: 0,
            run_release_hook: false,
        }
    }

    #[test]
    fn an_app_whose_assignment_was_refused_is_not_stopped() {
        let running = ["web".to_string(), "api".to_string(), "old".to_string()];
        let desired = BTreeMap::from([("web".to_string(), assignment("1.1", 2, "r2"))]);
        let refused = BTreeSet::from(["api".to_string()]);
        assert_eq!(
            unassigned(running.iter(), &desired, &refused),
            ["old".to_string()]
        );
    }

    #[test]
    fn decides_what_an_assignment_needs() {
        use Decision::*;
        use InstanceState::*;
        let current = assignment("1.0", 1, "r1");
        for (new, state, expect) in [
            (assignment("1.0", 1, "r1"), Some(Running), Keep),
            (assignment("1.0", 1, "r1"), Some(Checking), Keep),
            (assignment("1.0", 1, "r1"), Some(Fetching), Keep),
            (assignment("1.0", 1, "r1"), Some(Crashed), Keep),
            (assignment("1.0", 1, "r1"), Some(Failed), Converge),
            (assignment("1.0", 1, "r1"), Some(Stopped), Converge),
            (assignment("1.1", 1, "r1"), Some(Running), Converge),
            (assignment("1.0", 2, "r1"), Some(Running), Converge),
            (assignment("1.0", 1, "r2"), Some(Running), Converge),
        ] {
            assert_eq!(
                decide(Some(&current), state, None, &new),
                expect,
                "{new:?} in {state:?}"
            );
        }
        assert_eq!(decide(None, None, None, &current), Converge);
    }

    #[test]
    fn a_failed_deploy_keeps_the_instance_it_never_replaced_when_its_release_comes_back() {
        use Decision::*;
        use InstanceState::*;
        // 1.1 (rollout r2) failed before replacing the instance of 1.0 (rollout r1).
        let failed = assignment("1.1", 1, "r2");
        let before = assignment("1.0", 1, "r1");
        for (state, live, new, expect) in [
            // The rollback of r2 gives 1.0 back (under a generation of its own, as every
            // rollout): the instance of 1.0 is kept.
            (
                Some(Failed),
                Some(&before),
                assignment("1.0", 2, "r2"),
                KeepLive,
            ),
            (
                Some(Failed),
                Some(&before),
                assignment("1.0", 3, "r3"),
                KeepLive,
            ),
            // Another release: deployed as usual.
            (
                Some(Failed),
                Some(&before),
                assignment("1.2", 3, "r3"),
                Converge,
            ),
            (
                Some(Failed),
                Some(&before),
                assignment("1.1", 1, "r2"),
                Converge,
            ),
            // Nothing runs: deployed as usual.
            (Some(Failed), None, assignment("1.0", 1, "r2"), Converge),
            // Only after a failure: a running target is replaced by a new rollout as always.
            (
                Some(Running),
                Some(&before),
                assignment("1.0", 1, "r3"),
                Converge,
            ),
        ] {
            assert_eq!(
                decide(Some(&failed), state, live, &new),
                expect,
                "{new:?} in {state:?} with {live:?} running"
            );
        }
    }

    #[test]
    fn crash_backoff_doubles_to_a_cap() {
        let s = Duration::from_secs;
        let delays: Vec<Duration> = (1..=8).map(crash_backoff).collect();
        assert_eq!(
            delays,
            vec![s(1), s(2), s(4), s(8), s(16), s(30), s(30), s(30)]
        );
        assert_eq!(crash_backoff(u32::MAX), s(30));
    }
}
