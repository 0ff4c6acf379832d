//! `fleet-bench scale --agents N [--output json]`: N simulated hosts on one real controller.
//!
//! One process speaks the agents' real protocol over mutual TLS: each host makes its own key,
//! joins with a one-time token minted through the controller's token API (what `fleetctl
//! join-token create` calls), then holds its `Session` (hello, heartbeats at the interval the
//! controller tells, which grows with the fleet, a session left when the controller stops
//! answering heartbeats, HTTP/2 keepalives as the agent's, reconnects with the agent's
//! backoff) and answers assignments as an agent would:
//! it fetches the artifact (`FetchArtifact`, checked against the digest), then reports
//! `starting` and `running` without running a process. Every host dials from a loopback
//! source address of its own (`127.A.B.C`, bound before connecting, through a connector of
//! this module), as hosts of a real fleet would, so the edge's per-source limits apply to each
//! host apart. The file limit is raised here (`RLIMIT_NOFILE`) before the controller is
//! started, which inherits it.
//!
//! Measured: the time for all N to join (all at once: the controller's back-pressure is met as
//! retries, and no join may be lost), the controller's resident memory per connected host, its
//! CPU while the fleet is idle, a rollout of a 64 KB release with a smoke check at `--batch
//! 10%` (wall time and the controller's CPU-seconds, from `/proc/PID/stat`), a no-op rollout
//! (the release already runs), `fleetctl status` and `hosts` latency. Then bad input: a host
//! that reconnects 100 times a second (status latency meanwhile), and a session whose hello
//! speaks for another host (refused, and logged once). Every task stops at the end; every
//! wait is bounded.

use crate::fleet::Fleet;
use crate::process;
use anyhow::{bail, Context, Result};
use fleet_proto::pb;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio::net::TcpSocket;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Targets at 10,000 hosts (issue 12).
const TARGET_RSS_PER_AGENT_KB: f64 = 100.0;
const TARGET_IDLE_CPU_PCT: f64 = 5.0;
const TARGET_ROLLOUT_CPU_S: f64 = 15.0;
const TARGET_STATUS_MS: f64 = 1000.0;
/// How long one host may keep retrying its join.
const JOIN_DEADLINE: Duration = Duration::from_secs(1200);
/// How long all sessions may take to be welcomed.
const CONNECT_DEADLINE: Duration = Duration::from_secs(900);
/// How long a rollout may take.
const ROLLOUT_DEADLINE: Duration = Duration::from_secs(3600);
/// How long the fleet is left alone before its memory and idle CPU are read.
const SETTLE: Duration = Duration::from_secs(5);
/// The window idle CPU is measured over.
const IDLE_WINDOW: Duration = Duration::from_secs(10);
/// The reconnect storm: attempts per second, and for how long.
const STORM_RATE: u64 = 100;
const STORM_FOR: Duration = Duration::from_secs(5);
/// Join tokens minted at once.
const MINT_CONCURRENCY: usize = 32;
/// `/proc/PID/stat` ticks per second (`USER_HZ`, 100 on Linux).
const TICKS_PER_S: f64 = 100.0;
/// Latency samples per fleetctl call measured.
const LATENCY_SAMPLES: usize = 3;

/// The command line: `--agents N [--output json]`.
struct Opts {
    agents: usize,
    json: bool,
    /// The idle window (`--idle-s`), [`IDLE_WINDOW`] unless given: longer for a profiler to
    /// attach to the controller (its pid is printed when the window opens).
    idle: Duration,
}

impl Opts {
    fn parse(args: &[String]) -> Result<Opts> {
        let mut opts = Opts {
            agents: 1000,
            json: false,
            idle: IDLE_WINDOW,
        };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--agents" => {
                    let n = it.next().context("--agents needs a number, like 1000")?;
                    opts.agents = n
                        .parse()
                        .with_context(|| format!("--agents {n:?} is not a number"))?;
                    if !(2..=200_000).contains(&opts.agents) {
                        bail!("--agents must be between 2 and 200000");
                    }
                }
                "--idle-s" => {
                    let s = it.next().context("--idle-s needs a number of seconds")?;
                    let secs: u64 = s
                        .parse()
                        .with_context(|| format!("--idle-s {s:?} is not a number"))?;
                    if !(1..=3600).contains(&secs) {
                        bail!("--idle-s must be between 1 and 3600");
                    }
                    opts.idle = Duration::from_secs(secs);
                }
                "--output" => match it.next().map(String::as_str) {
                    Some("json") => opts.json = true,
                    Some("text") => opts.json = false,
                    other => bail!("--output takes text or json, not {other:?}"),
                },
                other => bail!(
                    "unknown argument {other:?}: fleet-bench scale [--agents N] [--idle-s S] [--output json]"
                ),
            }
        }
        Ok(opts)
    }
}

/// The loopback source address of host `index`: `127.A.B.C` with A from 200 up, C in 2..=251,
/// never an address a test fleet's range (`127.A.B.0/24` with A < 255 from `net`) serves on
/// port 8080 that this connects from with port 0.
fn source_addr(index: usize) -> Ipv4Addr {
    let c = 2 + (index % 250) as u8;
    let b = ((index / 250) % 250) as u8 + 1;
    let a = 200 + (index / 62_500) as u8;
    Ipv4Addr::new(127, a, b, c)
}

fn host_name(index: usize) -> String {
    format!("sim-{index:05}")
}

