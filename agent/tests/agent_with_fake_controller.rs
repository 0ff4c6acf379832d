//! The agent against an in-process fake controller: a resumed, verified fetch, a converge to
//! `running`, idempotent resends, a crash and its restart, unassignment, graceful shutdown, and
//! the agent binary brought back after a SIGKILL (it adopts its instance, which a graceful stop
//! leaves running too, unless `--stop-apps-on-exit`); the controller list and a follower's
//! redirect; heartbeats at the interval a controller's answers tell, and a controller that
//! stops answering them left for a new session.

use fleet_proto::pb;
use fleet_proto::pb::agent_service_server::{AgentService, AgentServiceServer};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

struct FakeController {
    artifacts: HashMap<String, Vec<u8>>,
    /// The first fetch is cut halfway through, to exercise resuming.
    cut_next_fetch: AtomicBool,
    fetch_offsets: Arc<Mutex<Vec<u64>>>,
    from_agent: mpsc::UnboundedSender<pb::AgentMessage>,
    desired: watch::Receiver<pb::DesiredState>,
}

#[tonic::async_trait]
impl AgentService for FakeController {
    type SessionStream = BoxStream<pb::ControllerMessage>;
    type FetchArtifactStream = BoxStream<pb::ArtifactChunk>;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = request.into_inner();
        let from_agent = self.from_agent.clone();
        tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                let _ = from_agent.send(message);
            }
        });
        let mut desired = self.desired.clone();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let welcome = pb::ControllerMessage {
                // A controller one version behind: heartbeats go unanswered.
                body: Some(pb::controller_message::Body::Welcome(pb::Welcome {
                    heartbeat_interval_ms: 200,
                    answers_heartbeats: false,
                })),
            };
            if tx.send(Ok(welcome)).await.is_err() {
                return;
            }
            loop {
                let state = desired.borrow_and_update().clone();
                let message = pb::ControllerMessage {
                    body: Some(pb::controller_message::Body::Desired(state)),
                };
                if tx.send(Ok(message)).await.is_err() || desired.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn join(
        &self,
        _request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        Err(Status::unimplemented(
            "the agent here already has its certificate",
        ))
    }

    async fn renew(
        &self,
        _request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        Err(Status::unimplemented(
            "the agent's certificate here outlives the test",
        ))
    }

    async fn artifact_sources(
        &self,
        _request: Request<pb::ArtifactSourcesRequest>,
    ) -> Result<Response<pb::ArtifactSourcesResponse>, Status> {
        // A controller from before peer fetches: the agent fetches everything from it.
        Err(Status::unimplemented("no peer fetches here"))
    }

    async fn fetch_artifact(
        &self,
        request: Request<pb::FetchArtifactRequest>,
    ) -> Result<Response<Self::FetchArtifactStream>, Status> {
        let request = request.into_inner();
        let bytes = self
            .artifacts
            .get(&request.digest)
            .ok_or_else(|| Status::not_found("no such artifact"))?
            .clone();
        self.fetch_offsets.lock().unwrap().push(request.offset);
        let cut = self.cut_next_fetch.swap(false, Ordering::SeqCst);
        let start = request.offset as usize;
        let end = if cut { bytes.len() / 2 } else { bytes.len() };
        let mut items: Vec<Result<pb::ArtifactChunk, Status>> = bytes[start..end]
            .chunks(1000)
            .map(|c| {
                Ok(pb::ArtifactChunk {
                    data: bytes::Bytes::copy_from_slice(c),
                })
            })
            .collect();
        if cut {
            items.push(Err(Status::unavailable("cut on purpose")));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(items))))
    }
}

/// A throwaway fleet CA: the fake controller's TLS config (certificate for `fleet-controller`,
/// client certificates verified against the CA) and host `host`'s credentials written into
/// `DATA/tls`, as a join would leave them.
fn provision_tls(data_dir: &Path, host: &str) -> tonic::transport::ServerTlsConfig {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server_cert = CertificateParams::new(vec!["fleet-controller".to_string()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();
    let agent_key = KeyPair::generate().unwrap();
    let mut agent_params = CertificateParams::default();
    agent_params
        .distinguished_name
        .push(DnType::CommonName, host);
    agent_params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, "agent");
    let agent_cert = agent_params.signed_by(&agent_key, &issuer).unwrap();
    let tls_dir = data_dir.join("tls");
    std::fs::create_dir_all(&tls_dir).unwrap();
    std::fs::write(tls_dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(tls_dir.join("agent.pem"), agent_cert.pem()).unwrap();
    std::fs::write(tls_dir.join("agent.key"), agent_key.serialize_pem()).unwrap();
    tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(
            server_cert.pem(),
            server_key.serialize_pem(),
        ))
        .client_ca_root(tonic::transport::Certificate::from_pem(ca_cert.pem()))
}

/// Kills a spawned agent process by its pid when the test ends, however it ends.
struct ProcessGuard(std::process::Child);

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn noise(n: usize) -> Vec<u8> {
    let mut x: u32 = 12345;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 16) as u8
        })
        .collect()
}

