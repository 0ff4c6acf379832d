//! fleet-agent: the small daemon on every host. It holds one long-lived stream to the
//! controller, fetches and unpacks the artifacts of the releases assigned to the host, runs one
//! instance per app (always started from the pristine release), checks it with the manifest's
//! smoke checks, and reports every transition.
//!
//! Code map:
//! - [`config`]: flags and the TOML file, validated.
//! - [`controllers`]: which of the configured controllers the agent dials next, after a failed
//!   session or a redirect to the leader (pure); [`session::Dialer`] holds the channel to it.
//! - [`follow`]: a download's verified bytes read as it runs, so a release unpacks alongside.
//! - [`memory`]: the heap's free memory given back to the system after a transfer.
//! - [`join`]: the host's key and certificate in `DATA/tls`, joining with a one-time token on
//!   the first start; the TLS setup of every connection to the controller.
//! - [`session`]: the `AgentService.Session` stream, reconnecting forever, and the channel to
//!   the controller dialled now.
//! - [`renew`]: the certificate renewed over the agent's own connection before it ends, or
//!   when the controller asks (CA rotation).
//! - [`fetch`]: resumable, digest-verified artifact download, chunk by checked chunk from
//!   peers where they hold it.
//! - [`peer`]: the peer listener (`--peer-port`) and client: artifact chunks between agents
//!   over mutual TLS, only against a grant the controller signed.
//! - [`direct_io`]: artifact files written and read around the page cache.
//! - [`disk`]: whether a release fits on the data directory's disk before anything is written.
//! - [`releases`]: unpacking into immutable release directories and pruning old ones.
//! - [`supervisor`]: one task per app running the instance lifecycle state machine.
//! - [`instance`]: start from origin state, process groups, graceful stop.
//! - [`app_log`]: the apps' logs (stdout and stderr), rotated and bounded, tailed and followed.
//! - [`app_user`]: who an app runs as (never root), and its lasting directory.
//! - [`smoke`]: http, tcp and exec smoke checks.
//! - [`state`]: `state.json`, what survives the agent's own restart.
//! - [`model`]: the domain types the parts share (never prost types past the session).
//! - [`removal`]: what a removed host's agent does on the controller's revoked answer (stop
//!   every instance, purge, disable its unit, exit with [`removal::EXIT_REVOKED`]).
//!
//! **Architecture Invariant:** only [`session`], [`fetch`], [`peer`] and [`renew`] speak gRPC; the supervisor sees
//! domain types. The agent never writes outside its data directory.
//!
//! No unsafe code but two calls: a memory map the peer server reads a complete artifact
//! through (`peer::ArtifactFile`, as the controller serves its own), and `malloc_trim`
//! ([`memory`]).
#![deny(unsafe_code)]

pub mod app_log;
pub mod app_user;
pub mod config;
pub mod controllers;
pub mod direct_io;
pub mod disk;
pub mod fetch;
pub mod follow;
pub mod hook;
pub mod instance;
pub mod join;
pub mod memory;
pub mod model;
pub mod peer;
pub mod releases;
pub mod removal;
pub mod renew;
pub mod session;
pub mod smoke;
pub mod state;
pub mod supervisor;

pub use config::Config;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

