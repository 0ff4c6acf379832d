//! Runs the controller: opens the store and the artifact store, picks up rollouts a previous
//! process left under way, serves both gRPC services, and shuts down on one path: the
//! shutdown future resolves, sessions and follow streams are told, in-flight calls get a
//! grace period, and a warning says when it ran out.

use crate::api::agent_service::AgentApi;
use crate::api::fleet_service::FleetApi;
use crate::artifacts::ArtifactStore;
use crate::config::ControllerConfig;
use crate::fleet_state::FleetState;
use crate::rollout::{self, Rollouts};
use crate::store::Store;
use anyhow::Context;
use fleet_proto::pb;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How long in-flight calls may take to finish once shutdown starts.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// gRPC messages may carry a 1 MiB artifact chunk plus framing.
const MAX_MESSAGE_BYTES: usize = 4 << 20;

pub async fn run(
    config: ControllerConfig,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {}",
            config.data_dir.display()
        )
    })?;
    let store = Store::open(&config.data_dir).with_context(|| {
        format!(
            "cannot open the store in {} (is another fleet-controller using it?)",
            config.data_dir.display()
        )
    })?;
    let artifacts = ArtifactStore::open(&config.data_dir)?;
    let fleet = Arc::new(FleetState::new(
        store,
        artifacts,
        config.heartbeat_interval_ms,
    ));
    let rollouts = Arc::new(Rollouts::default());

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    write_addr_file(&config.addr_file, &addr.to_string())?;
    tracing::info!("listening on {addr}");

    let recovered = rollout::recover(&fleet, &rollouts)?;
    if recovered > 0 {
        tracing::info!("picked up {recovered} rollout(s) left under way");
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let agent_api = AgentApi {
        fleet: fleet.clone(),
        shutdown: stop_rx.clone(),
    };
    let fleet_api = FleetApi {
        fleet: fleet.clone(),
        rollouts,
        shutdown: stop_rx.clone(),
    };
    let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .add_service(
            pb::agent_service_server::AgentServiceServer::new(agent_api)
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            pb::fleet_service_server::FleetServiceServer::new(fleet_api)
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async {
                let _ = signalled_rx.await;
            },
        );
    let mut server = tokio::spawn(server);
    tokio::select! {
        result = &mut server => {
            result??;
            return Ok(());
        }
        _ = shutdown => {}
    }
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = signalled_tx.send(());
    match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
        Ok(result) => result??,
        Err(_) => tracing::warn!(
            "in-flight calls did not finish within {SHUTDOWN_GRACE:?}; exiting anyway"
        ),
    }
    let _ = std::fs::remove_file(&config.addr_file);
    Ok(())
}

/// Writes the bound address atomically, so a reader never sees half of it.
fn write_addr_file(path: &std::path::Path, addr: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("addr.tmp");
    std::fs::write(&tmp, format!("{addr}\n"))
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
