//! Artifact download: the `FetchArtifact` server-streaming RPC into
//! `DATA/artifacts/<hex>.partial`. The chunks go to a writer thread that writes (around the page
//! cache, [`crate::direct_io`]) and hashes each one as it comes (the artifact is never held in
//! memory), while the session's runtime goes on
//! receiving and decrypting the next. A cut stream is resumed from the
//! partial file's length; the sha256 of the whole file is compared with the digest before the
//! file is renamed to `DATA/artifacts/<hex>.tar.gz`, so nothing unverified is ever unpacked. A
//! mismatch deletes the partial file and fails.
//!
//! With peers ([`crate::peer`]), a fetch first asks the controller for the artifact's sources
//! (`ArtifactSources`: the per-chunk sha256 list, a few peers that hold or are fetching it,
//! and a grant) and takes chunks from those peers in order, each checked against its sha256
//! before it is written; a peer that sends a bad chunk, or none for [`CHUNK_TIMEOUT`], is
//! dropped for this fetch. Whatever the peers did not bring comes from the controller as
//! above, and the whole file's digest is checked all the same. While a download is under way,
//! [`Fetcher::held`] tells the peer server how much of the partial file is written, so a host
//! passes chunks on as they arrive.

use crate::direct_io::ArtifactWriter;
use crate::model::{digest_hex, DataLayout};
use crate::peer::{Held, MAX_CHUNK_BYTES, MIN_CHUNK_BYTES};
use fleet_proto::pb;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
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
/// Times a fetch asks the controller for more peers after the ones it named were dropped.
const PEER_ROUNDS: u32 = 3;
/// Chunks from a peer being checked at once (off the runtime thread).
const VERIFY_AHEAD: usize = 4;

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
    /// Fetches chunks from peers; `None`: every byte comes from the controller.
    peers: Option<crate::peer::PeerClient>,
    /// Downloads under way: digest -> (announced size, bytes of the partial file written).
    under_way: UnderWayMap,
}

/// Downloads under way: digest -> (announced size, bytes of the partial file written).
type UnderWayMap = Arc<Mutex<HashMap<String, (u64, watch::Receiver<u64>)>>>;

/// Forgets a download under way when its fetch ends.
struct UnderWay {
    map: UnderWayMap,
    digest: String,
}

impl Drop for UnderWay {
    fn drop(&mut self) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.digest);
    }
}

/// The whole-file hash of the partial file's first bytes, carried from the peer phase to the
/// controller's so the file is not read back.
struct Resume {
    offset: u64,
    hasher: Sha256,
}

impl Fetcher {
    pub fn new(channel: tokio::sync::watch::Receiver<Channel>, layout: DataLayout) -> Fetcher {
        Fetcher {
            channel,
            layout,
            one_at_a_time: Default::default(),
            peers: None,
            under_way: Default::default(),
        }
    }

    /// Fetches from peers too (see the module's doc).
    pub fn with_peers(mut self, peers: crate::peer::PeerClient) -> Fetcher {
        self.peers = Some(peers);
        self
    }

    /// What this host holds of the artifact `digest`: the verified file, or a download under
    /// way whose size is known.
    pub fn held(&self, digest: &str) -> Option<Held> {
        crate::peer::Holdings::held(self, digest)
    }
}

impl crate::peer::Holdings for Fetcher {
    fn held(&self, digest: &str) -> Option<Held> {
        if let Some(path) = self.cached(digest) {
            return Some(Held::Complete(path));
        }
        let under_way = self.under_way.lock().unwrap_or_else(|e| e.into_inner());
        let (size, on_disk) = under_way.get(digest)?;
        Some(Held::Partial {
            path: self.layout.partial_file(digest_hex(digest)),
            size: *size,
            on_disk: on_disk.clone(),
        })
    }
}