/// Why the agent could not run at all.
#[derive(Debug, Error)]
pub enum AgentError {
    #[error("cannot prepare the data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error("controller url {url:?} is invalid: {reason}")]
    ControllerUrl { url: String, reason: String },
    #[error(transparent)]
    Join(#[from] join::JoinError),
    /// The controller answered that this host's certificate was revoked: the host was removed
    /// (`fleetctl remove`). Every instance was stopped; the agent exits for good.
    #[error("this host was removed from the fleet ({why}): its instances are stopped{}; the agent exits and is not restarted", if *purge { " and its releases, secrets and state wiped" } else { "" })]
    Revoked { purge: bool, why: String },
}

/// Splits the instances `saved` records into those still running the app's assigned release,
/// adopted (see [`instance::Instance::adopt`]), and the rest, to stop.
#[allow(clippy::type_complexity)]
fn adopt_instances(
    saved: &state::AgentState,
) -> (
    std::collections::BTreeMap<String, (state::SavedInstance, instance::Instance)>,
    std::collections::BTreeMap<String, state::SavedInstance>,
) {
    let mut adopted = std::collections::BTreeMap::new();
    let mut leftovers = std::collections::BTreeMap::new();
    for (app, record) in &saved.instances {
        let assigned = saved.assignments.iter().any(|a| {
            &a.app == app
                && a.version == record.version
                && a.artifact_digest == record.artifact_digest
        });
        match assigned
            .then(|| instance::Instance::adopt(record))
            .flatten()
        {
            Some(found) => {
                tracing::info!(%app, pid = record.pid, "adopting the instance the last run left running");
                adopted.insert(app.clone(), (record.clone(), found));
            }
            None => {
                leftovers.insert(app.clone(), record.clone());
            }
        }
    }
    (adopted, leftovers)
}

/// How long the session task may take to wind down after the instances stopped.
const SESSION_GRACE: Duration = Duration::from_secs(2);

/// Runs the agent until `shutdown` completes: adopts the instances an earlier run left running
/// (and stops those it cannot), brings the other assigned releases up from the local cache,
/// keeps the controller session alive and, on shutdown, leaves the instances running for the
/// next run (or, with `stop_apps_on_exit`, stops each gracefully) before returning.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    let data_dir_error = |source| AgentError::DataDir {
        path: config.data_dir.clone(),
        source,
    };
    // Absolute, so that instances (which run in their own directory) see absolute paths.
    let data_dir = std::path::absolute(&config.data_dir).map_err(data_dir_error)?;
    let layout = model::DataLayout::new(&data_dir);
    layout.create_all().map_err(data_dir_error)?;
    let store = Arc::new(state::StateStore::open(layout.state_file())?);

    // What an earlier run of the agent left running (it stopped, was upgraded, or was
    // SIGKILLed) is adopted when it still runs the app's assigned release: apps outlive their
    // agent. The rest goes first, so that the ports are free for the fresh instances.
    let saved = store.snapshot();
    let (adopted, leftovers) = adopt_instances(&saved);
    if !leftovers.is_empty() {
        instance::kill_leftovers(&leftovers).await;
        for app in leftovers.keys() {
            store.set_instance(app, None)?;
        }
    }

    let credentials = join::ensure_credentials(&config, &data_dir).await?;
    let (dialer, channel) = session::Dialer::new(config.controllers.clone(), credentials.clone())?;
    let dialer = Arc::new(dialer);
    let reporter = Arc::new(model::Reporter::new());
    let report_rx = reporter.take_receiver();
    // The peer listener, bound before the session says hello with its port; one that cannot
    // bind is reported and left off (fetches then use peers, and peers do not use this host).
    let (stop_peers_tx, stop_peers_rx) = tokio::sync::watch::channel(false);
    let mut fetcher = fetch::Fetcher::new(channel.clone(), layout.clone());
    let mut session_config = session::SessionConfig::from_config(&config);
    session_config.peer_port = 0;
    if config.peer_port != 0 {
        fetcher = fetcher.with_peers(peer::PeerClient::new(&data_dir));
        let addr = std::net::SocketAddr::new(config.advertise, config.peer_port);
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => {
                session_config.peer_port = config.peer_port;
                let server = peer::PeerServer::new(Arc::new(fetcher.clone()), &data_dir);
                tokio::spawn(async move {
                    if let Err(e) = server.serve(listener, stop_peers_rx).await {
                        tracing::warn!("the peer listener stopped: {e}");
                    }
                });
                tracing::info!(%addr, "serving artifact chunks to peers");
            }
            Err(e) => tracing::warn!(
                "cannot listen for peers on {addr} ({e}): this host serves no peers (--peer-port 0 turns the listener off)"
            ),
        }
    }
    let context = Arc::new(supervisor::Context {
        layout: layout.clone(),
        host_name: config.host_name.clone(),
        advertise: config.advertise.to_string(),
        fetcher,
        reporter: reporter.clone(),
        store: store.clone(),
        stop_apps_on_exit: config.stop_apps_on_exit,
    });
    let (supervisor_tx, supervisor_task) = supervisor::Supervisor::spawn(context, adopted);

    // Bring the assigned releases up again from origin, before the controller is even reached.
    // A restart is not a new rollout: the hook runs recorded in the state keep a hook from
    // running twice and a release whose hook failed from starting. (A state file from before
    // those records: its hooks ran then.)
    let saved = store.snapshot();
    let mut assigned = saved.assignments;
    if !saved.hooks_recorded {
        for assignment in &mut assigned {
            assignment.run_release_hook = false;
        }
    }
    if !assigned.is_empty() {
        tracing::info!(
            n_apps = assigned.len(),
            "bringing assigned releases up from the local cache"
        );
        let _ = supervisor_tx.send(supervisor::SupervisorCommand::Desired(
            supervisor::Desired {
                assignments: assigned,
                ..Default::default()
            },
        ));
    }

    let (stop_session_tx, stop_session_rx) = tokio::sync::watch::channel(false);
    let (renew_advice_tx, renew_advice_rx) = tokio::sync::mpsc::unbounded_channel();
    let renewer = renew::Renewer {
        data_dir: data_dir.clone(),
        host_name: config.host_name.clone(),
        credentials,
        dialer: dialer.clone(),
    };
    let renew_task = tokio::spawn(renewer.run(renew_advice_rx, stop_session_rx.clone()));
    let rotate_task = tokio::spawn(app_log::keep_rotated(
        layout.logs_dir(),
        stop_session_rx.clone(),
    ));
    let mut session_task = tokio::spawn(session::run_session(
        session_config,
        dialer,
        channel,
        renew_advice_tx,
        reporter.clone(),
        report_rx,
        supervisor_tx.clone(),
        stop_session_rx,
    ));

    tokio::pin!(shutdown);
    let revoked = tokio::select! {
        _ = &mut shutdown => None,
        ended = &mut session_task => match ended {
            Ok(session::SessionEnd::Revoked { purge, why }) => Some((purge, why)),
            // The session ends on its own only when revoked; otherwise wait for the signal.
            Ok(session::SessionEnd::Stopped) | Err(_) => {
                shutdown.await;
                None
            }
        },
    };
    if let Some((purge, why)) = revoked {
        tracing::error!(
            "the controller refused this host as revoked ({why}): the host was removed with `fleetctl remove`; stopping every instance{} and exiting for good (status {})",
            if purge { ", wiping its releases, secrets and state," } else { "" },
            removal::EXIT_REVOKED
        );
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        if supervisor_tx
            .send(supervisor::SupervisorCommand::StopAll(done_tx))
            .is_ok()
        {
            let _ = done_rx.await;
        }
        drop(supervisor_tx);
        let _ = supervisor_task.await;
        if purge {
            removal::purge(&layout).await;
        }
        removal::disable_unit().await;
        return Err(AgentError::Revoked { purge, why });
    }
    if config.stop_apps_on_exit {
        tracing::info!("shutting down: stopping every instance gracefully");
    } else {
        tracing::info!("shutting down: the instances keep running for the agent's next run");
    }
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    if supervisor_tx
        .send(supervisor::SupervisorCommand::Shutdown(done_tx))
        .is_ok()
    {
        let _ = done_rx.await;
    }
    let _ = stop_session_tx.send(true);
    if tokio::time::timeout(SESSION_GRACE, session_task)
        .await
        .is_err()
    {
        tracing::warn!("the controller session did not close in time");
    }
    let _ = tokio::time::timeout(SESSION_GRACE, renew_task).await;
    let _ = stop_peers_tx.send(true);
    let _ = tokio::time::timeout(SESSION_GRACE, rotate_task).await;
    drop(supervisor_tx);
    let _ = supervisor_task.await;
    tracing::info!("stopped");
    Ok(())
}
