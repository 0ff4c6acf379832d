//! `AgentService`: each agent's long-lived session (hello, desired state, reports,
//! heartbeats) and artifact fetches, streamed from an offset so a cut fetch resumes, and
//! `Join`, where a new host trades a one-time token and its certificate request for a
//! certificate naming it. Every call but `Join` needs an agent certificate, and an agent
//! speaks only for the host its certificate names (see `crate::auth`). An artifact this
//! controller does not hold (several controllers) is fetched from another one first.

use super::{convert, store_status};
use crate::auth::{self, Role};
use crate::ca_trust::{self, Trust, TrustEvent};
use crate::fleet_state::{FleetState, HostHello};
use crate::heartbeat::Cadence;
use crate::log_relay::{LogChunk, LogCommand};
use crate::model::AgentInfo;
use crate::store::{CertificateRecord, TokenUse};
use fleet_proto::pb::{
    self, agent_message::Body as AgentBody, controller_message::Body as ControllerBody,
};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// Bytes per artifact chunk: large enough that per-message overhead vanishes, well under
/// gRPC's 4 MiB message limit.
pub const CHUNK_BYTES: usize = 1 << 20;
/// The page size (or a divisor of it): touching one byte per page faults a chunk in.
const PAGE_BYTES: usize = 4096;
/// How long an agent has to say hello after opening its session.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

pub struct AgentApi {
    pub fleet: Arc<FleetState>,
    /// Log requests go down the sessions, and their answers come back through it.
    pub logs: Arc<crate::log_relay::LogRelay>,
    /// The fleet CA, which signs the certificates of joining and renewing hosts.
    pub trust: Arc<Trust>,
    /// Turns true when the controller shuts down, ending every session.
    pub shutdown: watch::Receiver<bool>,
    /// Joins under way at once ([`MAX_CONCURRENT_JOINS`]).
    pub joins: Arc<tokio::sync::Semaphore>,
    /// How often each host opened a session lately ([`crate::reconnects`]).
    pub reconnects: Arc<crate::reconnects::Reconnects>,
    /// The certificates (serials) already logged speaking for another host: each is logged
    /// once, however often it tries (every try is refused).
    pub impostors_logged: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    /// Which hosts hold which artifacts and serve them to peers (`ArtifactSources`).
    pub peers: Arc<crate::peers::Directory>,
    /// This controller's role: a session ends, with the redirect to the new leader, when it
    /// stops leading.
    pub role: watch::Receiver<crate::leader::Role>,
}

/// The most impostor certificates remembered as logged; past it the set starts afresh.
const IMPOSTORS_REMEMBERED: usize = 10_000;

/// How long a peer-fetch grant is valid: long enough for a large artifact over a slow link,
/// short enough that a removed host's grant soon means nothing.
const GRANT_TTL: Duration = Duration::from_secs(15 * 60);
/// Peers a fetch may say it dropped, at most.
const MAX_EXCLUDED_PEERS: usize = 64;

/// How many `Join` calls are handled at once; more are told to retry (agents do).
pub const MAX_CONCURRENT_JOINS: usize = 16;

type Outbound = Result<pb::ControllerMessage, Status>;