impl Fetcher {
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
        // Dropped last (declared first): a peer server waiting for more sees the download end
        // only once the file was renamed into place (or given up).
        let progress = Arc::new(watch::channel(0u64).0);
        let _under_way = (expected_size > 0).then(|| {
            self.under_way
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(digest.to_string(), (expected_size, progress.subscribe()));
            UnderWay {
                map: self.under_way.clone(),
                digest: digest.to_string(),
            }
        });
        let mut resume = None;
        if let (Some(peers), true) = (&self.peers, expected_size > 0) {
            resume = self
                .fetch_from_peers(
                    peers,
                    digest,
                    expected_size,
                    &partial,
                    guard.clone(),
                    progress.clone(),
                )
                .await?;
        }
        let mut without_progress = 0;
        let mut backoff = Duration::from_millis(200);
        for attempt in 1..=MAX_ATTEMPTS {
            match self
                .fetch_once(
                    digest,
                    expected_size,
                    &partial,
                    guard.clone(),
                    resume.take(),
                    progress.clone(),
                )
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
        resume: Option<Resume>,
        progress: Arc<watch::Sender<u64>>,
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
        let hasher = match resume {
            Some(resume) if resume.offset == offset => resume.hasher,
            _ => hash_prefix(partial, offset).await.map_err(io_error)?,
        };
        let (chunks, writer) = spawn_writer(
            partial,
            offset,
            expected_size.saturating_sub(offset),
            hasher,
            guard,
            progress,
        )
        .map_err(io_error)?;

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

/// Starts the blocking thread that writes and hashes the chunks sent to it (shared `Bytes`, no
/// copy) after the partial file's first `offset` bytes, and tells `progress` how much of the
/// file is written.
#[allow(clippy::type_complexity)]
fn spawn_writer(
    partial: &Path,
    offset: u64,
    expected_rest: u64,
    hasher: Sha256,
    guard: std::sync::Arc<tokio::sync::OwnedMutexGuard<()>>,
    progress: Arc<watch::Sender<u64>>,
) -> std::io::Result<(
    tokio::sync::mpsc::Sender<bytes::Bytes>,
    tokio::task::JoinHandle<std::io::Result<(std::fs::File, Sha256)>>,
)> {
    let file = ArtifactWriter::open(partial, offset, expected_rest)?;
    progress.send_replace(offset);
    let (chunks, mut chunk_rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(WRITER_QUEUE);
    let writer = tokio::task::spawn_blocking(move || {
        let _guard = guard;
        let (mut file, mut hasher) = (file, hasher);
        let mut total = offset;
        while let Some(chunk) = chunk_rx.blocking_recv() {
            // Piece by piece, so the copy into the write buffer reads what hashing has
            // just brought into the CPU cache, instead of the whole chunk from memory twice.
            for piece in chunk.chunks(HASH_PIECE) {
                hasher.update(piece);
                file.write(piece)?;
            }
            total += chunk.len() as u64;
            let on_disk = file.on_disk();
            progress.send_if_modified(|seen| {
                let grew = on_disk > *seen;
                *seen = (*seen).max(on_disk);
                grew
            });
        }
        let file = file.finish()?;
        progress.send_replace(total);
        Ok::<_, std::io::Error>((file, hasher))
    });
    Ok((chunks, writer))
}

/// The checked answer of `ArtifactSources`.
struct Sources {
    chunk_size: u64,
    sha256: Vec<[u8; 32]>,
    peers: Vec<pb::ArtifactPeer>,
    grant: pb::PeerGrant,
}

/// Checks the controller's answer against what the assignment announced.
fn check_sources(answer: pb::ArtifactSourcesResponse, size: u64) -> Result<Sources, String> {
    let chunk_size = answer.chunk_size;
    if !(MIN_CHUNK_BYTES..=MAX_CHUNK_BYTES as u32).contains(&chunk_size) {
        return Err(format!("chunk size {chunk_size} is out of range"));
    }
    if answer.size != size {
        return Err(format!(
            "the controller says {} bytes, the assignment {size}",
            answer.size
        ));
    }
    let n = size.div_ceil(chunk_size as u64);
    if answer.chunk_sha256.len() as u64 != n {
        return Err(format!(
            "{} chunk digests for {n} chunks",
            answer.chunk_sha256.len()
        ));
    }
    let mut sha256 = Vec::with_capacity(n as usize);
    for digest in &answer.chunk_sha256 {
        sha256.push(
            <[u8; 32]>::try_from(digest.as_slice())
                .map_err(|_| "a chunk digest is not 32 bytes")?,
        );
    }
    let grant = answer.grant.ok_or("no grant")?;
    Ok(Sources {
        chunk_size: chunk_size as u64,
        sha256,
        peers: answer.peers,
        grant,
    })
}

impl Fetcher {
    /// Fetches what peers can bring of the artifact into the partial file, every chunk checked
    /// before it is written. `None` when the controller names no sources (an older
    /// controller, or an error): the caller fetches everything from the controller; otherwise
    /// how far the partial file got and its hash so far.
    async fn fetch_from_peers(
        &self,
        peers: &crate::peer::PeerClient,
        digest: &str,
        size: u64,
        partial: &Path,
        guard: std::sync::Arc<tokio::sync::OwnedMutexGuard<()>>,
        progress: Arc<watch::Sender<u64>>,
    ) -> Result<Option<Resume>, FetchError> {
        let io_error = |source| FetchError::Io {
            path: partial.to_path_buf(),
            source,
        };
        let client =
            pb::agent_service_client::AgentServiceClient::new(self.channel.borrow().clone());
        let ask = |exclude: Vec<String>| {
            let mut client = client.clone();
            let digest = digest.to_string();
            async move {
                let answer = client
                    .artifact_sources(pb::ArtifactSourcesRequest {
                        digest,
                        exclude_hosts: exclude,
                    })
                    .await
                    .map_err(|status| status_message(&status))?;
                check_sources(answer.into_inner(), size)
            }
        };
        let sources = match ask(Vec::new()).await {
            Ok(sources) => sources,
            Err(why) => {
                tracing::info!(%digest, "no peer sources, fetching from the controller: {why}");
                return Ok(None);
            }
        };
        let chunk_size = sources.chunk_size;
        let n_chunks = sources.sha256.len() as u64;
        // Whole chunks only: a partial file left mid-chunk is cut back to a chunk's start.
        let mut offset = match tokio::fs::metadata(partial).await {
            Ok(meta) => meta.len(),
            Err(_) => 0,
        };
        if offset > size {
            offset = 0;
        }
        let aligned = offset / chunk_size * chunk_size;
        if aligned != offset || tokio::fs::metadata(partial).await.is_err() {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(partial)
                .map_err(io_error)?;
            file.set_len(aligned).map_err(io_error)?;
            offset = aligned;
        }
        let hasher = hash_prefix(partial, offset).await.map_err(io_error)?;
        let (chunks, writer) =
            spawn_writer(partial, offset, size - offset, hasher, guard, progress)
                .map_err(io_error)?;
        let mut next = offset / chunk_size;
        let first = next;
        let mut peers_left = sources.peers;
        let mut excluded: Vec<String> = Vec::new();
        let mut grant = sources.grant;
        let mut rounds = 0;
        let started = std::time::Instant::now();
        'peers: while next < n_chunks {
            if peers_left.is_empty() {
                if rounds >= PEER_ROUNDS || excluded.is_empty() {
                    break;
                }
                rounds += 1;
                match ask(excluded.clone()).await {
                    Ok(more) if !more.peers.is_empty() && more.sha256 == sources.sha256 => {
                        peers_left = more.peers;
                        grant = more.grant;
                    }
                    _ => break,
                }
            }
            let peer = peers_left.remove(0);
            let request = pb::FetchChunksRequest {
                digest: digest.to_string(),
                grant: Some(grant.clone()),
                first_chunk: next as u32,
                chunk_size: chunk_size as u32,
            };
            let mut stream = match peers.fetch_chunks(&peer, request).await {
                Ok(stream) => stream,
                Err(why) => {
                    tracing::info!(%digest, peer = %peer.host_name, "peer cannot serve: {why}");
                    excluded.push(peer.host_name);
                    continue;
                }
            };
            let mut checking = std::collections::VecDeque::new();
            let mut stream_done = false;
            loop {
                // Keep up to VERIFY_AHEAD chunks being hashed on the blocking pool.
                while !stream_done && checking.len() < VERIFY_AHEAD {
                    match tokio::time::timeout(CHUNK_TIMEOUT, stream.message()).await {
                        Ok(Ok(Some(chunk))) => {
                            let expect_index = next + checking.len() as u64;
                            let bad =
                                chunk.index as u64 != expect_index || expect_index >= n_chunks;
                            let expected = if bad {
                                [0; 32]
                            } else {
                                sources.sha256[expect_index as usize]
                            };
                            let want_len =
                                chunk_size.min(size.saturating_sub(expect_index * chunk_size));
                            let data = chunk.data;
                            checking.push_back(tokio::task::spawn_blocking(move || {
                                let ok = !bad
                                    && data.len() as u64 == want_len
                                    && <[u8; 32]>::from(Sha256::digest(&data)) == expected;
                                (ok, data)
                            }));
                        }
                        Ok(Ok(None)) => stream_done = true,
                        Ok(Err(status)) => {
                            tracing::info!(%digest, peer = %peer.host_name, "peer stream ended: {}", status_message(&status));
                            stream_done = true;
                        }
                        Err(_) => {
                            tracing::info!(%digest, peer = %peer.host_name, "peer sent nothing for {CHUNK_TIMEOUT:?}");
                            stream_done = true;
                        }
                    }
                }
                let Some(check) = checking.pop_front() else {
                    break;
                };
                let (ok, data) = check
                    .await
                    .map_err(|e| io_error(std::io::Error::other(e)))?;
                if !ok {
                    tracing::warn!(%digest, peer = %peer.host_name, chunk = next, "peer sent a chunk that does not match its digest: dropped for this fetch");
                    excluded.push(peer.host_name);
                    continue 'peers;
                }
                if chunks.send(data).await.is_err() {
                    // The writer stopped on an error; it is reported below.
                    break 'peers;
                }
                next += 1;
                if next == n_chunks {
                    break 'peers;
                }
            }
            excluded.push(peer.host_name);
        }
        drop(chunks);
        let (file, hasher) = writer
            .await
            .map_err(|e| io_error(std::io::Error::other(e)))?
            .map_err(io_error)?;
        drop(file);
        let offset = (next * chunk_size).min(size);
        tracing::info!(
            %digest,
            from_peers = offset - first * chunk_size,
            peers_dropped = excluded.len(),
            ms = started.elapsed().as_millis() as u64,
            "artifact chunks fetched from peers"
        );
        Ok(Some(Resume { offset, hasher }))
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
