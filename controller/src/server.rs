//! Runs the controller: opens the store and the artifact store, joins the election when the
//! fleet is on etcd (`leader`; on redb it is the only controller), runs the leader's work
//! ([`duties`]: rollouts picked up where they were, convergence, the lost-host watcher) while
//! it leads, serves both gRPC services (on two lanes: agents' connections on the calling
//! runtime, the rest on the clients' runtime, see `crate::lanes`; a follower redirects what it
//! does not serve, `crate::follower`), and shuts down on one path: the shutdown future
//! resolves, a leader resigns, sessions and follow streams are told, in-flight calls get a
//! grace period, and a warning says when it ran out. The operators' HTTP listener and the
//! webhooks (`http`) start before rollouts are recovered and stop on the same path.

use crate::api::agent_service::AgentApi;
use crate::api::fleet_service::FleetApi;
use crate::artifacts::ArtifactStore;
use crate::ca_trust::Trust;
use crate::config::ControllerConfig;
use crate::edge;
use crate::fleet_state::FleetState;
use crate::leader::Role;
use crate::registry::{ControllerEntry, Membership};
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
/// FleetService messages may carry a 1 MiB artifact chunk plus framing.
const MAX_FLEET_MESSAGE_BYTES: usize = 4 << 20;
/// AgentService messages are hellos, reports and requests: kilobytes. (A call without a client
/// certificate is held to far less at the edge.)
const MAX_AGENT_MESSAGE_BYTES: usize = 1 << 20;

