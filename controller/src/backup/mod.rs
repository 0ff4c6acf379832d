//! Backup and restore: one file that holds a controller's whole state, and an empty data
//! directory filled from it.
//!
//! **Taking it** (`fleet-controller backup --config controller.toml --to FILE`, [`take`]): a
//! running controller holds its redb file open and locked, so the backup asks it over its own
//! API. `ExportStore` (admin only) streams a store dump read in one read transaction: a
//! consistent snapshot of every table while writers go on ([`crate::store::Store::export`]).
//! The command authenticates with a short-lived admin certificate it signs itself with the CA
//! key from controller.toml: it must read that key anyway to put it in the backup, so it
//! needs no credential beside it, and the key of that certificate never leaves its memory.
//! The artifacts are read from the data directory after the snapshot: an artifact is renamed
//! into place before the release that refers to it is recorded, and never changes, so every
//! artifact the snapshot refers to is there (one that is missing fails the backup). Only those
//! are copied. The CA, the controller's certificate and key and controller.toml are read from
//! the files controller.toml names.
//!
//! **The file**: a gzip'd tar, written 0600 (it holds the CA key) to a temporary file beside
//! FILE and renamed into place once complete; an existing FILE is never overwritten. Members:
//!
//! | path | what |
//! | --- | --- |
//! | `fleet-backup.json` | first: the [`Manifest`] (format, format version, controller version, created time, every other member's size and sha256) |
//! | `store.jsonl` | the store dump (backend neutral, see `store.rs`) |
//! | `config/controller.toml`, `config/ca.pem`, `config/ca.key`, `config/controller.pem`, `config/controller.key` | the config and TLS files |
//! | `artifacts/sha256/<hex>` | each artifact a release refers to |
//!
//! **Restoring** (`fleet-controller restore --from FILE --data-dir DIR [--config-dir CDIR]`,
//! [`restore`]) refuses a DIR that is not empty, a file that is not a fleet backup, one whose
//! manifest names a newer format, and one that is damaged or truncated: every member is checked
//! against its sha256 in the manifest, every member of the manifest must be there, the gzip
//! stream must end with its checksum, and every artifact the store refers to must be present.
//! Only then is the store imported (one transaction); on any refusal what restore wrote is
//! removed again. With `--config-dir`, the config and TLS files are written there too, with
//! controller.toml's `data_dir` set to DIR (for a controller whose config was lost with it).

mod take;

pub use take::take;

use crate::store::{Store, StoreError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// What a fleet backup's manifest says it is.
pub const FORMAT: &str = "fleet-backup";
/// The format this controller writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;
/// The first member: the manifest.
pub const MANIFEST_MEMBER: &str = "fleet-backup.json";
/// The store dump.
pub const STORE_MEMBER: &str = "store.jsonl";
/// The config and TLS files, under `config/`, as restore writes them into `--config-dir`.
pub const CONFIG_FILES: [&str; 5] = [
    "controller.toml",
    "ca.pem",
    "ca.key",
    "controller.pem",
    "controller.key",
];
/// The largest manifest read (a manifest lists one line per artifact).
const MAX_MANIFEST_BYTES: u64 = 64 << 20;
/// The largest config or TLS file read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The first member of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    pub format_version: u32,
    /// The version of the fleet-controller that wrote it.
    pub controller_version: String,
    pub created_unix_ms: i64,
    /// The store backend the dump was exported from (`redb`).
    pub store_backend: String,
    pub members: Vec<Member>,
}

/// One member of a backup after the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub path: String,
    pub size: u64,
    /// Lowercase hex.
    pub sha256: String,
}

