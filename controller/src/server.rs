//! Runs the controller: opens the store and the artifact store, picks up rollouts a previous
//! process left under way, serves both gRPC services, and shuts down on one path: the
//! shutdown future resolves, sessions and follow streams are told, in-flight calls get a
//! grace period, and a warning says when it ran out.

use crate::api::agent_service::AgentApi;
use crate::api::fleet_service::FleetApi;
use crate::artifacts::ArtifactStore;
use crate::config::{ControllerConfig, TlsPaths};
use crate::edge;
use crate::fleet_state::FleetState;
use crate::rollout::{self, Rollouts};
use crate::store::Store;
use anyhow::Context;
use fleet_pki::ca::Authority;
use fleet_proto::pb;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How long in-flight calls may take to finish once shutdown starts.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// FleetService messages may carry a 1 MiB artifact chunk plus framing.
const MAX_FLEET_MESSAGE_BYTES: usize = 4 << 20;
/// AgentService messages are hellos, reports and requests: kilobytes. (A call without a client
/// certificate is held to far less at the edge.)
const MAX_AGENT_MESSAGE_BYTES: usize = 1 << 20;

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
    // Private, also when it existed with looser modes: release environments live in the store.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&config.data_dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| {
                format!(
                    "cannot make the data directory {} private (0700)",
                    config.data_dir.display()
                )
            })?;
    }
    let store = Store::open(&config.data_dir)
        .with_context(|| {
            format!(
                "cannot open the store in {} (is another fleet-controller using it?)",
                config.data_dir.display()
            )
        })?
        .with_max_events(config.max_events);
    let artifacts = ArtifactStore::open(&config.data_dir, config.uploads)?;
    let (tls, authority) = load_tls(&config.tls)?;
    let authority = Arc::new(authority);
    let fleet = Arc::new(FleetState::new(
        store,
        artifacts,
        config.heartbeat_interval_ms,
        config.lost_after_ms,
    ));
    let (stop_tx, stop_rx) = watch::channel(false);
    let lost_host_watcher = tokio::spawn(fleet.clone().watch_for_lost_hosts(stop_rx.clone()));
    let credential_uses = tokio::spawn(fleet.clone().keep_credential_uses(stop_rx.clone()));
    let rollouts = Arc::new(Rollouts::default());

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    write_addr_file(&config.addr_file, &addr.to_string())?;
    tracing::info!("listening on {addr}");

    let recovered = rollout::recover(&fleet, &rollouts).await?;
    let converger = tokio::spawn(crate::converge::run(
        fleet.clone(),
        rollouts.clone(),
        stop_rx.clone(),
    ));
    if recovered > 0 {
        tracing::info!("picked up {recovered} rollout(s) left under way");
    }

    let agent_api = AgentApi {
        fleet: fleet.clone(),
        authority: authority.clone(),
        shutdown: stop_rx.clone(),
        joins: Arc::new(tokio::sync::Semaphore::new(
            crate::api::agent_service::MAX_CONCURRENT_JOINS,
        )),
    };
    let fleet_api = FleetApi {
        fleet: fleet.clone(),
        authority,
        rollouts: rollouts.clone(),
        shutdown: stop_rx.clone(),
    };
    let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
    let limits = edge::Limits::default();
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .max_concurrent_streams(limits.streams_per_connection)
        // Bounded header lists and reset-stream floods (RUSTSEC-2024-0003: tonic leaves
        // hyper's limits off).
        .http2_max_header_list_size(Some(64 * 1024))
        .http2_max_pending_accept_reset_streams(Some(20))
        .http2_max_local_error_reset_streams(Some(1024))
        // Megabyte windows, so a release upload is not stalled every 64 KiB by flow control.
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(8 << 20))
        .layer(edge::EdgeLayer {
            limits,
            classify: {
                let fleet = fleet.clone();
                Arc::new(move |der: &[u8]| crate::auth::classify(&fleet, der))
            },
        })
        .add_service(
            pb::agent_service_server::AgentServiceServer::new(agent_api)
                .max_decoding_message_size(MAX_AGENT_MESSAGE_BYTES),
        )
        .add_service(
            pb::fleet_service_server::FleetServiceServer::new(fleet_api)
                .max_decoding_message_size(MAX_FLEET_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(
            // TLS at the edge (no Nagle there: an answer written in two parts must not wait
            // for the peer's delayed ACK before its second part goes out).
            edge::incoming(listener, tls, limits),
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
    let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    let _ = stop_tx.send(true);
    let _ = signalled_tx.send(());
    // The rollout executors and the lost-host watcher stop at their next await; what they
    // wrote is committed (a write in flight finishes on the blocking pool).
    let late_executors = rollouts.shut_down(deadline).await;
    if late_executors > 0 {
        tracing::warn!(
            "{late_executors} rollout executor(s) did not stop within {SHUTDOWN_GRACE:?}"
        );
    }
    if tokio::time::timeout_at(deadline, lost_host_watcher)
        .await
        .is_err()
    {
        tracing::warn!("the lost-host watcher did not stop within {SHUTDOWN_GRACE:?}");
    }
    if tokio::time::timeout_at(deadline, credential_uses)
        .await
        .is_err()
    {
        tracing::warn!("the credentials' last uses were not written within {SHUTDOWN_GRACE:?}");
    }
    if tokio::time::timeout_at(deadline, converger).await.is_err() {
        tracing::warn!("the converger did not stop within {SHUTDOWN_GRACE:?}");
    }
    match tokio::time::timeout_at(deadline, &mut server).await {
        Ok(result) => result??,
        Err(_) => tracing::warn!(
            "in-flight calls did not finish within {SHUTDOWN_GRACE:?}; exiting anyway"
        ),
    }
    tracing::info!("stopped");
    let _ = std::fs::remove_file(&config.addr_file);
    Ok(())
}

/// Reads the TLS files named in controller.toml: the server side of mutual TLS (the
/// controller's certificate, client certificates verified against the fleet CA but optional
/// at the handshake) and the CA that signs new certificates.
fn load_tls(
    paths: &TlsPaths,
) -> anyhow::Result<(Arc<tokio_rustls::rustls::ServerConfig>, Authority)> {
    let read = |path: &std::path::Path| {
        std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read {}; `fleetctl init --dir DIR` makes the CA and the controller's certificate",
                path.display()
            )
        })
    };
    let ca_pem = read(&paths.ca)?;
    let authority = Authority::load(&ca_pem, &read(&paths.ca_key)?)
        .with_context(|| format!("cannot load the fleet CA {}", paths.ca.display()))?;
    let tls = edge::server_tls(&ca_pem, &read(&paths.cert)?, &read(&paths.key)?)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("cannot set up TLS with {}", paths.cert.display()))?;
    Ok((tls, authority))
}

/// Writes the bound address atomically, so a reader never sees half of it.
fn write_addr_file(path: &std::path::Path, addr: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("addr.tmp");
    std::fs::write(&tmp, format!("{addr}\n"))
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