/// Runs the controller on the calling runtime (the agents' lane: sessions, rollout executors,
/// the converger, the operators' HTTP listener) and `clients` (the clients' lane: handshakes
/// and every connection without an agent certificate; see `crate::lanes`).
pub async fn run(
    config: ControllerConfig,
    clients: tokio::runtime::Handle,
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
    // Held until the controller ends: another controller on this directory is refused.
    let _data_lock = crate::data_lock::lock(&config.data_dir).map_err(anyhow::Error::msg)?;
    let opened = {
        let (data_dir, etcd, ca) = (
            config.data_dir.clone(),
            config.etcd.clone(),
            config.tls.ca.clone(),
        );
        tokio::task::spawn_blocking(move || Store::open_configured(&data_dir, etcd.as_ref(), &ca))
            .await?
    };
    let (store, etcd) = match (&config.etcd, opened) {
        (_, Ok(opened)) => opened,
        (Some(_), Err(e)) => return Err(anyhow::anyhow!("{e}")),
        (None, Err(e)) => {
            return Err(e).with_context(|| {
                format!(
                    "cannot open the store in {} (is another fleet-controller using it?)",
                    config.data_dir.display()
                )
            })
        }
    };
    let store = store.with_max_events(config.max_events);
    tracing::info!("store: {}", store.describe());
    let artifacts = ArtifactStore::open(&config.data_dir, config.uploads)?;
    let trust = Trust::load(&config.tls, config.certificate_ttl)?;
    let fleet = Arc::new(FleetState::new(
        store,
        artifacts,
        crate::heartbeat::Policy {
            interval_ms: config.heartbeat_interval_ms,
            lost_after_ms: config.lost_after_ms,
            per_second: config.heartbeats_per_second,
        },
    ));
    let (stop_tx, stop_rx) = watch::channel(false);
    // Executors stay on this runtime even when a client's call starts them.
    let rollouts = Arc::new(Rollouts::on(tokio::runtime::Handle::current()));

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let url = config.advertise_url(addr).map_err(anyhow::Error::msg)?;

    // Who leads: on etcd, the election decides (`leader::run` publishes what it won as
    // `elected`); on redb this controller is the only one. What the rest acts on is `role`,
    // which `duties` publishes once the leader's work is started (or stopped).
    let (elected_tx, elected) = watch::channel(match &etcd {
        Some(_) => Role::Follower { leader: None },
        None => Role::sole(),
    });
    let (role_tx, role) = watch::channel(Role::Follower { leader: None });
    let mut background = Vec::new();
    if let Some(etcd) = &etcd {
        background.push(tokio::spawn(crate::leader::run(
            etcd.clone(),
            url.clone(),
            crate::leader::DEFAULT_LEASE,
            elected_tx,
            stop_rx.clone(),
        )));
    }
    let duties = tokio::spawn(duties(
        fleet.clone(),
        rollouts.clone(),
        elected,
        role_tx,
        stop_rx.clone(),
    ));
    if let Some(etcd) = &etcd {
        // Several controllers: a release is kept on two of them (`crate::replicas`).
        let peers = Arc::new(crate::replicas::RegisteredPeers {
            etcd: etcd.clone(),
            me: url.clone(),
        });
        fleet.set_replicas(Arc::new(crate::replicas::Replicas::new(
            fleet.artifacts().clone(),
            trust.clone(),
            peers,
            url.clone(),
        )));
    }

    // Metrics, health, the status page and webhooks; before recovery, to see its events.
    let ops = crate::http::start(
        config.http,
        &config.http_addr_file,
        &config.webhooks,
        &fleet,
        &rollouts,
        stop_rx.clone(),
    )
    .await?;
    let me = ControllerEntry {
        url: url.clone(),
        http: ops.http_addr.map(|addr| addr.to_string()),
        up_since_unix_ms: fleet_proto::now_unix_ms(),
        leading_since_unix_ms: None,
    };
    if let Some(etcd) = &etcd {
        background.push(tokio::spawn(crate::registry::run(
            etcd.clone(),
            me.clone(),
            role.clone(),
            stop_rx.clone(),
        )));
    }
    let membership = Arc::new(Membership {
        etcd: etcd.clone(),
        me,
        role: role.clone(),
    });
    if etcd.is_none() {
        // One controller: it serves once the rollouts a previous run left are picked up.
        let mut leading = role.clone();
        crate::leader::until(&mut leading, Role::is_leader).await;
    }
    write_addr_file(&config.addr_file, &addr.to_string())?;
    tracing::info!("listening on {addr} ({url})");

    let logs = Arc::new(crate::log_relay::LogRelay::default());
    let agent_api = AgentApi {
        fleet: fleet.clone(),
        logs: logs.clone(),
        trust: trust.clone(),
        shutdown: stop_rx.clone(),
        joins: Arc::new(tokio::sync::Semaphore::new(
            crate::api::agent_service::MAX_CONCURRENT_JOINS,
        )),
        reconnects: Arc::default(),
        impostors_logged: Arc::default(),
        peers: Arc::new(crate::peers::Directory::default()),
        role: role.clone(),
    };
    let fleet_api = FleetApi {
        fleet: fleet.clone(),
        logs,
        trust: trust.clone(),
        rollouts: rollouts.clone(),
        shutdown: stop_rx.clone(),
        membership,
    };
    let (signalled_tx, signalled_rx) = watch::channel(false);
    let limits = edge::Limits {
        handshake: config.handshake_timeout,
        write_stall: config.write_stall_timeout,
        ..edge::Limits::default()
    };
    let connections = Arc::new(edge::Connections::default());
    let server = tonic::transport::Server::builder()
        // A ping after this long without a frame from the peer: longer than the longest
        // heartbeat interval (`heartbeat::MAX_INTERVAL_MS`), so an agent's session, which
        // heartbeats, is never pinged (at 10,000 hosts, pings would be most of the controller's
        // idle wake-ups); an idle `events --follow` is, as before.
        .http2_keepalive_interval(Some(crate::heartbeat::KEEPALIVE_INTERVAL))
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
            connections: connections.clone(),
            role: role.clone(),
            classify: {
                let (fleet, trust) = (fleet.clone(), trust.clone());
                // A connection opened before its certificate's CA was retired is refused too.
                Arc::new(move |der: &[u8]| match trust.refusal(der) {
                    Some(why) => edge::Caller::Refused(why),
                    None => crate::auth::classify(&fleet, der),
                })
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
        .add_service(
            pb::replica_service_server::ReplicaServiceServer::new(
                crate::api::replica_service::ReplicaApi {
                    fleet: fleet.clone(),
                },
            )
            .max_decoding_message_size(MAX_FLEET_MESSAGE_BYTES),
        );
    // TLS at the edge (no Nagle there: an answer written in two parts must not wait for the
    // peer's delayed ACK before its second part goes out), each connection to its lane.
    let lanes = edge::incoming(
        listener,
        {
            let trust = trust.clone();
            Arc::new(move || trust.server_tls())
        },
        limits,
        connections,
        clients.clone(),
    );
    let signalled = |mut rx: watch::Receiver<bool>| async move {
        crate::leader::until(&mut rx, |signalled| *signalled).await;
    };
    // Each server spawns its connections' tasks on the runtime it runs on.
    let mut agents_server = tokio::spawn(
        server
            .clone()
            .serve_with_incoming_shutdown(lanes.agents, signalled(signalled_rx.clone())),
    );
    let mut clients_server =
        clients.spawn(server.serve_with_incoming_shutdown(lanes.clients, signalled(signalled_rx)));
    // Under systemd (Type=notify): ready once the listener is bound and served.
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        tracing::warn!("cannot tell systemd the controller is ready (NOTIFY_SOCKET): {e}");
    }
    tokio::select! {
        result = &mut agents_server => {
            result??;
            return Ok(());
        }
        result = &mut clients_server => {
            result??;
            return Ok(());
        }
        _ = shutdown => {}
    }
    tracing::info!("shutting down");
    let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    let _ = stop_tx.send(true);
    let _ = signalled_tx.send(true);
    // The leader's work stops (the rollout executors and the lost-host watcher at their next
    // await; what they wrote is committed, a write in flight finishes on the blocking pool)
    // and a leader resigns, so that another takes over at once.
    match tokio::time::timeout_at(deadline, duties).await {
        Ok(Ok(late_executors)) if late_executors > 0 => tracing::warn!(
            "{late_executors} rollout executor(s) did not stop within {SHUTDOWN_GRACE:?}"
        ),
        Ok(_) => {}
        Err(_) => tracing::warn!("the leader's work did not stop within {SHUTDOWN_GRACE:?}"),
    }
    for task in background {
        if tokio::time::timeout_at(deadline, task).await.is_err() {
            tracing::warn!(
                "the election or the registration did not end within {SHUTDOWN_GRACE:?}"
            );
            break;
        }
    }
    for task in ops.tasks {
        if tokio::time::timeout_at(deadline, task).await.is_err() {
            tracing::warn!("the HTTP listener or a webhook did not stop within {SHUTDOWN_GRACE:?}");
            break;
        }
    }
    for server in [&mut agents_server, &mut clients_server] {
        match tokio::time::timeout_at(deadline, server).await {
            Ok(result) => result??,
            Err(_) => {
                tracing::warn!(
                    "in-flight calls did not finish within {SHUTDOWN_GRACE:?}; exiting anyway"
                );
                break;
            }
        }
    }
    tracing::info!("stopped");
    let _ = std::fs::remove_file(&config.addr_file);
    if ops.http_addr.is_some() {
        let _ = std::fs::remove_file(&config.http_addr_file);
    }
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

/// What only the leader runs, started each time this controller comes to lead (`elected`) and
/// stopped when it no longer does or shuts down: the rollouts (those under way picked up from
/// the store first), the converger, the lost-host watcher (which gives every host
/// `lost_after_ms` from this moment: the agents were talking to the previous leader) and the
/// credentials' last uses. `role` is published from here, so that calls and sessions are
/// served only while the work runs. Returns how many executors were late to stop at the end.
async fn duties(
    fleet: Arc<FleetState>,
    rollouts: Arc<Rollouts>,
    mut elected: watch::Receiver<Role>,
    role: watch::Sender<Role>,
    mut stop: watch::Receiver<bool>,
) -> usize {
    loop {
        // Follow: name the leader in redirects until this controller is elected.
        let since_unix_ms = loop {
            let now = elected.borrow_and_update().clone();
            if let Role::Leader { since_unix_ms } = now {
                break since_unix_ms;
            }
            role.send_replace(now);
            tokio::select! {
                changed = elected.changed() => if changed.is_err() { return 0 },
                _ = crate::leader::until(&mut stop, |stop| *stop) => return 0,
            }
        };
        fleet.hearing_from_now();
        let (term_tx, term) = watch::channel(false);
        let lost_host_watcher = tokio::spawn(fleet.clone().watch_for_lost_hosts(term.clone()));
        let credential_uses = tokio::spawn(fleet.clone().keep_credential_uses(term.clone()));
        match rollout::recover(&fleet, &rollouts).await {
            Ok(0) => {}
            Ok(recovered) => tracing::info!("picked up {recovered} rollout(s) left under way"),
            Err(e) => tracing::error!("cannot pick up the rollouts left under way: {e}"),
        }
        let converger = tokio::spawn(crate::converge::run(
            fleet.clone(),
            rollouts.clone(),
            term.clone(),
        ));
        role.send_replace(Role::Leader { since_unix_ms });
        let stopping = tokio::select! {
            _ = crate::leader::until(&mut elected, |elected| !elected.is_leader()) => false,
            _ = crate::leader::until(&mut stop, |stop| *stop) => true,
        };
        // Calls and sessions go elsewhere first, then the work stops.
        role.send_replace(elected.borrow().clone());
        if !stopping {
            tracing::warn!(
                "no longer the leader: rollouts, convergence and the lost-host watcher stop here"
            );
        }
        let _ = term_tx.send(true);
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        let late = rollouts.stand_down(deadline).await;
        for (task, what) in [
            (lost_host_watcher, "the lost-host watcher"),
            (credential_uses, "the credentials' last uses"),
            (converger, "the converger"),
        ] {
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                tracing::warn!("{what} did not stop within {SHUTDOWN_GRACE:?}");
            }
        }
        if stopping {
            return late;
        }
    }
}