#[derive(Debug, Error)]
pub enum BackupError {
    #[error("{path} exists: choose a new name for the backup, or move the old one aside")]
    Exists { path: PathBuf },
    #[error("cannot write the backup to {path}: {source}; pass --to a path in a directory you can write")]
    Unwritable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a fleet backup ({why}): pass --from a file written by `fleet-controller backup`")]
    NotABackup { path: PathBuf, why: String },
    #[error("{path} is damaged or truncated ({why}): nothing was restored; restore from another copy of the backup")]
    Damaged { path: PathBuf, why: String },
    #[error("{path} was made by a newer fleet-controller ({controller_version}, backup format {format_version}); this one ({}) reads backup format {FORMAT_VERSION} and older: restore with fleet-controller {controller_version} or newer", env!("CARGO_PKG_VERSION"))]
    Newer {
        path: PathBuf,
        controller_version: String,
        format_version: u32,
    },
    #[error("the data directory {path} is not empty: restore fills an empty one; pass --data-dir with a new or empty directory (move the old one aside first)")]
    NotEmpty { path: PathBuf },
    #[error("{path} exists: restore writes the config and TLS files into a directory without them; pass --config-dir with a new or empty directory, or leave it out to keep your config")]
    ConfigExists { path: PathBuf },
    #[error("{0}")]
    Controller(String),
    #[error("artifact {digest}, which release records refer to, {why}: run the backup again (and check the controller's disk)")]
    Artifact { digest: String, why: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl BackupError {
    /// 2 for bad input the operator can fix by changing the command, 3 when the controller
    /// could not be reached or refused, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            BackupError::Exists { .. }
            | BackupError::Unwritable { .. }
            | BackupError::NotABackup { .. }
            | BackupError::Damaged { .. }
            | BackupError::Newer { .. }
            | BackupError::NotEmpty { .. }
            | BackupError::ConfigExists { .. } => 2,
            BackupError::Controller(_) => 3,
            _ => 1,
        }
    }
}

/// The path of an artifact member.
fn artifact_member(digest: &str) -> String {
    format!("artifacts/sha256/{}", &digest["sha256:".len()..])
}