const MANIFEST: &str = r#"
[process]
command = ["/bin/sh", "-c", "echo $FLEET_VERSION > started; exec sleep 60"]
stop_timeout = "2s"

[[smoke]]
exec = ["/bin/sh", "-c", "test -f started"]
timeout = "5s"
"#;

fn assignment(digest: &str, size: usize, rollout_id: &str) -> pb::Assignment {
    pb::Assignment {
        app: "web".into(),
        version: "1.0".into(),
        artifact_digest: digest.into(),
        artifact_size: size as u64,
        env: HashMap::new(),
        rollout_id: rollout_id.into(),
        generation: 1,
        smoke_timeout_ms: 0,
        ..Default::default()
    }
}

/// Waits for a report matching `wanted`, returning every report seen until then.
async fn wait_report(
    rx: &mut mpsc::UnboundedReceiver<pb::AgentMessage>,
    what: &str,
    wanted: impl Fn(&pb::InstanceReport) -> bool,
) -> Vec<pb::InstanceReport> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    loop {
        let message = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}; saw {seen:#?}"))
            .expect("the fake controller is gone");
        if let Some(pb::agent_message::Body::Report(report)) = message.body {
            let hit = wanted(&report);
            seen.push(report);
            if hit {
                return seen;
            }
        }
    }
}

fn saved_instance(data_dir: &Path) -> Option<(i32, String)> {
    let text = std::fs::read_to_string(data_dir.join("state.json")).ok()?;
    let state: serde_json::Value = serde_json::from_str(&text).ok()?;
    let web = state.get("instances")?.get("web")?;
    Some((
        web.get("pid")?.as_i64()? as i32,
        web.get("token")?.as_str()?.to_string(),
    ))
}

