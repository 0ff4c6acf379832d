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
//! before it is written or passed on; a peer that sends a bad chunk, or none for
//! [`CHUNK_TIMEOUT`], is dropped for this fetch. Whatever the peers did not bring comes from
//! the controller as above. With that list every byte is hashed once ([`Check::Chunks`]): each
//! chunk against its entry, whoever sent it (the controller made the list from the stored
//! artifact whose digest it checked, so a file whose every chunk matches is that artifact),
//! instead of once per chunk and again for the whole file. A partial file left by an earlier
//! attempt is checked chunk by chunk too, and cut back to its first bad chunk. While a
//! download is under way, [`Fetcher::held`] tells the peer server how far it got and hands it
//! the last verified chunks ([`crate::peer::Recent`]), so a host passes a chunk on as soon as
//! it is verified.

use crate::direct_io::ArtifactWriter;
use crate::follow::Following;
use crate::model::{digest_hex, DataLayout};
use crate::peer::{Held, Progress, Recent, MAX_CHUNK_BYTES, MIN_CHUNK_BYTES};
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
    /// Downloads under way: digest -> what the peer server needs of it.
    under_way: UnderWayMap,
}

/// A download under way, for the peer server: its announced size, how far it got and its
/// last verified chunks.
type UnderWayEntry = (u64, watch::Receiver<Progress>, Arc<Recent>);
type UnderWayMap = Arc<Mutex<HashMap<String, UnderWayEntry>>>;

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

/// How far the partial file got and the state of its check, carried from one attempt to the
/// next (the peer phase, then the controller's) so the file is not read back.
struct Resume {
    offset: u64,
    check: Check,
}

/// The artifact's chunks as the controller listed them.
struct ChunkPlan {
    size: u64,
    chunk_size: u64,
    sha256: Vec<[u8; 32]>,
}

impl ChunkPlan {
    fn n_chunks(&self) -> u64 {
        self.sha256.len() as u64
    }

    /// The length of chunk `index` (the last may be short).
    fn len_of(&self, index: u64) -> u64 {
        self.chunk_size
            .min(self.size.saturating_sub(index * self.chunk_size))
    }
}

/// How a download's bytes are checked.
enum Check {
    /// The sha256 of the whole file, compared with the digest at the end (no chunk list: peers
    /// are off, or the controller named no sources).
    Whole(Sha256),
    /// Chunk by chunk against the controller's list: every chunk before `index` matched,
    /// `current` holds the `filled` bytes of chunk `index` received so far.
    Chunks {
        plan: Arc<ChunkPlan>,
        index: u64,
        current: Sha256,
        filled: u64,
    },
}

/// What the download loop hands the writer thread.
enum Piece {
    /// A whole chunk already checked against the list (from a peer).
    Checked(bytes::Bytes),
    /// Bytes to check here (from the controller).
    Unchecked(bytes::Bytes),
}

/// The error the writer reports for a chunk that does not match the list.
fn chunk_mismatch(index: u64) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("chunk {index} does not match its sha256"),
    )
}

impl Check {
    /// Bytes from the start checked so far, `total` being what was received.
    fn verified(&self, total: u64) -> u64 {
        match self {
            Check::Whole(_) => total,
            Check::Chunks { plan, index, .. } => (index * plan.chunk_size).min(plan.size),
        }
    }