fn is_hex_digest(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The file a backup is written to: a temporary file beside it until [`Target::finish`].
pub struct Target {
    path: PathBuf,
    temp: tempfile::NamedTempFile,
}

impl Target {
    /// Refuses an existing `path`, and one whose directory cannot be written, before anything
    /// else is done.
    pub fn create(path: &Path) -> Result<Target, BackupError> {
        if path.symlink_metadata().is_ok() {
            return Err(BackupError::Exists {
                path: path.to_path_buf(),
            });
        }
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        // 0600 whatever the umask: tempfile creates it so.
        let temp = tempfile::Builder::new()
            .prefix(".fleet-backup-")
            .suffix(".partial")
            .tempfile_in(dir)
            .map_err(|source| BackupError::Unwritable {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Target {
            path: path.to_path_buf(),
            temp,
        })
    }

    /// A scratch file beside the target (deleted when dropped), for the store dump.
    fn scratch(&self) -> Result<std::fs::File, BackupError> {
        let dir = self.temp.path().parent().unwrap_or(Path::new("."));
        tempfile::tempfile_in(dir).map_err(|source| BackupError::Unwritable {
            path: self.path.clone(),
            source,
        })
    }

    fn unwritable(&self, source: std::io::Error) -> BackupError {
        BackupError::Unwritable {
            path: self.path.clone(),
            source,
        }
    }
}

/// What goes into a backup.
pub struct Contents {
    /// The store dump, read from its start.
    pub store_dump: std::fs::File,
    /// The config and TLS files by their name in [`CONFIG_FILES`].
    pub config: BTreeMap<&'static str, Vec<u8>>,
    /// The data directory the artifacts are read from.
    pub data_dir: PathBuf,
    /// The artifacts the dump refers to.
    pub artifact_digests: BTreeSet<String>,
}

/// Reads the config and TLS files controller.toml names, for a backup.
pub fn read_config_files(
    config_path: &Path,
    tls: &crate::config::TlsPaths,
) -> Result<BTreeMap<&'static str, Vec<u8>>, BackupError> {
    let mut files = BTreeMap::new();
    for (name, path) in [
        ("controller.toml", config_path),
        ("ca.pem", tls.ca.as_path()),
        ("ca.key", tls.ca_key.as_path()),
        ("controller.pem", tls.cert.as_path()),
        ("controller.key", tls.key.as_path()),
    ] {
        let bytes = std::fs::read(path).map_err(|source| BackupError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        files.insert(name, bytes);
    }
    Ok(files)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    n_bytes: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.n_bytes += n as u64;
        Ok(n)
    }
}

fn hashing<R: Read>(inner: R) -> Hashing<R> {
    Hashing {
        inner,
        hasher: Sha256::new(),
        n_bytes: 0,
    }
}

fn tar_header(size: u64, mtime_secs: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(size);
    header.set_mode(0o600);
    header.set_mtime(mtime_secs);
    header
}

/// Writes the backup: the manifest first (the store dump and config files are hashed before,
/// an artifact's sha256 is its name), then every member; an artifact whose bytes on disk do
/// not match its name fails it. Renamed into place, 0600, once complete and synced.
pub fn write(target: Target, mut contents: Contents) -> Result<Manifest, BackupError> {
    let created_unix_ms = fleet_proto::now_unix_ms();
    let mtime = (created_unix_ms / 1000).max(0) as u64;
    let mut members = Vec::new();
    let mut dump_hash = hashing(&mut contents.store_dump);
    std::io::copy(&mut dump_hash, &mut std::io::sink()).map_err(|e| target.unwritable(e))?;
    members.push(Member {
        path: STORE_MEMBER.into(),
        size: dump_hash.n_bytes,
        sha256: hex::encode(dump_hash.hasher.finalize()),
    });
    for (name, bytes) in &contents.config {
        members.push(Member {
            path: format!("config/{name}"),
            size: bytes.len() as u64,
            sha256: sha256_hex(bytes),
        });
    }
    let mut artifact_files = Vec::new();
    for digest in &contents.artifact_digests {
        let path =
            crate::artifacts::artifact_path(&contents.data_dir, digest).ok_or_else(|| {
                BackupError::Artifact {
                    digest: digest.clone(),
                    why: "is not a sha256 digest".into(),
                }
            })?;
        let file = std::fs::File::open(&path).map_err(|e| BackupError::Artifact {
            digest: digest.clone(),
            why: format!("cannot be read at {}: {e}", path.display()),
        })?;
        let size = file
            .metadata()
            .map_err(|e| BackupError::Read {
                path: path.clone(),
                source: e,
            })?
            .len();
        members.push(Member {
            path: artifact_member(digest),
            size,
            sha256: digest["sha256:".len()..].to_string(),
        });
        artifact_files.push((digest.clone(), file, size));
    }
    let manifest = Manifest {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        controller_version: env!("CARGO_PKG_VERSION").into(),
        created_unix_ms,
        store_backend: "redb".into(),
        members,
    };

    let file = target
        .temp
        .as_file()
        .try_clone()
        .map_err(|e| target.unwritable(e))?;
    let gz = flate2::write::GzEncoder::new(
        std::io::BufWriter::new(file),
        flate2::Compression::default(),
    );
    let mut tar = tar::Builder::new(gz);
    let manifest_bytes = serde_json::to_vec_pretty(&manifest).expect("a manifest serialises");
    let io = |e: std::io::Error| target.unwritable(e);
    tar.append_data(
        &mut tar_header(manifest_bytes.len() as u64, mtime),
        MANIFEST_MEMBER,
        manifest_bytes.as_slice(),
    )
    .map_err(io)?;
    use std::io::Seek;
    contents
        .store_dump
        .seek(std::io::SeekFrom::Start(0))
        .map_err(io)?;
    tar.append_data(
        &mut tar_header(manifest.members[0].size, mtime),
        STORE_MEMBER,
        &mut contents.store_dump,
    )
    .map_err(io)?;
    for (name, bytes) in &contents.config {
        tar.append_data(
            &mut tar_header(bytes.len() as u64, mtime),
            format!("config/{name}"),
            bytes.as_slice(),
        )
        .map_err(io)?;
    }
    for (digest, file, size) in artifact_files {
        let mut reader = hashing(file.take(size));
        tar.append_data(
            &mut tar_header(size, mtime),
            artifact_member(&digest),
            &mut reader,
        )
        .map_err(io)?;
        if hex::encode(reader.hasher.finalize()) != digest["sha256:".len()..] {
            return Err(BackupError::Artifact {
                digest,
                why: "does not match its digest on the controller's disk".into(),
            });
        }
    }
    let gz = tar.into_inner().map_err(io)?;
    let buffered = gz.finish().map_err(io)?;
    let file = buffered.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    let Target { path, temp } = target;
    temp.persist_noclobber(&path).map_err(|e| {
        if path.exists() {
            BackupError::Exists { path: path.clone() }
        } else {
            BackupError::Unwritable {
                path: path.clone(),
                source: e.error,
            }
        }
    })?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(dir) = std::fs::File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    Ok(manifest)
}

/// What [`restore`] did.
#[derive(Debug)]
pub struct Restored {
    pub manifest: Manifest,
    pub n_artifacts: usize,
    /// Where the config and TLS files were written, when asked.
    pub config_dir: Option<PathBuf>,
}

/// Removes what a restore wrote when it does not finish.
struct Cleanup {
    data_dir: PathBuf,
    /// Whether restore made the directory (then it goes) or found it empty (then it is emptied).
    made_it: bool,
    done: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if self.made_it {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        } else if let Ok(entries) = std::fs::read_dir(&self.data_dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                let _ = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
            }
        }
    }
}

