//! Artifact chunks between agents (`PeerService`), both halves: the server a host runs on its
//! advertise address (`--peer-port`, default 7702; 0 turns it off) and the client a fetch uses
//! (the `fetch` module). Both are mutual TLS with the host's own certificate and the fleet CA
//! from `DATA/tls` (read at each connection, so a renewed certificate or a rotated CA is
//! used at once by the client; the server takes the files of its start). A peer serves a chunk
//! only to a caller whose agent certificate names the host a valid grant of the controller
//! names, for that artifact, before the grant expires ([`fleet_pki::grant`]): a host gets only
//! its own releases from peers too. It serves what it holds: the verified artifact, or a
//! download under way, chunk by chunk as the chunks are verified: the last few verified chunks
//! are kept in memory ([`Recent`]), so a chunk is passed on as soon as it was checked, before
//! its block is written and without reading it back; an older one is read from the partial
//! file once it is written.

use crate::join::{CA_FILE, CERT_FILE, KEY_FILE, TLS_DIR};
use fleet_proto::pb;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};
use tonic::{Request, Response, Status};

/// The largest gRPC message the agent accepts from the controller or a peer (one chunk).
pub const MAX_CHUNK_BYTES: usize = 16 << 20;
/// The smallest chunk size of the peer protocol the agent accepts.
pub const MIN_CHUNK_BYTES: u32 = 64 << 10;

/// Verified chunks a download keeps in memory for the peers it serves: enough for callers a
/// few chunks behind it (the usual case: they fetch at the pace it verifies); one further
/// behind reads from the partial file.
const RECENT_CHUNKS: usize = 8;

/// How far a download under way has got, for the peer server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Bytes of the partial file written out (a read of the file sees them).
    pub on_disk: u64,
    /// Bytes from the start that were checked chunk by chunk against the controller's list:
    /// only these are served. Without a list (an older controller): what is on disk.
    pub verified: u64,
    /// Whether `verified` was checked chunk by chunk (a list), rather than being only what is
    /// on disk, whose whole-file digest is known at the end.
    pub by_chunks: bool,
}

/// The last [`RECENT_CHUNKS`] chunks a download verified, by their offset in the artifact
/// (shared `Bytes`: no copy).
#[derive(Default)]
pub struct Recent {
    chunks: Mutex<VecDeque<(u64, bytes::Bytes)>>,
}

impl Recent {
    /// Keeps the verified chunk that starts at `offset`, forgetting the oldest one kept.
    pub fn keep(&self, offset: u64, data: bytes::Bytes) {
        let mut chunks = self.chunks.lock().unwrap_or_else(|e| e.into_inner());
        if chunks.len() >= RECENT_CHUNKS {
            chunks.pop_front();
        }
        chunks.push_back((offset, data));
    }

    /// The kept chunk that holds the byte at `position`, and the chunk's offset.
    pub fn holding(&self, position: u64) -> Option<(u64, bytes::Bytes)> {
        let chunks = self.chunks.lock().unwrap_or_else(|e| e.into_inner());
        chunks
            .iter()
            .find(|(at, data)| *at <= position && position < at + data.len() as u64)
            .cloned()
    }

    /// The kept chunk of `len` bytes at `offset`, if it is still kept.
    pub fn get(&self, offset: u64, len: u64) -> Option<bytes::Bytes> {
        let chunks = self.chunks.lock().unwrap_or_else(|e| e.into_inner());
        chunks
            .iter()
            .find(|(at, data)| *at == offset && data.len() as u64 == len)
            .map(|(_, data)| data.clone())
    }
}

/// What this host holds of an artifact, for the peer server.
pub enum Held {
    /// The verified artifact.
    Complete(PathBuf),
    /// A download under way: its partial file, the artifact's size, how far it got (the
    /// sender is dropped when the download ends, either way) and its last verified chunks.
    Partial {
        path: PathBuf,
        size: u64,
        progress: watch::Receiver<Progress>,
        recent: Arc<Recent>,
    },
}

/// What the server asks of the artifact cache (the fetcher, which implements it), without
/// this module knowing the fetcher.
pub trait Holdings: Send + Sync + 'static {
    fn held(&self, digest: &str) -> Option<Held>;
}

