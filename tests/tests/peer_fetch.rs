//! Artifact fan-out through peers, with real agents: a rollout where most chunks come from
//! peers (the controller's egress counter stays under 1.5x the artifact), a peer whose cached
//! artifact is corrupted is dropped and the fetch still ends with the right bytes, a peer
//! refuses chunks without a valid grant for the caller, a partial download left with a bad
//! chunk is cut back to it and completed, and with `--peer-port 0` everything comes from the
//! controller as before.

use fleet_proto::pb;
use fleet_tests::fleet::Fleet;
use fleet_tests::{grpc, incompressible_bytes, wait_until, web_manifest};
use std::path::PathBuf;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(120);
const BLOB_BYTES: usize = 12 << 20;

/// A web release whose artifact carries `BLOB_BYTES` of incompressible data; its size and
/// digest.
fn big_release(fleet: &Fleet, version: &str) -> (u64, String) {
    let bytes = big_release_bytes(fleet, version);
    (bytes.len() as u64, fleet_proto::artifact::digest_of(&bytes))
}

/// The same, returning the artifact's bytes.
fn big_release_bytes(fleet: &Fleet, version: &str) -> Vec<u8> {
    let blob = incompressible_bytes(BLOB_BYTES);
    let artifact = fleet.web_artifact(
        &web_manifest("30s"),
        &[("data/blob", &blob), ("NOTE", version.as_bytes())],
    );
    fleet
        .create_release("web", version, &artifact, &[])
        .expect_code(0);
    std::fs::read(&artifact).unwrap()
}

fn bytes_sent(fleet: &Fleet) -> u64 {
    grpc::runtime().block_on(async {
        let channel = grpc::channel(fleet, Some(grpc::admin_identity(fleet))).await;
        pb::fleet_service_client::FleetServiceClient::new(channel)
            .status(pb::StatusRequest::default())
            .await
            .expect("status")
            .into_inner()
            .artifact_bytes_sent
    })
}

fn agent_log(fleet: &Fleet, name: &str) -> String {
    std::fs::read_to_string(fleet.dir().join(format!("logs/agent-{name}.log"))).unwrap_or_default()
}

fn tls_of(fleet: &Fleet, name: &str) -> (String, String) {
    let dir = fleet.agent(name).data_dir.join("tls");
    (
        std::fs::read_to_string(dir.join("agent.pem")).unwrap(),
        std::fs::read_to_string(dir.join("agent.key")).unwrap(),
    )
}

fn cached_artifact(fleet: &Fleet, name: &str) -> Option<PathBuf> {
    let dir = fleet.agent(name).data_dir.join("artifacts");
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.to_string_lossy().ends_with(".tar.gz"))
}

#[test]
fn most_chunks_come_from_peers_and_peers_refuse_without_a_grant() {
    let fleet = Fleet::start(5);
    let (size, digest) = big_release(&fleet, "1.0.0");
    let before = bytes_sent(&fleet);
    fleet
        .ctl_with_deadline(
            &[
                "rollout", "web", "1.0.0", "--canary", "1", "--batch", "100%",
            ],
            DEADLINE,
        )
        .expect_code(0);
    fleet.wait_all_serve("1.0.0", DEADLINE);
    let sent = bytes_sent(&fleet) - before;
    let ratio = sent as f64 / size as f64;
    eprintln!("controller sent {sent} bytes for a {size}-byte artifact to 5 hosts: {ratio:.2}x");
    assert!(
        ratio < 1.5,
        "the controller sent {ratio:.2}x the artifact to 5 hosts; most chunks should come from peers"
    );
    let from_peers = fleet
        .host_names()
        .iter()
        .filter(|name| agent_log(&fleet, name).contains("artifact chunks fetched from peers"))
        .count();
    assert!(
        from_peers >= 3,
        "only {from_peers} hosts fetched from peers"
    );
    // Each host unpacked the release from the chunks as they were checked, while fetching.
    for name in fleet.host_names() {
        assert!(
            agent_log(&fleet, &name).contains("release unpacked while it was fetched"),
            "{name} did not unpack while fetching"
        );
    }

    // The grant: h2 asks h1 for chunks. Without a grant, and with h3's grant, it is refused;
    // with its own, served.
    let h1 = format!("https://{}:7702", fleet.agent("h1").advertise);
    grpc::runtime().block_on(async {
        let grant_of = |name: &'static str| {
            let identity = tls_of(&fleet, name);
            let digest = digest.clone();
            let fleet = &fleet;
            async move {
                let channel = grpc::channel(fleet, Some(identity)).await;
                pb::agent_service_client::AgentServiceClient::new(channel)
                    .artifact_sources(pb::ArtifactSourcesRequest {
                        digest,
                        exclude_hosts: vec![],
                    })
                    .await
                    .expect("artifact sources")
                    .into_inner()
                    .grant
                    .expect("a grant")
            }
        };
        let own = grant_of("h2").await;
        let other = grant_of("h3").await;
        let channel = grpc::channel_to(&fleet, &h1, "h1", Some(tls_of(&fleet, "h2")))
            .await
            .expect("a TLS connection to h1's peer listener with h2's certificate");
        let mut client = pb::peer_service_client::PeerServiceClient::new(channel);
        let request = |grant: Option<pb::PeerGrant>| pb::FetchChunksRequest {
            digest: digest.clone(),
            grant,
            first_chunk: 0,
            chunk_size: 1 << 20,
        };
        let mut forged = own.clone();
        forged.expires_unix_ms += 3_600_000;
        for (what, grant) in [
            ("no grant", None),
            ("h3's grant", Some(other)),
            ("a grant whose expiry was changed", Some(forged)),
        ] {
            let refused = match client.fetch_chunks(request(grant)).await {
                Err(status) => status,
                Ok(stream) => stream
                    .into_inner()
                    .message()
                    .await
                    .expect_err(&format!("h1 served h2 with {what}")),
            };
            assert_eq!(
                refused.code(),
                tonic::Code::PermissionDenied,
                "{what}: {refused:?}"
            );
        }
        let mut stream = client
            .fetch_chunks(request(Some(own)))
            .await
            .expect("h1 serves h2 with h2's own grant")
            .into_inner();
        let first = stream.message().await.expect("a chunk").expect("a chunk");
        assert_eq!(first.index, 0);
        assert_eq!(first.data.len(), 1 << 20);
    });
}