/// Whether `dir` is absent or an empty directory.
fn is_absent_or_empty(dir: &Path) -> Result<bool, BackupError> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(source) => Err(BackupError::Read {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// Which member a path names, when it is one a backup may hold.
fn member_is_known(path: &str) -> bool {
    path == STORE_MEMBER
        || path
            .strip_prefix("config/")
            .is_some_and(|name| CONFIG_FILES.contains(&name))
        || path
            .strip_prefix("artifacts/sha256/")
            .is_some_and(is_hex_digest)
}

/// Fills the empty (or absent) `data_dir` from the backup `from`, and writes its config and TLS
/// files into `config_dir` when given; see the module doc for what is checked.
pub fn restore(
    from: &Path,
    data_dir: &Path,
    config_dir: Option<&Path>,
) -> Result<Restored, BackupError> {
    if !is_absent_or_empty(data_dir)? {
        return Err(BackupError::NotEmpty {
            path: data_dir.to_path_buf(),
        });
    }
    if let Some(config_dir) = config_dir {
        for name in CONFIG_FILES {
            let path = config_dir.join(name);
            if path.symlink_metadata().is_ok() {
                return Err(BackupError::ConfigExists { path });
            }
        }
    }
    let file = std::fs::File::open(from).map_err(|source| BackupError::Read {
        path: from.to_path_buf(),
        source,
    })?;
    let not_a_backup = |why: String| BackupError::NotABackup {
        path: from.to_path_buf(),
        why,
    };
    let damaged = |why: String| BackupError::Damaged {
        path: from.to_path_buf(),
        why,
    };
    let mut reader = std::io::BufReader::new(file);
    {
        use std::io::BufRead;
        let start = reader.fill_buf().map_err(|source| BackupError::Read {
            path: from.to_path_buf(),
            source,
        })?;
        if !start.starts_with(&[0x1f, 0x8b]) {
            return Err(not_a_backup("it is not gzip-compressed".into()));
        }
    }

    let made_it = !data_dir.exists();
    std::fs::create_dir_all(data_dir).map_err(|source| BackupError::Write {
        path: data_dir.to_path_buf(),
        source,
    })?;
    let mut cleanup = Cleanup {
        data_dir: data_dir.to_path_buf(),
        made_it,
        done: false,
    };
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700)).map_err(
            |source| BackupError::Write {
                path: data_dir.to_path_buf(),
                source,
            },
        )?;
    }
    let staged_dump = data_dir.join(".restore-store.jsonl");
    let artifacts_dir = data_dir.join("artifacts").join("sha256");
    std::fs::create_dir_all(&artifacts_dir).map_err(|source| BackupError::Write {
        path: artifacts_dir.clone(),
        source,
    })?;

    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(reader));
    let mut entries = archive.entries().map_err(|e| not_a_backup(e.to_string()))?;
    // The manifest, first.
    let manifest: Manifest = {
        let mut entry = match entries.next() {
            Some(Ok(entry)) => entry,
            Some(Err(e)) => return Err(not_a_backup(e.to_string())),
            None => return Err(not_a_backup("it is an empty archive".into())),
        };
        let path = entry
            .path()
            .map_err(|e| not_a_backup(e.to_string()))?
            .to_string_lossy()
            .into_owned();
        if path != MANIFEST_MEMBER {
            return Err(not_a_backup(format!(
                "its first member is {path:?}, not {MANIFEST_MEMBER}"
            )));
        }
        let mut bytes = Vec::new();
        (&mut entry)
            .take(MAX_MANIFEST_BYTES)
            .read_to_end(&mut bytes)
            .map_err(|e| damaged(format!("its manifest cannot be read: {e}")))?;
        // The version first, so a newer manifest of another shape is still told apart.
        let version: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| not_a_backup(format!("its manifest is not JSON: {e}")))?;
        if version["format"] != FORMAT {
            return Err(not_a_backup(format!(
                "its manifest's format is {}, not {FORMAT:?}",
                version["format"]
            )));
        }
        let format_version = version["format_version"].as_u64().unwrap_or(0);
        if format_version > u64::from(FORMAT_VERSION) {
            return Err(BackupError::Newer {
                path: from.to_path_buf(),
                controller_version: version["controller_version"]
                    .as_str()
                    .unwrap_or("unknown")
                    .to_string(),
                format_version: format_version.min(u64::from(u32::MAX)) as u32,
            });
        }
        serde_json::from_value(version)
            .map_err(|e| not_a_backup(format!("its manifest cannot be read: {e}")))?
    };
    let mut expected: BTreeMap<String, &Member> = BTreeMap::new();
    for member in &manifest.members {
        if !member_is_known(&member.path) || !is_hex_digest(&member.sha256) {
            return Err(damaged(format!(
                "its manifest lists {:?}, which no backup holds",
                member.path
            )));
        }
        if let Some(hex) = member.path.strip_prefix("artifacts/sha256/") {
            if hex != member.sha256 {
                return Err(damaged(format!(
                    "its manifest gives artifact {hex} another sha256"
                )));
            }
        }
        expected.insert(member.path.clone(), member);
    }
    if !expected.contains_key(STORE_MEMBER) {
        return Err(damaged("its manifest lists no store dump".into()));
    }

    let mut config_files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut n_artifacts = 0;
    for entry in entries {
        let mut entry = entry.map_err(|e| damaged(e.to_string()))?;
        let path = entry
            .path()
            .map_err(|e| damaged(e.to_string()))?
            .to_string_lossy()
            .into_owned();
        let member = expected.remove(&path).ok_or_else(|| {
            damaged(format!(
                "it holds {path:?}, which its manifest does not list (or twice)"
            ))
        })?;
        if entry.header().entry_type() != tar::EntryType::Regular || entry.size() != member.size {
            return Err(damaged(format!(
                "member {path} is not the file of {} bytes its manifest lists",
                member.size
            )));
        }
        let mut reader = hashing(&mut entry);
        if let Some(name) = path.strip_prefix("config/") {
            let mut bytes = Vec::new();
            (&mut reader)
                .take(MAX_CONFIG_BYTES)
                .read_to_end(&mut bytes)
                .map_err(|e| damaged(format!("member {path}: {e}")))?;
            config_files.insert(name.to_string(), bytes);
        } else {
            let out_path = if path == STORE_MEMBER {
                staged_dump.clone()
            } else {
                n_artifacts += 1;
                data_dir.join(&path)
            };
            let mut out =
                std::fs::File::create(&out_path).map_err(|source| BackupError::Write {
                    path: out_path.clone(),
                    source,
                })?;
            std::io::copy(&mut reader, &mut out).map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof
                    || e.kind() == std::io::ErrorKind::InvalidData
                    || e.kind() == std::io::ErrorKind::InvalidInput
                {
                    damaged(format!("member {path}: {e}"))
                } else {
                    BackupError::Write {
                        path: out_path.clone(),
                        source: e,
                    }
                }
            })?;
            out.sync_all().map_err(|source| BackupError::Write {
                path: out_path.clone(),
                source,
            })?;
        }
        if reader.n_bytes != member.size || hex::encode(reader.hasher.finalize()) != member.sha256 {
            return Err(damaged(format!(
                "member {path} does not match its sha256 in the manifest"
            )));
        }
    }
    if let Some(missing) = expected.keys().next() {
        return Err(damaged(format!(
            "it ends before {missing}, which its manifest lists"
        )));
    }
    // The gzip stream's own checksum and length, at its end.
    let mut rest = archive.into_inner();
    std::io::copy(&mut rest, &mut std::io::sink())
        .map_err(|e| damaged(format!("its gzip stream does not end well: {e}")))?;

    let dump = std::fs::File::open(&staged_dump).map_err(|source| BackupError::Read {
        path: staged_dump.clone(),
        source,
    })?;
    let store = Store::import(data_dir, dump).map_err(|e| match e {
        StoreError::Dump(why) => damaged(format!("its store dump: {why}")),
        other => BackupError::Store(other),
    })?;
    let _ = std::fs::remove_file(&staged_dump);
    let summary = store.export(std::io::sink())?;
    drop(store);
    for digest in &summary.artifact_digests {
        let present =
            crate::artifacts::artifact_path(data_dir, digest).is_some_and(|p| p.is_file());
        if !present {
            return Err(damaged(format!(
                "release records refer to artifact {digest}, which it does not hold"
            )));
        }
    }

    if let Some(config_dir) = config_dir {
        write_config_dir(config_dir, data_dir, &config_files).map_err(|e| match e {
            BackupError::NotABackup { why, .. } => damaged(why),
            other => other,
        })?;
    }
    cleanup.done = true;
    Ok(Restored {
        manifest,
        n_artifacts,
        config_dir: config_dir.map(Path::to_path_buf),
    })
}