/// Downloads a peer serves at once; more are refused (the caller goes to another peer or
/// to the controller).
const MAX_SERVING: usize = 16;
/// How long a peer waits for a chunk of a download under way before it gives up.
const CHUNK_WAIT: Duration = Duration::from_secs(30);
/// How long connecting to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// HTTP/2 windows, as for the controller's artifact stream.
const STREAM_WINDOW: u32 = 4 << 20;
const CONNECTION_WINDOW: u32 = 8 << 20;
const MAX_FRAME: u32 = 256 << 10;

fn read_tls(tls_dir: &Path, file: &str) -> Result<String, String> {
    let path = tls_dir.join(file);
    std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Dials peers with this host's certificate.
#[derive(Clone)]
pub struct PeerClient {
    tls_dir: PathBuf,
}

impl PeerClient {
    pub fn new(data_dir: &Path) -> PeerClient {
        PeerClient {
            tls_dir: data_dir.join(TLS_DIR),
        }
    }

    /// Opens the chunk stream of `request` from `peer`, whose certificate must name it.
    pub async fn fetch_chunks(
        &self,
        peer: &pb::ArtifactPeer,
        request: pb::FetchChunksRequest,
    ) -> Result<tonic::Streaming<pb::PeerChunk>, String> {
        fleet_proto::names::check_host(&peer.host_name).map_err(|e| e.to_string())?;
        let addr: SocketAddr = peer
            .addr
            .parse()
            .map_err(|_| format!("peer address {:?} is not IP:PORT", peer.addr))?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read_tls(&self.tls_dir, CA_FILE)?))
            .domain_name(peer.host_name.clone())
            .identity(Identity::from_pem(
                read_tls(&self.tls_dir, CERT_FILE)?,
                read_tls(&self.tls_dir, KEY_FILE)?,
            ));
        let channel = Endpoint::from_shared(format!("https://{addr}"))
            .map_err(|e| e.to_string())?
            .tls_config(tls)
            .map_err(|e| e.to_string())?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .connect()
            .await
            .map_err(|e| {
                format!(
                    "cannot connect to {addr}: {}",
                    fleet_proto::error_text::with_sources(&e)
                )
            })?;
        let mut client = pb::peer_service_client::PeerServiceClient::new(channel)
            .max_decoding_message_size(MAX_CHUNK_BYTES + 1024);
        let response = client
            .fetch_chunks(request)
            .await
            .map_err(|status| format!("{:?}: {}", status.code(), status.message()))?;
        Ok(response.into_inner())
    }
}

/// The server half: serves what `fetcher` holds.
pub struct PeerServer {
    fetcher: Arc<dyn Holdings>,
    tls_dir: PathBuf,
    serving: Arc<tokio::sync::Semaphore>,
}

impl PeerServer {
    pub fn new(fetcher: Arc<dyn Holdings>, data_dir: &Path) -> PeerServer {
        PeerServer {
            fetcher,
            tls_dir: data_dir.join(TLS_DIR),
            serving: Arc::new(tokio::sync::Semaphore::new(MAX_SERVING)),
        }
    }

    /// Serves peers on `listener` until `shutdown` turns true.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), String> {
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(
                read_tls(&self.tls_dir, CERT_FILE)?,
                read_tls(&self.tls_dir, KEY_FILE)?,
            ))
            .client_ca_root(Certificate::from_pem(read_tls(&self.tls_dir, CA_FILE)?));
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tonic::transport::Server::builder()
            .tls_config(tls)
            .map_err(|e| e.to_string())?
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(STREAM_WINDOW))
            .initial_connection_window_size(Some(CONNECTION_WINDOW))
            .max_frame_size(Some(MAX_FRAME))
            .timeout(Duration::from_secs(3600))
            .add_service(pb::peer_service_server::PeerServiceServer::new(self))
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = shutdown.wait_for(|stop| *stop).await;
            })
            .await
            .map_err(|e| fleet_proto::error_text::with_sources(&e))
    }
}