fn check_hello(hello: pb::Hello) -> Result<HostHello, Status> {
    let bad = |m: String| Status::invalid_argument(m);
    fleet_proto::names::check_host(&hello.host_name).map_err(|e| bad(e.to_string()))?;
    let mut labels = BTreeMap::new();
    for (key, value) in hello.labels {
        fleet_proto::names::check_label(&key, &value).map_err(|e| bad(e.to_string()))?;
        labels.insert(key, value);
    }
    if hello.advertise_addr.parse::<IpAddr>().is_err() {
        return Err(bad(format!(
            "advertise address {} is not an IP address",
            fleet_proto::names::quoted(&hello.advertise_addr)
        )));
    }
    for (what, value) in [
        ("agent version", &hello.agent_version),
        ("agent architecture", &hello.agent_arch),
    ] {
        if value.len() > 64 || value.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(bad(format!(
                "{what} {} is not a version or an architecture name",
                fleet_proto::names::quoted(value)
            )));
        }
    }
    let mut instances = Vec::new();
    for report in hello.instances {
        match convert::instance_from(report) {
            Ok(instance) => instances.push(instance),
            Err(e) => tracing::warn!("host {} reported a bad instance: {e}", hello.host_name),
        }
    }
    Ok(HostHello {
        name: hello.host_name,
        labels,
        advertise_addr: hello.advertise_addr,
        instances,
        agent: AgentInfo {
            version: hello.agent_version,
            arch: hello.agent_arch,
        },
    })
}

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentApi {
    type SessionStream = ReceiverStream<Outbound>;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let identity = auth::require(&self.fleet, &request, Role::Agent)?;
        let presented: Vec<u8> = request
            .peer_certs()
            .and_then(|certs| certs.first().map(|cert| cert.to_vec()))
            .unwrap_or_default();
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 10s"))??;
        let (hello, peer_port) = match first.and_then(|m| m.body) {
            Some(AgentBody::Hello(hello)) => {
                let peer_port = hello.peer_port;
                (check_hello(hello)?, peer_port)
            }
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of a session must be a hello",
                ))
            }
        };
        // Before anything is logged or written: a certificate used in a loop costs a map lookup.
        if !self.reconnects.admit(&identity.name) {
            return Err(Status::unavailable(format!(
                "host `{}` opens sessions too often (more than {} a second after a burst of {}): \
                 wait a moment before reconnecting (the agent backs off by itself)",
                identity.name,
                crate::reconnects::PER_SECOND,
                crate::reconnects::BURST
            )));
        }
        if let Err(refused) = auth::host_scope::require_own_host(&identity, &hello.name) {
            let first = {
                let mut logged = self
                    .impostors_logged
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if logged.len() >= IMPOSTORS_REMEMBERED {
                    logged.clear();
                }
                logged.insert(identity.serial.clone())
            };
            if first {
                // Names were checked above: the line holds no control characters.
                tracing::warn!(
                    "a session with the certificate of host {} (serial {}) tried to speak for host {}: refused (further tries of this certificate are refused without a log line)",
                    identity.name,
                    identity.serial,
                    hello.name
                );
            }
            return Err(refused);
        }
        // The labels the host's join token named, if it did (the certificate records them).
        let joined_labels = self
            .fleet
            .certificate(&identity.serial)
            .map_err(store_status)?
            .and_then(|certificate| certificate.labels);
        let host = hello.name.clone();
        let advertise: Option<IpAddr> = hello.advertise_addr.parse().ok();
        let Some(session) = self
            .fleet
            .host_connected(hello, joined_labels, &identity.serial)
            .await
            .map_err(store_status)?
        else {
            let purge = self
                .fleet
                .revocation(&identity.serial)
                .map_err(store_status)?
                .is_some_and(|revocation| revocation.purge);
            return Err(fleet_proto::refusal::revoked_status(
                auth::revoked(&identity),
                purge,
            ));
        };
        let peers = self.peers.clone();
        let peer_session = advertise.map(|ip| peers.session_opened(&host, ip, peer_port));
        let (tx, rx) = mpsc::channel::<Outbound>(16);
        let mut cadence = session.cadence;
        let _ = tx.send(Ok(welcome(cadence))).await;
        // Counted by the CA of its certificate while it lasts (`ca rotate --finish` asks), and
        // told to renew when that CA no longer signs.
        self.trust.session_opened(&host, &presented);
        let trust = self.trust.clone();
        let mut trust_changes = self.trust.changes();
        let mut trust_event = Some(TrustEvent::Connected);
        let fleet = self.fleet.clone();
        let logs = self.logs.clone();
        let mut log_commands = logs.attach(&host, session.id);
        let mut shutdown = self.shutdown.clone();
        let mut role = self.role.clone();
        tokio::spawn(async move {
            let mut desired = session.desired;
            let mut send_desired = true;
            loop {
                if let Some(event) = trust_event.take() {
                    if ca_trust::advise_renewal(
                        event,
                        trust.from_signing_ca(&presented),
                        trust.issued_before_last_finish(&presented),
                    ) {
                        tracing::info!("asking host {host} to renew its certificate ({event:?})");
                        let message = pb::ControllerMessage {
                            body: Some(ControllerBody::Renew(pb::RenewCertificate {
                                reason: format!("{event:?}"),
                            })),
                        };
                        if tx.send(Ok(message)).await.is_err() {
                            break;
                        }
                    }
                }
                if send_desired {
                    let (assignments, draining) = {
                        let desired = desired.borrow_and_update();
                        let assignments = desired
                            .assignments
                            .iter()
                            .map(convert::assignment)
                            .collect();
                        (assignments, desired.draining)
                    };
                    let message = pb::ControllerMessage {
                        body: Some(ControllerBody::Desired(pb::DesiredState {
                            assignments,
                            draining,
                        })),
                    };
                    if tx.send(Ok(message)).await.is_err() {
                        break;
                    }
                    send_desired = false;
                }
                // Three missed heartbeats end the session.
                let silence = Duration::from_millis(cadence.interval_ms * 3);
                tokio::select! {
                    changed = desired.changed() => match changed {
                        Ok(()) => send_desired = true,
                        // A newer session of this host replaced this one, or the host was
                        // removed: then the agent hears it was revoked at once.
                        Err(_) => {
                            if let Err(revoked) = auth::host_scope::session_still_allowed(&fleet, &identity) {
                                let _ = tx.send(Err(revoked)).await;
                            }
                            break;
                        }
                    },
                    message = tokio::time::timeout(silence, inbound.message()) => match message {
                        Ok(Ok(Some(pb::AgentMessage { body: Some(AgentBody::Report(report)) }))) => {
                            match convert::instance_from(report) {
                                Ok(status) => fleet.host_reported(&host, session.id, status).await,
                                Err(e) => tracing::warn!("host {host} sent a bad report: {e}"),
                            }
                        }
                        Ok(Ok(Some(pb::AgentMessage { body: Some(AgentBody::Heartbeat(_)) }))) => {
                            // A host removed (its certificate revoked) loses its session here,
                            // with the revoked answer, so that its agent ends.
                            if let Err(revoked) = auth::host_scope::session_still_allowed(&fleet, &identity) {
                                tracing::warn!("host {host}'s certificate was revoked: ending its session");
                                let _ = tx.send(Err(revoked)).await;
                                break;
                            }
                            if let Some(now) = fleet.host_heartbeat(&host, session.id) {
                                cadence = now;
                                // The answer: the agent knows it is heard (it needs no HTTP/2
                                // pings of its own) and takes the interval as it stands. An
                                // agent that does not read its answers is not waited for.
                                if let Err(mpsc::error::TrySendError::Closed(_)) =
                                    tx.try_send(Ok(welcome(cadence)))
                                {
                                    break;
                                }
                            }
                        }
                        Ok(Ok(Some(pb::AgentMessage { body: Some(AgentBody::LogLines(answer)) }))) => {
                            let error = (!answer.error.is_empty()).then_some(answer.error);
                            let chunk = LogChunk { lines: answer.lines, done: answer.done || error.is_some(), error };
                            logs.deliver(&host, &answer.request_id, chunk);
                        }
                        Ok(Ok(Some(_))) => tracing::warn!("host {host} sent an unexpected message"),
                        Ok(Ok(None)) => break,
                        Ok(Err(e)) => {
                            tracing::info!("session of host {host} ended: {}", e.message());
                            break;
                        }
                        Err(_) => {
                            tracing::warn!("host {host} sent nothing for {silence:?}: ending its session");
                            break;
                        }
                    },
                    changed = trust_changes.changed() => match changed {
                        Ok(()) => trust_event = Some(trust_changes.borrow_and_update().1),
                        Err(_) => break,
                    },
                    Some(command) = log_commands.recv() => {
                        let body = match command {
                            LogCommand::Request { request_id, app, lines, follow } => {
                                ControllerBody::LogRequest(pb::LogRequest { request_id, app, lines, follow })
                            }
                            LogCommand::Cancel { request_id } => {
                                ControllerBody::LogCancel(pb::LogCancel { request_id })
                            }
                        };
                        if tx.send(Ok(pb::ControllerMessage { body: Some(body) })).await.is_err() {
                            break;
                        }
                    }
                    _ = shutdown.changed() => break,
                    _ = crate::leader::until(&mut role, |role| !role.is_leader()) => {
                        // Deposed: the agent follows the redirect once a new leader is known
                        // (until then it tries its other controllers).
                        let leader = role.borrow().leader_url().map(str::to_string);
                        let _ = tx.send(Err(fleet_proto::leader::not_leader_status(leader.as_deref()))).await;
                        break;
                    }
                }
            }
            logs.detach(&host, session.id);
            if let Some(token) = peer_session {
                peers.session_closed(&host, token);
            }
            fleet.host_disconnected(&host, session.id).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let request = request.into_inner();
        let host = request.host_name;
        fleet_proto::names::check_host(&host)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let refused = || {
            Status::permission_denied(
                "the join token is not valid: create a new one with `fleetctl join-token create`",
            )
        };
        if !auth::tokens::well_formed(&request.token) {
            return Err(refused());
        }
        // The request is checked before the token is spent, so a broken agent wastes no token.
        let key_sha256 = fleet_pki::request::request_key_sha256(&request.csr_pem)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let now = fleet_proto::now_unix_ms();
        // Joins are few; a flood of them waits for no one else's store writes.
        let Ok(_joining) = self.joins.try_acquire() else {
            return Err(Status::unavailable(
                "too many hosts are joining at once: try again in a moment (the agent retries by itself)",
            ));
        };
        // A token that cannot be spent is refused before anything is signed or written.
        let precheck = self
            .fleet
            .join_precheck(auth::tokens::hash(&request.token), &host, &key_sha256, now)
            .map_err(store_status)?;
        if let Some(outcome) = precheck {
            if let Some(certificate_pem) = join_answer(outcome, &host)? {
                return Ok(Response::new(pb::JoinResponse {
                    certificate_pem,
                    ca_pem: self.trust.ca_bundle(),
                }));
            }
        }
        // Signed first, handed out only when the store admits the join (one transaction).
        let authority = self.trust.authority();
        let issued = authority
            .sign_request(
                &request.csr_pem,
                &host,
                Role::Agent,
                self.trust.certificate_ttl,
            )
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let certificate = CertificateRecord {
            serial: issued.serial.clone(),
            name: host.clone(),
            role: Role::Agent.as_str().to_string(),
            issued_unix_ms: now,
            not_after_unix_ms: issued.not_after_unix_ms,
            issued_by: "join token".to_string(),
            labels: None,
        };
        let outcome = self
            .fleet
            .join_with_token(
                auth::tokens::hash(&request.token),
                certificate,
                issued.cert_pem.clone(),
                key_sha256,
                now,
            )
            .await
            .map_err(store_status)?;
        if let Some(certificate_pem) = join_answer(outcome, &host)? {
            return Ok(Response::new(pb::JoinResponse {
                certificate_pem,
                ca_pem: self.trust.ca_bundle(),
            }));
        }
        self.fleet
            .event(
                &format!("host:{host}"),
                "host.joined",
                "",
                &host,
                format!(
                    "host {host} joined with a join token (certificate {})",
                    issued.serial
                ),
            )
            .await;
        Ok(Response::new(pb::JoinResponse {
            certificate_pem: issued.cert_pem,
            ca_pem: authority.ca_pem().to_string(),
        }))
    }

    async fn renew(
        &self,
        request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        // The name and role come from the certificate presented: a host renews only itself,
        // and only while that certificate is trusted and not revoked.
        let identity = auth::require(&self.fleet, &request, Role::Agent)?;
        let request = request.into_inner();
        let authority = self.trust.authority();
        let issued = authority
            .sign_request(
                &request.csr_pem,
                &identity.name,
                Role::Agent,
                self.trust.certificate_ttl,
            )
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // The labels its join token named go with the host to its new certificate.
        let labels = self
            .fleet
            .certificate(&identity.serial)
            .map_err(store_status)?
            .and_then(|certificate| certificate.labels);
        let now = fleet_proto::now_unix_ms();
        self.fleet
            .record_certificate(CertificateRecord {
                serial: issued.serial.clone(),
                name: identity.name.clone(),
                role: Role::Agent.as_str().to_string(),
                issued_unix_ms: now,
                not_after_unix_ms: issued.not_after_unix_ms,
                issued_by: format!("{}{}", super::certificates::RENEWAL_OF, identity.serial),
                labels,
            })
            .await
            .map_err(store_status)?;
        let host = &identity.name;
        self.fleet
            .event(
                &format!("host:{host}"),
                "host.certificate_renewed",
                "",
                host,
                format!(
                    "host {host} renewed its certificate {} for {} (valid {})",
                    identity.serial,
                    issued.serial,
                    fleet_pki::lifetime::format_lifetime(self.trust.certificate_ttl),
                ),
            )
            .await;
        Ok(Response::new(pb::RenewResponse {
            certificate_pem: issued.cert_pem,
            ca_pem: authority.ca_pem().to_string(),
        }))
    }

    type FetchArtifactStream = ReceiverStream<Result<pb::ArtifactChunk, Status>>;

    async fn fetch_artifact(
        &self,
        request: Request<pb::FetchArtifactRequest>,
    ) -> Result<Response<Self::FetchArtifactStream>, Status> {
        let identity = auth::require(&self.fleet, &request, Role::Agent)?;
        let request = request.into_inner();
        auth::host_scope::require_artifact_of_own_host(&self.fleet, &identity, &request.digest)?;
        super::replica_service::ensure_local(&self.fleet, &request.digest).await?;
        let path = self
            .fleet
            .artifacts()
            .path_of(&request.digest)
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "{} is not a sha256 digest",
                    fleet_proto::names::quoted(&request.digest)
                ))
            })?;
        let file = std::fs::File::open(&path)
            .map_err(|_| Status::not_found(format!("no artifact {}", request.digest)))?;
        let size = file
            .metadata()
            .map_err(|e| Status::internal(e.to_string()))?
            .len();
        if request.offset > size {
            return Err(Status::out_of_range(format!(
                "offset {} is past the end of artifact {} ({size} bytes)",
                request.offset, request.digest
            )));
        }
        let (tx, rx) = mpsc::channel(4);
        if request.offset == size {
            return Ok(Response::new(ReceiverStream::new(rx)));
        }
        // SAFETY: a stored artifact is never written again: it is renamed into place whole and
        // only ever removed, which leaves a mapping valid (see `crate::artifacts`).
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| {
            tracing::error!(digest = %request.digest, "cannot map the stored artifact: {e}");
            Status::internal(format!(
                "the controller cannot read artifact {} from its store ({e}); its operator \
                 should check the data directory's disk and permissions",
                request.digest
            ))
        })?;
        let _ = map.advise(memmap2::Advice::Sequential);
        // Each chunk is a slice of the page cache itself: no read into a fresh buffer per chunk;
        // the encoder copies it once, into the gRPC frame. A blocking thread touches every page
        // of a chunk before it is sent, so a page that must come from the disk stalls that
        // thread and never a runtime worker.
        let artifact = bytes::Bytes::from_owner(map);
        tokio::task::spawn_blocking(move || {
            let mut at = request.offset as usize;
            while at < artifact.len() {
                let chunk = artifact.slice(at..artifact.len().min(at + CHUNK_BYTES));
                at += chunk.len();
                std::hint::black_box(chunk.iter().step_by(PAGE_BYTES).fold(0, |a, b| a ^ b));
                let n_bytes = chunk.len() as u64;
                let message = pb::ArtifactChunk { data: chunk };
                if tx.blocking_send(Ok(message)).is_err() {
                    return;
                }
                crate::peers::count_sent(n_bytes);
                crate::http::metrics::note_artifact_bytes_sent(n_bytes);
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn artifact_sources(
        &self,
        request: Request<pb::ArtifactSourcesRequest>,
    ) -> Result<Response<pb::ArtifactSourcesResponse>, Status> {
        let identity = auth::require(&self.fleet, &request, Role::Agent)?;
        let request = request.into_inner();
        auth::host_scope::require_artifact_of_own_host(&self.fleet, &identity, &request.digest)?;
        if request.exclude_hosts.len() > MAX_EXCLUDED_PEERS {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_EXCLUDED_PEERS} excluded peers"
            )));
        }
        super::replica_service::ensure_local(&self.fleet, &request.digest).await?;
        let path = self
            .fleet
            .artifacts()
            .path_of(&request.digest)
            .ok_or_else(|| Status::invalid_argument("not a sha256 digest"))?;
        let chunks = self
            .peers
            .chunk_list(&request.digest, &path)
            .await
            .map_err(|_| Status::not_found(format!("no artifact {}", request.digest)))?;
        let peers = self
            .peers
            .sources(&identity.name, &request.digest, &request.exclude_hosts)
            .into_iter()
            .map(|(host_name, addr)| pb::ArtifactPeer {
                host_name,
                addr: addr.to_string(),
            })
            .collect();
        let grant = fleet_pki::grant::Grant {
            host_name: identity.name.clone(),
            digest: request.digest.clone(),
            expires_unix_ms: fleet_proto::now_unix_ms() + GRANT_TTL.as_millis() as i64,
        };
        let signature = self
            .trust
            .authority()
            .sign_grant(&grant)
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::ArtifactSourcesResponse {
            size: chunks.size,
            chunk_size: chunks.chunk_size,
            chunk_sha256: chunks.sha256.iter().map(|d| d.to_vec()).collect(),
            peers,
            grant: Some(pb::PeerGrant {
                host_name: grant.host_name,
                digest: grant.digest,
                expires_unix_ms: grant.expires_unix_ms,
                signature,
            }),
        }))
    }
}