async fn eventually<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converges_crashes_restarts_and_survives_its_own_sigkill() {
    let bytes = fleet_proto::artifact::build_artifact(&[
        ("fleet.toml", MANIFEST.as_bytes(), 0o644),
        ("filler.bin", &noise(20_000), 0o644),
    ])
    .unwrap();
    let digest = fleet_proto::artifact::digest_of(&bytes);
    let size = bytes.len();
    let (desired_tx, desired_rx) = watch::channel(pb::DesiredState {
        assignments: vec![assignment(&digest, size, "r1")],
        ..Default::default()
    });
    let (from_agent_tx, mut from_agent) = mpsc::unbounded_channel();
    let fetch_offsets = Arc::new(Mutex::new(Vec::new()));
    let controller = FakeController {
        artifacts: HashMap::from([(digest.clone(), bytes.clone())]),
        cut_next_fetch: AtomicBool::new(true),
        fetch_offsets: fetch_offsets.clone(),
        from_agent: from_agent_tx,
        desired: desired_rx,
    };
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let tls = provision_tls(&data_dir, "h1");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let controller_addr = listener.local_addr().unwrap();
    let (stop_controller, controller_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(AgentServiceServer::new(controller))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = controller_stopped.await;
                },
            ),
    );

    let config = fleet_agent::Config {
        controllers: vec![format!("https://{controller_addr}")],
        host_name: "h1".into(),
        advertise: "127.0.0.1".parse().unwrap(),
        data_dir: data_dir.clone(),
        labels: BTreeMap::from([("env".to_string(), "test".to_string())]),
        ca: None,
        join_token: None,
        // As a local fleet runs it: its apps go with it.
        stop_apps_on_exit: true,
        // Peers on: against this controller, which names none, every fetch falls back to it.
        peer_port: fleet_agent::config::DEFAULT_PEER_PORT,
    };
    let (stop_agent, agent_stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(fleet_agent::run(config, async {
        let _ = agent_stopped.await;
    }));

    // Hello first, with the labels.
    let hello = tokio::time::timeout(Duration::from_secs(20), from_agent.recv())
        .await
        .unwrap()
        .unwrap();
    match hello.body {
        Some(pb::agent_message::Body::Hello(hello)) => {
            assert_eq!(hello.host_name, "h1");
            assert_eq!(hello.labels["env"], "test");
        }
        other => panic!("expected Hello first, got {other:?}"),
    }

    // The fetch is cut once, resumed from the partial length, verified, and the app runs.
    let seen = wait_report(&mut from_agent, "web running", |r| state_of(r) == "running").await;
    let states: Vec<&str> = seen.iter().map(|r| state_of(r)).collect();
    assert_eq!(
        states,
        ["fetching", "unpacking", "starting", "checking", "running"]
    );
    assert!(seen
        .iter()
        .all(|r| r.rollout_id == "r1" && r.version == "1.0"));
    let offsets = fetch_offsets.lock().unwrap().clone();
    assert_eq!(offsets.len(), 2, "{offsets:?}");
    assert_eq!(offsets[0], 0);
    assert!(offsets[1] > 0, "the second fetch resumes: {offsets:?}");
    let hex = digest.strip_prefix("sha256:").unwrap();
    assert!(data_dir.join(format!("artifacts/{hex}.tar.gz")).is_file());
    assert!(!data_dir.join(format!("artifacts/{hex}.partial")).exists());
    assert!(data_dir
        .join(format!("releases/web/1.0-{}", &hex[..12]))
        .join("filler.bin")
        .is_file());
    let (pid, _) = eventually("the instance's pid and token", || {
        saved_instance(&data_dir).filter(|(p, t)| fleet_agent::instance::has_token(*p, t))
    })
    .await;

    // A crash restarts it from origin. (That the same desired state sent again changes nothing
    // is `supervisor::tests::decides_what_an_assignment_needs`, and end to end the
    // untouched pids of `tests/tests/broken_release.rs` after every agent reconnected.)
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let seen = wait_report(&mut from_agent, "a restart after the crash", |r| {
        state_of(r) == "running"
    })
    .await;
    let states: Vec<&str> = seen.iter().map(|r| state_of(r)).collect();
    assert_eq!(states, ["crashed", "starting", "checking", "running"]);
    assert!(seen[0].message.contains("SIGKILL"), "{}", seen[0].message);
    assert_eq!(seen.last().unwrap().restarts, 1);

    // An invalid assignment is refused and reported; what runs is left alone: the next valid
    // one replaces the instance as any new release does, and nothing was stopped as unassigned
    // in between.
    let (pid, token) = eventually("the restarted instance", || {
        saved_instance(&data_dir).filter(|(p, t)| fleet_agent::instance::has_token(*p, t))
    })
    .await;
    desired_tx.send_replace(pb::DesiredState {
        assignments: vec![pb::Assignment {
            artifact_digest: "sha256:not-a-digest".into(),
            ..assignment(&digest, size, "r9")
        }],
        ..Default::default()
    });
    let seen = wait_report(&mut from_agent, "the refusal", |r| state_of(r) == "failed").await;
    let refusal = seen.last().unwrap();
    assert!(
        refusal.message.contains("the assignment is invalid"),
        "{}",
        refusal.message
    );
    desired_tx.send_replace(pb::DesiredState {
        assignments: vec![assignment(&digest, size, "r10")],
        ..Default::default()
    });
    let seen = wait_report(&mut from_agent, "web running under r10", |r| {
        state_of(r) == "running" && r.rollout_id == "r10"
    })
    .await;
    assert!(
        !seen
            .iter()
            .any(|r| r.message.contains("no longer assigned")),
        "the refused app was stopped as unassigned: {seen:#?}"
    );
    assert!(!fleet_agent::instance::has_token(pid, &token));

    // Unassigned: stopped and forgotten.
    desired_tx.send_replace(pb::DesiredState::default());
    wait_report(&mut from_agent, "web stopped", |r| state_of(r) == "stopped").await;
    eventually("no instance in state.json", || {
        saved_instance(&data_dir).is_none().then_some(())
    })
    .await;

    // Assigned again under a new rollout, then the agent shuts down: nothing is left behind.
    desired_tx.send_replace(pb::DesiredState {
        assignments: vec![assignment(&digest, size, "r2")],
        ..Default::default()
    });
    let seen = wait_report(&mut from_agent, "web running again", |r| {
        state_of(r) == "running"
    })
    .await;
    assert_eq!(seen[0].message, "artifact is in the local cache");
    let (pid, token) = eventually("the new pid", || saved_instance(&data_dir)).await;
    let _ = stop_agent.send(());
    tokio::time::timeout(Duration::from_secs(20), agent)
        .await
        .expect("the agent stops in time")
        .unwrap()
        .unwrap();
    assert!(!fleet_agent::instance::has_token(pid, &token));
    assert!(saved_instance(&data_dir).is_none());
    let _ = stop_controller.send(());
    let _ = server.await;

    // The binary, with no controller: it brings the assigned release up from the cache.
    let dead_controller = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let spawn_agent = |extra: &[&str], log: &str| {
        let log = std::fs::File::create(dir.path().join(log)).unwrap();
        ProcessGuard(
            std::process::Command::new(env!("CARGO_BIN_EXE_fleet-agent"))
                .args(["--controller", &format!("https://{dead_controller}")])
                .args(["--name", "h1", "--advertise", "127.0.0.1", "--data-dir"])
                .arg(&data_dir)
                .args(extra)
                .env("RUST_LOG", "info")
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    };
    // The agent says so when it has taken over the instance (its signal handlers are set up by
    // then: they are before its apps' tasks first run).
    let adopted = |log: &str| {
        std::fs::read_to_string(dir.path().join(log))
            .unwrap_or_default()
            .contains("adopted after the agent's restart")
            .then_some(())
    };
    let sigterm = |guard: &mut ProcessGuard| {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(guard.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
    };
    let mut first = spawn_agent(&[], "first.log");
    let (pid1, token1) = eventually("the instance up without a controller", || {
        saved_instance(&data_dir).filter(|(p, t)| fleet_agent::instance::has_token(*p, t))
    })
    .await;
    first.0.kill().unwrap(); // SIGKILL: the instance is orphaned, still running
    first.0.wait().unwrap();
    assert!(fleet_agent::instance::has_token(pid1, &token1));

    // The next run adopts it: same pid, same token, still recorded.
    let mut second = spawn_agent(&[], "second.log");
    eventually("the second agent to adopt the instance", || {
        adopted("second.log")
    })
    .await;
    // A graceful stop leaves the app running for the next run.
    sigterm(&mut second);
    let status = eventually("the agent to exit on SIGTERM", || {
        second.0.try_wait().unwrap()
    })
    .await;
    assert!(status.success(), "{status}");
    assert!(
        fleet_agent::instance::has_token(pid1, &token1),
        "the instance outlived its agent"
    );
    assert_eq!(saved_instance(&data_dir), Some((pid1, token1.clone())));

    // With --stop-apps-on-exit, the agent adopts it and stops it when it stops.
    let mut third = spawn_agent(&["--stop-apps-on-exit"], "third.log");
    eventually("the third agent to adopt the instance", || {
        adopted("third.log")
    })
    .await;
    sigterm(&mut third);
    let status = eventually("the agent to exit on SIGTERM", || {
        third.0.try_wait().unwrap()
    })
    .await;
    assert!(status.success(), "{status}");
    assert!(
        !fleet_agent::instance::has_token(pid1, &token1),
        "--stop-apps-on-exit stopped the adopted instance"
    );
}

/// The state a report names, read from the enum, which must agree with the text field kept
/// for controllers one version older.
fn state_of(report: &pb::InstanceReport) -> &'static str {
    let state = fleet_proto::instance_state::InstanceState::from_wire(report.state())
        .expect("the agent sends the state enum");
    assert_eq!(
        report.legacy_state,
        state.as_str(),
        "the two state fields disagree"
    );
    state.as_str()
}

/// A controller that is not the leader: every call is answered with the redirect to
/// `leader_url` (`fleet_proto::leader`), counted.
struct Follower {
    leader_url: String,
    calls: Arc<std::sync::atomic::AtomicUsize>,
}

impl Follower {
    fn refuse<T>(&self) -> Result<T, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Err(fleet_proto::leader::not_leader_status(Some(
            &self.leader_url,
        )))
    }
}

