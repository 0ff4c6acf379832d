//! Backup and restore without a running controller: a store exported here, written as a
//! backup, restored; and every refusal (non-empty data directory, unwritable or existing
//! target, a file that is not a backup, a damaged or truncated one, a newer format).

use super::*;
use crate::model::{EventRecord, HostRecord, ReleaseRecord};
use std::io::Seek;
use std::os::unix::fs::PermissionsExt;

const CONTROLLER_TOML: &str = "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\nca = \"ca.pem\"\nca_key = \"ca.key\"\ncert = \"controller.pem\"\nkey = \"controller.key\"\n";

/// A data directory with a host, a release whose artifact is stored, an event and a counter.
fn fleet_data(dir: &Path) -> (PathBuf, Store, Vec<u8>, String) {
    let data_dir = dir.join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    let store = Store::open(&data_dir).unwrap();
    let artifact = b"the artifact's bytes".to_vec();
    let digest = format!("sha256:{}", sha256_hex(&artifact));
    let path = crate::artifacts::artifact_path(&data_dir, &digest).unwrap();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, &artifact).unwrap();
    store
        .insert_release(&ReleaseRecord {
            app: "web".into(),
            version: "1.0".into(),
            artifact_digest: digest.clone(),
            artifact_size: artifact.len() as u64,
            env: Default::default(),
            created_unix_ms: 1,
            created_by: "test".into(),
            smoke_timeouts_ms: Vec::new(),
            has_release_hook: false,
            min_healthy_ms: 0,
            unpacked_size: 0,
            secrets: Default::default(),
            secrets_sha256: String::new(),
        })
        .unwrap();
    store
        .put_host(&HostRecord {
            name: "h1".into(),
            labels: [("env".to_string(), "prod".to_string())].into(),
            advertise_addr: "127.0.0.2".into(),
            registered_unix_ms: 5,
            last_seen_unix_ms: 6,
            desired: Default::default(),
            drain: None,
            agent: Default::default(),
        })
        .unwrap();
    store
        .append_event(EventRecord {
            seq: 0,
            unix_ms: 7,
            actor: "admin".into(),
            kind: "test".into(),
            app: "web".into(),
            host: String::new(),
            message: "made for a backup".into(),
        })
        .unwrap();
    assert_eq!(store.next_seq("rollout").unwrap(), 1);
    (data_dir, store, artifact, digest)
}

fn config_files() -> BTreeMap<&'static str, Vec<u8>> {
    CONFIG_FILES
        .iter()
        .map(|&name| {
            let bytes = match name {
                "controller.toml" => CONTROLLER_TOML.as_bytes().to_vec(),
                other => format!("the bytes of {other}").into_bytes(),
            };
            (name, bytes)
        })
        .collect()
}

/// Writes a backup of the fixture's store to `dir/backup.tar.gz`.
fn backup_of(dir: &Path) -> (PathBuf, Vec<u8>, String) {
    let (data_dir, store, artifact, digest) = fleet_data(dir);
    let to = dir.join("backup.tar.gz");
    let target = Target::create(&to).unwrap();
    let mut dump = target.scratch().unwrap();
    let summary = store.export(&mut dump).unwrap();
    assert_eq!(summary.artifact_digests, [digest.clone()].into());
    dump.seek(std::io::SeekFrom::Start(0)).unwrap();
    write(
        target,
        Contents {
            store_dump: dump,
            config: config_files(),
            data_dir,
            artifact_digests: summary.artifact_digests,
        },
    )
    .unwrap();
    (to, artifact, digest)
}

