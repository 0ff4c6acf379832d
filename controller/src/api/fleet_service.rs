//! `FleetService`: what fleetctl calls. Releases, rollouts and their live progress, rollback,
//! and the read verbs (hosts, status, history, events).

use super::{actor_of, certificates, convert, rollout_status, store_status};
use crate::auth::{self, Role};
use crate::fleet_state::FleetState;
use crate::host_lifecycle::{self, Progress};
use crate::model::{Batch, RolloutPolicy};
use crate::releases;
use crate::rollout::{self, Rollouts, StartRequest};
use fleet_proto::names;
use fleet_proto::pb::{self, create_release_request::Body as ReleaseBody};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

const MAX_SMOKE_TIMEOUT_MS: u64 = 3_600_000;
const MAX_PAUSE_AFTER_CANARY_MS: u64 = 24 * 3_600_000;
const DEFAULT_BATCH: Batch = Batch::Percent(25);

pub struct FleetApi {
    pub fleet: Arc<FleetState>,
    /// App logs, relayed from the agents (`Logs`).
    pub logs: Arc<crate::log_relay::LogRelay>,
    /// The fleet CA, which signs credentials (`IssueCredential`).
    pub trust: Arc<crate::ca_trust::Trust>,
    pub rollouts: Arc<Rollouts>,
    /// Turns true when the controller shuts down, ending `events --follow` streams.
    pub shutdown: watch::Receiver<bool>,
    /// The fleet's controllers (`ListControllers`).
    pub membership: Arc<crate::registry::Membership>,
}

type ProgressStream = ReceiverStream<Result<pb::RolloutProgress, Status>>;

/// The state of the rollout a dry run answers with (`rollout --dry-run`): planned, never
/// started.
const DRY_RUN_STATE: &str = "planned";

fn bad(message: impl std::fmt::Display) -> Status {
    Status::invalid_argument(message.to_string())
}

fn check_app(app: &str) -> Result<(), Status> {
    names::check_app(app).map_err(bad)
}

/// Forwards a rollout's progress to a client until the rollout ends (or at once, detached).
fn progress_stream(
    fleet: Arc<FleetState>,
    id: String,
    mut rx: broadcast::Receiver<rollout::Progress>,
    detach: bool,
) -> ProgressStream {
    let (tx, out) = mpsc::channel(64);
    tokio::spawn(async move {
        // The (state, wave) the client last got the whole record at.
        let mut sent: Option<(String, usize)> = None;
        loop {
            let progress = match rx.recv().await {
                Ok(progress) => progress,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!("a client following rollout {id} missed {n} progress lines");
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => {
                    // The executor is gone; send the final record as stored.
                    if let Ok(Some(record)) = fleet.rollout(&id) {
                        let _ = tx
                            .send(Ok(pb::RolloutProgress {
                                rollout: Some(convert::rollout(&record)),
                                line: String::new(),
                            }))
                            .await;
                    }
                    return;
                }
            };
            let done = progress.rollout.state.is_final();
            // The whole record (every host of every wave: megabytes in a large fleet) goes
            // with the first line, when the rollout's state or wave changes, and at the end;
            // a line about one host carries only the line (fleetctl keeps the last record).
            let now = (
                progress.rollout.state.as_str().to_string(),
                progress.rollout.current_wave,
            );
            let whole = done || detach || sent.as_ref() != Some(&now);
            let message = pb::RolloutProgress {
                rollout: whole.then(|| convert::rollout(&progress.rollout)),
                line: progress.line,
            };
            if whole {
                sent = Some(now);
            }
            if tx.send(Ok(message)).await.is_err() || done || detach {
                return;
            }
        }
    });
    ReceiverStream::new(out)
}

/// The most labels a host or a join token may carry.
const MAX_LABELS: usize = 64;

/// Checks labels from the wire.
fn check_labels(
    labels: &std::collections::HashMap<String, String>,
) -> Result<BTreeMap<String, String>, Status> {
    if labels.len() > MAX_LABELS {
        return Err(bad(format!("at most {MAX_LABELS} labels, please")));
    }
    let mut checked = BTreeMap::new();
    for (key, value) in labels {
        names::check_label(key, value).map_err(bad)?;
        checked.insert(key.clone(), value.clone());
    }
    Ok(checked)
}

/// A rollout's or rollback's `max_unavailable`: empty is none asked for.
fn parse_max_unavailable(text: &str) -> Result<Option<Batch>, Status> {
    match text.trim() {
        "" => Ok(None),
        "0" | "0%" => Err(bad(
            "max unavailable 0 lets no host be updated: allow at least 1 host (or 1%)",
        )),
        text => Ok(Some(Batch::parse(text).map_err(|_| {
            bad(format!(
                "max unavailable {} is invalid: write a host count like 2 or a share like 25% (1% to 100%)",
                names::quoted(text)
            ))
        })?)),
    }
}

