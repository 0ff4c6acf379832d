//! Artifacts that outlive a controller, when several controllers share one fleet in etcd. The
//! controller that takes a release does not acknowledge it before its artifact is stored on at
//! least one other live controller ([`Replicas::replicate`]: pushed to every other one at once,
//! the first confirmation is enough; with no other controller up the release is refused), and
//! a controller asked for an artifact it does not hold (an agent's fetch, a peer grant) first
//! fetches it from another controller that does ([`Replicas::ensure_local`]). A copy is kept
//! only once its bytes hash to the digest it was sent under and it passes an upload's checks
//! (`crate::artifacts`).
//!
//! Controllers call each other's `ReplicaService` over mutual TLS as the role `controller`,
//! with a certificate each issues itself with the fleet CA's key they share (re-issued before
//! it ends and whenever the trusted CAs change). Which controllers are up comes from a
//! [`PeerSource`]. The decisions (what a release must wait for, how long a transfer may take,
//! when the own certificate is issued again) are pure functions with table tests; the rest is
//! I/O. With the redb store (one controller) none of this runs: `FleetState::replicas` is
//! `None` and a release is acknowledged as soon as it is stored.

use crate::artifacts::{ArtifactStore, ArtifactStoreError, Upload};
use crate::ca_trust::Trust;
use bytes::Bytes;
use fleet_proto::pb;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

/// Bytes per message of a push or a pull.
pub const CHUNK_BYTES: usize = 1 << 20;
/// How long dialling another controller may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a transfer may go without a message before it is dropped.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// What any transfer may take, whatever its size.
const TRANSFER_BASE: Duration = Duration::from_secs(15);
/// The slowest rate a transfer is given time for, past [`TRANSFER_BASE`].
const TRANSFER_MIN_BYTES_PER_SEC: u64 = 4 << 20;
/// How long the certificate a controller issues itself is valid.
const CREDENTIAL_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// How long it is used before another is issued (well before it ends).
const CREDENTIAL_REUSE: Duration = Duration::from_secs(12 * 3600);
/// The name (CN) of the certificates controllers issue themselves, followed by the address.
pub const CREDENTIAL_NAME_PREFIX: &str = "fleet-controller-at-";

#[derive(Debug, Error)]
pub enum ReplicaError {
    #[error("only one controller is up: a release must be stored on two before it is acknowledged; start another controller of this fleet (`fleet-controller --config controller.toml --data-dir DIR --listen ADDR`) and create the release again")]
    OnlyOneController,
    #[error("the artifact {digest} could not be stored on another controller ({failures}): the release is not acknowledged; check those controllers' logs and disks, then create the release again")]
    NotStored { digest: String, failures: String },
    #[error("this controller does not hold artifact {digest}, and no other controller gave it ({failures}): create the release again (`fleetctl release create`) so that it is stored again")]
    NotHeld { digest: String, failures: String },
    #[error("{0} is not a sha256 digest (sha256:<64 hex digits>)")]
    BadDigest(String),
    #[error("cannot tell which other controllers are up: {0}")]
    Peers(String),
    #[error(transparent)]
    Store(#[from] ArtifactStoreError),
    #[error("{0}")]
    Internal(String),
}

/// Which other controllers of the fleet are up, each as the URL it is dialled at
/// (`https://HOST:PORT`), never this controller's own.
#[tonic::async_trait]
pub trait PeerSource: Send + Sync {
    async fn peers(&self) -> Result<Vec<String>, String>;
}

/// The other live controllers as the registry lists them (`crate::registry::peers`), read on
/// the blocking pool.
pub struct RegisteredPeers {
    pub etcd: Arc<crate::store::etcd::EtcdBackend>,
    /// This controller's URL, left out.
    pub me: String,
}

#[tonic::async_trait]
impl PeerSource for RegisteredPeers {
    async fn peers(&self) -> Result<Vec<String>, String> {
        let (etcd, me) = (self.etcd.clone(), self.me.clone());
        tokio::task::spawn_blocking(move || crate::registry::peers(&etcd, &me))
            .await
            .map_err(|e| format!("reading the registry crashed: {e}"))?
            .map_err(|e| e.to_string())
    }
}

/// What a release create must do before it is acknowledged, decided from the other
/// controllers up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Push the artifact to each of these (distinct, in order) and wait for one to confirm.
    PushTo(Vec<String>),
    /// Refuse the release: nobody else could keep a copy.
    Refuse,
}