#[test]
fn a_backup_restores_every_record_artifact_and_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let (backup, artifact, digest) = backup_of(dir.path());
    assert_eq!(
        std::fs::metadata(&backup).unwrap().permissions().mode() & 0o777,
        0o600,
        "the backup holds the CA key"
    );
    let restored_data = dir.path().join("restored");
    let restored_config = dir.path().join("restored-config");
    let restored = restore(&backup, &restored_data, Some(&restored_config)).unwrap();
    assert_eq!(restored.n_artifacts, 1);
    assert_eq!(restored.manifest.format_version, FORMAT_VERSION);

    let store = Store::open(&restored_data).unwrap();
    assert_eq!(store.list_releases("web").unwrap().len(), 1);
    assert_eq!(store.list_hosts().unwrap()[0].name, "h1");
    assert_eq!(
        store.recent_events(10).unwrap()[0].message,
        "made for a backup"
    );
    assert_eq!(store.next_seq("rollout").unwrap(), 2, "counters go on");
    let path = crate::artifacts::artifact_path(&restored_data, &digest).unwrap();
    assert_eq!(std::fs::read(path).unwrap(), artifact);
    assert!(!restored_data.join(".restore-store.jsonl").exists());

    assert_eq!(
        std::fs::read(restored_config.join("ca.key")).unwrap(),
        b"the bytes of ca.key"
    );
    assert_eq!(
        std::fs::metadata(restored_config.join("ca.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let config =
        crate::config::ControllerConfig::load(&restored_config.join("controller.toml")).unwrap();
    assert_eq!(
        config.data_dir,
        std::fs::canonicalize(&restored_data).unwrap(),
        "the restored controller.toml points at the restored data"
    );
    assert_eq!(config.tls.ca_key, restored_config.join("ca.key"));
}

#[test]
fn restore_refuses_a_data_directory_that_is_not_empty_and_leaves_it_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (backup, _, _) = backup_of(dir.path());
    // The fixture's own data directory holds a store.
    let error = restore(&backup, &dir.path().join("data"), None).unwrap_err();
    assert!(matches!(error, BackupError::NotEmpty { .. }), "{error}");
    assert!(
        error
            .to_string()
            .contains("pass --data-dir with a new or empty directory"),
        "{error}"
    );
    assert_eq!(error.exit_code(), 2);
    assert!(dir
        .path()
        .join("data")
        .join(crate::store::STORE_FILE)
        .exists());
    // An empty one is fine; a config directory that holds a CA already is not.
    let config_dir = dir.path().join("config");
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::write(config_dir.join("ca.key"), "keep me").unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let error = restore(&backup, &empty, Some(&config_dir)).unwrap_err();
    assert!(matches!(error, BackupError::ConfigExists { .. }), "{error}");
    assert_eq!(
        std::fs::read_to_string(config_dir.join("ca.key")).unwrap(),
        "keep me"
    );
    restore(&backup, &empty, None).unwrap();
}

#[test]
fn backup_refuses_a_target_it_cannot_write_or_that_exists() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    // A directory that is a file: not writable, whoever runs the test (root too).
    let error = Target::create(&file.join("backup.tar.gz"))
        .err()
        .expect("refused");
    assert!(matches!(error, BackupError::Unwritable { .. }), "{error}");
    assert!(
        error
            .to_string()
            .contains("pass --to a path in a directory you can write"),
        "{error}"
    );
    let error = Target::create(&file).err().expect("refused");
    assert!(matches!(error, BackupError::Exists { .. }), "{error}");
    assert_eq!(
        std::fs::read(&file).unwrap(),
        b"",
        "an existing file is never overwritten"
    );
}

/// Restores `bytes` as a backup into a fresh directory; the error, and whether the data
/// directory was left empty.
fn restore_bytes(bytes: &[u8]) -> (BackupError, bool) {
    let dir = tempfile::tempdir().unwrap();
    let from = dir.path().join("input.tar.gz");
    std::fs::write(&from, bytes).unwrap();
    let data_dir = dir.path().join("data");
    let error = restore(&from, &data_dir, None).expect_err("refused");
    (error, is_absent_or_empty(&data_dir).unwrap())
}