/// What a join's token outcome means for the caller: go on (`None`: the token was spent for a
/// new certificate), the certificate to answer a retried join with, or the refusal.
fn join_answer(outcome: TokenUse, host: &str) -> Result<Option<String>, Status> {
    let refused = || {
        Status::permission_denied(
            "the join token is not valid: create a new one with `fleetctl join-token create`",
        )
    };
    match outcome {
        TokenUse::Spent => Ok(None),
        TokenUse::Retried { certificate_pem } => {
            tracing::info!(%host, "a join answered before is asked again with the same key: answering again with the same certificate");
            Ok(Some(certificate_pem))
        }
        TokenUse::HostRemoved { host: removed } => {
            tracing::warn!(%host, "a join with the token of removed host {removed} was refused");
            Err(Status::permission_denied(format!(
                "this join token joined host `{removed}`, which was removed (`fleetctl remove`): it cannot join anything again; to bring the host back, give it a fresh data directory and a new token from `fleetctl join-token create`"
            )))
        }
        TokenUse::HostHasCertificate => Err(Status::failed_precondition(format!(
            "host `{host}` already has a certificate: a join token cannot take over a host; run `fleetctl remove {host}` first to revoke it, or keep the host's data directory (DATA/tls)"
        ))),
        TokenUse::Unknown => Err(refused()),
        TokenUse::AlreadyUsed { by_host } => Err(Status::permission_denied(format!(
            "the join token was already used (by host `{by_host}`): a token joins one host once; create a new one with `fleetctl join-token create`"
        ))),
        TokenUse::Expired { .. } => Err(Status::permission_denied(
            "the join token has expired: create a new one with `fleetctl join-token create`",
        )),
    }
}

/// The controller's `Welcome`: the heartbeat interval as it stands, and the promise that every
/// heartbeat is answered (with another `Welcome`).
fn welcome(cadence: Cadence) -> pb::ControllerMessage {
    pb::ControllerMessage {
        body: Some(ControllerBody::Welcome(pb::Welcome {
            heartbeat_interval_ms: cadence.interval_ms,
            answers_heartbeats: true,
        })),
    }
}
