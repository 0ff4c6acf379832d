//! `fleet-controller`, the daemon: the store, the artifact store, the rollout engine and the
//! gRPC API. The CLI is the `fleetctl` crate; it reaches this one only over gRPC.
//!
//! **Architecture Invariant:** the controller shares nothing with the agent but `fleet-proto`
//! and `fleet-pki`.
//! The planner knows nothing of gRPC or the store; generated types stop at `api`.
#![deny(unsafe_code)]

pub mod api;
pub mod artifacts;
pub mod auth;
pub mod backup;
pub mod break_glass;
pub mod budget;
pub mod ca_trust;
pub mod config;
pub mod converge;
pub mod data_lock;
pub mod edge;
pub mod fleet_state;
pub mod follower;
pub mod heartbeat;
pub mod host_lifecycle;
pub mod http;
pub mod lanes;
pub mod leader;
pub mod log_relay;
pub mod migrate;
pub mod model;
pub mod peers;
pub mod planner;
pub mod prune;
pub mod reconnects;
pub mod registry;
pub mod releases;
pub mod replicas;
pub mod rollout;
pub mod server;
pub mod status;
pub mod step;
pub mod store;

/// Resolves on the first SIGTERM or SIGINT: the one way a fleet process is asked to stop.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
