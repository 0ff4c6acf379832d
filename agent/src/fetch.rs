//! Artifact download: the `FetchArtifact` server-streaming RPC into
//! `DATA/artifacts/<hex>.partial`. The chunks go to a writer thread that writes (around the page
//! cache, [`crate::direct_io`]) and hashes each one as it comes (the artifact is never held in
//! memory), while the session's runtime goes on
//! receiving and decrypting the next. A cut stream is resumed from the
//! partial file's length; the sha256 of the whole file is compared with the digest before the
//! file is renamed to `DATA/artifacts/<hex>.tar.gz`, so nothing unverified is ever unpacked. A
//! mismatch deletes the partial file and fails.

use crate::direct_io::ArtifactWriter;
use crate::model::{digest_hex, DataLayout};
use fleet_proto::pb;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;
use tokio::io::AsyncReadExt;
use tonic::transport::Channel;

/// Attempts in a row that brought no new byte before a fetch gives up.
const MAX_ATTEMPTS_WITHOUT_PROGRESS: u32 = 5;
/// Attempts in all, progress or not.
const MAX_ATTEMPTS: u32 = 100;
/// A stream that delivers nothing for this long counts as cut.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(30);
/// Chunks that may wait for the writer thread: enough to go on receiving while it writes
/// one block ([`crate::direct_io`]).
const WRITER_QUEUE: usize = 8;
/// Bytes hashed and then copied at a time: well within a core's own cache.
const HASH_PIECE: usize = 64 << 10;
/// The largest gRPC message the agent accepts (one chunk).
const MAX_CHUNK_BYTES: usize = 16 << 20;

#[derive(Debug, Error)]
pub enum FetchError {
    #[error("artifact digest {0:?} is invalid: expected sha256:<64 lowercase hex>")]
    BadDigest(String),
    #[error("cannot write the artifact download {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot fetch artifact {digest} from the controller: {message}")]
    Interrupted { digest: String, message: String },
    #[error("artifact {digest} failed verification (got {actual}); the partial download was deleted and the next attempt starts afresh")]
    Mismatch { digest: String, actual: String },
    #[error("artifact {digest} is larger than the {expected} bytes announced; the partial download was deleted")]
    TooLarge { digest: String, expected: u64 },
}

