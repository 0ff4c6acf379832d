//! User story: a deployer credential (leaked, or a CI job gone wrong) opens release uploads
//! and holds them, or uploads to a controller whose disk is nearly full. The controller takes
//! only so many uploads at once, drops an upload that sends nothing for its idle timeout (and
//! what it wrote), and refuses uploads that would eat the free space it must keep; each
//! refusal says what to do.

use fleet_proto::pb::{self, create_release_request::Body};
use fleet_tests::fleet::Fleet;
use fleet_tests::grpc::{admin_identity, channel, runtime};
use std::time::Duration;

/// The files of uploads in progress.
fn upload_files(fleet: &Fleet) -> usize {
    std::fs::read_dir(fleet.config_dir().join("data/artifacts/tmp"))
        .map(|dir| dir.count())
        .unwrap_or(0)
}

#[test]
fn uploads_are_limited_in_number_and_dropped_when_idle() {
    let fleet =
        Fleet::start_with_controller_config(0, "max_uploads = 2\nupload_idle_timeout_ms = 1500\n");
    let artifact = fleet.web_artifact(&fleet_tests::web_manifest("10s"), &[]);
    runtime().block_on(async {
        let channel = channel(&fleet, Some(admin_identity(&fleet))).await;
        // Two uploads that send their header and one chunk, then nothing.
        let mut held = Vec::new();
        for version in ["0.1.0", "0.2.0"] {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tx.send(pb::CreateReleaseRequest {
                body: Some(Body::Header(pb::ReleaseHeader {
                    app: "web".into(),
                    version: version.into(),
                    ..Default::default()
                })),
            })
            .await
            .unwrap();
            tx.send(pb::CreateReleaseRequest {
                body: Some(Body::Chunk(vec![0x1f, 0x8b, 8, 0].into())),
            })
            .await
            .unwrap();
            let mut client = pb::fleet_service_client::FleetServiceClient::new(channel.clone());
            let call = tokio::spawn(async move {
                client
                    .create_release(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
            });
            held.push((tx, call));
        }
        // (Polled on this runtime, which also drives the two calls.)
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        while upload_files(&fleet) < 2 {
            assert!(
                tokio::time::Instant::now() < until,
                "two uploads never began"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // A third is refused while they are held, and says why.
        let third = fleet.create_release("web", "1.0.0", &artifact, &[]);
        assert_ne!(third.code, 0);
        assert!(
            third.stderr.contains("2 release uploads are under way"),
            "{}",
            third.stderr
        );

        // The held ones send nothing: each is dropped at its idle timeout, and its file with it.
        for (_tx, call) in held {
            let ended = tokio::time::timeout(Duration::from_secs(10), call)
                .await
                .expect("an idle upload is dropped within its timeout")
                .unwrap();
            let status = ended.expect_err("an idle upload fails");
            assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
            assert!(status.message().contains("sent nothing"), "{status:?}");
        }
    });
    assert_eq!(
        upload_files(&fleet),
        0,
        "a dropped upload leaves nothing behind"
    );
    fleet
        .create_release("web", "1.0.0", &artifact, &[])
        .expect_code(0);
}

#[test]
fn uploads_leave_the_free_space_the_controller_keeps() {
    // More free space than any test disk has: every upload is refused.
    let fleet = Fleet::start_with_controller_config(0, "min_free_disk_mb = 1073741824\n");
    let artifact = fleet.web_artifact(&fleet_tests::web_manifest("10s"), &[]);
    let refused = fleet.create_release("web", "1.0.0", &artifact, &[]);
    assert_ne!(refused.code, 0);
    assert!(refused.stderr.contains("MiB free"), "{}", refused.stderr);
    assert!(
        refused.stderr.contains("min_free_disk_mb"),
        "{}",
        refused.stderr
    );
    assert_eq!(upload_files(&fleet), 0);
    assert!(fleet.ctl_ok(&["releases", "web"])["releases"]
        .as_array()
        .is_none_or(Vec::is_empty));
}
