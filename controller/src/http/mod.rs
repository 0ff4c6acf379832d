//! The operators' side of the controller, beside the gRPC API: an HTTP listener (`server`)
//! that answers Prometheus (`metrics`), health checks and the status page (`status_page`), and
//! the webhooks (`webhooks`) that tell chat rooms and other receivers about events. `observer`
//! is the one event subscriber that feeds them: it counts rollouts, times waves and hands
//! events to the webhooks' queues.
//!
//! **Architecture Invariant:** nothing here writes desired state or decides anything about a
//! rollout: it reads `FleetState`, follows the event log and the rollouts' progress, and
//! records one event of its own (`webhook.failed`). A slow scrape, browser or receiver never
//! slows a rollout.

pub mod metrics;
pub mod observer;
pub mod server;
pub mod status_page;
pub mod webhooks;

use crate::config::HttpListen;
use crate::fleet_state::FleetState;
use crate::rollout::Rollouts;
use anyhow::Context;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// The rollouts under way (running or paused), by id, with their app: what the status page and
/// `fleet_rollout_in_progress` show. Filled from the store at start, then kept by the observer.
#[derive(Debug, Default)]
pub struct InProgress(Mutex<BTreeMap<String, String>>);

impl InProgress {
    pub fn insert(&self, id: &str, app: &str) {
        self.lock().insert(id.to_string(), app.to_string());
    }

    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    /// `(rollout id, app)`, ordered by id.
    pub fn list(&self) -> Vec<(String, String)> {
        self.lock()
            .iter()
            .map(|(id, app)| (id.clone(), app.clone()))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What [`start`] started: the tasks to wait for at shutdown and where the listener is.
pub struct Started {
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
    pub http_addr: Option<SocketAddr>,
}

/// Binds the HTTP listener (when `http_listen` is set; the bound address goes to
/// `controller.http.addr`), subscribes to the event log and starts the webhooks' senders.
/// Called before rollouts are recovered, so their events are seen too. Fails when the address
/// is taken.
pub async fn start(
    http: Option<HttpListen>,
    http_addr_file: &Path,
    webhooks: &[webhooks::Webhook],
    fleet: &Arc<FleetState>,
    rollouts: &Arc<Rollouts>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Started> {
    let in_progress = Arc::new(InProgress::default());
    for rollout in fleet.rollouts(None)? {
        if !rollout.state.is_final() {
            in_progress.insert(&rollout.id, &rollout.app);
        }
    }
    let metrics = Arc::new(metrics::Metrics::new(fleet.clone(), in_progress.clone()));
    let mut tasks = Vec::new();
    let (hooks, senders) = webhooks::spawn(webhooks, fleet.clone(), stop.clone());
    tasks.extend(senders);
    let observer = observer::Observer::new(
        fleet.clone(),
        rollouts.clone(),
        metrics.clone(),
        in_progress.clone(),
        hooks,
    );
    tasks.push(tokio::spawn(
        observer.run(fleet.subscribe_events(), stop.clone()),
    ));
    let mut http_addr = None;
    if let Some(http) = http {
        let listener = tokio::net::TcpListener::bind(http.addr).await.with_context(|| {
            format!(
                "cannot listen for HTTP (metrics, status page) on {}: is another fleet-controller or program using it? Choose another address with http_listen in controller.toml or --http-listen",
                http.addr
            )
        })?;
        let addr = listener.local_addr()?;
        write_addr_file(http_addr_file, &addr.to_string())?;
        tracing::info!("serving metrics and the status page on http://{addr}/");
        let state = server::AppState {
            fleet: fleet.clone(),
            metrics,
            in_progress,
        };
        tasks.push(tokio::spawn(server::serve(
            listener,
            Arc::new(state),
            server::Limits::default(),
            stop,
        )));
        http_addr = Some(addr);
    }
    Ok(Started { tasks, http_addr })
}

/// Writes the bound address atomically, so a reader never sees half of it.
fn write_addr_file(path: &Path, addr: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("addr.tmp");
    std::fs::write(&tmp, format!("{addr}\n"))
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