#[tonic::async_trait]
impl AgentService for Follower {
    type SessionStream = BoxStream<pb::ControllerMessage>;
    type FetchArtifactStream = BoxStream<pb::ArtifactChunk>;

    async fn session(
        &self,
        _request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        self.refuse()
    }
    async fn join(
        &self,
        _request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        self.refuse()
    }
    async fn renew(
        &self,
        _request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        self.refuse()
    }
    async fn artifact_sources(
        &self,
        _request: Request<pb::ArtifactSourcesRequest>,
    ) -> Result<Response<pb::ArtifactSourcesResponse>, Status> {
        self.refuse()
    }
    async fn fetch_artifact(
        &self,
        _request: Request<pb::FetchArtifactRequest>,
    ) -> Result<Response<Self::FetchArtifactStream>, Status> {
        self.refuse()
    }
}

/// Serves `service` with `tls` on a loopback port until the returned sender fires.
fn serve_agent_service<S: AgentService>(
    service: S,
    tls: tonic::transport::ServerTlsConfig,
    listener: tokio::net::TcpListener,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(AgentServiceServer::new(service))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = stopped.await;
                },
            ),
    );
    (stop, server)
}

/// An agent whose list names a closed port, then a follower: it moves past the closed port,
/// follows the follower's redirect to the leader (not in its list) once, and stays there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_the_list_and_the_redirect_to_the_leader() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let tls = provision_tls(&data_dir, "h1");
    let (_desired_tx, desired_rx) = watch::channel(pb::DesiredState::default());
    let (from_agent_tx, mut from_agent) = mpsc::unbounded_channel();
    let leader = FakeController {
        artifacts: HashMap::new(),
        cut_next_fetch: AtomicBool::new(false),
        fetch_offsets: Arc::default(),
        from_agent: from_agent_tx,
        desired: desired_rx,
    };
    let leader_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let leader_url = format!("https://{}", leader_listener.local_addr().unwrap());
    let (stop_leader, leader_server) = serve_agent_service(leader, tls.clone(), leader_listener);
    let follower_calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let follower = Follower {
        leader_url: leader_url.clone(),
        calls: follower_calls.clone(),
    };
    let follower_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let follower_url = format!("https://{}", follower_listener.local_addr().unwrap());
    let (stop_follower, follower_server) = serve_agent_service(follower, tls, follower_listener);
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed_url = format!("https://{}", closed.local_addr().unwrap());
    drop(closed);

    let config = fleet_agent::Config {
        controllers: vec![closed_url, follower_url],
        host_name: "h1".into(),
        advertise: "127.0.0.1".parse().unwrap(),
        data_dir,
        labels: BTreeMap::new(),
        ca: None,
        join_token: None,
        stop_apps_on_exit: true,
        peer_port: 0,
    };
    let started = Instant::now();
    let (stop_agent, agent_stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(fleet_agent::run(config, async {
        let _ = agent_stopped.await;
    }));
    let hello = tokio::time::timeout(Duration::from_secs(20), from_agent.recv())
        .await
        .expect("the agent reaches the leader")
        .unwrap();
    assert!(
        matches!(hello.body, Some(pb::agent_message::Body::Hello(_))),
        "{hello:?}"
    );
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert_eq!(follower_calls.load(Ordering::SeqCst), 1);
    // The session stays with the leader: heartbeats (every 200 ms here) keep arriving there,
    // and the follower is asked nothing more.
    for _ in 0..5 {
        let message = tokio::time::timeout(Duration::from_secs(5), from_agent.recv())
            .await
            .expect("the session goes on with the leader")
            .unwrap();
        assert!(
            matches!(message.body, Some(pb::agent_message::Body::Heartbeat(_))),
            "{message:?}"
        );
    }
    assert_eq!(follower_calls.load(Ordering::SeqCst), 1);

    let _ = stop_agent.send(());
    tokio::time::timeout(Duration::from_secs(20), agent)
        .await
        .expect("the agent stops")
        .unwrap()
        .unwrap();
    let _ = stop_leader.send(());
    let _ = stop_follower.send(());
    let _ = leader_server.await;
    let _ = follower_server.await;
}