fn parse_policy(request: &pb::StartRolloutRequest) -> Result<RolloutPolicy, Status> {
    let mut selector = BTreeMap::new();
    for (key, value) in &request.selector {
        names::check_label(key, value).map_err(bad)?;
        selector.insert(key.clone(), value.clone());
    }
    if request.canary > 1000 {
        return Err(bad(format!(
            "canary {} is too large: use at most 1000 hosts",
            request.canary
        )));
    }
    let batch = if request.batch.is_empty() {
        DEFAULT_BATCH
    } else {
        Batch::parse(&request.batch).map_err(bad)?
    };
    if request.smoke_timeout_ms > MAX_SMOKE_TIMEOUT_MS {
        return Err(bad("smoke timeout is over 1h: use a shorter one"));
    }
    if request.pause_after_canary_ms > MAX_PAUSE_AFTER_CANARY_MS {
        return Err(bad("pause after canary is over 24h: use a shorter one"));
    }
    if let Some(ms) = request.min_healthy_ms {
        if ms > fleet_proto::manifest::MAX_MIN_HEALTHY.as_millis() as u64 {
            return Err(bad("min healthy is over 1h: use a shorter one"));
        }
    }
    let min_healthy_ms = request.min_healthy_ms;
    let max_unavailable = parse_max_unavailable(&request.max_unavailable)?;
    Ok(RolloutPolicy {
        selector,
        canary: request.canary,
        batch,
        pause_after_canary_ms: request.pause_after_canary_ms,
        smoke_timeout_ms: request.smoke_timeout_ms,
        auto_rollback: !request.no_auto_rollback,
        skip_lost: request.skip_lost,
        min_healthy_ms,
        max_unavailable,
    })
}

impl FleetApi {
    /// Pause, resume and abort: the same call with another control.
    fn control_rollout(
        &self,
        request: Request<pb::RolloutRef>,
        control: rollout::Control,
    ) -> Result<Response<pb::Rollout>, Status> {
        let identity = auth::require(&self.fleet, &request, Role::Deployer)?;
        let actor = actor_of(&identity, &request);
        let id = request.into_inner().id;
        let record = rollout::control(&self.fleet, &self.rollouts, &id, control, &actor)
            .map_err(rollout_status)?;
        Ok(Response::new(convert::rollout(&record)))
    }
}

#[tonic::async_trait]
impl pb::fleet_service_server::FleetService for FleetApi {
    async fn create_release(
        &self,
        request: Request<Streaming<pb::CreateReleaseRequest>>,
    ) -> Result<Response<pb::CreateReleaseResponse>, Status> {
        let identity = auth::require(&self.fleet, &request, Role::Deployer)?;
        let actor = actor_of(&identity, &request);
        let mut stream = request.into_inner();
        let header = match stream.message().await?.and_then(|m| m.body) {
            Some(ReleaseBody::Header(header)) => header,
            _ => {
                return Err(bad(
                    "the first message of a release upload must be its header",
                ))
            }
        };
        let new =
            releases::NewRelease::check(header.app, header.version, header.env, header.secrets)
                .map_err(release_status)?;
        let mut upload = releases::begin(&self.fleet).await.map_err(release_status)?;
        let idle = self.fleet.artifacts().limits().idle_timeout;
        loop {
            let Ok(message) = tokio::time::timeout(idle, stream.message()).await else {
                // Dropping the upload removes what it wrote.
                return Err(Status::deadline_exceeded(format!(
                    "the upload sent nothing for {}: it was dropped; upload again",
                    fleet_proto::duration::format_duration(idle)
                )));
            };
            let Some(message) = message? else { break };
            match message.body {
                Some(ReleaseBody::Chunk(bytes)) => upload.write(&bytes).map_err(release_status)?,
                _ => {
                    return Err(bad(
                        "a release upload carries one header, then only artifact bytes",
                    ))
                }
            }
        }
        let outcome = releases::create(&self.fleet, new, upload, &actor)
            .await
            .map_err(release_status)?;
        Ok(Response::new(pb::CreateReleaseResponse {
            release: Some(convert::release(&outcome.record)),
            created: outcome.created,
        }))
    }

    async fn list_releases(
        &self,
        request: Request<pb::ListReleasesRequest>,
    ) -> Result<Response<pb::ListReleasesResponse>, Status> {
        auth::require(&self.fleet, &request, Role::Deployer)?;
        let app = request.into_inner().app;
        check_app(&app)?;
        let releases = self.fleet.releases(&app).map_err(store_status)?;
        Ok(Response::new(pb::ListReleasesResponse {
            releases: releases.iter().map(convert::release).collect(),
        }))
    }

    async fn prune_releases(
        &self,
        request: Request<pb::PruneReleasesRequest>,
    ) -> Result<Response<pb::PruneReleasesResponse>, Status> {
        let identity = auth::require(&self.fleet, &request, Role::Admin)?;
        let actor = actor_of(&identity, &request);
        let request = request.into_inner();
        check_app(&request.app)?;
        let pruned = releases::prune(&self.fleet, &request.app, request.keep, &actor)
            .await
            .map_err(release_status)?;
        Ok(Response::new(pb::PruneReleasesResponse {
            removed: pruned
                .removed
                .into_iter()
                .map(|removed| pb::PrunedRelease {
                    reason: if removed.artifact_deleted {
                        "removed with its artifact".to_string()
                    } else {
                        "removed; its artifact stays: another release has the same digest"
                            .to_string()
                    },
                    version: removed.record.version,
                    artifact_digest: removed.record.artifact_digest,
                    artifact_deleted: removed.artifact_deleted,
                })
                .collect(),
            kept: pruned
                .kept
                .into_iter()
                .map(|(record, reason)| pb::PrunedRelease {
                    version: record.version,
                    artifact_digest: record.artifact_digest,
                    reason,
                    artifact_deleted: false,
                })
                .collect(),
        }))
    }