fn tar_gz(members: &[(&str, &[u8])]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    for (path, bytes) in members {
        tar.append_data(&mut tar_header(bytes.len() as u64, 0), path, *bytes)
            .unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap()
}

#[test]
fn restore_refuses_what_is_not_a_fleet_backup() {
    for bytes in [
        b"just some text".to_vec(),
        Vec::new(),
        tar_gz(&[("fleet.toml", b"[process]")]),
        tar_gz(&[(MANIFEST_MEMBER, b"{\"format\":\"something-else\"}")]),
        tar_gz(&[(MANIFEST_MEMBER, b"not json")]),
    ] {
        let (error, empty) = restore_bytes(&bytes);
        assert!(matches!(error, BackupError::NotABackup { .. }), "{error}");
        assert!(error
            .to_string()
            .contains("a file written by `fleet-controller backup`"));
        assert!(empty);
    }
}

#[test]
fn restore_refuses_a_damaged_or_truncated_backup_and_leaves_the_data_directory_empty() {
    let dir = tempfile::tempdir().unwrap();
    let (backup, _, _) = backup_of(dir.path());
    let good = std::fs::read(&backup).unwrap();
    let mut cases = vec![
        ("truncated at 90%", good[..good.len() * 9 / 10].to_vec()),
        ("truncated at 60%", good[..good.len() * 6 / 10].to_vec()),
        ("without its gzip trailer", good[..good.len() - 4].to_vec()),
    ];
    for at in [good.len() / 2, good.len() * 3 / 4, good.len() - 6] {
        let mut flipped = good.clone();
        flipped[at] ^= 0x55;
        cases.push(("a byte flipped", flipped));
    }
    for (what, bytes) in cases {
        let (error, empty) = restore_bytes(&bytes);
        assert!(
            matches!(
                error,
                BackupError::Damaged { .. } | BackupError::NotABackup { .. }
            ),
            "{what}: {error}"
        );
        assert!(empty, "{what}: the data directory is left as it was");
    }
    // A member whose bytes differ from the manifest's sha256, with a sound gzip stream.
    let manifest = Manifest {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        controller_version: "0.1.0".into(),
        created_unix_ms: 1,
        store_backend: "redb".into(),
        members: vec![Member {
            path: STORE_MEMBER.into(),
            size: 5,
            sha256: sha256_hex(b"other"),
        }],
    };
    let (error, empty) = restore_bytes(&tar_gz(&[
        (MANIFEST_MEMBER, &serde_json::to_vec(&manifest).unwrap()),
        (STORE_MEMBER, b"bytes"),
    ]));
    assert!(matches!(error, BackupError::Damaged { .. }), "{error}");
    assert!(
        error.to_string().contains("does not match its sha256"),
        "{error}"
    );
    assert!(
        error.to_string().contains("restore from another copy"),
        "{error}"
    );
    assert!(empty);
}

#[test]
fn restore_refuses_a_backup_of_a_newer_format() {
    let manifest = serde_json::json!({
        "format": FORMAT,
        "format_version": FORMAT_VERSION + 1,
        "controller_version": "9.0.0",
        "something_new": true,
    });
    let (error, empty) = restore_bytes(&tar_gz(&[(
        MANIFEST_MEMBER,
        &serde_json::to_vec(&manifest).unwrap(),
    )]));
    assert!(matches!(error, BackupError::Newer { .. }), "{error}");
    assert!(
        error
            .to_string()
            .contains("restore with fleet-controller 9.0.0 or newer"),
        "{error}"
    );
    assert!(empty);
}

#[test]
fn a_store_dump_imports_only_into_a_directory_without_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let (data_dir, store, _, _) = fleet_data(dir.path());
    let mut dump = Vec::new();
    store.export(&mut dump).unwrap();
    let error = Store::import(&data_dir, dump.as_slice())
        .err()
        .expect("refused");
    assert!(matches!(error, StoreError::Exists { .. }), "{error}");
    let unknown =
        b"{\"fleet_store_dump\":1}\n{\"table\":\"later\",\"key\":\"k\",\"value\":\"v\"}\n";
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let error = Store::import(&other, unknown.as_slice())
        .err()
        .expect("refused");
    assert!(error.to_string().contains("does not know"), "{error}");
    assert!(
        !other.join(crate::store::STORE_FILE).exists(),
        "no half store is left"
    );
    let newer = b"{\"fleet_store_dump\":2}\n";
    let error = Store::import(&other, newer.as_slice())
        .err()
        .expect("refused");
    assert!(error.to_string().contains("newer"), "{error}");
}
