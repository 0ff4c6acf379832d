//! User story: a version, once created, can never point at other bytes or another config;
//! uploading the very same release again is a harmless no-op; and what is not a valid release
//! (not a gzip tarball, no fleet.toml, an empty command, a bad app name or version) is refused
//! with exit code 2 before anything is stored (the refused bytes are not kept either).

use fleet_tests::fleet::Fleet;
use fleet_tests::web_manifest;

#[test]
fn a_version_is_immutable_and_bad_releases_are_refused() {
    let fleet = Fleet::start(0);
    let manifest = web_manifest("10s");
    let original = fleet.web_artifact(&manifest, &[]);
    let original_digest = fleet_proto::artifact::digest_of(&std::fs::read(&original).unwrap());

    let created = fleet
        .create_release("web", "1.0.0", &original, &[])
        .expect_code(0)
        .json;
    assert_eq!(created["created"], true, "{created:#}");
    assert_eq!(
        created["release"]["artifact_digest"],
        original_digest.as_str()
    );
    assert_eq!(created["release"]["version"], "1.0.0");

    // The same bytes and config again: exit 0, nothing created.
    let again = fleet
        .create_release("web", "1.0.0", &original, &[])
        .expect_code(0)
        .json;
    assert_eq!(again["created"], false, "{again:#}");

    // Other bytes under the same version: refused with a message naming the version.
    let other = fleet.web_artifact(&manifest, &[("NOTE", b"other bytes")]);
    let refused = fleet
        .create_release("web", "1.0.0", &other, &[])
        .expect_code(2);
    assert!(
        refused.stderr.contains("1.0.0"),
        "the refusal should name the version: {}",
        refused.stderr
    );
    // Other config under the same version is another release too: refused.
    fleet
        .create_release("web", "1.0.0", &original, &["WEB_BROKEN=1"])
        .expect_code(2);
    // The refused bytes were not kept: the artifact store holds the original alone.
    let blobs = fleet.config_dir().join("data/artifacts/sha256");
    let stored: Vec<_> = std::fs::read_dir(&blobs)
        .expect("the controller's artifact store")
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        stored,
        [original_digest.strip_prefix("sha256:").unwrap()],
        "a refused upload leaves no blob behind"
    );
    // The other bytes are welcome under a new version.
    fleet
        .create_release("web", "1.0.1", &other, &[])
        .expect_code(0);

    // What is not a release at all.
    let not_gzip = fleet.write_raw_artifact(b"this is not a gzip tarball\n");
    fleet
        .create_release("web", "2.0.0", &not_gzip, &[])
        .expect_code(2);
    let web = std::fs::read(&fleet.bins.web).unwrap();
    let no_manifest = fleet.write_artifact(&[("bin/web", &web, 0o755)]);
    let refused = fleet
        .create_release("web", "2.0.1", &no_manifest, &[])
        .expect_code(2);
    assert!(refused.stderr.contains("fleet.toml"), "{}", refused.stderr);
    let empty_command = fleet.write_artifact(&[
        ("fleet.toml", b"[process]\ncommand = []\n", 0o644),
        ("bin/web", &web, 0o755),
    ]);
    let refused = fleet
        .create_release("web", "2.0.2", &empty_command, &[])
        .expect_code(2);
    assert!(refused.stderr.contains("command"), "{}", refused.stderr);
    fleet
        .create_release("Web_App", "2.0.3", &original, &[])
        .expect_code(2);
    fleet
        .create_release("web", "2.0/../4", &original, &[])
        .expect_code(2);
    let missing_file = fleet.dir().join("no-such-artifact.tar.gz");
    fleet
        .create_release("web", "2.0.5", &missing_file, &[])
        .expect_code(2);

    // Only the two good releases exist, 1.0.0 still with its first bytes.
    let releases = fleet.ctl_ok(&["releases", "web"]);
    let releases = releases["releases"].as_array().expect("releases");
    let mut versions: Vec<&str> = releases
        .iter()
        .map(|r| r["version"].as_str().unwrap())
        .collect();
    versions.sort();
    assert_eq!(versions, vec!["1.0.0", "1.0.1"]);
    let first = releases.iter().find(|r| r["version"] == "1.0.0").unwrap();
    assert_eq!(first["artifact_digest"], original_digest.as_str());
}