    async fn list_hosts(
        &self,
        request: Request<pb::ListHostsRequest>,
    ) -> Result<Response<pb::ListHostsResponse>, Status> {
        auth::require(&self.fleet, &request, Role::Deployer)?;
        let request = request.into_inner();
        if !request.after.is_empty() {
            fleet_proto::names::check_host(&request.after).map_err(|e| {
                Status::invalid_argument(format!("--after: {e} (pass the name a page ended on)"))
            })?;
        }
        let hosts = self.fleet.host_records().map_err(store_status)?;
        let total = hosts.len() as u32;
        let (page, next_after) = convert::page(&hosts, request.limit, &request.after);
        let mut page: Vec<pb::Host> = page
            .iter()
            .map(|h| convert::host(&self.fleet, h, None))
            .collect();
        certificates::fill_certificate_expiry(&self.fleet, &self.trust, &mut page)?;
        Ok(Response::new(pb::ListHostsResponse {
            hosts: page,
            next_after,
            total,
        }))
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        auth::require(&self.fleet, &request, Role::Deployer)?;
        let pb::StatusRequest { app, all_hosts } = request.into_inner();
        let only_app = if app.is_empty() {
            None
        } else {
            check_app(&app)?;
            Some(app.as_str())
        };
        let hosts = self.fleet.host_records().map_err(store_status)?;
        let mut hosts: Vec<pb::Host> = hosts
            .iter()
            .map(|h| convert::host(&self.fleet, h, only_app))
            .filter(|h| only_app.is_none() || !h.apps.is_empty())
            .collect();
        let summary = convert::summary(&hosts);
        // A large fleet's status is its summary: listing every host would make an answer of
        // megabytes (past gRPC's 4 MiB message limit near 20,000 hosts) that no one reads.
        let hosts_omitted = if !all_hosts && hosts.len() > convert::STATUS_LISTS_HOSTS_UP_TO {
            std::mem::take(&mut hosts).len() as u32
        } else {
            0
        };
        certificates::fill_certificate_expiry(&self.fleet, &self.trust, &mut hosts)?;
        let active_rollouts = self
            .fleet
            .rollouts(only_app)
            .map_err(store_status)?
            .iter()
            .filter(|r| !r.state.is_final())
            .map(convert::rollout)
            .collect();
        let deployments = crate::converge::report(&self.fleet, only_app)
            .map_err(store_status)?
            .iter()
            .map(convert::deployment)
            .collect();
        Ok(Response::new(pb::StatusResponse {
            hosts,
            active_rollouts,
            deployments,
            hosts_omitted,
            summary: Some(summary),
            artifact_bytes_sent: crate::peers::bytes_sent(),
        }))
    }

    async fn history(
        &self,
        request: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        auth::require(&self.fleet, &request, Role::Deployer)?;
        let request = request.into_inner();
        check_app(&request.app)?;
        let limit = if request.limit == 0 {
            20
        } else {
            request.limit as usize
        };
        let rollouts = self
            .fleet
            .rollouts(Some(&request.app))
            .map_err(store_status)?;
        let convergences = self
            .fleet
            .convergences(Some(&request.app))
            .map_err(store_status)?;
        Ok(Response::new(pb::HistoryResponse {
            rollouts: rollouts.iter().take(limit).map(convert::rollout).collect(),
            convergences: convergences
                .iter()
                .take(limit)
                .map(convert::convergence)
                .collect(),
        }))
    }

    type StartRolloutStream = ProgressStream;

    async fn start_rollout(
        &self,
        request: Request<pb::StartRolloutRequest>,
    ) -> Result<Response<Self::StartRolloutStream>, Status> {
        let identity = auth::require(&self.fleet, &request, Role::Deployer)?;
        let actor = actor_of(&identity, &request);
        let request = request.into_inner();
        check_app(&request.app)?;
        names::check_version(&request.version).map_err(bad)?;
        let policy = parse_policy(&request)?;
        let start = StartRequest {
            app: request.app,
            version: request.version,
            policy,
            actor,
        };
        if request.dry_run {
            // The plan alone, as one message: nothing is written, reserved or sent.
            let progress =
                rollout::dry_run(&self.fleet, &self.rollouts, start).map_err(rollout_status)?;
            let mut planned = convert::rollout(&progress.rollout);
            planned.state = DRY_RUN_STATE.to_string();
            let (tx, out) = mpsc::channel(1);
            let _ = tx.try_send(Ok(pb::RolloutProgress {
                rollout: Some(planned),
                line: progress.line,
            }));
            return Ok(Response::new(ReceiverStream::new(out)));
        }
        let (record, rx) = rollout::start(&self.fleet, &self.rollouts, start)
            .await
            .map_err(rollout_status)?;
        Ok(Response::new(progress_stream(
            self.fleet.clone(),
            record.id,
            rx,
            request.detach,
        )))
    }

    type RollbackStream = ProgressStream;

    async fn rollback(
        &self,
        request: Request<pb::RollbackRequest>,
    ) -> Result<Response<Self::RollbackStream>, Status> {
        let identity = auth::require(&self.fleet, &request, Role::Deployer)?;
        let actor = actor_of(&identity, &request);
        let request = request.into_inner();
        check_app(&request.app)?;
        let to_version = if request.to_version.is_empty() {
            None
        } else {
            names::check_version(&request.to_version).map_err(bad)?;
            Some(request.to_version)
        };
        let selector = if request.selector.is_empty() {
            None
        } else {
            Some(check_labels(&request.selector)?)
        };
        let max_unavailable = parse_max_unavailable(&request.max_unavailable)?;
        let (record, rx) = rollout::start_rollback(
            &self.fleet,
            &self.rollouts,
            rollout::RollbackRequest {
                app: request.app.clone(),
                selector,
                to_version,
                max_unavailable,
                actor,
            },
        )
        .await
        .map_err(rollout_status)?;
        Ok(Response::new(progress_stream(
            self.fleet.clone(),
            record.id,
            rx,
            request.detach,
        )))
    }