/// Downloads artifacts into the data directory; clones share one connection.
#[derive(Clone)]
pub struct Fetcher {
    /// The current channel to the controller (replaced when the certificate is renewed).
    channel: tokio::sync::watch::Receiver<Channel>,
    layout: DataLayout,
    /// One download at a time: two apps of the same release never write one partial file.
    one_at_a_time: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl Fetcher {
    pub fn new(channel: tokio::sync::watch::Receiver<Channel>, layout: DataLayout) -> Fetcher {
        Fetcher {
            channel,
            layout,
            one_at_a_time: Default::default(),
        }
    }

    /// The verified artifact for `digest`, if it is in the local cache.
    pub fn cached(&self, digest: &str) -> Option<PathBuf> {
        let path = self.layout.artifact_file(digest_hex(digest));
        path.is_file().then_some(path)
    }

    /// Returns the verified artifact's path, downloading (or resuming) it when not cached.
    /// `expected_size` is the announced size, or 0 when unknown.
    pub async fn fetch(&self, digest: &str, expected_size: u64) -> Result<PathBuf, FetchError> {
        if !fleet_proto::artifact::check_digest(digest) {
            return Err(FetchError::BadDigest(digest.to_string()));
        }
        // Held by every attempt's writer thread too: a download dropped mid-way (its rollout
        // replaced) still writes what it had queued, and a new download of the same file
        // waits for that.
        let guard = std::sync::Arc::new(self.one_at_a_time.clone().lock_owned().await);
        if let Some(path) = self.cached(digest) {
            return Ok(path);
        }
        let hex = digest_hex(digest);
        let partial = self.layout.partial_file(hex);
        let done = self.layout.artifact_file(hex);
        let mut without_progress = 0;
        let mut backoff = Duration::from_millis(200);
        for attempt in 1..=MAX_ATTEMPTS {
            match self
                .fetch_once(digest, expected_size, &partial, guard.clone())
                .await
            {
                Ok(Attempt::Complete(actual)) => {
                    if actual != digest {
                        let _ = tokio::fs::remove_file(&partial).await;
                        return Err(FetchError::Mismatch {
                            digest: digest.to_string(),
                            actual,
                        });
                    }
                    tokio::fs::rename(&partial, &done)
                        .await
                        .map_err(|source| FetchError::Io {
                            path: done.clone(),
                            source,
                        })?;
                    sync_dir(&self.layout.artifacts_dir()).await;
                    return Ok(done);
                }
                Ok(Attempt::Cut {
                    progressed,
                    message,
                }) => {
                    if progressed {
                        without_progress = 0;
                        backoff = Duration::from_millis(200);
                    } else {
                        without_progress += 1;
                    }
                    if without_progress >= MAX_ATTEMPTS_WITHOUT_PROGRESS || attempt == MAX_ATTEMPTS
                    {
                        return Err(FetchError::Interrupted {
                            digest: digest.to_string(),
                            message,
                        });
                    }
                    tracing::warn!(%digest, attempt, "artifact download cut, resuming: {message}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(e),
            }
        }
        Err(FetchError::Interrupted {
            digest: digest.to_string(),
            message: format!("gave up after {MAX_ATTEMPTS} attempts"),
        })
    }

    /// One request from the partial file's current length to the end of the stream.
    async fn fetch_once(
        &self,
        digest: &str,
        expected_size: u64,
        partial: &Path,
        guard: std::sync::Arc<tokio::sync::OwnedMutexGuard<()>>,
    ) -> Result<Attempt, FetchError> {
        let io_error = |source| FetchError::Io {
            path: partial.to_path_buf(),
            source,
        };
        let mut offset = match tokio::fs::metadata(partial).await {
            Ok(meta) => meta.len(),
            Err(_) => 0,
        };
        if expected_size > 0 && offset > expected_size {
            tokio::fs::remove_file(partial).await.map_err(io_error)?;
            offset = 0;
        }
        let hasher = hash_prefix(partial, offset).await.map_err(io_error)?;
        let file = ArtifactWriter::open(partial, offset, expected_size.saturating_sub(offset))
            .map_err(io_error)?;
        // Chunks (shared `Bytes`, no copy) go to a blocking thread that writes and hashes them.
        let (chunks, mut chunk_rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(WRITER_QUEUE);
        let writer = tokio::task::spawn_blocking(move || {
            let _guard = guard;
            let (mut file, mut hasher) = (file, hasher);
            while let Some(chunk) = chunk_rx.blocking_recv() {
                // Piece by piece, so the copy into the write buffer reads what hashing has
                // just brought into the CPU cache, instead of the whole chunk from memory twice.
                for piece in chunk.chunks(HASH_PIECE) {
                    hasher.update(piece);
                    file.write(piece)?;
                }
            }
            Ok::<_, std::io::Error>((file.finish()?, hasher))
        });

        let started = std::time::Instant::now();
        let mut written: u64 = 0;
        let mut cut: Option<String> = None;
        if expected_size == 0 || offset < expected_size {
            let mut client =
                pb::agent_service_client::AgentServiceClient::new(self.channel.borrow().clone())
                    .max_decoding_message_size(MAX_CHUNK_BYTES);
            let request = pb::FetchArtifactRequest {
                digest: digest.to_string(),
                offset,
            };
            match client.fetch_artifact(request).await {
                Err(status) => cut = Some(status_message(&status)),
                Ok(response) => {
                    let mut stream = response.into_inner();
                    loop {
                        match tokio::time::timeout(CHUNK_TIMEOUT, stream.message()).await {
                            Err(_) => {
                                cut = Some("no data for 30s".into());
                                break;
                            }
                            Ok(Err(status)) => {
                                cut = Some(status_message(&status));
                                break;
                            }
                            Ok(Ok(None)) => break,
                            Ok(Ok(Some(chunk))) => {
                                let n = chunk.data.len() as u64;
                                if expected_size > 0 && offset + written + n > expected_size {
                                    drop(chunks);
                                    let _ = writer.await;
                                    let _ = tokio::fs::remove_file(partial).await;
                                    return Err(FetchError::TooLarge {
                                        digest: digest.to_string(),
                                        expected: expected_size,
                                    });
                                }
                                if chunks.send(chunk.data).await.is_err() {
                                    // The writer stopped on an error; it is reported below.
                                    break;
                                }
                                written += n;
                            }
                        }
                    }
                }
            }
        }
        drop(chunks);
        let (file, hasher) = writer
            .await
            .map_err(|e| io_error(std::io::Error::other(e)))?
            .map_err(io_error)?;
        if let Some(message) = cut {
            return Ok(Attempt::Cut {
                progressed: written > 0,
                message,
            });
        }
        if expected_size > 0 && offset + written < expected_size {
            return Ok(Attempt::Cut {
                progressed: written > 0,
                message: format!(
                    "stream ended after {} of {expected_size} bytes",
                    offset + written
                ),
            });
        }
        let received = started.elapsed();
        tokio::task::spawn_blocking(move || file.sync_all())
            .await
            .map_err(|e| io_error(std::io::Error::other(e)))?
            .map_err(io_error)?;
        tracing::info!(
            %digest,
            bytes = written,
            received_ms = received.as_millis() as u64,
            synced_ms = (started.elapsed() - received).as_millis() as u64,
            "artifact received"
        );
        Ok(Attempt::Complete(format!(
            "sha256:{}",
            hex::encode(hasher.finalize())
        )))
    }
}

enum Attempt {
    /// The stream ended; the digest of everything in the partial file.
    Complete(String),
    /// The stream broke; resume from the partial file's length.
    Cut { progressed: bool, message: String },
}

/// Hashes the first `len` bytes already in the partial file, to continue from there.
async fn hash_prefix(path: &Path, len: u64) -> std::io::Result<Sha256> {
    let mut hasher = Sha256::new();
    if len == 0 {
        return Ok(hasher);
    }
    let mut file = tokio::fs::File::open(path).await?.take(len);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            return Ok(hasher);
        }
        hasher.update(&buf[..n]);
    }
}

async fn sync_dir(dir: &Path) {
    if let Ok(dir) = tokio::fs::File::open(dir).await {
        let _ = dir.sync_all().await;
    }
}

fn status_message(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}