/// The plan for a release create: every other controller up (a URL named twice, or this
/// controller's own `own_url` if the source named it, counts once or not at all).
pub fn plan(own_url: Option<&str>, peers: Vec<String>) -> Plan {
    let mut distinct: Vec<String> = Vec::new();
    for url in peers {
        let url = url.trim_end_matches('/').to_string();
        if Some(url.as_str()) != own_url.map(|own| own.trim_end_matches('/'))
            && !distinct.contains(&url)
        {
            distinct.push(url);
        }
    }
    if distinct.is_empty() {
        Plan::Refuse
    } else {
        Plan::PushTo(distinct)
    }
}

/// How long the transfer of an artifact of `size` bytes may take in all.
pub fn transfer_deadline(size: u64) -> Duration {
    TRANSFER_BASE + Duration::from_secs(size / TRANSFER_MIN_BYTES_PER_SEC)
}

/// Whether the certificate issued at `issued` under the CA bundle `issued_under` may still be
/// used at `now` with the CA bundle `trusted_now`: not once the trusted CAs changed (a
/// rotation), nor after [`CREDENTIAL_REUSE`].
pub fn credential_usable(
    issued: Instant,
    issued_under: &str,
    now: Instant,
    trusted_now: &str,
) -> bool {
    issued_under == trusted_now && now.saturating_duration_since(issued) < CREDENTIAL_REUSE
}

/// The certificate this controller calls others with, and what it was issued under.
struct Credential {
    tls: tonic::transport::ClientTlsConfig,
    issued: Instant,
    ca_bundle: String,
}

/// One controller's side of artifact replication; see the module doc.
pub struct Replicas {
    artifacts: ArtifactStore,
    trust: Arc<Trust>,
    peers: Arc<dyn PeerSource>,
    /// The URL this controller is dialled at, if known: left out of the peers.
    own_url: Option<String>,
    /// What the certificates it issues itself are named (CN).
    name: String,
    credential: Mutex<Option<Credential>>,
    /// One fetch from peers per digest at a time; the others wait for it.
    pulls: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for Replicas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicas")
            .field("name", &self.name)
            .field("own_url", &self.own_url)
            .finish_non_exhaustive()
    }
}

/// A copy pushed by another controller, being received.
pub struct Receiving {
    digest: String,
    upload: Upload,
    artifacts: ArtifactStore,
}

impl Replicas {
    /// `own_url`: the URL the other controllers dial this one at (its advertise URL).
    pub fn new(
        artifacts: ArtifactStore,
        trust: Arc<Trust>,
        peers: Arc<dyn PeerSource>,
        own_url: String,
    ) -> Replicas {
        let name = format!(
            "{CREDENTIAL_NAME_PREFIX}{}",
            own_url.trim_start_matches("https://")
        );
        Replicas {
            artifacts,
            trust,
            peers,
            own_url: Some(own_url),
            name,
            credential: Mutex::default(),
            pulls: Mutex::default(),
        }
    }

    /// Refuses at once when no other controller is up: what `release create` checks before
    /// it takes any bytes (and [`Replicas::replicate`] again once it has them).
    pub async fn require_another_controller(&self) -> Result<Vec<String>, ReplicaError> {
        let peers = self.peers.peers().await.map_err(ReplicaError::Peers)?;
        match plan(self.own_url.as_deref(), peers) {
            Plan::PushTo(peers) => Ok(peers),
            Plan::Refuse => Err(ReplicaError::OnlyOneController),
        }
    }

    /// Gets the stored artifact `digest` stored on at least one other controller: pushed to
    /// every other controller up at once, done at the first that confirms (the pushes to the
    /// others go on in the background, each within its deadline). Returns who confirmed.
    pub async fn replicate(&self, digest: &str) -> Result<String, ReplicaError> {
        let peers = self.require_another_controller().await?;
        let path = self.path_of(digest)?;
        let size = std::fs::metadata(&path)
            .map_err(|source| ArtifactStoreError::Io {
                path: path.clone(),
                source,
            })?
            .len();
        let tls = self.client_tls()?;
        let (tx, mut rx) = mpsc::channel(peers.len());
        for url in peers {
            let (tx, tls, path, digest) =
                (tx.clone(), tls.clone(), path.clone(), digest.to_string());
            tokio::spawn(async move {
                let started = Instant::now();
                let result = push(&url, tls, &digest, &path, size).await;
                match &result {
                    Ok(already_held) => tracing::info!(
                        %digest, peer = %url, already_held,
                        "artifact stored on another controller in {:?}", started.elapsed()
                    ),
                    Err(why) => {
                        tracing::warn!(%digest, peer = %url, "artifact not stored on another controller: {why}")
                    }
                }
                let _ = tx.send((url, result)).await;
            });
        }
        drop(tx);
        let mut failures = Vec::new();
        while let Some((url, result)) = rx.recv().await {
            match result {
                Ok(_) => return Ok(url),
                Err(why) => failures.push(format!("{url}: {why}")),
            }
        }
        Err(ReplicaError::NotStored {
            digest: digest.to_string(),
            failures: failures.join("; "),
        })
    }