    type WatchRolloutStream = ProgressStream;

    async fn watch_rollout(
        &self,
        request: Request<pb::RolloutRef>,
    ) -> Result<Response<Self::WatchRolloutStream>, Status> {
        auth::require(&self.fleet, &request, Role::Deployer)?;
        let id = request.into_inner().id;
        let record = rollout::get(&self.fleet, &id).map_err(rollout_status)?;
        let rx = self.rollouts.subscribe(&id);
        let (tx, out) = mpsc::channel(64);
        let first = pb::RolloutProgress {
            rollout: Some(convert::rollout(&record)),
            line: format!(
                "rollout {id} of {}@{} is {}",
                record.app,
                record.version,
                record.state.as_str()
            ),
        };
        let _ = tx.send(Ok(first)).await;
        match rx {
            Some(rx) if !record.state.is_final() => {
                let mut inner = progress_stream(self.fleet.clone(), id, rx, false).into_inner();
                tokio::spawn(async move {
                    while let Some(item) = inner.recv().await {
                        if tx.send(item).await.is_err() {
                            return;
                        }
                    }
                });
            }
            _ => drop(tx),
        }
        Ok(Response::new(ReceiverStream::new(out)))
    }

    async fn get_rollout(
        &self,
        request: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::Rollout>, Status> {
        auth::require(&self.fleet, &request, Role::Deployer)?;
        let id = request.into_inner().id;
        let record = rollout::get(&self.fleet, &id).map_err(rollout_status)?;
        Ok(Response::new(convert::rollout(&record)))
    }

    async fn pause_rollout(
        &self,
        request: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::Rollout>, Status> {
        self.control_rollout(request, rollout::Control::Pause)
    }

    async fn resume_rollout(
        &self,
        request: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::Rollout>, Status> {
        self.control_rollout(request, rollout::Control::Run)
    }

    async fn abort_rollout(
        &self,
        request: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::Rollout>, Status> {
        self.control_rollout(request, rollout::Control::Abort)
    }

    type EventsStream = ReceiverStream<Result<pb::Event, Status>>;

    async fn events(
        &self,
        request: Request<pb::EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        auth::require(&self.fleet, &request, Role::Deployer)?;
        let request = request.into_inner();
        let limit = if request.limit == 0 {
            50
        } else {
            request.limit.min(10_000) as usize
        };
        // Subscribe before reading the log so no event falls between the two.
        let mut live = self.fleet.subscribe_events();
        let recent = self.fleet.recent_events(limit).map_err(store_status)?;
        let (tx, out) = mpsc::channel(256);
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let mut last_seq = 0;
            for event in &recent {
                last_seq = event.seq;
                if tx.send(Ok(convert::event(event))).await.is_err() {
                    return;
                }
            }
            if !request.follow {
                return;
            }
            loop {
                tokio::select! {
                    event = live.recv() => match event {
                        Ok(event) if event.seq > last_seq => {
                            last_seq = event.seq;
                            if tx.send(Ok(convert::event(&event))).await.is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    _ = shutdown.changed() => return,
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(out)))
    }

    async fn create_join_token(
        &self,
        request: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        let identity = auth::require(&self.fleet, &request, Role::Admin)?;
        let actor = actor_of(&identity, &request);
        let request = request.into_inner();
        let labels = check_labels(&request.labels)?;
        let ttl_ms = match request.ttl_ms {
            0 => auth::tokens::DEFAULT_TTL_MS,
            ttl_ms if ttl_ms > auth::tokens::MAX_TTL_MS => {
                return Err(bad(
                    "a join token lives at most 7 days: use a shorter --ttl",
                ))
            }
            ttl_ms => ttl_ms,
        };
        let token = auth::tokens::generate()
            .map_err(|e| Status::internal(format!("no randomness for a token: {e}")))?;
        let expires_unix_ms = fleet_proto::now_unix_ms() + ttl_ms as i64;
        let record = crate::store::JoinTokenRecord {
            expires_unix_ms,
            created_by: identity.name.clone(),
            used_unix_ms: None,
            used_by_host: None,
            used_with_key: None,
            issued_certificate_pem: None,
            host_removed_unix_ms: None,
            labels: (!labels.is_empty()).then_some(labels),
        };
        self.fleet
            .insert_join_token(auth::tokens::hash(&token), record)
            .await
            .map_err(store_status)?;
        self.fleet
            .event(
                &actor,
                "join_token.created",
                "",
                "",
                format!(
                    "join token created by {} ({actor}), valid for {}",
                    identity.name,
                    fleet_proto::duration::format_duration(std::time::Duration::from_millis(
                        ttl_ms
                    ))
                ),
            )
            .await;
        Ok(Response::new(pb::CreateJoinTokenResponse {
            token,
            expires_unix_ms,
        }))
    }

    async fn issue_credential(
        &self,
        request: Request<pb::IssueCredentialRequest>,
    ) -> Result<Response<pb::IssueCredentialResponse>, Status> {
        let identity = auth::require(&self.fleet, &request, Role::Admin)?;
        let actor = actor_of(&identity, &request);
        let request = request.into_inner();
        names::check_app(&request.name).map_err(|_| {
            bad(format!(
                "credential name {} is invalid: use lowercase letters, digits and '-', at most 63 characters",
                names::quoted(&request.name)
            ))
        })?;
        let role = match Role::parse(&request.role) {
            Some(role @ (Role::Admin | Role::Deployer)) => role,
            _ => {
                return Err(bad(format!(
                    "role {} is not admin or deployer (agents get their certificate by joining with a token)",
                    names::quoted(&request.role)
                )))
            }
        };
        let lifetime =
            certificates::credential_lifetime(request.ttl_ms, self.trust.certificate_ttl)?;
        let authority = self.trust.authority();
        let issued = authority
            .sign_request(&request.csr_pem, &request.name, role, lifetime)
            .map_err(bad)?;
        self.fleet
            .record_certificate(crate::store::CertificateRecord {
                serial: issued.serial.clone(),
                name: request.name.clone(),
                role: role.as_str().to_string(),
                issued_unix_ms: fleet_proto::now_unix_ms(),
                not_after_unix_ms: issued.not_after_unix_ms,
                issued_by: identity.name.clone(),
                labels: None,
            })
            .await
            .map_err(store_status)?;
        self.fleet
            .event(
                &actor,
                "credential.issued",
                "",
                "",
                format!(
                    "credential `{}` with role {} issued by {} (certificate {}, valid {})",
                    request.name,
                    role.as_str(),
                    identity.name,
                    issued.serial,
                    fleet_pki::lifetime::format_lifetime(lifetime),
                ),
            )
            .await;
        Ok(Response::new(pb::IssueCredentialResponse {
            certificate_pem: issued.cert_pem,
            ca_pem: authority.ca_pem().to_string(),
        }))
    }

    async fn renew_credential(
        &self,
        request: Request<pb::RenewCredentialRequest>,
    ) -> Result<Response<pb::RenewCredentialResponse>, Status> {
        certificates::renew_credential(&self.fleet, &self.trust, request).await
    }

    async fn rotate_ca(
        &self,
        request: Request<pb::RotateCaRequest>,
    ) -> Result<Response<pb::RotateCaResponse>, Status> {
        let identity = auth::require(&self.fleet, &request, Role::Admin)?;
        let actor = actor_of(&identity, &request);
        let request = request.into_inner();
        let trust = self.trust.clone();
        let failed = |e: anyhow::Error| Status::failed_precondition(format!("{e:#}"));
        if !request.finish {
            tokio::task::spawn_blocking(move || trust.start_rotation())
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(failed)?;
            self.fleet
                .event(
                    &actor,
                    "ca.rotation_started",
                    "",
                    "",
                    "a new CA signs from now on; the old one is trusted until `fleetctl ca rotate --finish`; connected hosts were told to renew".to_string(),
                )
                .await;
            // The caller's own credential, from the new CA, so `--finish` does not lock it out.
            let mut certificate_pem = String::new();
            if !request.csr_pem.is_empty() {
                let issued = certificates::reissue_own(
                    &self.fleet,
                    &self.trust,
                    &identity,
                    &request.csr_pem,
                    format!("ca rotation, for {}", identity.serial),
                )
                .await?;
                certificate_pem = issued.cert_pem;
            }
            return Ok(Response::new(pb::RotateCaResponse {
                ca_pem: self.trust.ca_bundle(),
                certificate_pem,
                hosts_not_connected: Vec::new(),
                message: "rotation started: a new CA signs from now on and both are trusted; connected hosts renew by themselves; run `fleetctl ca rotate --finish` once `fleetctl ca rotate --finish` stops naming hosts".to_string(),
            }));
        }
        // Hosts whose latest session used an old-CA certificate, unless removed or lost (a
        // host between two sessions has not moved yet).
        let mut on_old = Vec::new();
        for host in self.trust.hosts_on_old_ca() {
            let record = self.fleet.host_record(&host).map_err(store_status)?;
            if record.is_some_and(|record| !self.fleet.is_lost(&record)) {
                on_old.push(host);
            }
        }
        if !on_old.is_empty() {
            return Err(Status::failed_precondition(format!(
                "hosts still use a certificate of the old CA: {}; connected hosts were told to renew and normally do within seconds: try again in a moment, and look at their agents' logs if they stay (a host that is down counts once it shows as lost)",
                on_old.join(", ")
            )));
        }
        let trust = self.trust.clone();
        tokio::task::spawn_blocking(move || trust.finish_rotation())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(failed)?;
        let hosts_not_connected: Vec<String> = self
            .fleet
            .host_records()
            .map_err(store_status)?
            .into_iter()
            .map(|host| host.name)
            .filter(|name| !self.fleet.is_connected(name))
            .collect();
        self.fleet
            .event(
                &actor,
                "ca.rotation_finished",
                "",
                "",
                format!(
                    "the old CA is no longer trusted; the controller presents a certificate of the new one{}",
                    if hosts_not_connected.is_empty() {
                        String::new()
                    } else {
                        format!("; not connected: {}", hosts_not_connected.join(", "))
                    }
                ),
            )
            .await;
        Ok(Response::new(pb::RotateCaResponse {
            ca_pem: self.trust.ca_bundle(),
            certificate_pem: String::new(),
            hosts_not_connected,
            message: "rotation finished: only the new CA is trusted; give operators and CI new credentials (`fleetctl credentials create`) and the new ca.pem".to_string(),
        }))
    }

    async fn list_credentials(
        &self,
        request: Request<pb::ListCredentialsRequest>,
    ) -> Result<Response<pb::ListCredentialsResponse>, Status> {
        auth::require(&self.fleet, &request, Role::Admin)?;
        let views = self.fleet.list_credentials().await.map_err(store_status)?;
        let renewals = certificates::renewals(views.iter().map(|view| view.certificate.clone()));
        let credentials = views
            .into_iter()
            .map(|view| pb::Credential {
                renewed_by: renewals
                    .get(&view.certificate.serial)
                    .cloned()
                    .unwrap_or_default(),
                ..credential_to_pb(
                    &view.certificate,
                    view.last_used_unix_ms,
                    view.revoked_unix_ms,
                )
            })
            .collect();
        Ok(Response::new(pb::ListCredentialsResponse { credentials }))
    }

    async fn revoke_credential(
        &self,
        request: Request<pb::RevokeCredentialRequest>,
    ) -> Result<Response<pb::RevokeCredentialResponse>, Status> {
        use crate::store::CredentialRevocation;
        let identity = auth::require(&self.fleet, &request, Role::Admin)?;
        let actor = actor_of(&identity, &request);
        let name = request.into_inner().name;
        names::check_app(&name).map_err(|_| {
            bad(format!(
                "credential name {} is invalid: see `fleetctl credentials list`",
                names::quoted(&name)
            ))
        })?;
        let now = fleet_proto::now_unix_ms();
        match self
            .fleet
            .revoke_credential(&name, &actor)
            .await
            .map_err(store_status)?
        {
            CredentialRevocation::Revoked(certificates) => {
                Ok(Response::new(pb::RevokeCredentialResponse {
                    revoked: certificates
                        .iter()
                        .map(|c| credential_to_pb(c, None, Some(now)))
                        .collect(),
                }))
            }
            CredentialRevocation::Unknown => Err(Status::not_found(format!(
                "no credential `{name}`: see `fleetctl credentials list`"
            ))),
            CredentialRevocation::IsHost => Err(Status::failed_precondition(format!(
                "`{name}` is a host, not a credential: remove a host with `fleetctl remove {name}`"
            ))),
            CredentialRevocation::AlreadyRevoked => Err(Status::failed_precondition(format!(
                "credential `{name}` is revoked already"
            ))),
            CredentialRevocation::LastAdmin => Err(Status::failed_precondition(format!(
                "credential `{name}` is the last live admin credential: revoking it would leave nobody who can manage the fleet; create another first (`fleetctl credentials create NAME --role admin --out DIR`) and revoke `{name}` with it, or, if every other admin credential is lost, run `fleet-controller issue-admin --config controller.toml --out DIR` on the controller's host"
            ))),
        }
    }

    type DrainHostStream = HostStream;

    async fn drain_host(
        &self,
        request: Request<pb::DrainHostRequest>,
    ) -> Result<Response<Self::DrainHostStream>, Status> {
        let identity = auth::require(&self.fleet, &request, Role::Admin)?;
        let actor = actor_of(&identity, &request);
        let request = request.into_inner();
        names::check_host(&request.host).map_err(bad)?;
        let deadline = checked_deadline(request.deadline_ms)?;
        if !self
            .fleet
            .drain(&request.host, &actor)
            .await
            .map_err(store_status)?
        {
            return Err(no_host(&request.host));
        }
        let host = request.host.clone();
        Ok(Response::new(host_stream(
            self.fleet.clone(),
            request.host,
            deadline,
            format!(
                "host {host} did not drain in time: its instances are still stopping, or its agent is not connected \
                 (see `fleetctl status`; a host that is gone for good can be removed with `fleetctl remove {host}`)"
            ),
            move |fleet| host_lifecycle::drain_progress(fleet, &host).unwrap_or(Progress::Waiting),
        )))
    }

    async fn list_deployments(
        &self,
        request: Request<pb::ListDeploymentsRequest>,
    ) -> Result<Response<pb::ListDeploymentsResponse>, Status> {
        auth::require(&self.fleet, &request, Role::Deployer)?;
        let app = request.into_inner().app;
        if !app.is_empty() {
            check_app(&app)?;
        }
        let reports = crate::converge::report(&self.fleet, (!app.is_empty()).then_some(&*app))
            .map_err(store_status)?;
        Ok(Response::new(pb::ListDeploymentsResponse {
            deployments: reports.iter().map(convert::deployment).collect(),
        }))
    }

    async fn list_controllers(
        &self,
        request: Request<pb::ListControllersRequest>,
    ) -> Result<Response<pb::ListControllersResponse>, Status> {
        auth::require(&self.fleet, &request, Role::Deployer)?;
        let membership = self.membership.clone();
        let listed = tokio::task::spawn_blocking(move || membership.list())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(store_status)?;
        Ok(Response::new(pb::ListControllersResponse {
            controllers: listed
                .into_iter()
                .map(|listed| pb::Controller {
                    url: listed.entry.url,
                    leader: listed.leader,
                    leading_since_unix_ms: listed
                        .entry
                        .leading_since_unix_ms
                        .filter(|_| listed.leader)
                        .unwrap_or(0),
                    up_since_unix_ms: listed.entry.up_since_unix_ms,
                    http: listed.entry.http.unwrap_or_default(),
                })
                .collect(),
            store: self.fleet.describe_store(),
            answered_by: self.membership.me.url.clone(),
        }))
    }

    async fn label_host(
        &self,
        request: Request<pb::LabelHostRequest>,
    ) -> Result<Response<pb::Host>, Status> {
        let identity = auth::require(&self.fleet, &request, Role::Admin)?;
        let actor = actor_of(&identity, &request);
        let request = request.into_inner();
        names::check_host(&request.host).map_err(bad)?;
        let set = check_labels(&request.set)?;
        for key in &request.remove {
            names::check_label(key, "").map_err(bad)?;
        }
        if set.is_empty() && request.remove.is_empty() {
            return Err(bad(
                "name labels to set (k=v) or to remove (k-), e.g. fleetctl label web-1 zone=b,tier-",
            ));
        }
        if self
            .fleet
            .label_host(&request.host, &set, &request.remove, &actor)
            .await
            .map_err(store_status)?
            .is_none()
        {
            return Err(no_host(&request.host));
        }
        Ok(Response::new(
            host_snapshot(&self.fleet, &request.host).ok_or_else(|| no_host(&request.host))?,
        ))
    }

    async fn undrain_host(
        &self,
        request: Request<pb::HostRef>,
    ) -> Result<Response<pb::Host>, Status> {
        let identity = auth::require(&self.fleet, &request, Role::Admin)?;
        let actor = actor_of(&identity, &request);
        let host = request.into_inner().host;
        names::check_host(&host).map_err(bad)?;
        if !self
            .fleet
            .undrain(&host, &actor)
            .await
            .map_err(store_status)?
        {
            return Err(no_host(&host));
        }
        Ok(Response::new(
            host_snapshot(&self.fleet, &host).ok_or_else(|| no_host(&host))?,
        ))
    }

    type ConvergeLikeStream = HostStream;

    async fn converge_like(
        &self,
        request: Request<pb::ConvergeLikeRequest>,
    ) -> Result<Response<Self::ConvergeLikeStream>, Status> {
        let identity = auth::require(&self.fleet, &request, Role::Admin)?;
        let actor = actor_of(&identity, &request);
        let request = request.into_inner();
        names::check_host(&request.host).map_err(bad)?;
        names::check_host(&request.like).map_err(bad)?;
        let deadline = checked_deadline(request.deadline_ms)?;
        let convergence = host_lifecycle::converge_like(
            &self.fleet,
            &request.host,
            &request.like,
            &actor,
            |app| self.rollouts.active_for_app(app),
        )
        .await
        .map_err(lifecycle_status)?;
        Ok(Response::new(host_stream(
            self.fleet.clone(),
            request.host.clone(),
            deadline,
            format!(
                "host {} did not run every release of {} with passing smoke checks in time (see `fleetctl status`)",
                request.host, request.like
            ),
            move |fleet| host_lifecycle::converge_progress(fleet, &convergence),
        )))
    }

    async fn remove_host(
        &self,
        request: Request<pb::RemoveHostRequest>,
    ) -> Result<Response<pb::RemoveHostResponse>, Status> {
        let identity = auth::require(&self.fleet, &request, Role::Admin)?;
        let actor = actor_of(&identity, &request);
        let pb::RemoveHostRequest { host, purge } = request.into_inner();
        names::check_host(&host).map_err(bad)?;
        if !self
            .fleet
            .drain(&host, &actor)
            .await
            .map_err(store_status)?
        {
            return Err(no_host(&host));
        }
        // A connected host gets a bounded chance to stop its instances gracefully; a lost one
        // cannot be drained, and is forgotten all the same.
        if self.fleet.is_connected(&host) {
            let until = tokio::time::Instant::now() + REMOVE_DRAIN_DEADLINE;
            self.fleet
                .wait_until(until, || {
                    host_lifecycle::drain_progress(&self.fleet, &host)
                        .map_or(true, |progress| progress != Progress::Waiting)
                })
                .await;
        }
        let last = host_snapshot(&self.fleet, &host);
        self.fleet
            .forget(&host, &actor, purge)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::RemoveHostResponse { host: last }))
    }

    type LogsStream = super::logs::LogsStream;

    async fn logs(
        &self,
        request: Request<pb::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        super::logs::logs(&self.fleet, &self.logs, &self.shutdown, request).await
    }

    type ExportStoreStream = ReceiverStream<Result<pb::StoreDumpChunk, Status>>;

    async fn export_store(
        &self,
        request: Request<pb::ExportStoreRequest>,
    ) -> Result<Response<Self::ExportStoreStream>, Status> {
        let identity = auth::require(&self.fleet, &request, Role::Admin)?;
        let actor = actor_of(&identity, &request);
        // Recorded first, so the backup holds the event of its own making.
        self.fleet
            .event(
                &actor,
                "store.exported",
                "",
                "",
                format!("store snapshot taken by {} (a backup)", identity.name),
            )
            .await;
        let (tx, out) = mpsc::channel(4);
        let fleet = self.fleet.clone();
        // One read transaction, on the blocking pool; writers go on meanwhile. The channel's
        // bound holds the reader back while the client is slower.
        tokio::task::spawn_blocking(move || {
            let mut writer = ChunkWriter {
                tx: tx.clone(),
                buffer: Vec::with_capacity(DUMP_CHUNK_BYTES),
            };
            let exported = fleet
                .export_store(&mut writer)
                .and_then(|_| writer.send().map_err(|_| closed_dump()));
            if let Err(e) = exported {
                let _ = tx.blocking_send(Err(store_status(e)));
            }
        });
        Ok(Response::new(ReceiverStream::new(out)))
    }
}

/// The size of one chunk of a store dump on the wire.
const DUMP_CHUNK_BYTES: usize = 1 << 20;

fn closed_dump() -> crate::store::StoreError {
    crate::store::StoreError::Dump("the client went away".into())
}

/// A `Write` that sends what it is given as chunks of a stream, from the blocking pool.
struct ChunkWriter {
    tx: mpsc::Sender<Result<pb::StoreDumpChunk, Status>>,
    buffer: Vec<u8>,
}

impl ChunkWriter {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let data = std::mem::replace(&mut self.buffer, Vec::with_capacity(DUMP_CHUNK_BYTES));
        self.tx
            .blocking_send(Ok(pb::StoreDumpChunk { data }))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client went away"))
    }
}

impl std::io::Write for ChunkWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(bytes);
        if self.buffer.len() >= DUMP_CHUNK_BYTES {
            self.send()?;
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn credential_to_pb(
    certificate: &crate::store::CertificateRecord,
    last_used_unix_ms: Option<i64>,
    revoked_unix_ms: Option<i64>,
) -> pb::Credential {
    pb::Credential {
        name: certificate.name.clone(),
        role: certificate.role.clone(),
        serial: certificate.serial.clone(),
        issued_unix_ms: certificate.issued_unix_ms,
        not_after_unix_ms: certificate.not_after_unix_ms,
        last_used_unix_ms: last_used_unix_ms.unwrap_or(0),
        revoked_unix_ms: revoked_unix_ms.unwrap_or(0),
        issued_by: certificate.issued_by.clone(),
        renewed_by: String::new(),
    }
}

const DEFAULT_HOST_DEADLINE_MS: u64 = 5 * 60_000;
/// How long `remove` waits for a connected host's instances to stop.
const REMOVE_DRAIN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

type HostStream = ReceiverStream<Result<pb::Host, Status>>;

fn no_host(host: &str) -> Status {
    Status::not_found(format!("no host {host}: see `fleetctl hosts`"))
}

fn checked_deadline(deadline_ms: u64) -> Result<std::time::Duration, Status> {
    if deadline_ms > 24 * 3_600_000 {
        return Err(bad("deadline is over 24h: use a shorter one"));
    }
    Ok(std::time::Duration::from_millis(if deadline_ms == 0 {
        DEFAULT_HOST_DEADLINE_MS
    } else {
        deadline_ms
    }))
}

fn lifecycle_status(e: host_lifecycle::LifecycleError) -> Status {
    match e {
        host_lifecycle::LifecycleError::Invalid(m) => Status::failed_precondition(m),
        host_lifecycle::LifecycleError::NotFound(m) => Status::not_found(m),
        host_lifecycle::LifecycleError::Store(e) => store_status(e),
    }
}

fn host_snapshot(fleet: &FleetState, host: &str) -> Option<pb::Host> {
    let record = fleet.host_record(host).ok()??;
    Some(convert::host(fleet, &record, None))
}

/// Streams a host's state on every change until `check` says done (the stream ends), failed,
/// or the deadline passed (the stream ends with an error saying so).
fn host_stream(
    fleet: Arc<FleetState>,
    host: String,
    deadline: std::time::Duration,
    timeout_message: String,
    check: impl Fn(&FleetState) -> Progress + Send + 'static,
) -> HostStream {
    let (tx, out) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut changes = fleet.changes();
        let until = tokio::time::Instant::now() + deadline;
        let mut last_sent = None;
        loop {
            changes.borrow_and_update();
            if let Some(snapshot) = host_snapshot(&fleet, &host) {
                if last_sent.as_ref() != Some(&snapshot) {
                    last_sent = Some(snapshot.clone());
                    if tx.send(Ok(snapshot)).await.is_err() {
                        return;
                    }
                }
            }
            match check(&fleet) {
                Progress::Done => return,
                Progress::Failed(why) => {
                    let _ = tx.send(Err(Status::aborted(why))).await;
                    return;
                }
                Progress::Waiting => {}
            }
            tokio::select! {
                _ = tokio::time::sleep_until(until) => {
                    let _ = tx.send(Err(Status::deadline_exceeded(timeout_message))).await;
                    return;
                }
                _ = changes.changed() => {}
                _ = tx.closed() => return,
            }
        }
    });
    ReceiverStream::new(out)
}

/// The refusal of a release whose version exists with other bytes (or the same bytes and other
/// config).
fn release_status(e: releases::ReleaseError) -> Status {
    use releases::ReleaseError;
    match e {
        ReleaseError::Invalid(m) => Status::invalid_argument(m),
        ReleaseError::Exhausted(m) => Status::resource_exhausted(m),
        ReleaseError::OneController(m) => Status::failed_precondition(m),
        ReleaseError::NotReplicated(m) => {
            tracing::warn!("{m}");
            Status::aborted(m)
        }
        e @ ReleaseError::Immutable { .. } => Status::already_exists(e.to_string()),
        ReleaseError::Store(e) => store_status(e),
        e @ (ReleaseError::Artifacts(_) | ReleaseError::Internal(_)) => {
            tracing::error!("{e}");
            Status::internal(e.to_string())
        }
    }
}