/// A connector for tonic's `Endpoint` that binds each socket to one source address first.
#[derive(Clone)]
struct BoundConnector {
    source: Ipv4Addr,
}

type ConnectFuture = Pin<
    Box<
        dyn Future<Output = std::io::Result<hyper_util::rt::TokioIo<tokio::net::TcpStream>>> + Send,
    >,
>;

impl tower::Service<http::Uri> for BoundConnector {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let source = self.source;
        Box::pin(async move {
            let invalid = |what: &str| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_string())
            };
            let host = uri.host().ok_or_else(|| invalid("the URL names no host"))?;
            let port = uri
                .port_u16()
                .ok_or_else(|| invalid("the URL names no port"))?;
            let ip: std::net::IpAddr = host
                .trim_matches(|c| c == '[' || c == ']')
                .parse()
                .map_err(|_| invalid("the controller's URL must name an IP address"))?;
            let socket = TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(source.into(), 0))?;
            let stream = socket.connect(SocketAddr::new(ip, port)).await?;
            stream.set_nodelay(true)?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}

/// One simulated host once joined.
struct SimHost {
    index: usize,
    name: String,
    source: Ipv4Addr,
    key_pem: String,
    cert_pem: String,
}

/// Counters the simulated hosts share.
#[derive(Default)]
struct Counters {
    /// Hosts whose session is open and welcomed now.
    welcomed: AtomicUsize,
    sessions_opened: AtomicU64,
    sessions_lost: AtomicU64,
    /// Heartbeats sent, and the longest interval a controller's welcome or answer told.
    heartbeats: AtomicU64,
    interval_ms: AtomicU64,
    desired_messages: AtomicU64,
    fetches: AtomicU64,
    fetched_bytes: AtomicU64,
    failed: AtomicU64,
    /// `running` reports sent, per release version.
    running: Mutex<HashMap<String, u64>>,
    /// Why joins were retried, by cause, and why sessions were lost (samples).
    join_retries: Mutex<BTreeMap<String, u64>>,
    session_errors: Mutex<BTreeMap<String, u64>>,
}

impl Counters {
    fn note(map: &Mutex<BTreeMap<String, u64>>, why: &str) {
        let key: String = why.chars().take(90).collect();
        *map.lock().unwrap().entry(key).or_default() += 1;
    }

    fn running_of(&self, version: &str) -> u64 {
        self.running
            .lock()
            .unwrap()
            .get(version)
            .copied()
            .unwrap_or(0)
    }
}

/// What every simulated host needs to reach the controller.
struct Shared {
    url: String,
    ca_pem: String,
    counters: Counters,
}

fn agent_endpoint(shared: &Shared, host: &SimHost) -> Result<Endpoint> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&shared.ca_pem))
        .domain_name(fleet_pki::CONTROLLER_TLS_NAME)
        .identity(Identity::from_pem(&host.cert_pem, &host.key_pem));
    // The agent's own channel settings (agent/src/session.rs), keepalives included (a ping
    // after 75 s without a frame from the controller: never, while heartbeats are answered).
    Ok(Endpoint::from_shared(shared.url.clone())?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(75))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true))
}

/// Mints `n` one-time join tokens through the controller's token API, as an admin.
async fn mint_tokens(admin: Channel, n: usize) -> Result<Vec<String>> {
    let mut tokens = Vec::with_capacity(n);
    let mut tasks = tokio::task::JoinSet::new();
    let mut next = 0;
    while tokens.len() < n {
        while next < n && tasks.len() < MINT_CONCURRENCY {
            let mut client = pb::fleet_service_client::FleetServiceClient::new(admin.clone());
            tasks.spawn(async move {
                client
                    .create_join_token(pb::CreateJoinTokenRequest {
                        ttl_ms: fleet_proto::MAX_JOIN_TOKEN_TTL_MS,
                        labels: Default::default(),
                    })
                    .await
                    .map(|r| r.into_inner().token)
            });
            next += 1;
        }
        let done = tasks.join_next().await.context("a token task")??;
        tokens.push(done.context("minting a join token")?);
    }
    Ok(tokens)
}

