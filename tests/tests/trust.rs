//! Trust, end to end: only mutual TLS with a certificate from the fleet's CA gets an answer,
//! join tokens are single-use and expire, roles decide what a credential may do (a deployer
//! releases and rolls out but cannot drain; an agent's certificate cannot call an admin or
//! deployer RPC and cannot speak for another host or fetch another host's artifacts; what it
//! may fetch it gets from any offset, byte for byte).

use fleet_proto::pb;
use fleet_tests::fleet::Fleet;
use fleet_tests::grpc::{admin_identity, channel, runtime};
use fleet_tests::{incompressible_bytes, process};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

const MANIFEST: &[u8] =
    b"[process]\ncommand = [\"/bin/sh\", \"-c\", \"exec sleep 600\"]\nstop_timeout = \"2s\"\n";

/// What one fleetctl run said.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs fleetctl with `--config-dir config_dir` (and the fleet's controller URL).
fn fleetctl(fleet: &Fleet, config_dir: &Path, args: &[&str]) -> Run {
    let mut command = std::process::Command::new(&fleet.bins.fleetctl);
    command
        .arg("--config-dir")
        .arg(config_dir)
        .args(["--controller", &fleet.controller_url()])
        .args(args)
        .env_remove("FLEET_CONFIG_DIR")
        .env_remove("FLEET_CONTROLLER");
    let finished = process::run_with_deadline(command, Duration::from_secs(45));
    Run {
        code: finished.code,
        stdout: finished.stdout,
        stderr: finished.stderr,
    }
}

/// Runs `fleet-agent` for host `name` with `token` until it exits (a refused join exits).
fn agent_join(fleet: &Fleet, name: &str, token: &str) -> Run {
    let mut command = std::process::Command::new(&fleet.bins.agent);
    command
        .args(["--controller", &fleet.controller_url(), "--name", name])
        .args(["--advertise", "127.0.0.1", "--ca"])
        .arg(fleet.config_dir().join("ca.pem"))
        .args(["--join-token", token, "--data-dir"])
        .arg(fleet.dir().join("refused").join(name));
    let finished = process::run_with_deadline(command, Duration::from_secs(45));
    Run {
        code: finished.code,
        stdout: finished.stdout,
        stderr: finished.stderr,
    }
}

fn create_token(fleet: &Fleet, ttl: &str) -> (String, i64) {
    let json = fleet.ctl_ok(&["join-token", "create", "--ttl", ttl]);
    (
        json["token"].as_str().expect("a token").to_string(),
        json["expires_unix_ms"]
            .as_str()
            .map(|s| s.parse().unwrap())
            .or_else(|| json["expires_unix_ms"].as_i64())
            .expect("an expiry"),
    )
}