    /// Makes sure the artifact `digest` is stored here: at once when it is, else fetched from
    /// the first other controller that holds it (each tried in turn), checked and kept. Returns
    /// the controller it came from, or `None` when it was here already.
    pub async fn ensure_local(&self, digest: &str) -> Result<Option<String>, ReplicaError> {
        self.path_of(digest)?;
        if self.artifacts.holds(digest) {
            return Ok(None);
        }
        let lock = self
            .pulls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(digest.to_string())
            .or_default()
            .clone();
        let _one_at_a_time = lock.lock().await;
        let result = self.pull_from_peers(digest).await;
        self.pulls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(digest);
        result
    }

    async fn pull_from_peers(&self, digest: &str) -> Result<Option<String>, ReplicaError> {
        // Another caller may have fetched it while this one waited.
        if self.artifacts.holds(digest) {
            return Ok(None);
        }
        let peers = self.peers.peers().await.map_err(ReplicaError::Peers)?;
        let Plan::PushTo(peers) = plan(self.own_url.as_deref(), peers) else {
            return Err(ReplicaError::NotHeld {
                digest: digest.to_string(),
                failures: "no other controller is up".to_string(),
            });
        };
        let tls = self.client_tls()?;
        let mut failures = Vec::new();
        for url in peers {
            let started = Instant::now();
            match self.pull(&url, tls.clone(), digest).await {
                Ok(()) => {
                    tracing::info!(%digest, peer = %url, "artifact fetched from another controller in {:?}", started.elapsed());
                    return Ok(Some(url));
                }
                Err(why) => {
                    tracing::warn!(%digest, peer = %url, "artifact not fetched from another controller: {why}");
                    failures.push(format!("{url}: {why}"));
                }
            }
        }
        Err(ReplicaError::NotHeld {
            digest: digest.to_string(),
            failures: failures.join("; "),
        })
    }

    /// Fetches `digest` from the controller at `url`, checks it and keeps it.
    async fn pull(
        &self,
        url: &str,
        tls: tonic::transport::ClientTlsConfig,
        digest: &str,
    ) -> Result<(), String> {
        let channel = connect(url, tls).await?;
        let mut client = pb::replica_service_client::ReplicaServiceClient::new(channel)
            .max_decoding_message_size(CHUNK_BYTES + (64 << 10));
        let mut stream = tokio::time::timeout(
            IDLE_TIMEOUT,
            client.pull_artifact(pb::PullArtifactRequest {
                digest: digest.to_string(),
            }),
        )
        .await
        .map_err(|_| format!("no answer within {IDLE_TIMEOUT:?}"))?
        .map_err(|status| status.message().to_string())?
        .into_inner();
        let mut upload = self.artifacts.begin_replica().map_err(|e| e.to_string())?;
        loop {
            let message = tokio::time::timeout(IDLE_TIMEOUT, stream.message())
                .await
                .map_err(|_| format!("it sent nothing for {IDLE_TIMEOUT:?}"))?
                .map_err(|status| status.message().to_string())?;
            let Some(chunk) = message else { break };
            upload = write_blocking(upload, chunk.data)
                .await
                .map_err(|e| e.to_string())?;
        }
        let receiving = Receiving {
            digest: digest.to_string(),
            upload,
            artifacts: self.artifacts.clone(),
        };
        receiving.finish().await.map_err(|e| e.to_string())
    }

    /// Starts taking a copy of `digest` pushed by another controller, or `None` when it is
    /// stored here already.
    pub fn begin_receive(&self, digest: &str) -> Result<Option<Receiving>, ReplicaError> {
        self.path_of(digest)?;
        if self.artifacts.holds(digest) {
            return Ok(None);
        }
        Ok(Some(Receiving {
            digest: digest.to_string(),
            upload: self.artifacts.begin_replica()?,
            artifacts: self.artifacts.clone(),
        }))
    }