/// Joins one host with `token`, retrying as the agent does while the controller pushes back.
async fn join_one(shared: Arc<Shared>, index: usize, token: String) -> Result<SimHost> {
    let name = host_name(index);
    let source = source_addr(index);
    let (csr_pem, key_pem) = fleet_pki::request::new_key_and_request(&name)
        .map_err(|e| anyhow::anyhow!("a key for {name}: {e}"))?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&shared.ca_pem))
        .domain_name(fleet_pki::CONTROLLER_TLS_NAME);
    let endpoint = Endpoint::from_shared(shared.url.clone())?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(60));
    let request = pb::JoinRequest {
        token,
        host_name: name.clone(),
        csr_pem,
    };
    let started = Instant::now();
    let mut backoff = Duration::from_millis(200);
    let mut tries: u64 = 0;
    loop {
        tries += 1;
        let attempt = async {
            let channel = endpoint
                .connect_with_connector(BoundConnector { source })
                .await
                .map_err(|e| {
                    (
                        true,
                        format!("connect: {}", fleet_proto::error_text::with_sources(&e)),
                    )
                })?;
            pb::agent_service_client::AgentServiceClient::new(channel)
                .join(request.clone())
                .await
                .map(|r| r.into_inner())
                .map_err(|status| {
                    let retry = matches!(
                        status.code(),
                        tonic::Code::Unavailable
                            | tonic::Code::DeadlineExceeded
                            | tonic::Code::ResourceExhausted
                            | tonic::Code::Unknown
                            | tonic::Code::Cancelled
                    );
                    (retry, format!("{:?}: {}", status.code(), status.message()))
                })
        };
        match attempt.await {
            Ok(response) => {
                return Ok(SimHost {
                    index,
                    name,
                    source,
                    key_pem,
                    cert_pem: response.certificate_pem,
                })
            }
            Err((false, message)) => bail!("host {name} was refused: {message}"),
            Err((true, message)) => {
                Counters::note(&shared.counters.join_retries, &message);
                if started.elapsed() >= JOIN_DEADLINE {
                    bail!("host {name} could not join within {JOIN_DEADLINE:?} ({tries} tries): {message}");
                }
                // The agent's backoff (200 ms doubling to 5 s), spread so retries do not march
                // in step.
                let spread =
                    0.5 + ((index * 7919 + tries as usize * 104_729) % 1000) as f64 / 1000.0;
                tokio::time::sleep(backoff.mul_f64(spread)).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// What a simulated host runs of one app: the assignment it converged to.
#[derive(Clone, PartialEq, Eq)]
struct Running {
    version: String,
    generation: u64,
    rollout_id: String,
    digest: String,
}

fn report(
    app: &str,
    version: &str,
    rollout_id: &str,
    state: fleet_proto::instance_state::InstanceState,
    message: &str,
) -> pb::AgentMessage {
    let mut wire = pb::InstanceReport {
        app: app.to_string(),
        version: version.to_string(),
        message: message.to_string(),
        since_unix_ms: fleet_proto::now_unix_ms(),
        restarts: 0,
        rollout_id: rollout_id.to_string(),
        ..Default::default()
    };
    state.write_to(&mut wire);
    pb::AgentMessage {
        body: Some(pb::agent_message::Body::Report(wire)),
    }
}

/// Fetches an artifact whole and checks it against its digest; its size.
async fn fetch(channel: Channel, digest: &str) -> Result<u64, String> {
    let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
    let mut stream = client
        .fetch_artifact(pb::FetchArtifactRequest {
            digest: digest.to_string(),
            offset: 0,
        })
        .await
        .map_err(|s| format!("fetch refused: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) = stream
        .message()
        .await
        .map_err(|s| format!("fetch cut: {:?}: {}", s.code(), s.message()))?
    {
        size += chunk.data.len() as u64;
        hasher.update(&chunk.data);
    }
    let got: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if format!("sha256:{got}") != digest {
        return Err(format!(
            "the artifact's digest is sha256:{got}, not {digest}"
        ));
    }
    Ok(size)
}

/// How one session ended.
enum Ended {
    Stopped,
    Lost { welcomed: bool },
}

/// What a simulated host keeps across its sessions.
#[derive(Default)]
struct HostState {
    apps: HashMap<String, Running>,
    cached: HashSet<String>,
}

/// Holds host `host`'s session until `stop`, reconnecting with the agent's backoff.
async fn hold_session(host: Arc<SimHost>, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut state = HostState::default();
    let mut backoff = Duration::from_millis(200);
    loop {
        if *stop.borrow() {
            return;
        }
        match session_once(&host, &shared, &mut state, &mut stop).await {
            Ended::Stopped => return,
            Ended::Lost { welcomed } => {
                shared
                    .counters
                    .sessions_lost
                    .fetch_add(1, Ordering::Relaxed);
                if welcomed {
                    backoff = Duration::from_millis(200);
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn session_once(
    host: &SimHost,
    shared: &Shared,
    state: &mut HostState,
    stop: &mut watch::Receiver<bool>,
) -> Ended {
    let counters = &shared.counters;
    let lost = |welcomed: bool, why: String| {
        Counters::note(&counters.session_errors, &why);
        Ended::Lost { welcomed }
    };
    let endpoint = match agent_endpoint(shared, host) {
        Ok(endpoint) => endpoint,
        Err(e) => return lost(false, e.to_string()),
    };
    let channel = tokio::select! {
        channel = endpoint.connect_with_connector(BoundConnector { source: host.source }) => match channel {
            Ok(channel) => channel,
            Err(e) => return lost(false, format!("connect: {}", fleet_proto::error_text::with_sources(&e))),
        },
        _ = stop.changed() => return Ended::Stopped,
    };
    let mut client = pb::agent_service_client::AgentServiceClient::new(channel.clone());
    let (tx, rx) = mpsc::channel::<pb::AgentMessage>(64);
    let instances = state
        .apps
        .iter()
        .map(|(app, running)| {
            match report(
                app,
                &running.version,
                &running.rollout_id,
                fleet_proto::instance_state::InstanceState::Running,
                "running",
            )
            .body
            {
                Some(pb::agent_message::Body::Report(r)) => r,
                _ => unreachable!(),
            }
        })
        .collect();
    let hello = pb::Hello {
        host_name: host.name.clone(),
        labels: Default::default(),
        advertise_addr: host.source.to_string(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        agent_arch: std::env::consts::ARCH.to_string(),
        instances,
        // Simulated hosts serve no peers: each fetches from the controller.
        peer_port: 0,
    };
    let _ = tx.try_send(pb::AgentMessage {
        body: Some(pb::agent_message::Body::Hello(hello)),
    });
    let opened = tokio::select! {
        opened = tokio::time::timeout(Duration::from_secs(60), client.session(ReceiverStream::new(rx))) => opened,
        _ = stop.changed() => return Ended::Stopped,
    };
    let mut inbound = match opened {
        Err(_) => return lost(false, "the session did not open in 60s".into()),
        Ok(Err(status)) => {
            return lost(false, format!("{:?}: {}", status.code(), status.message()))
        }
        Ok(Ok(response)) => response.into_inner(),
    };
    counters.sessions_opened.fetch_add(1, Ordering::Relaxed);
    let mut welcomed = false;
    // As the agent: a controller that answers heartbeats and leaves one unanswered is gone
    // (here after 20 s, as this one process's 10,000 sessions may answer late, not the agent's
    // 10 s).
    let mut answers = false;
    let mut answer_due: Option<tokio::time::Instant> = None;
    let mut period = Duration::from_secs(5);
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let ended = loop {
        tokio::select! {
            _ = stop.changed() => break Ended::Stopped,
            _ = tokio::time::sleep_until(answer_due.unwrap_or_else(tokio::time::Instant::now)), if answer_due.is_some() => {
                break lost(welcomed, "a heartbeat left unanswered for 20 s".into());
            }
            message = inbound.message() => match message {
                Ok(Some(message)) => match message.body {
                    Some(pb::controller_message::Body::Welcome(welcome)) => {
                        answer_due = None;
                        answers = welcome.answers_heartbeats;
                        counters.interval_ms.fetch_max(welcome.heartbeat_interval_ms, Ordering::Relaxed);
                        if !welcomed {
                            welcomed = true;
                            counters.welcomed.fetch_add(1, Ordering::Relaxed);
                        }
                        let asked = Duration::from_millis(welcome.heartbeat_interval_ms.max(50));
                        if asked != period {
                            period = asked;
                            heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                        }
                    }
                    Some(pb::controller_message::Body::Desired(desired)) => {
                        answer_due = None;
                        counters.desired_messages.fetch_add(1, Ordering::Relaxed);
                        if converge(desired, &channel, &tx, state, counters).await.is_err() {
                            break lost(welcomed, "the session's send side closed".into());
                        }
                    }
                    _ => answer_due = None,
                },
                Ok(None) => break lost(welcomed, "the controller closed the session".into()),
                Err(status) => break lost(welcomed, format!("{:?}: {}", status.code(), status.message())),
            },
            _ = heartbeat.tick() => {
                if answers && answer_due.is_none() {
                    answer_due = Some(tokio::time::Instant::now() + Duration::from_secs(20));
                }
                counters.heartbeats.fetch_add(1, Ordering::Relaxed);
                let beat = pb::AgentMessage { body: Some(pb::agent_message::Body::Heartbeat(pb::Heartbeat {})) };
                if tx.send(beat).await.is_err() {
                    break lost(welcomed, "the session's send side closed".into());
                }
            }
        }
    };
    if welcomed {
        counters.welcomed.fetch_sub(1, Ordering::Relaxed);
    }
    ended
}

/// Converges to a desired state as an agent does (see `agent/src/supervisor.rs`): an
/// assignment equal to what runs changes nothing; another is fetched unless cached, then
/// reported starting and running; an app no longer assigned is reported stopped.
async fn converge(
    desired: pb::DesiredState,
    channel: &Channel,
    tx: &mpsc::Sender<pb::AgentMessage>,
    state: &mut HostState,
    counters: &Counters,
) -> Result<(), ()> {
    use fleet_proto::instance_state::InstanceState;
    let send = |message| async move { tx.send(message).await.map_err(|_| ()) };
    let mut assigned = HashSet::new();
    for a in desired.assignments {
        assigned.insert(a.app.clone());
        let wanted = Running {
            version: a.version.clone(),
            generation: a.generation,
            rollout_id: a.rollout_id.clone(),
            digest: a.artifact_digest.clone(),
        };
        if state.apps.get(&a.app) == Some(&wanted) {
            continue;
        }
        if !state.cached.contains(&a.artifact_digest) {
            send(report(
                &a.app,
                &a.version,
                &a.rollout_id,
                InstanceState::Fetching,
                "fetching",
            ))
            .await?;
            match fetch(channel.clone(), &a.artifact_digest).await {
                Ok(size) => {
                    counters.fetches.fetch_add(1, Ordering::Relaxed);
                    counters.fetched_bytes.fetch_add(size, Ordering::Relaxed);
                    state.cached.insert(a.artifact_digest.clone());
                }
                Err(message) => {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                    state.apps.remove(&a.app);
                    send(report(
                        &a.app,
                        &a.version,
                        &a.rollout_id,
                        InstanceState::Failed,
                        &message,
                    ))
                    .await?;
                    continue;
                }
            }
        }
        send(report(
            &a.app,
            &a.version,
            &a.rollout_id,
            InstanceState::Starting,
            "starting",
        ))
        .await?;
        send(report(
            &a.app,
            &a.version,
            &a.rollout_id,
            InstanceState::Running,
            "smoke checks passed",
        ))
        .await?;
        *counters
            .running
            .lock()
            .unwrap()
            .entry(a.version.clone())
            .or_default() += 1;
        state.apps.insert(a.app.clone(), wanted);
    }
    let gone: Vec<String> = state
        .apps
        .keys()
        .filter(|app| !assigned.contains(*app))
        .cloned()
        .collect();
    for app in gone {
        if let Some(running) = state.apps.remove(&app) {
            send(report(
                &app,
                &running.version,
                &running.rollout_id,
                InstanceState::Stopped,
                "not assigned any more",
            ))
            .await?;
        }
    }
    Ok(())
}

/// Opens one session with `host`'s certificate whose hello names `claimed`; the status it
/// ended with, or `Ok` when it was welcomed.
async fn one_session(shared: &Shared, host: &SimHost, claimed: &str) -> Result<(), tonic::Status> {
    let endpoint =
        agent_endpoint(shared, host).map_err(|e| tonic::Status::unknown(e.to_string()))?;
    let channel = endpoint
        .connect_with_connector(BoundConnector {
            source: host.source,
        })
        .await
        .map_err(|e| {
            tonic::Status::unavailable(format!(
                "connect: {}",
                fleet_proto::error_text::with_sources(&e)
            ))
        })?;
    let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
    let (tx, rx) = mpsc::channel::<pb::AgentMessage>(4);
    let _ = tx.try_send(pb::AgentMessage {
        body: Some(pb::agent_message::Body::Hello(pb::Hello {
            host_name: claimed.to_string(),
            advertise_addr: host.source.to_string(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            agent_arch: std::env::consts::ARCH.to_string(),
            ..Default::default()
        })),
    });
    let mut inbound = tokio::time::timeout(
        Duration::from_secs(30),
        client.session(ReceiverStream::new(rx)),
    )
    .await
    .map_err(|_| tonic::Status::deadline_exceeded("no answer in 30s"))??
    .into_inner();
    match tokio::time::timeout(Duration::from_secs(30), inbound.message()).await {
        Ok(Ok(Some(_))) => Ok(()),
        Ok(Ok(None)) => Err(tonic::Status::unknown("closed at once")),
        Ok(Err(status)) => Err(status),
        Err(_) => Err(tonic::Status::deadline_exceeded("no message in 30s")),
    }
}

/// Raises this process's open-file limit to `wanted` (the hard limit too, as root); the limit
/// in force. Processes started afterwards (the controller) inherit it.
fn raise_nofile(wanted: u64) -> Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if hard < wanted && setrlimit(Resource::RLIMIT_NOFILE, wanted, wanted).is_ok() {
        return Ok(wanted);
    }
    let soft = wanted.min(hard);
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard.max(soft))?;
    Ok(getrlimit(Resource::RLIMIT_NOFILE)?.0)
}

/// The open-file limit of process `pid` as `/proc/PID/limits` shows it.
fn nofile_of(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// User plus system CPU time of process `pid`, in ticks (`/proc/PID/stat` fields 14 and 15).
fn cpu_ticks(pid: u32) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces: count from the closing parenthesis.
    let after = &text[text.rfind(')').context("a /proc stat line")? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

/// Waits until `condition` holds, polling every 100 ms, at most `deadline`.
fn wait_until(
    deadline: Duration,
    what: &str,
    mut condition: impl FnMut() -> bool,
) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if condition() {
            return Ok(start.elapsed());
        }
        if start.elapsed() >= deadline {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

/// The median latency of `fleetctl ARGS` in milliseconds, over [`LATENCY_SAMPLES`] calls; NaN
/// and the error when a call fails.
fn ctl_latency_ms(fleet: &Fleet, args: &[&str]) -> (f64, Option<String>) {
    let mut samples = Vec::new();
    for _ in 0..LATENCY_SAMPLES {
        let started = Instant::now();
        let out = fleet.ctl_with_deadline(args, Duration::from_secs(300));
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        if out.code != 0 {
            let why = out.stderr.lines().last().unwrap_or("").to_string();
            return (
                f64::NAN,
                Some(format!(
                    "fleetctl {} exited {}: {why}",
                    args.join(" "),
                    out.code
                )),
            );
        }
        samples.push(ms);
    }
    (median(samples), None)
}

/// The first `n` characters of `text`, and how much was left out.
fn clip(text: &str, n: usize) -> String {
    let count = text.chars().count();
    if count <= n {
        return text.to_string();
    }
    let head: String = text.chars().take(n).collect();
    format!("{head}... ({} more characters)", count - n)
}

/// One line of the result.
struct Line {
    what: String,
    value: String,
    target: String,
    ok: Option<bool>,
}

/// A line for information (its value cut at 400 characters: a failed rollout names every
/// host it lost).
fn line(what: impl Into<String>, value: impl Into<String>) -> Line {
    Line {
        what: what.into(),
        value: clip(&value.into(), 400),
        target: String::new(),
        ok: None,
    }
}

fn checked(what: impl Into<String>, value: f64, unit: &str, target: f64, at_10k: bool) -> Line {
    Line {
        what: what.into(),
        value: format!("{value:.2} {unit}"),
        target: format!(
            "< {target} {unit}{}",
            if at_10k { " (at 10,000)" } else { "" }
        ),
        ok: Some(value < target),
    }
}

/// Runs the benchmark; `args` are those after `scale`.
pub fn run(args: &[String]) -> Result<()> {
    let opts = Opts::parse(args)?;
    let n = opts.agents;
    let limit = raise_nofile((4 * n as u64 + 4096).max(65_536))?;
    eprintln!("fleet-bench scale: {n} hosts; open-file limit {limit}");
    let fleet = Fleet::start(0);
    let pid = fleet.controller_pid();
    let controller_nofile = nofile_of(pid).unwrap_or(0);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let ca_pem = std::fs::read_to_string(fleet.config_dir().join("ca.pem"))?;
    let shared = Arc::new(Shared {
        url: fleet.controller_url(),
        ca_pem,
        counters: Counters::default(),
    });
    let admin = runtime.block_on(crate::grpc::channel(
        &fleet,
        Some(crate::grpc::admin_identity(&fleet)),
    ));
    let mut lines = Vec::new();
    let mut json = serde_json::Map::new();
    json.insert("agents".into(), n.into());

    eprintln!("fleet-bench scale: minting {n} join tokens");
    let tokens = runtime.block_on(mint_tokens(admin, n))?;
    let rss_before = process::rss_kib(pid).unwrap_or(0);

    eprintln!("fleet-bench scale: {n} hosts join at once");
    let cpu_before_join = cpu_ticks(pid)?;
    let joined_at = Instant::now();
    let results = runtime.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for (index, token) in tokens.into_iter().enumerate() {
            tasks.spawn(join_one(shared.clone(), index, token));
        }
        let mut results = Vec::new();
        while let Some(result) = tasks.join_next().await {
            results.push(result.map_err(anyhow::Error::from).and_then(|r| r));
        }
        results
    });
    let join_s = joined_at.elapsed().as_secs_f64();
    let join_cpu_s = (cpu_ticks(pid)? - cpu_before_join) as f64 / TICKS_PER_S;
    let mut hosts = Vec::new();
    let mut join_failures = Vec::new();
    for result in results {
        match result {
            Ok(host) => hosts.push(Arc::new(host)),
            Err(e) => join_failures.push(e.to_string()),
        }
    }
    hosts.sort_by_key(|h| h.index);
    if hosts.len() < 3 {
        bail!(
            "only {} of {n} hosts joined; the first refusal: {}",
            hosts.len(),
            join_failures.first().map(String::as_str).unwrap_or("none")
        );
    }
    let retries: u64 = shared.counters.join_retries.lock().unwrap().values().sum();
    lines.push(line(
        "hosts joined (all at once)",
        format!(
            "{} of {n}, in {join_s:.1} s; controller CPU {join_cpu_s:.1} s",
            hosts.len()
        ),
    ));
    lines.push(Line {
        what: "joins lost under back-pressure".into(),
        value: format!(
            "{} ({retries} retries answered by back-pressure)",
            join_failures.len()
        ),
        target: "0".into(),
        ok: Some(join_failures.is_empty()),
    });
    for (why, count) in shared.counters.join_retries.lock().unwrap().iter() {
        lines.push(line("  join retried", format!("{count}x {why}")));
    }
    if let Some(first) = join_failures.first() {
        lines.push(line("  first lost join", first.clone()));
    }
    json.insert("join_s".into(), join_s.into());
    json.insert("join_controller_cpu_s".into(), join_cpu_s.into());
    json.insert("joins_lost".into(), join_failures.len().into());
    json.insert("join_retries".into(), retries.into());

    eprintln!("fleet-bench scale: {} sessions open", hosts.len());
    let (stop_tx, stop_rx) = watch::channel(false);
    let connect_at = Instant::now();
    for host in &hosts {
        runtime.spawn(hold_session(host.clone(), shared.clone(), stop_rx.clone()));
    }
    let counters = &shared.counters;
    let connected = wait_until(CONNECT_DEADLINE, "every session to be welcomed", || {
        counters.welcomed.load(Ordering::Relaxed) >= hosts.len()
    });
    let connect_s = connect_at.elapsed().as_secs_f64();
    let outcome = (|| -> Result<()> {
        connected?;
        lines.push(line(
            "sessions open and welcomed",
            format!("{} in {connect_s:.1} s", hosts.len()),
        ));
        json.insert("connect_s".into(), connect_s.into());
        std::thread::sleep(SETTLE);
        let rss_after = process::rss_kib(pid).unwrap_or(0);
        let per_agent = rss_after.saturating_sub(rss_before) as f64 / hosts.len() as f64;
        lines.push(checked(
            "controller resident memory per connected host",
            per_agent,
            "KB",
            TARGET_RSS_PER_AGENT_KB,
            true,
        ));
        lines.push(line(
            "  controller resident memory",
            format!(
                "{} MB before the hosts, {} MB with them",
                rss_before / 1024,
                rss_after / 1024
            ),
        ));
        json.insert("controller_rss_per_agent_kb".into(), per_agent.into());
        json.insert("controller_rss_kb".into(), rss_after.into());
        eprintln!(
            "idle window of {} s begins (controller pid {pid})",
            opts.idle.as_secs()
        );
        let idle_before = cpu_ticks(pid)?;
        let beats_before = counters.heartbeats.load(Ordering::Relaxed);
        std::thread::sleep(opts.idle);
        let idle_pct =
            (cpu_ticks(pid)? - idle_before) as f64 / TICKS_PER_S / opts.idle.as_secs_f64() * 100.0;
        let beats_per_s = (counters.heartbeats.load(Ordering::Relaxed) - beats_before) as f64
            / opts.idle.as_secs_f64();
        lines.push(checked(
            "controller CPU while idle (heartbeats, keepalives)",
            idle_pct,
            "% of a core",
            TARGET_IDLE_CPU_PCT,
            true,
        ));
        let interval_ms = counters.interval_ms.load(Ordering::Relaxed);
        lines.push(line(
            "  heartbeats meanwhile",
            format!(
                "{beats_per_s:.0} a second (the longest interval told: {:.1} s)",
                interval_ms as f64 / 1000.0
            ),
        ));
        json.insert("idle_cpu_pct".into(), idle_pct.into());
        json.insert("idle_heartbeats_per_s".into(), beats_per_s.into());
        json.insert("heartbeat_interval_ms".into(), interval_ms.into());

        let (status_ms, status_err) = ctl_latency_ms(&fleet, &["status"]);
        lines.push(checked(
            "fleetctl status (median of 3)",
            status_ms,
            "ms",
            TARGET_STATUS_MS,
            true,
        ));
        if let Some(err) = &status_err {
            lines.push(line("  status failed", err.clone()));
        }
        json.insert("status_ms".into(), status_ms.into());
        let (every_ms, every_err) = ctl_latency_ms(&fleet, &["status", "--all-hosts"]);
        lines.push(line(
            "fleetctl status --all-hosts, every host listed (median of 3)",
            format!("{every_ms:.0} ms"),
        ));
        if let Some(err) = &every_err {
            lines.push(line("  status --all-hosts failed", err.clone()));
        }
        json.insert("status_all_hosts_ms".into(), every_ms.into());
        let (hosts_ms, hosts_err) = ctl_latency_ms(&fleet, &["hosts", "--limit", "100"]);
        lines.push(checked(
            "fleetctl hosts --limit 100, a page (median of 3)",
            hosts_ms,
            "ms",
            TARGET_STATUS_MS,
            true,
        ));
        if let Some(err) = &hosts_err {
            lines.push(line("  hosts failed", err.clone()));
        }
        json.insert("hosts_ms".into(), hosts_ms.into());
        let (all_hosts_ms, all_hosts_err) = ctl_latency_ms(&fleet, &["hosts"]);
        lines.push(line(
            "fleetctl hosts, every host (median of 3)",
            format!("{all_hosts_ms:.0} ms"),
        ));
        if let Some(err) = &all_hosts_err {
            lines.push(line("  hosts failed", err.clone()));
        }
        json.insert("all_hosts_ms".into(), all_hosts_ms.into());

        // A 64 KB release with a smoke check.
        let manifest = "[process]\ncommand = [\"bin/app\"]\n\n[[smoke]]\nhttp = \"http://${FLEET_ADDR}:8080/healthz\"\nexpect_status = 200\ntimeout = \"60s\"\n";
        let blob = crate::incompressible_bytes(63 * 1024);
        let artifact = fleet.write_artifact(&[
            ("fleet.toml", manifest.as_bytes(), 0o644),
            ("bin/app", b"#!/bin/sh\nexec sleep 100000\n", 0o755),
            ("blob", &blob, 0o644),
        ]);
        let artifact_kb = std::fs::metadata(&artifact)?.len() / 1024;
        fleet
            .create_release("sim", "1.0", &artifact, &[])
            .expect_code(0);
        eprintln!(
            "fleet-bench scale: rollout of a {artifact_kb} KB release to {} hosts",
            hosts.len()
        );
        let cpu_before = cpu_ticks(pid)?;
        let started = Instant::now();
        let out = fleet.ctl_with_deadline(
            &["rollout", "sim", "1.0", "--batch", "10%"],
            ROLLOUT_DEADLINE,
        );
        let rollout_s = started.elapsed().as_secs_f64();
        let rollout_cpu_s = (cpu_ticks(pid)? - cpu_before) as f64 / TICKS_PER_S;
        let ran = counters.running_of("1.0");
        if out.code != 0 {
            lines.push(line(
                "rollout FAILED",
                format!(
                    "exit {}: {}",
                    out.code,
                    out.stderr
                        .lines()
                        .rev()
                        .take(3)
                        .collect::<Vec<_>>()
                        .join(" | ")
                ),
            ));
        }
        lines.push(line(
            format!("rollout of a {artifact_kb} KB release, --batch 10%"),
            format!("{rollout_s:.1} s, {ran} hosts reported running"),
        ));
        lines.push(checked(
            "  controller CPU during the rollout",
            rollout_cpu_s,
            "s",
            TARGET_ROLLOUT_CPU_S,
            true,
        ));
        lines.push(line(
            "  artifact fetches",
            format!(
                "{} ({} KB in all)",
                counters.fetches.load(Ordering::Relaxed),
                counters.fetched_bytes.load(Ordering::Relaxed) / 1024
            ),
        ));
        json.insert("rollout_s".into(), rollout_s.into());
        json.insert("rollout_controller_cpu_s".into(), rollout_cpu_s.into());
        json.insert("rollout_ok".into(), (out.code == 0).into());

        let cpu_before = cpu_ticks(pid)?;
        let started = Instant::now();
        let out = fleet.ctl_with_deadline(
            &["rollout", "sim", "1.0", "--batch", "10%"],
            ROLLOUT_DEADLINE,
        );
        let noop_s = started.elapsed().as_secs_f64();
        let noop_cpu_s = (cpu_ticks(pid)? - cpu_before) as f64 / TICKS_PER_S;
        if out.code != 0 {
            lines.push(line(
                "no-op rollout FAILED",
                format!(
                    "exit {}: {}",
                    out.code,
                    out.stderr
                        .lines()
                        .rev()
                        .take(3)
                        .collect::<Vec<_>>()
                        .join(" | ")
                ),
            ));
        }
        lines.push(line(
            "no-op rollout (the release already runs)",
            format!("{noop_s:.1} s, controller CPU {noop_cpu_s:.1} s"),
        ));
        json.insert("noop_rollout_s".into(), noop_s.into());
        json.insert("noop_rollout_controller_cpu_s".into(), noop_cpu_s.into());

        let (status_after_ms, _) = ctl_latency_ms(&fleet, &["status"]);
        lines.push(line(
            "fleetctl status after the rollouts (median of 3)",
            format!("{status_after_ms:.0} ms"),
        ));
        json.insert("status_after_rollout_ms".into(), status_after_ms.into());

        // Bad input: one host reconnecting STORM_RATE times a second.
        let stormer = hosts[0].clone();
        let storm = {
            let shared = shared.clone();
            runtime.spawn(async move {
                let outcomes: Arc<Mutex<BTreeMap<String, u64>>> = Default::default();
                let mut tasks = tokio::task::JoinSet::new();
                let mut tick = tokio::time::interval(Duration::from_millis(1000 / STORM_RATE));
                let until = Instant::now() + STORM_FOR;
                while Instant::now() < until {
                    tick.tick().await;
                    let (shared, host, outcomes) =
                        (shared.clone(), stormer.clone(), outcomes.clone());
                    tasks.spawn(async move {
                        let key = match one_session(&shared, &host, &host.name).await {
                            Ok(()) => "welcomed".to_string(),
                            Err(status) => format!("{:?}", status.code()),
                        };
                        *outcomes.lock().unwrap().entry(key).or_default() += 1;
                    });
                }
                while tasks.join_next().await.is_some() {}
                Arc::try_unwrap(outcomes)
                    .map(|m| m.into_inner().unwrap())
                    .unwrap_or_default()
            })
        };
        std::thread::sleep(Duration::from_millis(500));
        let (storm_status_ms, storm_err) = ctl_latency_ms(&fleet, &["status"]);
        let outcomes = runtime.block_on(storm)?;
        let attempts: u64 = outcomes.values().sum();
        lines.push(line(
            format!(
                "a host reconnecting {STORM_RATE}/s for {}s",
                STORM_FOR.as_secs()
            ),
            format!(
                "{attempts} tries: {}",
                outcomes
                    .iter()
                    .map(|(k, v)| format!("{v} {k}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
        lines.push(checked(
            "  fleetctl status meanwhile (median of 3)",
            storm_status_ms,
            "ms",
            TARGET_STATUS_MS,
            true,
        ));
        if let Some(err) = storm_err {
            lines.push(line("  status failed", err));
        }
        json.insert("storm_attempts".into(), attempts.into());
        json.insert(
            "storm_welcomed".into(),
            outcomes.get("welcomed").copied().unwrap_or(0).into(),
        );
        json.insert("storm_status_ms".into(), storm_status_ms.into());

        // Bad input: a session whose hello speaks for another host.
        let (thief, victim) = (hosts[1].clone(), hosts[2].name.clone());
        // Three tries: each refused, one log line.
        let mut refused = Ok(());
        for _ in 0..3 {
            refused = runtime.block_on(one_session(&shared, &thief, &victim));
            if !matches!(&refused, Err(s) if s.code() == tonic::Code::PermissionDenied) {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        let logged = fleet
            .controller_log()
            .lines()
            .filter(|l| {
                l.contains(&format!("certificate of host {}", thief.name))
                    && l.contains(&format!("speak for host {victim}"))
            })
            .count();
        let refused_ok = matches!(&refused, Err(s) if s.code() == tonic::Code::PermissionDenied);
        lines.push(Line {
            what: format!("3 sessions of {} speaking for {victim}", thief.name),
            value: format!(
                "{}; logged {logged}x",
                match &refused {
                    Ok(()) => "ACCEPTED".to_string(),
                    Err(s) => format!("refused {:?}", s.code()),
                }
            ),
            target: "refused, logged once".into(),
            ok: Some(refused_ok && logged == 1),
        });
        json.insert("foreign_session_refused".into(), refused_ok.into());
        json.insert("foreign_session_logged".into(), logged.into());
        Ok(())
    })();
    let _ = stop_tx.send(true);
    lines.push(line(
        "sessions",
        format!(
            "{} opened, {} lost (and reopened); open-file limit {limit} here, {controller_nofile} in the controller",
            counters.sessions_opened.load(Ordering::Relaxed),
            counters.sessions_lost.load(Ordering::Relaxed)
        ),
    ));
    for (why, count) in counters.session_errors.lock().unwrap().iter().take(8) {
        lines.push(line("  session lost", format!("{count}x {why}")));
    }
    if let Err(e) = &outcome {
        lines.push(line("FAILED", format!("{e:#}")));
        json.insert("error".into(), format!("{e:#}").into());
    }
    runtime.shutdown_timeout(Duration::from_secs(10));
    if opts.json {
        println!("{}", serde_json::Value::Object(json));
    } else {
        for l in &lines {
            let result = match l.ok {
                Some(true) => "ok",
                Some(false) => "MISSED",
                None => "",
            };
            println!("{:<56} {:<60} {:<22} {result}", l.what, l.value, l.target);
        }
    }
    drop(fleet);
    outcome
}
