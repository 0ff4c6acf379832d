//! The content-addressed artifact store: `DATA/artifacts/sha256/<hex>`. An upload is streamed
//! to a temporary file while it is hashed (never whole in memory), checked as a release
//! artifact, and only then renamed into place under its digest. A stored artifact never
//! changes; the same bytes uploaded twice are stored once. A copy another controller sends
//! (`crate::replicas`) goes the same way, and is kept only when its bytes hash to the digest
//! it was sent under.

use crate::config::UploadLimits;
use fleet_proto::artifact::{self, ArtifactError, Limits};
use fleet_proto::manifest::Manifest;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ArtifactStoreError {
    #[error("artifact store at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("artifact is over the {limit} byte limit")]
    TooLarge { limit: u64 },
    #[error(transparent)]
    Invalid(#[from] ArtifactError),
    #[error("{0} release uploads are under way, the most the controller takes at once: try again when one has ended")]
    Busy(usize),
    #[error("the bytes received for {expected} hash to {actual}: the copy was dropped")]
    DigestMismatch { expected: String, actual: String },
    #[error("the controller's disk has {free_mb} MiB free, and uploads leave {reserve_mb} MiB free (min_free_disk_mb in controller.toml): delete old artifacts or grow the disk, then upload again")]
    DiskFull { free_mb: u64, reserve_mb: u64 },
}

/// The largest artifact accepted.
pub const MAX_ARTIFACT_BYTES: u64 = 4 << 30;

/// How often (in bytes written) an upload checks the disk's free space again.
const FREE_SPACE_CHECK_BYTES: u64 = 64 << 20;

#[derive(Debug, Clone)]
pub struct ArtifactStore {
    root: PathBuf,
    limits: UploadLimits,
    /// Uploads in progress, shared by every clone.
    uploads: Arc<AtomicUsize>,
}

/// An upload in progress: bytes go to a temporary file and into the hash.
pub struct Upload {
    file: std::io::BufWriter<std::fs::File>,
    temp: tempfile::TempPath,
    hasher: Sha256,
    size: u64,
    /// Where the next free-space check is due.
    next_check: u64,
    root: PathBuf,
    min_free_bytes: u64,
    /// `None` for a copy from another controller: those do not count against the uploads
    /// under way (one at a time per digest, see `crate::replicas`).
    _slot: Option<UploadSlot>,
}

/// One place among the uploads in progress, given back when the upload ends either way.
struct UploadSlot(Arc<AtomicUsize>);

impl Drop for UploadSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Fails when the disk holding `dir` has less than `reserve` bytes free.
fn check_free_space(dir: &Path, reserve: u64) -> Result<(), ArtifactStoreError> {
    if reserve == 0 {
        return Ok(());
    }
    let stat = nix::sys::statvfs::statvfs(dir).map_err(|e| ArtifactStoreError::Io {
        path: dir.to_path_buf(),
        source: e.into(),
    })?;
    let free = stat.blocks_available() as u64 * stat.fragment_size() as u64;
    if free < reserve {
        return Err(ArtifactStoreError::DiskFull {
            free_mb: free >> 20,
            reserve_mb: reserve >> 20,
        });
    }
    Ok(())
}

/// An artifact that is stored and checked.
#[derive(Debug, Clone)]
pub struct StoredArtifact {
    pub digest: String,
    pub size: u64,
    pub manifest: Manifest,
    /// The bytes of all its entries.
    pub unpacked_size: u64,
}

/// An upload that passed the checks and is not stored yet; dropped, its file is deleted.
pub struct CheckedArtifact {
    pub stored: StoredArtifact,
    temp: tempfile::TempPath,
}

impl ArtifactStore {
    pub fn open(
        data_dir: &Path,
        limits: UploadLimits,
    ) -> Result<ArtifactStore, ArtifactStoreError> {
        let root = data_dir.join("artifacts");
        for dir in [root.join("sha256"), root.join("tmp")] {
            std::fs::create_dir_all(&dir).map_err(|source| ArtifactStoreError::Io {
                path: dir.clone(),
                source,
            })?;
        }
        Ok(ArtifactStore {
            root,
            limits,
            uploads: Arc::new(AtomicUsize::new(0)),
        })
    }

    pub fn limits(&self) -> UploadLimits {
        self.limits
    }

    fn io(&self, source: std::io::Error) -> ArtifactStoreError {
        ArtifactStoreError::Io {
            path: self.root.clone(),
            source,
        }
    }

    /// Starts an upload into a temporary file (removed if the upload is dropped unfinished),
    /// unless as many uploads as the limits allow are under way or the disk is short of the
    /// free space uploads must leave.
    pub fn begin_upload(&self) -> Result<Upload, ArtifactStoreError> {
        let max = self.limits.max_concurrent;
        let taken = self
            .uploads
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            });
        if taken.is_err() {
            return Err(ArtifactStoreError::Busy(max));
        }
        let slot = UploadSlot(self.uploads.clone());
        self.begin(Some(slot))
    }

    /// Starts receiving a copy of an artifact from another controller, like an upload but
    /// outside the limit of uploads under way (the disk's free space is checked all the same).
    pub fn begin_replica(&self) -> Result<Upload, ArtifactStoreError> {
        self.begin(None)
    }

    fn begin(&self, slot: Option<UploadSlot>) -> Result<Upload, ArtifactStoreError> {
        let tmp = self.root.join("tmp");
        check_free_space(&tmp, self.limits.min_free_bytes)?;
        let named = tempfile::NamedTempFile::new_in(&tmp).map_err(|e| self.io(e))?;
        let (file, temp) = named.into_parts();
        Ok(Upload {
            file: std::io::BufWriter::with_capacity(1 << 20, file),
            temp,
            hasher: Sha256::new(),
            size: 0,
            next_check: FREE_SPACE_CHECK_BYTES,
            root: tmp,
            min_free_bytes: self.limits.min_free_bytes,
            _slot: slot,
        })
    }

    /// Checks a finished upload (gzip tarball, safe entries, valid fleet.toml) without storing
    /// it yet: the caller may still refuse it, and a dropped [`CheckedArtifact`] is deleted.
    pub fn check_upload(&self, upload: Upload) -> Result<CheckedArtifact, ArtifactStoreError> {
        let Upload {
            file,
            temp,
            hasher,
            size,
            ..
        } = upload;
        let file = file.into_inner().map_err(|e| self.io(e.into_error()))?;
        file.sync_all().map_err(|e| self.io(e))?;
        drop(file);
        let digest = format!("sha256:{}", hex::encode(hasher.finalize()));
        let reader = std::io::BufReader::new(std::fs::File::open(&temp).map_err(|e| self.io(e))?);
        // The unpacked size may not pass the limit nor the compression ratio (at least 1 MiB
        // unpacked is always allowed): a decompression bomb is stopped as it is read.
        let by_ratio = size
            .saturating_mul(self.limits.max_compression_ratio)
            .max(1 << 20);
        let max_total = self.limits.max_unpacked_bytes.min(by_ratio);
        let limits = Limits {
            max_total_bytes: max_total.min(Limits::default().max_total_bytes),
            ..Limits::default()
        };
        let (manifest, unpacked_size) = match artifact::read_artifact_sized(reader, None, limits) {
            Ok(read) => read,
            // Over the total (not one entry's limit, nor the metadata's): say which limit.
            Err(ArtifactError::TooLarge(why))
                if why.ends_with("bytes in all") && by_ratio < self.limits.max_unpacked_bytes =>
            {
                return Err(ArtifactStoreError::Invalid(ArtifactError::TooLarge(format!(
                    "it unpacks to more than {} times its {size} bytes (max_compression_ratio in controller.toml): a decompression bomb, or data that belongs outside the artifact",
                    self.limits.max_compression_ratio
                ))));
            }
            Err(ArtifactError::TooLarge(why)) if why.ends_with("bytes in all") => {
                return Err(ArtifactStoreError::Invalid(ArtifactError::TooLarge(
                    format!(
                        "over {} MiB unpacked (max_unpacked_mb in controller.toml)",
                        self.limits.max_unpacked_bytes >> 20
                    ),
                )));
            }
            Err(e) => return Err(e.into()),
        };
        Ok(CheckedArtifact {
            stored: StoredArtifact {
                digest,
                size,
                manifest,
                unpacked_size,
            },
            temp,
        })
    }

    /// Checks a copy received from another controller as an upload is checked, and that its
    /// bytes hash to `expected`, the digest it was sent under; dropped otherwise.
    pub fn check_replica(
        &self,
        upload: Upload,
        expected: &str,
    ) -> Result<CheckedArtifact, ArtifactStoreError> {
        // The digest first: bytes that are not what was asked for are not worth unpacking.
        let actual = format!("sha256:{}", hex::encode(upload.hasher.clone().finalize()));
        if actual != expected {
            return Err(ArtifactStoreError::DigestMismatch {
                expected: expected.to_string(),
                actual,
            });
        }
        self.check_upload(upload)
    }

    /// Whether the artifact with `digest` is stored here.
    pub fn holds(&self, digest: &str) -> bool {
        self.path_of(digest).is_some_and(|path| path.is_file())
    }

    /// Stores a checked artifact under its digest.
    pub fn keep(&self, checked: CheckedArtifact) -> Result<StoredArtifact, ArtifactStoreError> {
        let CheckedArtifact { stored, temp } = checked;
        let path = self
            .path_of(&stored.digest)
            .expect("digest was just computed");
        if path.exists() {
            // Same bytes already stored: keep the existing file, drop the temporary one.
            drop(temp);
        } else {
            temp.persist(&path).map_err(|e| self.io(e.error))?;
        }
        Ok(stored)
    }

    /// Deletes the artifact with `digest` (once no release uses it); one that is not there is
    /// fine.
    pub fn delete(&self, digest: &str) -> Result<(), ArtifactStoreError> {
        let Some(path) = self.path_of(digest) else {
            return Ok(());
        };
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io(e)),
        }
    }

    /// Where the artifact with `digest` lives, or None when the digest is malformed.
    pub fn path_of(&self, digest: &str) -> Option<PathBuf> {
        if !artifact::check_digest(digest) {
            return None;
        }
        Some(self.root.join("sha256").join(&digest["sha256:".len()..]))
    }
}