    /// Where the artifact `digest` is (or would be) stored; a malformed digest is refused.
    pub fn path_of(&self, digest: &str) -> Result<PathBuf, ReplicaError> {
        self.artifacts
            .path_of(digest)
            .ok_or_else(|| ReplicaError::BadDigest(fleet_proto::names::quoted(digest)))
    }

    /// The TLS settings this controller dials others with: the fleet's CAs, and a certificate
    /// with the role `controller` it issued itself (again when [`credential_usable`] says so).
    fn client_tls(&self) -> Result<tonic::transport::ClientTlsConfig, ReplicaError> {
        let mut credential = self.credential.lock().unwrap_or_else(|e| e.into_inner());
        let ca_bundle = self.trust.ca_bundle();
        let now = Instant::now();
        if let Some(current) = credential.as_ref() {
            if credential_usable(current.issued, &current.ca_bundle, now, &ca_bundle) {
                return Ok(current.tls.clone());
            }
        }
        let issued = self
            .trust
            .authority()
            .issue_client(&self.name, fleet_pki::Role::Controller, CREDENTIAL_LIFETIME)
            .map_err(|e| {
                ReplicaError::Internal(format!(
                    "cannot issue this controller's certificate for the others: {e}"
                ))
            })?;
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&ca_bundle))
            .identity(tonic::transport::Identity::from_pem(
                &issued.cert_pem,
                issued.key_pem.unwrap_or_default(),
            ))
            .domain_name(fleet_pki::CONTROLLER_TLS_NAME);
        *credential = Some(Credential {
            tls: tls.clone(),
            issued: now,
            ca_bundle,
        });
        Ok(tls)
    }
}

impl Receiving {
    /// Appends bytes (on the blocking pool: the write may wait on the disk).
    pub async fn write(self, bytes: Bytes) -> Result<Receiving, ReplicaError> {
        let Receiving {
            digest,
            upload,
            artifacts,
        } = self;
        let upload = write_blocking(upload, bytes).await?;
        Ok(Receiving {
            digest,
            upload,
            artifacts,
        })
    }

    /// Checks the copy against its digest and an upload's rules, and keeps it.
    pub async fn finish(self) -> Result<(), ReplicaError> {
        let Receiving {
            digest,
            upload,
            artifacts,
        } = self;
        tokio::task::spawn_blocking(move || {
            let checked = artifacts.check_replica(upload, &digest)?;
            artifacts.keep(checked)?;
            Ok(())
        })
        .await
        .map_err(|e| ReplicaError::Internal(format!("keeping the copy crashed: {e}")))?
    }
}

async fn write_blocking(mut upload: Upload, bytes: Bytes) -> Result<Upload, ReplicaError> {
    tokio::task::spawn_blocking(move || {
        upload.write(&bytes)?;
        Ok(upload)
    })
    .await
    .map_err(|e| ReplicaError::Internal(format!("writing the copy crashed: {e}")))?
}

/// Dials the controller at `url` as a controller.
async fn connect(
    url: &str,
    tls: tonic::transport::ClientTlsConfig,
) -> Result<tonic::transport::Channel, String> {
    tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| format!("not a controller URL: {e}"))?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(CONNECT_TIMEOUT)
        // Megabyte windows, as the controller serves with, so a copy is not stalled every
        // 64 KiB by flow control.
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(8 << 20))
        .connect()
        .await
        .map_err(|e| fleet_proto::error_text::with_sources(&e))
}

/// Pushes the artifact at `path` to the controller at `url` and waits for it to confirm it
/// stored it, within [`transfer_deadline`]. `Ok(true)`: it held it already.
async fn push(
    url: &str,
    tls: tonic::transport::ClientTlsConfig,
    digest: &str,
    path: &Path,
    size: u64,
) -> Result<bool, String> {
    let deadline = transfer_deadline(size);
    let transfer = async {
        let channel = connect(url, tls).await?;
        let mut client = pb::replica_service_client::ReplicaServiceClient::new(channel);
        let first = pb::PushArtifactRequest {
            digest: digest.to_string(),
            data: Bytes::new(),
        };
        let chunks = read_chunks(path.to_path_buf()).map_while(|chunk| {
            // A read error ends the stream short: the callee's digest check refuses it.
            chunk
                .map_err(|e| tracing::error!("cannot read the artifact to push it: {e}"))
                .ok()
                .map(|data| pb::PushArtifactRequest {
                    digest: String::new(),
                    data,
                })
        });
        let messages = tokio_stream::once(first).chain(chunks);
        let response = client
            .push_artifact(messages)
            .await
            .map_err(|status| status.message().to_string())?;
        Ok(response.into_inner().already_held)
    };
    tokio::time::timeout(deadline, transfer)
        .await
        .map_err(|_| format!("it did not confirm within {deadline:?}"))?
}