/// Whether `request`'s caller (its verified agent certificate) may fetch `digest` with
/// `grant`: the grant's signature checked against the CA bundle in `ca_pem`.
fn authorize(
    caller_der: Option<&[u8]>,
    grant: Option<&pb::PeerGrant>,
    digest: &str,
    ca_pem: &str,
) -> Result<String, Status> {
    let caller = caller_der
        .and_then(|der| fleet_pki::Identity::from_der(der).ok())
        .filter(|identity| identity.role == fleet_pki::Role::Agent)
        .ok_or_else(|| Status::permission_denied("only agents fetch from peers"))?;
    let grant = grant.map(|g| {
        (
            fleet_pki::grant::Grant {
                host_name: g.host_name.clone(),
                digest: g.digest.clone(),
                expires_unix_ms: g.expires_unix_ms,
            },
            g.signature.as_slice(),
        )
    });
    let signed = grant
        .as_ref()
        .is_some_and(|(g, signature)| fleet_pki::grant::signed_by_ca(ca_pem, g, signature));
    fleet_pki::grant::check(
        grant.as_ref().map(|(g, _)| g),
        signed,
        &caller.name,
        digest,
        fleet_proto::now_unix_ms(),
    )
    .map_err(|e| {
        tracing::warn!(caller = %caller.name, %digest, "refused a peer fetch: {e}");
        Status::permission_denied(format!("peer fetch refused: {e}"))
    })?;
    Ok(caller.name)
}

/// The artifact file a peer is served from, for the chunks not kept in memory. A complete
/// artifact is never written again (it is renamed into place whole and only ever removed, which
/// leaves a mapping valid), so it is read through a memory map of it: a chunk is a slice of
/// the page cache, shared by every peer served at once, with no read into a fresh buffer; the
/// gRPC encoder copies it once, into its frame. A partial file still being written is read
/// chunk by chunk instead.
struct ArtifactFile {
    file: Arc<std::fs::File>,
    size: u64,
    mapped: Option<bytes::Bytes>,
}

impl ArtifactFile {
    fn new(file: std::fs::File, size: u64) -> ArtifactFile {
        ArtifactFile {
            file: Arc::new(file),
            size,
            mapped: None,
        }
    }

    /// Bytes `start..end`; `complete` once the file is the whole verified artifact. Blocking
    /// work (a read, or touching the pages of a mapped chunk, which may have to come from the
    /// disk) runs on the blocking pool, never on the runtime thread.
    async fn read(
        &mut self,
        start: u64,
        end: u64,
        complete: bool,
    ) -> std::io::Result<bytes::Bytes> {
        if complete && self.mapped.is_none() {
            self.mapped = self.map()?;
        }
        let file = self.file.clone();
        let mapped = self.mapped.clone();
        tokio::task::spawn_blocking(move || match mapped {
            Some(map) => {
                let chunk = map.slice(start as usize..end as usize);
                let touched = chunk.iter().step_by(PAGE_BYTES).fold(0u8, |a, b| a ^ b);
                std::hint::black_box(touched);
                Ok(chunk)
            }
            None => {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; (end - start) as usize];
                file.read_exact_at(&mut buf, start).map(|()| buf.into())
            }
        })
        .await
        .map_err(std::io::Error::other)?
    }

    /// A map of the whole artifact, or `None` when the file is not (yet) its full size.
    fn map(&self) -> std::io::Result<Option<bytes::Bytes>> {
        if self.file.metadata()?.len() != self.size || self.size == 0 {
            return Ok(None);
        }
        // SAFETY: the file is the complete artifact, never written again (see above).
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::Mmap::map(&*self.file) }?;
        let _ = map.advise(memmap2::Advice::Sequential);
        Ok(Some(bytes::Bytes::from_owner(map)))
    }
}

/// Touching one byte per page brings a mapped chunk into memory.
const PAGE_BYTES: usize = 4096;

#[tonic::async_trait]
impl pb::peer_service_server::PeerService for PeerServer {
    type FetchChunksStream = ReceiverStream<Result<pb::PeerChunk, Status>>;