/// Where the artifact with `digest` lives in the data directory `data_dir`, without opening
/// the artifact store (a backup reads it beside a running controller; a restore fills it), or
/// None when the digest is malformed.
pub fn artifact_path(data_dir: &Path, digest: &str) -> Option<PathBuf> {
    if !artifact::check_digest(digest) {
        return None;
    }
    Some(
        data_dir
            .join("artifacts")
            .join("sha256")
            .join(&digest["sha256:".len()..]),
    )
}

impl Upload {
    /// Appends bytes to the upload.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), ArtifactStoreError> {
        self.size += bytes.len() as u64;
        if self.size > MAX_ARTIFACT_BYTES {
            return Err(ArtifactStoreError::TooLarge {
                limit: MAX_ARTIFACT_BYTES,
            });
        }
        if self.size >= self.next_check {
            self.next_check = self.size + FREE_SPACE_CHECK_BYTES;
            check_free_space(&self.root, self.min_free_bytes)?;
        }
        self.hasher.update(bytes);
        self.file
            .write_all(bytes)
            .map_err(|source| ArtifactStoreError::Io {
                path: self.temp.to_path_buf(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_by_digest_and_refuses_bad_artifacts() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path(), UploadLimits::default()).unwrap();
        let bytes =
            artifact::build_artifact(&[("fleet.toml", b"[process]\ncommand = [\"x\"]\n", 0o644)])
                .unwrap();
        let mut upload = store.begin_upload().unwrap();
        upload.write(&bytes).unwrap();
        let stored = store.keep(store.check_upload(upload).unwrap()).unwrap();
        assert_eq!(stored.digest, artifact::digest_of(&bytes));
        assert_eq!(
            std::fs::read(store.path_of(&stored.digest).unwrap()).unwrap(),
            bytes
        );

        // Checked, then refused by the caller: nothing is kept.
        let other =
            artifact::build_artifact(&[("fleet.toml", b"[process]\ncommand = [\"y\"]\n", 0o644)])
                .unwrap();
        let mut upload = store.begin_upload().unwrap();
        upload.write(&other).unwrap();
        let checked = store.check_upload(upload).unwrap();
        let digest = checked.stored.digest.clone();
        drop(checked);
        assert!(!store.path_of(&digest).unwrap().exists());

        let mut upload = store.begin_upload().unwrap();
        upload.write(b"not a tarball").unwrap();
        assert!(store.check_upload(upload).is_err());
        assert_eq!(
            std::fs::read_dir(dir.path().join("artifacts/tmp"))
                .unwrap()
                .count(),
            0
        );
        assert!(store.path_of("sha256:../../etc").is_none());
    }

    #[test]
    fn a_copy_is_kept_only_under_the_digest_its_bytes_hash_to() {
        let dir = tempfile::tempdir().unwrap();
        let limits = UploadLimits {
            max_concurrent: 1,
            min_free_bytes: 0,
            ..UploadLimits::default()
        };
        let store = ArtifactStore::open(dir.path(), limits).unwrap();
        let bytes =
            artifact::build_artifact(&[("fleet.toml", b"[process]\ncommand = [\"x\"]\n", 0o644)])
                .unwrap();
        let digest = artifact::digest_of(&bytes);
        // An upload under way takes the one slot; a copy does not need one.
        let _upload = store.begin_upload().unwrap();
        assert!(matches!(
            store.begin_upload(),
            Err(ArtifactStoreError::Busy(1))
        ));

        let mut wrong = store.begin_replica().unwrap();
        wrong.write(&bytes[..bytes.len() - 1]).unwrap();
        let refused = store.check_replica(wrong, &digest).err().unwrap();
        assert!(
            matches!(&refused, ArtifactStoreError::DigestMismatch { expected, .. } if *expected == digest),
            "{refused}"
        );
        assert!(!store.holds(&digest));

        let mut copy = store.begin_replica().unwrap();
        copy.write(&bytes).unwrap();
        let stored = store
            .keep(store.check_replica(copy, &digest).unwrap())
            .unwrap();
        assert_eq!(stored.digest, digest);
        assert!(store.holds(&digest));
        assert!(!store.holds("sha256:nonsense"));
        // Only the upload under way is left in the temporary area.
        assert_eq!(
            std::fs::read_dir(dir.path().join("artifacts/tmp"))
                .unwrap()
                .count(),
            1
        );
    }
}