/// Writes the backup's config and TLS files into `config_dir` under their usual names, with
/// controller.toml naming them and `data_dir` (absolute).
fn write_config_dir(
    config_dir: &Path,
    data_dir: &Path,
    files: &BTreeMap<String, Vec<u8>>,
) -> Result<(), BackupError> {
    let write_error = |path: &Path, source| BackupError::Write {
        path: path.to_path_buf(),
        source,
    };
    let missing = |name: &str| BackupError::NotABackup {
        path: config_dir.to_path_buf(),
        why: format!("it holds no config/{name}"),
    };
    let toml_text = files
        .get("controller.toml")
        .ok_or_else(|| missing("controller.toml"))?;
    let mut controller: crate::config::ControllerFile =
        toml::from_str(&String::from_utf8_lossy(toml_text)).map_err(|e| {
            BackupError::NotABackup {
                path: config_dir.to_path_buf(),
                why: format!("its controller.toml cannot be read: {e}"),
            }
        })?;
    let data_dir = std::fs::canonicalize(data_dir).map_err(|e| write_error(data_dir, e))?;
    controller.data_dir = data_dir.display().to_string();
    controller.ca = "ca.pem".into();
    controller.ca_key = "ca.key".into();
    controller.cert = "controller.pem".into();
    controller.key = "controller.key".into();
    std::fs::create_dir_all(config_dir).map_err(|e| write_error(config_dir, e))?;
    for name in CONFIG_FILES {
        let bytes = match name {
            "controller.toml" => format!(
                "# Restored by `fleet-controller restore` from a backup.\n{}",
                toml::to_string(&controller).expect("controller.toml serialises")
            )
            .into_bytes(),
            _ => files.get(name).ok_or_else(|| missing(name))?.clone(),
        };
        let mode = if name.ends_with(".key") { 0o600 } else { 0o644 };
        let path = config_dir.join(name);
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .map_err(|e| write_error(&path, e))?;
        file.write_all(&bytes)
            .and_then(|()| file.sync_all())
            .map_err(|e| write_error(&path, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