/// A controller that answers heartbeats (`Welcome.answers_heartbeats`) with a longer interval,
/// until `answering` turns false; it counts the sessions opened and timestamps heartbeats.
struct Answering {
    answering: Arc<AtomicBool>,
    sessions: Arc<std::sync::atomic::AtomicUsize>,
    heartbeats: mpsc::UnboundedSender<(usize, Instant)>,
}

#[tonic::async_trait]
impl AgentService for Answering {
    type SessionStream = BoxStream<pb::ControllerMessage>;
    type FetchArtifactStream = BoxStream<pb::ArtifactChunk>;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let session = self.sessions.fetch_add(1, Ordering::SeqCst) + 1;
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let welcome = |interval_ms| {
            Ok(pb::ControllerMessage {
                body: Some(pb::controller_message::Body::Welcome(pb::Welcome {
                    heartbeat_interval_ms: interval_ms,
                    answers_heartbeats: true,
                })),
            })
        };
        let _ = tx.send(welcome(200)).await;
        let (answering, heartbeats) = (self.answering.clone(), self.heartbeats.clone());
        tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                if let Some(pb::agent_message::Body::Heartbeat(_)) = message.body {
                    let _ = heartbeats.send((session, Instant::now()));
                    if answering.load(Ordering::SeqCst) && tx.send(welcome(400)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
    async fn join(
        &self,
        _request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        Err(Status::unimplemented("not here"))
    }
    async fn renew(
        &self,
        _request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        Err(Status::unimplemented("not here"))
    }
    async fn artifact_sources(
        &self,
        _request: Request<pb::ArtifactSourcesRequest>,
    ) -> Result<Response<pb::ArtifactSourcesResponse>, Status> {
        Err(Status::unimplemented("not here"))
    }
    async fn fetch_artifact(
        &self,
        _request: Request<pb::FetchArtifactRequest>,
    ) -> Result<Response<Self::FetchArtifactStream>, Status> {
        Err(Status::unimplemented("not here"))
    }
}

async fn next_beat(heartbeats: &mut mpsc::UnboundedReceiver<(usize, Instant)>) -> (usize, Instant) {
    tokio::time::timeout(Duration::from_secs(20), heartbeats.recv())
        .await
        .expect("a heartbeat within 20 s")
        .unwrap()
}

/// The agent heartbeats at the interval the controller's answers tell (400 ms after a welcome
/// of 200 ms); when the controller stops answering, with the connection still up, the agent
/// leaves the session within `ANSWER_TIMEOUT` and opens a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takes_the_interval_from_answers_and_leaves_a_controller_that_stops_answering() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let tls = provision_tls(&data_dir, "h1");
    let answering = Arc::new(AtomicBool::new(true));
    let sessions = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (heartbeats_tx, mut heartbeats) = mpsc::unbounded_channel();
    let controller = Answering {
        answering: answering.clone(),
        sessions: sessions.clone(),
        heartbeats: heartbeats_tx,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let (stop_controller, server) = serve_agent_service(controller, tls, listener);
    let config = fleet_agent::Config {
        controllers: vec![url],
        host_name: "h1".into(),
        advertise: "127.0.0.1".parse().unwrap(),
        data_dir,
        labels: BTreeMap::new(),
        ca: None,
        join_token: None,
        stop_apps_on_exit: true,
        peer_port: 0,
    };
    let (stop_agent, agent_stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(fleet_agent::run(config, async {
        let _ = agent_stopped.await;
    }));
    // The first heartbeat comes 200 ms after the welcome; its answer says 400 ms.
    let (_, mut last) = next_beat(&mut heartbeats).await;
    for _ in 0..4 {
        let (session, at) = next_beat(&mut heartbeats).await;
        assert_eq!(
            session, 1,
            "the session goes on while heartbeats are answered"
        );
        let gap = at - last;
        assert!(
            gap >= Duration::from_millis(350),
            "heartbeats {gap:?} apart"
        );
        last = at;
    }

    answering.store(false, Ordering::SeqCst);
    let stopped_answering = Instant::now();
    let deadline = stopped_answering + Duration::from_secs(20);
    loop {
        let (session, _) = next_beat(&mut heartbeats).await;
        if session == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "no new session within 20 s");
    }
    let took = stopped_answering.elapsed();
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(15),
        "a new session {took:?} after the answers stopped (the timeout is {:?})",
        fleet_agent::session::ANSWER_TIMEOUT
    );

    let _ = stop_agent.send(());
    tokio::time::timeout(Duration::from_secs(20), agent)
        .await
        .expect("the agent stops")
        .unwrap()
        .unwrap();
    let _ = stop_controller.send(());
    let _ = server.await;
}