/// A config dir made of a host's own TLS files, as if someone stole them for fleetctl.
fn config_dir_from_agent(fleet: &Fleet, host: &str) -> PathBuf {
    let tls = fleet.agent(host).data_dir.join("tls");
    let dir = fleet.dir().join(format!("stolen-{host}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(tls.join("agent.pem"), dir.join("client.pem")).unwrap();
    std::fs::copy(tls.join("agent.key"), dir.join("client.key")).unwrap();
    std::fs::copy(tls.join("ca.pem"), dir.join("ca.pem")).unwrap();
    dir
}

/// A raw gRPC channel to the controller over TLS, with `identity` (cert, key) if given.
fn agent_identity(fleet: &Fleet, host: &str) -> (String, String) {
    let tls = fleet.agent(host).data_dir.join("tls");
    (
        std::fs::read_to_string(tls.join("agent.pem")).unwrap(),
        std::fs::read_to_string(tls.join("agent.key")).unwrap(),
    )
}

/// Creates release `app VERSION` of `artifact`; returns its artifact digest.
fn create_release_digest(fleet: &Fleet, version: &str, artifact: &Path) -> String {
    let release = fleet
        .create_release("app", version, artifact, &[])
        .expect_code(0)
        .json;
    release["release"]["artifact_digest"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn plaintext_and_certificateless_connections_are_refused() {
    let fleet = Fleet::start(1);
    let addr = fleet
        .controller_url()
        .trim_start_matches("https://")
        .to_string();

    // Plaintext HTTP/2 (what a gRPC client without TLS sends) gets no HTTP/2 answer: the TLS
    // server answers with an alert or closes.
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    assert!(
        answer.is_empty() || answer[0] == 0x15,
        "a plaintext client got an answer that is not a TLS alert: {answer:?}"
    );

    // TLS without a client certificate: fleetctl exits 3 and says why.
    let no_cert = fleet.dir().join("no-cert");
    std::fs::create_dir_all(&no_cert).unwrap();
    std::fs::copy(fleet.config_dir().join("ca.pem"), no_cert.join("ca.pem")).unwrap();
    let out = fleetctl(&fleet, &no_cert, &["hosts"]);
    assert_eq!(out.code, 3, "{}", out.stderr);
    assert!(
        out.stderr.contains("needs a client certificate"),
        "{}",
        out.stderr
    );

    // And at the gRPC level, for both services.
    runtime().block_on(async {
        let channel = channel(&fleet, None).await;
        let status = pb::fleet_service_client::FleetServiceClient::new(channel.clone())
            .list_hosts(pb::ListHostsRequest {})
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
        let status = pb::agent_service_client::AgentServiceClient::new(channel)
            .fetch_artifact(pb::FetchArtifactRequest {
                digest: format!("sha256:{}", "0".repeat(64)),
                offset: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    });

    // A certificate from another CA does not even get through the handshake.
    let other = fleet.dir().join("other-fleet");
    let init = fleetctl(
        &fleet,
        &other,
        &[
            "init",
            "--dir",
            &other.display().to_string(),
            "--http-listen",
            "127.0.0.1:0",
        ],
    );
    assert_eq!(init.code, 0, "{}", init.stderr);
    std::fs::copy(fleet.config_dir().join("ca.pem"), other.join("ca.pem")).unwrap();
    let out = fleetctl(&fleet, &other, &["hosts"]);
    assert_eq!(out.code, 3, "{}", out.stderr);
    fleet.ctl_ok(&["hosts"]);
}

#[test]
fn join_tokens_are_single_use_and_expire() {
    let mut fleet = Fleet::start(1);
    // h1 joined with its own token (the harness made one); its key stays private.
    let tls = fleet.agent("h1").data_dir.join("tls");
    for file in ["agent.key", "agent.pem", "ca.pem"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(tls.join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }

    // A token joins one host once.
    let (token, _) = create_token(&fleet, "10m");
    let mut command = std::process::Command::new(&fleet.bins.agent);
    command
        .args(["--controller", &fleet.controller_url(), "--name", "h2"])
        .args(["--advertise", "127.0.0.1", "--ca"])
        .arg(fleet.config_dir().join("ca.pem"))
        .args(["--join-token", &token, "--data-dir"])
        .arg(fleet.dir().join("h2-data"));
    let _h2 = process::ChildGuard::spawn(
        "fleet-agent h2",
        command,
        &fleet.dir().join("logs/agent-h2.log"),
    );
    fleet.wait_hosts_ready(2);
    let again = agent_join(&fleet, "h3", &token);
    assert_ne!(again.code, 0);
    assert!(again.stderr.contains("already used"), "{}", again.stderr);

    // An expired token is refused (waiting for the clock, not sleeping).
    let (token, expires_unix_ms) = create_token(&fleet, "1s");
    fleet_tests::wait_until(Duration::from_secs(10), "the token to expire", || {
        fleet_proto::now_unix_ms() > expires_unix_ms
    });
    let expired = agent_join(&fleet, "h3", &token);
    assert_ne!(expired.code, 0);
    assert!(expired.stderr.contains("expired"), "{}", expired.stderr);

    // A made-up token, and none at all.
    let made_up = agent_join(&fleet, "h3", &"ab".repeat(32));
    assert!(made_up.stderr.contains("not valid"), "{}", made_up.stderr);
    let none = agent_join(&fleet, "h3", "");
    assert!(none.stderr.contains("--join-token"), "{}", none.stderr);
    // A token cannot take over a host that still has a certificate.
    let (token, _) = create_token(&fleet, "10m");
    let takeover = agent_join(&fleet, "h1", &token);
    assert!(
        takeover.stderr.contains("already has a certificate"),
        "{}",
        takeover.stderr
    );
    assert!(!fleet.dir().join("refused/h3/tls/agent.pem").exists());

    // Later starts need no token.
    fleet.restart_agent("h1");
    fleet.wait_hosts_ready(2);
    // A token that would never be valid is bad usage.
    assert_eq!(fleet.ctl(&["join-token", "create", "--ttl", "0s"]).code, 2);
}

/// The agent joining as `name` with `token` into `data_dir`, as a child killed when dropped.
fn spawn_joining_agent(
    fleet: &Fleet,
    name: &str,
    token: &str,
    data_dir: &Path,
) -> process::ChildGuard {
    let mut command = std::process::Command::new(&fleet.bins.agent);
    command
        .args(["--controller", &fleet.controller_url(), "--name", name])
        .args(["--advertise", "127.0.0.1", "--ca"])
        .arg(fleet.config_dir().join("ca.pem"))
        .args(["--join-token", token, "--data-dir"])
        .arg(data_dir);
    process::ChildGuard::spawn(
        &format!("fleet-agent {name}"),
        command,
        &fleet.dir().join(format!("logs/agent-{name}.log")),
    )
}

#[test]
fn a_join_whose_answer_was_lost_is_answered_again_for_the_same_key_only() {
    let fleet = Fleet::start(0);
    let (token, _) = create_token(&fleet, "10m");
    let data_dir = fleet.dir().join("j1-data");
    let cert = data_dir.join("tls/agent.pem");
    let first = spawn_joining_agent(&fleet, "j1", &token, &data_dir);
    fleet.wait_hosts_ready(1);
    assert!(cert.is_file());
    let first_certificate = std::fs::read_to_string(&cert).unwrap();
    // The agent dies before it kept its certificate: the controller spent the token, the
    // host has its key and no certificate.
    drop(first);
    std::fs::remove_file(&cert).unwrap();

    // Another key asking with that token is refused: the token joined j1 once.
    let thief = agent_join(&fleet, "j1", &token);
    assert_ne!(thief.code, 0);
    assert!(thief.stderr.contains("already used"), "{}", thief.stderr);

    // The same agent with its kept key asks again and is answered again, with the certificate
    // it was issued the first time (a retry signs nothing new).
    let again = spawn_joining_agent(&fleet, "j1", &token, &data_dir);
    let connected = |fleet: &Fleet| {
        fleet.ctl_ok(&["hosts"])["hosts"]
            .as_array()
            .is_some_and(|hosts| {
                hosts
                    .iter()
                    .any(|h| h["name"] == "j1" && h["connected"] == true)
            })
    };
    fleet_tests::wait_until(
        Duration::from_secs(30),
        "j1 to join again and register",
        || cert.is_file() && connected(&fleet),
    );
    assert_eq!(std::fs::read_to_string(&cert).unwrap(), first_certificate);

    // Removed, j1 cannot come back with that token: not as a retried join with its own key
    // while the token is still valid, as an agent restarted with its agent.toml would try.
    fleet.ctl(&["remove", "j1"]).expect_code(0);
    drop(again);
    std::fs::remove_file(&cert).unwrap();
    let mut command = std::process::Command::new(&fleet.bins.agent);
    command
        .args(["--controller", &fleet.controller_url(), "--name", "j1"])
        .args(["--advertise", "127.0.0.1", "--ca"])
        .arg(fleet.config_dir().join("ca.pem"))
        .args(["--join-token", &token, "--data-dir"])
        .arg(&data_dir);
    let rejoin = process::run_with_deadline(command, Duration::from_secs(45));
    assert_ne!(rejoin.code, 0, "{}", rejoin.stderr);
    assert!(rejoin.stderr.contains("was removed"), "{}", rejoin.stderr);
    assert!(!cert.exists(), "no certificate for a removed host");
    let hosts = fleet.ctl_ok(&["hosts"]);
    assert!(
        hosts["hosts"]
            .as_array()
            .is_none_or(|hosts| hosts.iter().all(|h| h["name"] != "j1")),
        "a removed host stays removed: {hosts:#}"
    );
}

#[test]
fn a_deployer_can_release_and_roll_out_but_cannot_drain() {
    let fleet = Fleet::start(1);
    let ci = fleet.dir().join("ci");
    let created = fleet.ctl_ok(&[
        "credentials",
        "create",
        "ci",
        "--role",
        "deployer",
        "--out",
        &ci.display().to_string(),
    ]);
    assert_eq!(created["role"], "deployer");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(ci.join("client.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let artifact = fleet.write_artifact(&[("fleet.toml", MANIFEST, 0o644)]);
    let release = fleetctl(
        &fleet,
        &ci,
        &[
            "release",
            "create",
            "app",
            "1.0",
            &artifact.display().to_string(),
        ],
    );
    assert_eq!(release.code, 0, "{}", release.stderr);
    let rollout = fleetctl(&fleet, &ci, &["rollout", "app", "1.0"]);
    assert_eq!(rollout.code, 0, "{}\n{}", rollout.stdout, rollout.stderr);
    for args in [
        &["hosts"][..],
        &["status"],
        &["history", "app"],
        &["releases", "app"],
    ] {
        let out = fleetctl(&fleet, &ci, args);
        assert_eq!(out.code, 0, "{args:?}: {}", out.stderr);
    }
    let drain = fleetctl(&fleet, &ci, &["drain", "h1"]);
    assert_eq!(drain.code, 3, "{}", drain.stderr);
    assert!(
        drain
            .stderr
            .contains("this call needs the admin role; your credential `ci` has role deployer"),
        "{}",
        drain.stderr
    );
    for args in [
        &["join-token", "create"][..],
        &[
            "credentials",
            "create",
            "ci2",
            "--role",
            "admin",
            "--out",
            "x",
        ],
        &["undrain", "h1"],
        &["remove", "h1"],
    ] {
        let out = fleetctl(&fleet, &ci, args);
        assert_eq!(out.code, 3, "{args:?}: {}", out.stderr);
        assert!(
            out.stderr.contains("needs the admin role"),
            "{args:?}: {}",
            out.stderr
        );
    }
    // The admin's credential (from init) may.
    fleet.ctl_ok(&["join-token", "create"]);
}

#[test]
fn an_agent_certificate_speaks_only_for_its_own_host() {
    let fleet = Fleet::start(2);
    let artifact = fleet.write_artifact(&[("fleet.toml", MANIFEST, 0o644)]);
    fleet
        .create_release("app", "1.0", &artifact, &[])
        .expect_code(0);
    let other = fleet.write_artifact(&[("fleet.toml", MANIFEST, 0o644), ("x", b"x", 0o644)]);
    let other_digest = create_release_digest(&fleet, "2.0", &other);

    // With fleetctl: an agent's certificate is no operator's (refused at the edge, before
    // the request's body is read).
    let stolen = config_dir_from_agent(&fleet, "h1");
    for args in [
        &["hosts"][..],
        &["release", "create", "app", "3.0", "x.tar.gz"],
        &["drain", "h2"],
        &["join-token", "create"],
    ] {
        let out = fleetctl(&fleet, &stolen, args);
        if args[0] == "release" {
            continue; // refused locally: the file does not exist
        }
        assert_eq!(out.code, 3, "{args:?}: {}", out.stderr);
        let expect =
            "this call needs the admin or deployer role; your credential `h1` has role agent";
        assert!(out.stderr.contains(expect), "{args:?}: {}", out.stderr);
    }

    runtime().block_on(async {
        let channel = channel(&fleet, Some(agent_identity(&fleet, "h1"))).await;
        // A session saying hello as h2 with h1's certificate.
        let hello = pb::AgentMessage {
            body: Some(pb::agent_message::Body::Hello(pb::Hello {
                host_name: "h2".into(),
                advertise_addr: "127.0.0.1".into(),
                ..Default::default()
            })),
        };
        let status = pb::agent_service_client::AgentServiceClient::new(channel.clone())
            .session(tokio_stream::iter(vec![hello]))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert!(
            status.message().contains("cannot speak for host `h2`"),
            "{status:?}"
        );

        // Fetching an artifact no release of h1 is assigned.
        let mut fetch = pb::agent_service_client::AgentServiceClient::new(channel.clone())
            .fetch_artifact(pb::FetchArtifactRequest {
                digest: other_digest.clone(),
                offset: 0,
            })
            .await;
        if let Ok(response) = &mut fetch {
            panic!(
                "h1 fetched an artifact it is not assigned: {:?}",
                response.get_ref()
            );
        }
        let status = fetch.unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

        // And the fleet's own calls.
        let status = pb::fleet_service_client::FleetServiceClient::new(channel)
            .create_join_token(pb::CreateJoinTokenRequest {
                ttl_ms: 1000,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    });
    fleet.wait_hosts_ready(2);
}

#[test]
fn an_agent_fetches_its_artifact_from_any_offset() {
    let fleet = Fleet::start(1);
    // Bytes gzip cannot shrink, so the artifact spans a few 1 MiB chunks.
    let blob = incompressible_bytes(5 << 19);
    let artifact = fleet.write_artifact(&[("fleet.toml", MANIFEST, 0o644), ("blob", &blob, 0o644)]);
    let bytes = std::fs::read(&artifact).unwrap();
    assert!(bytes.len() > 2 << 20, "{} bytes", bytes.len());
    let digest = create_release_digest(&fleet, "1.0", &artifact);
    fleet.ctl_ok(&["rollout", "app", "1.0"]);

    runtime().block_on(async {
        let channel = channel(&fleet, Some(agent_identity(&fleet, "h1"))).await;
        let fetch = |offset: u64| {
            let mut client = pb::agent_service_client::AgentServiceClient::new(channel.clone())
                .max_decoding_message_size(16 << 20);
            let digest = digest.clone();
            async move {
                let mut stream = client
                    .fetch_artifact(pb::FetchArtifactRequest { digest, offset })
                    .await?
                    .into_inner();
                let mut got = Vec::new();
                while let Some(chunk) = stream.message().await? {
                    assert!(
                        chunk.data.len() <= 1 << 20,
                        "{} byte chunk",
                        chunk.data.len()
                    );
                    got.extend_from_slice(&chunk.data);
                }
                Ok::<_, tonic::Status>(got)
            }
        };
        let size = bytes.len() as u64;
        for offset in [0, 1, (1 << 20) - 1, (1 << 20) + 4097, size - 1, size] {
            let got = fetch(offset).await.unwrap();
            assert!(
                got == bytes[offset as usize..],
                "from offset {offset}: {} bytes that differ from the artifact's last {}",
                got.len(),
                size - offset
            );
        }
        let status = fetch(size + 1).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    });
}

/// A hostile client sends 10 KB values where names belong: every refusal says what was wrong
/// and quotes only a bounded prefix, so the message fits gRPC's metadata and reaches the
/// client (instead of `RESOURCE_EXHAUSTED`).
#[test]
fn refusals_quote_a_bounded_prefix_of_huge_input() {
    let fleet = Fleet::start(1);
    let admin = admin_identity(&fleet);
    let huge = "z".repeat(10_000);
    runtime().block_on(async {
        let channel = channel(&fleet, Some(admin)).await;
        let mut client = pb::fleet_service_client::FleetServiceClient::new(channel.clone());
        let refusals = [
            client
                .start_rollout(pb::StartRolloutRequest {
                    app: "web".into(),
                    version: "1.0.0".into(),
                    selector: [("zone".to_string(), huge.clone())].into(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            client
                .start_rollout(pb::StartRolloutRequest {
                    app: "web".into(),
                    version: "1.0.0".into(),
                    batch: huge.clone(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            client
                .list_releases(pb::ListReleasesRequest { app: huge.clone() })
                .await
                .map(|_| ()),
            client
                .drain_host(pb::DrainHostRequest {
                    host: huge.clone(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
        ];
        for refusal in refusals {
            let status = refusal.expect_err("a 10 KB name is refused");
            assert_eq!(
                status.code(),
                tonic::Code::InvalidArgument,
                "{}",
                &status.message()[..status.message().len().min(300)]
            );
            assert!(status.message().len() < 512, "{}", status.message());
            assert!(status.message().contains(" bytes)"), "{}", status.message());
        }
    });
}
