//! User story: the controller's releases pile up; an admin prunes them. `fleetctl release prune
//! web --keep 1` deletes the old releases nobody uses, keeps the newest and the one the hosts
//! run (the standing deployment's), says why for each, and deletes an artifact only when no
//! remaining release shares its digest. `--keep 0` is refused. The fleet goes on working: the
//! kept releases roll out.

use fleet_tests::fleet::Fleet;
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;

/// `(version, reason)` of each entry of a prune answer's `removed` or `kept`.
fn entries(answer: &Value, which: &str) -> Vec<(String, String)> {
    answer[which]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|r| {
            (
                r["version"].as_str().unwrap_or_default().to_string(),
                r["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn artifact_file(fleet: &Fleet, digest: &str) -> PathBuf {
    fleet
        .config_dir()
        .join("data/artifacts/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

#[test]
fn prune_removes_old_unused_releases_and_their_unshared_artifacts() {
    let fleet = Fleet::start(2);
    let manifest = fleet_tests::web_manifest("10s");
    // 1.0.0 and 1.1.0 are the same bytes with other config; the others have bytes of their own.
    let shared = fleet.web_artifact(&manifest, &[("VERSION", b"1.0")]);
    fleet
        .create_release("web", "1.0.0", &shared, &[])
        .expect_code(0);
    fleet
        .create_release("web", "1.1.0", &shared, &["GREETING=hi"])
        .expect_code(0);
    for version in ["1.2.0", "1.3.0", "1.4.0"] {
        let artifact = fleet.web_artifact(&manifest, &[("VERSION", version.as_bytes())]);
        fleet
            .create_release("web", version, &artifact, &[])
            .expect_code(0);
    }
    let digest_of = |version: &str| -> String {
        fleet.ctl_ok(&["releases", "web"])["releases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["version"] == version)
            .map(|r| r["artifact_digest"].as_str().unwrap().to_string())
            .unwrap_or_else(|| panic!("no release {version}"))
    };
    let (shared_digest, digest_2, digest_3) =
        (digest_of("1.0.0"), digest_of("1.2.0"), digest_of("1.3.0"));
    assert!(artifact_file(&fleet, &shared_digest).is_file());
    fleet
        .ctl(&["rollout", "web", "1.2.0", "--batch", "100%"])
        .expect_code(0);

    let refused = fleet.ctl(&["release", "prune", "web", "--keep", "0"]);
    assert_eq!(refused.code, 2, "{refused:?}");
    assert!(
        refused.stderr.contains("keep at least 1"),
        "{}",
        refused.stderr
    );

    let answer = fleet.ctl_ok(&["release", "prune", "web", "--keep", "1"]);
    let removed: Vec<String> = entries(&answer, "removed")
        .into_iter()
        .map(|(version, _)| version)
        .collect();
    assert_eq!(removed, ["1.0.0", "1.1.0", "1.3.0"], "{answer}");
    let kept = entries(&answer, "kept");
    assert_eq!(kept.len(), 2, "{answer}");
    assert_eq!(kept[0].0, "1.2.0");
    assert!(kept[0].1.starts_with("in use: "), "{answer}");
    assert_eq!(
        kept[1],
        ("1.4.0".to_string(), "one of the newest 1".to_string())
    );
    for removed in answer["removed"].as_array().unwrap() {
        assert_eq!(removed["artifact_deleted"], true, "{answer}");
    }
    assert!(!artifact_file(&fleet, &shared_digest).exists());
    assert!(!artifact_file(&fleet, &digest_3).exists());
    assert!(artifact_file(&fleet, &digest_2).is_file());

    let left: Vec<String> = fleet.ctl_ok(&["releases", "web"])["releases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["version"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(left, ["1.2.0", "1.4.0"]);
    let events = fleet.ctl(&["events"]).expect_code(0).json_lines();
    assert!(
        events.iter().any(|e| e["kind"] == "release.pruned"),
        "no release.pruned event"
    );

    // Nothing more to prune; the fleet goes on: the hosts still serve 1.2.0 and take 1.4.0.
    let again = fleet.ctl_ok(&["release", "prune", "web", "--keep", "1"]);
    assert!(entries(&again, "removed").is_empty(), "{again}");
    fleet.wait_all_serve("1.2.0", Duration::from_secs(10));
    fleet
        .ctl(&["rollout", "web", "1.4.0", "--batch", "100%"])
        .expect_code(0);
    fleet.wait_all_serve("1.4.0", Duration::from_secs(20));
}