    async fn fetch_chunks(
        &self,
        request: Request<pb::FetchChunksRequest>,
    ) -> Result<Response<Self::FetchChunksStream>, Status> {
        let caller_der = request
            .peer_certs()
            .and_then(|certs| certs.first().map(|c| c.to_vec()));
        let request = request.into_inner();
        if !fleet_proto::artifact::check_digest(&request.digest) {
            return Err(Status::invalid_argument("not a sha256 digest"));
        }
        let chunk_size = request.chunk_size;
        if !(MIN_CHUNK_BYTES..=MAX_CHUNK_BYTES as u32).contains(&chunk_size) {
            return Err(Status::invalid_argument("chunk size out of range"));
        }
        let ca_pem = read_tls(&self.tls_dir, CA_FILE).map_err(Status::internal)?;
        let caller = authorize(
            caller_der.as_deref(),
            request.grant.as_ref(),
            &request.digest,
            &ca_pem,
        )?;
        let Ok(permit) = self.serving.clone().try_acquire_owned() else {
            return Err(Status::resource_exhausted(
                "this peer serves as many as it can",
            ));
        };
        let held = self
            .fetcher
            .held(&request.digest)
            .ok_or_else(|| Status::not_found("this peer holds no such artifact"))?;
        let (path, size, mut under_way) = match held {
            Held::Complete(path) => {
                let size = std::fs::metadata(&path)
                    .map_err(|e| Status::internal(e.to_string()))?
                    .len();
                (path, size, None)
            }
            Held::Partial {
                path,
                size,
                progress,
                recent,
            } => (path, size, Some((progress, recent))),
        };
        let file = std::fs::File::open(&path)
            .map_err(|_| Status::not_found("this peer holds no such artifact"))?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let fetcher = self.fetcher.clone();
        let digest = request.digest.clone();
        let first = request.first_chunk as u64;
        tokio::spawn(async move {
            let _permit = permit;
            let chunk_size = chunk_size as u64;
            let mut index = first;
            let (mut from_memory, mut from_file) = (0u64, 0u64);
            let mut artifact = ArtifactFile::new(file, size);
            while index * chunk_size < size {
                let start = index * chunk_size;
                let end = (start + chunk_size).min(size);
                let mut kept = None;
                if let Some((progress, recent)) = &mut under_way {
                    // Verified first; then from memory, or from the file once it is written.
                    let waited = tokio::time::timeout(CHUNK_WAIT, async {
                        progress.wait_for(|p| p.verified >= end).await?;
                        kept = recent.get(start, end - start);
                        if kept.is_none() {
                            progress.wait_for(|p| p.on_disk >= end).await?;
                        }
                        Ok::<_, watch::error::RecvError>(())
                    })
                    .await;
                    match waited {
                        Ok(Ok(())) => {}
                        // The download ended: complete (the same file, renamed) or given up.
                        Ok(Err(_)) if matches!(fetcher.held(&digest), Some(Held::Complete(_))) => {
                            under_way = None
                        }
                        Ok(Err(_)) => {
                            let _ = tx
                                .send(Err(Status::unavailable("this peer's download failed")))
                                .await;
                            return;
                        }
                        Err(_) => {
                            let _ = tx
                                .send(Err(Status::deadline_exceeded(
                                    "this peer's download brought nothing new in time",
                                )))
                                .await;
                            return;
                        }
                    }
                }
                let data = match kept {
                    Some(data) => {
                        from_memory += 1;
                        data
                    }
                    None => {
                        from_file += 1;
                        match artifact.read(start, end, under_way.is_none()).await {
                            Ok(data) => data,
                            Err(e) => {
                                tracing::warn!(%digest, "cannot read the artifact for a peer: {e}");
                                let _ = tx
                                    .send(Err(Status::internal("cannot read the artifact")))
                                    .await;
                                return;
                            }
                        }
                    }
                };
                let chunk = pb::PeerChunk {
                    index: index as u32,
                    data,
                };
                if tx.send(Ok(chunk)).await.is_err() {
                    return;
                }
                index += 1;
            }
            drop(artifact);
            crate::memory::give_back_soon();
            tracing::info!(
                %caller,
                %digest,
                chunks = index - first,
                from_memory,
                from_file,
                "served a peer"
            );
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
