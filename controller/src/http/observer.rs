//! The one subscriber of the event log on the operators' side. For each event it keeps the
//! set of rollouts in progress, counts what the metrics count (rollouts ended and how long they
//! took, failed smoke checks), follows each rollout's progress to time its waves, and offers
//! the event, with the rollout it ends, to the webhooks. It never writes state and never
//! blocks the code that records events: it reads a broadcast channel, and one that lagged
//! behind only misses counts, never a rollout's step.

use crate::fleet_state::FleetState;
use crate::http::metrics::Metrics;
use crate::http::webhooks::Hooks;
use crate::http::InProgress;
use crate::model::{EventRecord, RolloutRecord, WaveState};
use crate::rollout::Rollouts;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::{broadcast, watch};

/// The event kinds that start (or restart following) a rollout.
const STARTS: &[&str] = &[
    "rollout.started",
    "rollback.started",
    "rollout.recovered",
    "rollout.resumed",
];

/// The event kinds that end one: `rollout.<final state>`.
pub const ENDS: &[&str] = &[
    "rollout.succeeded",
    "rollout.failed",
    "rollout.rolled_back",
    "rollout.aborted",
];

pub struct Observer {
    fleet: Arc<FleetState>,
    rollouts: Arc<Rollouts>,
    metrics: Arc<Metrics>,
    in_progress: Arc<InProgress>,
    hooks: Hooks,
    /// Rollouts whose progress a task follows, so each is followed once.
    followed: Mutex<HashSet<String>>,
}

impl Observer {
    pub fn new(
        fleet: Arc<FleetState>,
        rollouts: Arc<Rollouts>,
        metrics: Arc<Metrics>,
        in_progress: Arc<InProgress>,
        hooks: Hooks,
    ) -> Arc<Observer> {
        Arc::new(Observer {
            fleet,
            rollouts,
            metrics,
            in_progress,
            hooks,
            followed: Mutex::new(HashSet::new()),
        })
    }

    /// Reads events until `stop` turns true.
    pub async fn run(
        self: Arc<Self>,
        mut events: broadcast::Receiver<EventRecord>,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            let event = tokio::select! {
                event = events.recv() => event,
                _ = stop.wait_for(|stop| *stop) => return,
            };
            match event {
                Ok(event) => self.clone().see(event, &stop).await,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!("the operators' event observer missed {n} event(s): metrics and webhooks miss them");
                    // A rollout that started meanwhile is in progress all the same.
                    let fleet = self.fleet.clone();
                    if let Ok(Ok(rollouts)) =
                        tokio::task::spawn_blocking(move || fleet.rollouts(None)).await
                    {
                        for rollout in rollouts.iter().filter(|r| !r.state.is_final()) {
                            self.in_progress.insert(&rollout.id, &rollout.app);
                        }
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// The newest rollout of `app` (rollouts of one app never overlap, so the one an event
    /// about the app's rollout is about), read on the blocking pool.
    async fn newest_rollout(&self, app: &str) -> Option<RolloutRecord> {
        let fleet = self.fleet.clone();
        let app = app.to_string();
        tokio::task::spawn_blocking(move || fleet.rollouts(Some(&app)))
            .await
            .ok()?
            .ok()?
            .into_iter()
            .next()
    }

    async fn see(self: Arc<Self>, event: EventRecord, stop: &watch::Receiver<bool>) {
        let mut rollout = None;
        if STARTS.contains(&event.kind.as_str()) {
            if let Some(record) = self.newest_rollout(&event.app).await {
                if !record.state.is_final() {
                    self.in_progress.insert(&record.id, &record.app);
                    self.clone().follow(&record.id, &record.app, stop.clone());
                }
                rollout = Some(record);
            }
        } else if ENDS.contains(&event.kind.as_str()) {
            if let Some(record) = self.newest_rollout(&event.app).await {
                if record.state.is_final() {
                    self.in_progress.remove(&record.id);
                    let seconds =
                        (record.finished_unix_ms - record.started_unix_ms).max(0) as f64 / 1000.0;
                    self.metrics
                        .rollout_ended(&record.app, record.state.as_str(), seconds);
                }
                rollout = Some(record);
            }
        } else if event.kind.starts_with("rollout.") || event.kind.starts_with("rollback.") {
            // Paused, halted: the webhooks say which rollout.
            rollout = self.newest_rollout(&event.app).await;
        } else if event.kind == "instance.failed" && event.message.contains("smoke check") {
            self.metrics.smoke_check_failed(&event.app);
        }
        self.hooks.offer(&event, rollout.as_ref());
    }

    /// Follows rollout `id`'s progress (while its executor runs here) to time its waves: a
    /// wave's time runs from the first progress that shows it running to the first that shows
    /// it passed or failed. Progress carries a snapshot of the record taken when the rollout's
    /// state or wave changes, so a short wave may be seen ended without ever being seen
    /// running: its time then runs from the end of the wave before it (or from the start of
    /// the following), which is when it began.
    fn follow(self: Arc<Self>, id: &str, app: &str, mut stop: watch::Receiver<bool>) {
        let Some(mut progress) = self.rollouts.subscribe_new(id, app) else {
            return;
        };
        if !self
            .followed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string())
        {
            return;
        }
        let (id, app) = (id.to_string(), app.to_string());
        tokio::spawn(async move {
            let mut started: HashMap<usize, Instant> = HashMap::new();
            let mut ended: HashSet<usize> = HashSet::new();
            // When the last wave seen to end ended (at first: when following began).
            let mut last_end = Instant::now();
            loop {
                let step = tokio::select! {
                    step = progress.recv() => step,
                    _ = stop.wait_for(|stop| *stop) => break,
                };
                let record = match step {
                    Ok(step) => step.rollout,
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => break,
                };
                for (idx, wave) in record.waves.iter().enumerate() {
                    match wave.state {
                        WaveState::Running => {
                            started.entry(idx).or_insert_with(Instant::now);
                        }
                        WaveState::Passed | WaveState::Failed => {
                            if ended.insert(idx) {
                                let start = started.get(&idx).copied().unwrap_or(last_end);
                                self.metrics.wave_ended(&app, start.elapsed().as_secs_f64());
                                last_end = Instant::now();
                            }
                        }
                        WaveState::Pending => {}
                    }
                }
                if record.state.is_final() {
                    break;
                }
            }
            self.followed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
        });
    }
}