/// The bytes of the file at `path` in chunks of [`CHUNK_BYTES`], read on the blocking pool.
pub fn read_chunks(path: PathBuf) -> ReceiverStream<std::io::Result<Bytes>> {
    let (tx, rx) = mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        };
        loop {
            let mut chunk = vec![0u8; CHUNK_BYTES];
            let mut filled = 0;
            while filled < CHUNK_BYTES {
                match file.read(&mut chunk[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        return;
                    }
                }
            }
            if filled == 0 {
                return;
            }
            chunk.truncate(filled);
            if tx.blocking_send(Ok(Bytes::from(chunk))).is_err() || filled < CHUNK_BYTES {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_release_waits_for_another_controller_or_is_refused() {
        let urls = |list: &[&str]| list.iter().map(|u| u.to_string()).collect::<Vec<_>>();
        let own = Some("https://127.0.0.1:7700");
        for (peers, expected) in [
            (vec![], Plan::Refuse),
            // Its own URL named by the source is no other controller.
            (vec!["https://127.0.0.1:7700"], Plan::Refuse),
            (vec!["https://127.0.0.1:7700/"], Plan::Refuse),
            (
                vec!["https://127.0.0.1:7701"],
                Plan::PushTo(urls(&["https://127.0.0.1:7701"])),
            ),
            (
                vec![
                    "https://127.0.0.1:7702",
                    "https://127.0.0.1:7700",
                    "https://127.0.0.1:7701/",
                    "https://127.0.0.1:7702",
                ],
                Plan::PushTo(urls(&["https://127.0.0.1:7702", "https://127.0.0.1:7701"])),
            ),
        ] {
            assert_eq!(plan(own, urls(&peers)), expected, "{peers:?}");
        }
        assert_eq!(
            plan(None, urls(&["https://127.0.0.1:7700"])),
            Plan::PushTo(urls(&["https://127.0.0.1:7700"]))
        );
    }

    #[test]
    fn a_transfer_gets_time_for_its_size() {
        for (size, secs) in [
            (0, 15),
            (1 << 20, 15),
            (4 << 20, 16),
            (100 << 20, 40),
            (crate::artifacts::MAX_ARTIFACT_BYTES, 15 + 1024),
        ] {
            assert_eq!(transfer_deadline(size), Duration::from_secs(secs), "{size}");
        }
    }

    #[test]
    fn the_own_certificate_is_issued_again_after_a_while_or_a_rotation() {
        let issued = Instant::now();
        let hour = Duration::from_secs(3600);
        for (after, under, now_trusted, usable) in [
            (Duration::ZERO, "ca", "ca", true),
            (11 * hour, "ca", "ca", true),
            (12 * hour, "ca", "ca", false),
            (Duration::ZERO, "ca", "new+ca", false),
            (hour, "new+ca", "new", false),
        ] {
            assert_eq!(
                credential_usable(issued, under, issued + after, now_trusted),
                usable,
                "{after:?} {under} {now_trusted}"
            );
        }
    }

    #[tokio::test]
    async fn a_file_is_read_in_chunks() {
        let dir = tempfile::tempdir().unwrap();
        for len in [0, 1, CHUNK_BYTES, CHUNK_BYTES + 1, 3 * CHUNK_BYTES - 7] {
            let path = dir.path().join(format!("f{len}"));
            let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            std::fs::write(&path, &bytes).unwrap();
            let chunks: Vec<Bytes> = read_chunks(path)
                .map(|chunk| chunk.unwrap())
                .collect()
                .await;
            assert!(chunks
                .iter()
                .all(|c| !c.is_empty() && c.len() <= CHUNK_BYTES));
            assert_eq!(chunks.concat(), bytes, "{len}");
        }
        let missing: Vec<_> = read_chunks(dir.path().join("missing")).collect().await;
        assert!(matches!(missing.as_slice(), [Err(_)]));
    }
}