    /// Hashes and writes `data` (received after everything before it); in chunk mode each
    /// chunk is compared with its entry as it completes, and a chunk that came whole in `data`
    /// is kept in `recent` for the peer server.
    fn write_unchecked(
        &mut self,
        data: &bytes::Bytes,
        file: &mut ArtifactWriter,
        recent: &Recent,
    ) -> std::io::Result<()> {
        match self {
            Check::Whole(hasher) => {
                // Piece by piece, so the copy into the write buffer reads what hashing has
                // just brought into the CPU cache, instead of the whole chunk from memory twice.
                for piece in data.chunks(HASH_PIECE) {
                    hasher.update(piece);
                    file.write(piece)?;
                }
            }
            Check::Chunks {
                plan,
                index,
                current,
                filled,
            } => {
                let mut at = 0;
                let mut began = (*filled == 0).then_some(0);
                while at < data.len() {
                    if *index >= plan.n_chunks() {
                        return Err(chunk_mismatch(*index));
                    }
                    let want = plan.len_of(*index) - *filled;
                    let n = (want as usize).min(data.len() - at).min(HASH_PIECE);
                    let piece = &data[at..at + n];
                    current.update(piece);
                    file.write(piece)?;
                    at += n;
                    *filled += n as u64;
                    if *filled == plan.len_of(*index) {
                        let got: [u8; 32] = current.finalize_reset().into();
                        if got != plan.sha256[*index as usize] {
                            return Err(chunk_mismatch(*index));
                        }
                        if let Some(began) = began {
                            recent.keep(*index * plan.chunk_size, data.slice(began..at));
                        }
                        *index += 1;
                        *filled = 0;
                        began = Some(at);
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes a chunk the caller checked against the list.
    fn write_checked(
        &mut self,
        data: &bytes::Bytes,
        file: &mut ArtifactWriter,
        recent: &Recent,
    ) -> std::io::Result<()> {
        match self {
            Check::Chunks { index, filled, .. } if *filled == 0 => {
                file.write(data)?;
                *index += 1;
                Ok(())
            }
            // Not at a chunk's start (cannot happen: peers fill whole chunks from a chunk's
            // start): checked again here.
            _ => self.write_unchecked(data, file, recent),
        }
    }

    /// What the file's check says once every byte is in: the digest it has (`Whole`), or
    /// `digest` itself when every chunk matched the controller's list.
    fn outcome(self, digest: &str) -> String {
        match self {
            Check::Whole(hasher) => format!("sha256:{}", hex::encode(hasher.finalize())),
            Check::Chunks {
                plan,
                index,
                filled,
                ..
            } if index == plan.n_chunks() && filled == 0 => digest.to_string(),
            Check::Chunks { plan, index, .. } => {
                format!("only {index} of {} chunks checked", plan.n_chunks())
            }
        }
    }
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
        let (size, progress, recent) = under_way.get(digest)?;
        Some(Held::Partial {
            path: self.layout.partial_file(digest_hex(digest)),
            size: *size,
            progress: progress.clone(),
            recent: recent.clone(),
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
        self.fetch_followed(digest, expected_size, None).await
    }

    /// [`Fetcher::fetch`], handing `follow` a reader of the download's verified bytes as it
    /// starts ([`crate::follow`]). `follow` is dropped unsent when nothing is downloaded (the
    /// artifact is cached, or its size is not announced).
    pub async fn fetch_followed(
        &self,
        digest: &str,
        expected_size: u64,
        follow: Option<tokio::sync::oneshot::Sender<Following>>,
    ) -> Result<PathBuf, FetchError> {
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
        let progress = Arc::new(watch::channel(Progress::default()).0);
        let recent = Arc::new(Recent::default());
        let _under_way = (expected_size > 0).then(|| {
            self.under_way
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(
                    digest.to_string(),
                    (expected_size, progress.subscribe(), recent.clone()),
                );
            UnderWay {
                map: self.under_way.clone(),
                digest: digest.to_string(),
            }
        });
        if let (Some(follow), true) = (follow, expected_size > 0) {
            let _ = follow.send(Following::new(
                digest,
                expected_size,
                progress.subscribe(),
                recent.clone(),
                partial.clone(),
                done.clone(),
            ));
        }
        let mut resume = None;
        let mut plan = None;
        if let (Some(peers), true) = (&self.peers, expected_size > 0) {
            let download = Download {
                digest,
                size: expected_size,
                partial: &partial,
                guard: guard.clone(),
                progress: progress.clone(),
                recent: recent.clone(),
            };
            (plan, resume) = self.fetch_from_peers(peers, &download).await?;
        }
        let mut without_progress = 0;
        let mut backoff = Duration::from_millis(200);
        for attempt in 1..=MAX_ATTEMPTS {
            let download = Download {
                digest,
                size: expected_size,
                partial: &partial,
                guard: guard.clone(),
                progress: progress.clone(),
                recent: recent.clone(),
            };
            match self
                .fetch_once(&download, resume.take(), plan.clone())
                .await
            {
                Ok(Attempt::Complete(actual)) => {
                    if actual != digest {
                        // Never the case in chunk mode: a bad chunk fails as it completes.
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
                    resume: carried,
                }) => {
                    resume = carried;
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
        download: &Download<'_>,
        resume: Option<Resume>,
        plan: Option<Arc<ChunkPlan>>,
    ) -> Result<Attempt, FetchError> {
        let (digest, expected_size, partial) = (download.digest, download.size, download.partial);
        let io_error = |source| FetchError::Io {
            path: partial.to_path_buf(),
            source,
        };
        let length = match tokio::fs::metadata(partial).await {
            Ok(meta) => meta.len(),
            Err(_) => 0,
        };
        let (offset, check) = match resume {
            Some(resume) if resume.offset == length => (resume.offset, resume.check),
            _ => prepare(partial, expected_size, plan)
                .await
                .map_err(io_error)?,
        };
        let (chunks, writer) = spawn_writer(download, offset, check).map_err(io_error)?;
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
                                if chunks.send(Piece::Unchecked(chunk.data)).await.is_err() {
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
        let (file, check, total) = match writer
            .await
            .map_err(|e| io_error(std::io::Error::other(e)))?
        {
            Ok(done) => done,
            Err(e) => return Err(written_off(partial, digest, e).await),
        };
        if let Some(message) = cut {
            return Ok(Attempt::Cut {
                progressed: written > 0,
                message,
                resume: Some(Resume {
                    offset: total,
                    check,
                }),
            });
        }
        if expected_size > 0 && offset + written < expected_size {
            return Ok(Attempt::Cut {
                progressed: written > 0,
                message: format!(
                    "stream ended after {} of {expected_size} bytes",
                    offset + written
                ),
                resume: Some(Resume {
                    offset: total,
                    check,
                }),
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
        Ok(Attempt::Complete(check.outcome(digest)))
    }
}

/// What one attempt writes: the artifact, its partial file, and what the peer server is told.
struct Download<'a> {
    digest: &'a str,
    /// The announced size (0: unknown).
    size: u64,
    partial: &'a Path,
    guard: std::sync::Arc<tokio::sync::OwnedMutexGuard<()>>,
    progress: Arc<watch::Sender<Progress>>,
    recent: Arc<Recent>,
}

/// The error of a writer that stopped: a chunk that does not match its entry deletes the
/// partial file (the next attempt starts afresh), like a whole-file mismatch.
async fn written_off(partial: &Path, digest: &str, e: std::io::Error) -> FetchError {
    if e.kind() == std::io::ErrorKind::InvalidData {
        let _ = tokio::fs::remove_file(partial).await;
        return FetchError::Mismatch {
            digest: digest.to_string(),
            actual: e.to_string(),
        };
    }
    FetchError::Io {
        path: partial.to_path_buf(),
        source: e,
    }
}

/// Raises what `progress` says, never lowers it.
fn raise(progress: &watch::Sender<Progress>, on_disk: u64, verified: u64, by_chunks: bool) {
    progress.send_if_modified(|seen| {
        let next = Progress {
            on_disk: seen.on_disk.max(on_disk),
            verified: seen.verified.max(verified),
            by_chunks,
        };
        let grew = next != *seen;
        *seen = next;
        grew
    });
}

/// Starts the blocking thread that checks and writes the pieces sent to it (shared `Bytes`, no
/// copy) after the partial file's first `offset` bytes, and tells the download's progress how
/// much of the file is written and verified. It returns the file, the check's state and the
/// file's length.
#[allow(clippy::type_complexity)]
fn spawn_writer(
    download: &Download<'_>,
    offset: u64,
    check: Check,
) -> std::io::Result<(
    tokio::sync::mpsc::Sender<Piece>,
    tokio::task::JoinHandle<std::io::Result<(std::fs::File, Check, u64)>>,
)> {
    let file = ArtifactWriter::open(
        download.partial,
        offset,
        download.size.saturating_sub(offset),
    )?;
    let by_chunks = matches!(check, Check::Chunks { .. });
    raise(
        &download.progress,
        offset,
        check.verified(offset),
        by_chunks,
    );
    let (chunks, mut chunk_rx) = tokio::sync::mpsc::channel::<Piece>(WRITER_QUEUE);
    let (guard, progress, recent) = (
        download.guard.clone(),
        download.progress.clone(),
        download.recent.clone(),
    );
    let writer = tokio::task::spawn_blocking(move || {
        let _guard = guard;
        let (mut file, mut check) = (file, check);
        let mut total = offset;
        while let Some(piece) = chunk_rx.blocking_recv() {
            let n = match &piece {
                Piece::Checked(data) => {
                    check.write_checked(data, &mut file, &recent)?;
                    data.len()
                }
                Piece::Unchecked(data) => {
                    check.write_unchecked(data, &mut file, &recent)?;
                    data.len()
                }
            };
            total += n as u64;
            raise(&progress, file.on_disk(), check.verified(total), by_chunks);
        }
        let file = file.finish()?;
        raise(&progress, total, check.verified(total), by_chunks);
        Ok::<_, std::io::Error>((file, check, total))
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
    /// before it is written or passed on. `(None, None)` when the controller names no sources
    /// (an older controller, or an error): the caller fetches everything from the controller
    /// and checks the whole file; otherwise the controller's chunk list, how far the partial
    /// file got and the state of its check.
    async fn fetch_from_peers(
        &self,
        peers: &crate::peer::PeerClient,
        download: &Download<'_>,
    ) -> Result<(Option<Arc<ChunkPlan>>, Option<Resume>), FetchError> {
        let (digest, size, partial) = (download.digest, download.size, download.partial);
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
                return Ok((None, None));
            }
        };
        let chunk_size = sources.chunk_size;
        let n_chunks = sources.sha256.len() as u64;
        let plan = Arc::new(ChunkPlan {
            size,
            chunk_size,
            sha256: sources.sha256.clone(),
        });
        // What an earlier attempt left is checked chunk by chunk; peers bring whole chunks
        // only, so a partial file left mid-chunk is cut back to a chunk's start.
        let (mut offset, mut check) = prepare(partial, size, Some(plan.clone()))
            .await
            .map_err(io_error)?;
        if let Check::Chunks {
            index,
            current,
            filled,
            ..
        } = &mut check
        {
            if *filled > 0 {
                offset = *index * chunk_size;
                cut_to(partial, offset).map_err(io_error)?;
                *current = Sha256::new();
                *filled = 0;
            }
        }
        let (chunks, writer) = spawn_writer(download, offset, check).map_err(io_error)?;
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
                // Verified: the peers this host serves may have it now, before it is written.
                let start = next * chunk_size;
                let end = start + data.len() as u64;
                download.recent.keep(start, data.clone());
                raise(&download.progress, 0, end, true);
                if chunks.send(Piece::Checked(data)).await.is_err() {
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
        let (file, check, offset) = match writer
            .await
            .map_err(|e| io_error(std::io::Error::other(e)))?
        {
            Ok(done) => done,
            Err(e) => return Err(written_off(partial, digest, e).await),
        };
        drop(file);
        tracing::info!(
            %digest,
            from_peers = offset - first * chunk_size,
            peers_dropped = excluded.len(),
            ms = started.elapsed().as_millis() as u64,
            "artifact chunks fetched from peers"
        );
        Ok((Some(plan), Some(Resume { offset, check })))
    }
}

enum Attempt {
    /// The stream ended; the digest of everything in the partial file.
    Complete(String),
    /// The stream broke; resume from the partial file's length (with the check's state, when
    /// the file is as the attempt left it).
    Cut {
        progressed: bool,
        message: String,
        resume: Option<Resume>,
    },
}

/// Where an attempt starts when nothing is carried over from the one before: the partial
/// file's length (none if it is longer than the artifact) and its check so far, from reading
/// the file back. With a chunk list the file is checked chunk by chunk and cut back to its
/// first chunk that does not match; without one its bytes are hashed.
async fn prepare(
    partial: &Path,
    size: u64,
    plan: Option<Arc<ChunkPlan>>,
) -> std::io::Result<(u64, Check)> {
    let mut length = match tokio::fs::metadata(partial).await {
        Ok(meta) => meta.len(),
        Err(_) => 0,
    };
    if size > 0 && length > size {
        tokio::fs::remove_file(partial).await?;
        length = 0;
    }
    let Some(plan) = plan else {
        return Ok((length, Check::Whole(hash_prefix(partial, length).await?)));
    };
    if length == 0 {
        let check = Check::Chunks {
            plan,
            index: 0,
            current: Sha256::new(),
            filled: 0,
        };
        return Ok((0, check));
    }
    let partial = partial.to_path_buf();
    tokio::task::spawn_blocking(move || check_prefix(&partial, length, plan))
        .await
        .map_err(std::io::Error::other)?
}

/// Checks the first `length` bytes of the partial file chunk by chunk (see [`prepare`]).
fn check_prefix(
    partial: &Path,
    length: u64,
    plan: Arc<ChunkPlan>,
) -> std::io::Result<(u64, Check)> {
    use std::io::Read;
    let mut file = std::fs::File::open(partial)?.take(length);
    let mut buf = vec![0u8; HASH_PIECE];
    let (mut index, mut filled, mut current) = (0u64, 0u64, Sha256::new());
    loop {
        let want = (plan.len_of(index) - filled).min(buf.len() as u64) as usize;
        let n = file.read(&mut buf[..want])?;
        if n == 0 {
            break;
        }
        current.update(&buf[..n]);
        filled += n as u64;
        if filled == plan.len_of(index) {
            let got: [u8; 32] = current.finalize_reset().into();
            if got != plan.sha256[index as usize] {
                tracing::warn!(
                    chunk = index,
                    "the partial download has a chunk that does not match its sha256: cut back to it"
                );
                cut_to(partial, index * plan.chunk_size)?;
                filled = 0;
                break;
            }
            index += 1;
            filled = 0;
            if index == plan.n_chunks() {
                break;
            }
        }
    }
    let offset = index * plan.chunk_size + filled;
    let check = Check::Chunks {
        plan,
        index,
        current,
        filled,
    };
    Ok((offset.min(length), check))
}

/// Cuts the partial file back to `length` bytes.
fn cut_to(partial: &Path, length: u64) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(partial)?
        .set_len(length)
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

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK: u64 = 64 << 10;

    fn bytes_of(n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(13) ^ (i >> 9) as u8)
            .collect()
    }

    fn plan_of(data: &[u8]) -> Arc<ChunkPlan> {
        Arc::new(ChunkPlan {
            size: data.len() as u64,
            chunk_size: CHUNK,
            sha256: data
                .chunks(CHUNK as usize)
                .map(|c| Sha256::digest(c).into())
                .collect(),
        })
    }

    fn fresh(plan: &Arc<ChunkPlan>) -> Check {
        Check::Chunks {
            plan: plan.clone(),
            index: 0,
            current: Sha256::new(),
            filled: 0,
        }
    }

    /// Feeds `data` to a chunk check in messages of `split` bytes (the first `checked` whole
    /// chunks as checked by the caller); the outcome, the file's bytes and the chunks kept.
    fn feed(
        data: &[u8],
        plan: &Arc<ChunkPlan>,
        split: usize,
        checked: u64,
    ) -> (std::io::Result<String>, Vec<u8>, Vec<u64>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.partial");
        let mut file = ArtifactWriter::open(&path, 0, data.len() as u64).unwrap();
        let recent = Recent::default();
        let mut check = fresh(plan);
        let head = (checked * CHUNK) as usize;
        let mut result = Ok(());
        for chunk in data[..head].chunks(CHUNK as usize) {
            let chunk = bytes::Bytes::copy_from_slice(chunk);
            result = result.and_then(|()| check.write_checked(&chunk, &mut file, &recent));
        }
        for message in data[head..].chunks(split) {
            let message = bytes::Bytes::copy_from_slice(message);
            result = result.and_then(|()| check.write_unchecked(&message, &mut file, &recent));
        }
        file.finish().unwrap();
        let kept = (0..plan.n_chunks())
            .filter(|i| {
                recent
                    .get(i * CHUNK, plan.len_of(*i))
                    .is_some_and(|b| b[..] == data[(i * CHUNK) as usize..][..b.len()])
            })
            .collect();
        let outcome = result.map(|()| check.outcome("sha256:the-digest"));
        (outcome, std::fs::read(&path).unwrap(), kept)
    }

    #[test]
    fn every_chunk_is_checked_once_whatever_the_messages() {
        let data = bytes_of(5 * CHUNK as usize + 1234);
        let plan = plan_of(&data);
        // (messages of, chunks checked by the caller first, chunks kept for peers)
        for (split, checked, kept) in [
            // Messages of a chunk each, as the controller sends: every chunk is kept.
            (CHUNK as usize, 0, vec![0, 1, 2, 3, 4, 5]),
            // Larger messages: the chunks inside them are kept.
            (3 * CHUNK as usize, 0, vec![0, 1, 2, 3, 4, 5]),
            // A chunk split over two messages is checked but not kept.
            (CHUNK as usize / 2 + 1, 0, vec![]),
            (7777, 0, vec![5]),
            // Peers first (kept by the peer phase, not here), then the controller.
            (CHUNK as usize, 2, vec![2, 3, 4, 5]),
            (CHUNK as usize, 5, vec![5]),
        ] {
            let (outcome, written, got_kept) = feed(&data, &plan, split, checked);
            assert_eq!(
                outcome.unwrap(),
                "sha256:the-digest",
                "split {split}, {checked} checked"
            );
            assert_eq!(written, data, "split {split}");
            assert_eq!(got_kept, kept, "split {split}, {checked} checked");
        }
    }

    #[test]
    fn a_bad_chunk_stops_the_writer_and_is_never_kept() {
        let data = bytes_of(4 * CHUNK as usize);
        let plan = plan_of(&data);
        for (bad_byte, split) in [(0, CHUNK as usize), (2 * CHUNK as usize + 5, 1000)] {
            let mut bad = data.clone();
            bad[bad_byte] ^= 1;
            let (outcome, _, kept) = feed(&bad, &plan, split, 0);
            let error = outcome.unwrap_err();
            assert_eq!(error.kind(), std::io::ErrorKind::InvalidData);
            let index = bad_byte as u64 / CHUNK;
            assert!(error.to_string().contains(&format!("chunk {index} ")));
            assert!(kept.iter().all(|i| *i < index), "kept {kept:?}");
        }
        // More bytes than the list has chunks.
        let mut longer = data.clone();
        longer.extend_from_slice(b"tail");
        let (outcome, _, _) = feed(&longer, &plan, CHUNK as usize, 0);
        assert_eq!(outcome.unwrap_err().kind(), std::io::ErrorKind::InvalidData);
    }

    #[test]
    fn an_incomplete_check_is_not_the_digest() {
        let data = bytes_of(3 * CHUNK as usize);
        let plan = plan_of(&data);
        let (outcome, _, _) = feed(&data[..2 * CHUNK as usize + 10], &plan, 4096, 0);
        assert_eq!(outcome.unwrap(), "only 2 of 3 chunks checked");
    }

    #[tokio::test]
    async fn a_partial_file_is_checked_and_cut_back_to_its_first_bad_chunk() {
        let data = bytes_of(4 * CHUNK as usize + 100);
        let plan = plan_of(&data);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.partial");
        // (bytes left by an earlier attempt, a byte spoiled, where the next attempt starts)
        for (left, spoiled, start) in [
            (0, None, 0),
            (2 * CHUNK + 10, None, 2 * CHUNK + 10),
            (4 * CHUNK + 100, None, 4 * CHUNK + 100),
            (3 * CHUNK, Some(CHUNK + 7), CHUNK),
            (2 * CHUNK + 10, Some(2 * CHUNK + 3), 2 * CHUNK + 10),
            (CHUNK / 2, Some(0), CHUNK / 2),
            // Longer than the artifact: removed.
            (4 * CHUNK + 101, None, 0),
        ] {
            let mut bytes = data.clone();
            bytes.push(0);
            bytes.truncate(left as usize);
            if let Some(at) = spoiled {
                bytes[at as usize] ^= 1;
            }
            std::fs::write(&path, &bytes).unwrap();
            let (offset, check) = prepare(&path, data.len() as u64, Some(plan.clone()))
                .await
                .unwrap();
            assert_eq!(offset, start, "left {left}, spoiled {spoiled:?}");
            let on_disk = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            assert_eq!(on_disk, start, "left {left}, spoiled {spoiled:?}");
            // Whole chunks are verified (the short last one too).
            let whole = match offset == data.len() as u64 {
                true => offset,
                false => offset / CHUNK * CHUNK,
            };
            assert_eq!(check.verified(offset), whole, "left {left}");
            // A bad byte in the unfinished last chunk is found when that chunk completes.
            let mut check = check;
            let mut file = ArtifactWriter::open(&path, offset, 0).unwrap();
            let rest = bytes::Bytes::copy_from_slice(&data[offset as usize..]);
            let result = check.write_unchecked(&rest, &mut file, &Recent::default());
            file.finish().unwrap();
            match spoiled {
                Some(at) if at >= offset / CHUNK * CHUNK && at < offset => {
                    assert!(result.is_err())
                }
                _ => {
                    result.unwrap();
                    assert_eq!(check.outcome("d"), "d");
                    assert_eq!(std::fs::read(&path).unwrap(), data);
                }
            }
        }
    }
}