#[test]
fn a_peer_that_sends_a_bad_chunk_is_dropped_and_the_fetch_completes() {
    let fleet = Fleet::start(4);
    let (_, digest) = big_release(&fleet, "1.0.0");
    fleet.ctl_ok(&["label", "h1", "first=yes"]);
    fleet
        .ctl_with_deadline(
            &["rollout", "web", "1.0.0", "--selector", "first=yes"],
            DEADLINE,
        )
        .expect_code(0);
    // h1's cached artifact goes bad on its disk; it serves it as it is.
    let cached = cached_artifact(&fleet, "h1").expect("h1 keeps the artifact");
    let mut bytes = std::fs::read(&cached).unwrap();
    for byte in &mut bytes[(1 << 20) + 100..(1 << 20) + 200] {
        *byte ^= 0xff;
    }
    std::fs::write(&cached, &bytes).unwrap();

    fleet
        .ctl_with_deadline(&["rollout", "web", "1.0.0"], DEADLINE)
        .expect_code(0);
    fleet.wait_all_serve("1.0.0", DEADLINE);
    let dropped = ["h2", "h3", "h4"]
        .iter()
        .filter(|name| agent_log(&fleet, name).contains("does not match its digest"))
        .count();
    assert!(dropped >= 1, "no host noticed h1's bad chunk");
    for name in ["h2", "h3", "h4"] {
        let path = cached_artifact(&fleet, name).expect("the artifact is cached");
        assert_eq!(
            fleet_proto::artifact::digest_of(&std::fs::read(&path).unwrap()),
            digest,
            "{name} kept other bytes"
        );
    }
}

#[test]
fn a_partial_download_with_a_bad_chunk_is_cut_back_to_it_and_completed() {
    let fleet = Fleet::start(1);
    let bytes = big_release_bytes(&fleet, "1.0.0");
    let digest = fleet_proto::artifact::digest_of(&bytes);
    // What an earlier download of h1 left: three chunks, the second spoiled on its disk.
    let artifacts = fleet.agent("h1").data_dir.join("artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let mut left = bytes[..3 << 20].to_vec();
    left[(1 << 20) + 4321] ^= 0xff;
    let hex = digest.strip_prefix("sha256:").unwrap();
    std::fs::write(artifacts.join(format!("{hex}.partial")), &left).unwrap();
    let before = bytes_sent(&fleet);

    fleet
        .ctl_with_deadline(&["rollout", "web", "1.0.0"], DEADLINE)
        .expect_code(0);
    fleet.wait_all_serve("1.0.0", DEADLINE);
    assert!(
        agent_log(&fleet, "h1").contains("does not match its sha256: cut back"),
        "h1 did not say it cut its partial download back"
    );
    // The unpack followed the download from the kept first chunk on (read back from the
    // partial file) to the controller's last.
    assert!(
        agent_log(&fleet, "h1").contains("release unpacked while it was fetched"),
        "h1 did not unpack while fetching"
    );
    let path = cached_artifact(&fleet, "h1").expect("the artifact is cached");
    assert_eq!(
        fleet_proto::artifact::digest_of(&std::fs::read(&path).unwrap()),
        digest,
        "h1 kept other bytes"
    );
    // The good first chunk was kept: the controller sent everything after it.
    assert_eq!(bytes_sent(&fleet) - before, bytes.len() as u64 - (1 << 20));
}

#[test]
fn with_peer_port_0_everything_comes_from_the_controller() {
    let mut fleet = Fleet::start(3);
    for name in ["h1", "h2", "h3"] {
        fleet.set_agent_env(name, "FLEET_PEER_PORT", "0");
        fleet.restart_agent(name);
    }
    fleet.wait_hosts_ready(3);
    wait_until(DEADLINE, "every host serves no peers", || {
        ["h1", "h2", "h3"].iter().all(|name| {
            std::net::TcpStream::connect((fleet.agent(name).advertise.as_str(), 7702)).is_err()
        })
    });
    let (size, _) = big_release(&fleet, "1.0.0");
    let before = bytes_sent(&fleet);
    fleet
        .ctl_with_deadline(
            &[
                "rollout", "web", "1.0.0", "--canary", "1", "--batch", "100%",
            ],
            DEADLINE,
        )
        .expect_code(0);
    fleet.wait_all_serve("1.0.0", DEADLINE);
    let sent = bytes_sent(&fleet) - before;
    assert_eq!(
        sent,
        3 * size,
        "each host fetched the whole artifact from the controller"
    );
    // Checked whole at its end, so unpacked from the verified file afterwards.
    for name in ["h1", "h2", "h3"] {
        assert!(
            !agent_log(&fleet, name).contains("release unpacked while it was fetched"),
            "{name} unpacked bytes not checked yet"
        );
    }
}
