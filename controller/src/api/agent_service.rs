//! `AgentService`: each agent's long-lived session (hello, desired state, reports,
//! heartbeats) and artifact fetches, streamed from an offset so a cut fetch resumes.

use super::{convert, store_status};
use crate::fleet_state::{FleetState, HostHello};
use fleet_proto::pb::{
    self, agent_message::Body as AgentBody, controller_message::Body as ControllerBody,
};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// Bytes per artifact chunk: large enough that per-message overhead vanishes, well under
/// gRPC's 4 MiB message limit.
pub const CHUNK_BYTES: usize = 1 << 20;
/// How long an agent has to say hello after opening its session.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

pub struct AgentApi {
    pub fleet: Arc<FleetState>,
    /// Turns true when the controller shuts down, ending every session.
    pub shutdown: watch::Receiver<bool>,
}

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
            "advertise address {:?} is not an IP address",
            hello.advertise_addr
        )));
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
    })
}

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentApi {
    type SessionStream = ReceiverStream<Outbound>;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 10s"))??;
        let hello = match first.and_then(|m| m.body) {
            Some(AgentBody::Hello(hello)) => check_hello(hello)?,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of a session must be a hello",
                ))
            }
        };
        let host = hello.name.clone();
        let session = self
            .fleet
            .host_connected(hello)
            .await
            .map_err(store_status)?;
        let (tx, rx) = mpsc::channel::<Outbound>(16);
        let welcome = pb::ControllerMessage {
            body: Some(ControllerBody::Welcome(pb::Welcome {
                heartbeat_interval_ms: self.fleet.heartbeat_interval_ms,
            })),
        };
        let _ = tx.send(Ok(welcome)).await;
        let fleet = self.fleet.clone();
        let mut shutdown = self.shutdown.clone();
        // Three missed heartbeats end the session.
        let silence = Duration::from_millis(self.fleet.heartbeat_interval_ms * 3);
        tokio::spawn(async move {
            let mut desired = session.desired;
            let mut send_desired = true;
            loop {
                if send_desired {
                    let assignments = desired
                        .borrow_and_update()
                        .iter()
                        .map(convert::assignment)
                        .collect();
                    let message = pb::ControllerMessage {
                        body: Some(ControllerBody::Desired(pb::DesiredState {
                            assignments,
                            draining: false,
                        })),
                    };
                    if tx.send(Ok(message)).await.is_err() {
                        break;
                    }
                    send_desired = false;
                }
                tokio::select! {
                    changed = desired.changed() => match changed {
                        Ok(()) => send_desired = true,
                        Err(_) => break, // a newer session of this host replaced this one
                    },
                    message = tokio::time::timeout(silence, inbound.message()) => match message {
                        Ok(Ok(Some(pb::AgentMessage { body: Some(AgentBody::Report(report)) }))) => {
                            match convert::instance_from(report) {
                                Ok(status) => fleet.host_reported(&host, session.id, status),
                                Err(e) => tracing::warn!("host {host} sent a bad report: {e}"),
                            }
                        }
                        Ok(Ok(Some(pb::AgentMessage { body: Some(AgentBody::Heartbeat(_)) }))) => {
                            fleet.host_heartbeat(&host, session.id);
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
                    _ = shutdown.changed() => break,
                }
            }
            fleet.host_disconnected(&host, session.id);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn join(
        &self,
        _request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        Err(Status::unimplemented(
            "joining with a token is not built yet",
        ))
    }

    type FetchArtifactStream = ReceiverStream<Result<pb::ArtifactChunk, Status>>;

    async fn fetch_artifact(
        &self,
        request: Request<pb::FetchArtifactRequest>,
    ) -> Result<Response<Self::FetchArtifactStream>, Status> {
        let request = request.into_inner();
        let path = self
            .fleet
            .artifacts
            .path_of(&request.digest)
            .ok_or_else(|| {
                Status::invalid_argument(format!("{:?} is not a sha256 digest", request.digest))
            })?;
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|_| Status::not_found(format!("no artifact {}", request.digest)))?;
        let size = file
            .metadata()
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .len();
        if request.offset > size {
            return Err(Status::out_of_range(format!(
                "offset {} is past the end of artifact {} ({size} bytes)",
                request.offset, request.digest
            )));
        }
        file.seek(std::io::SeekFrom::Start(request.offset))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut remaining = size - request.offset;
            while remaining > 0 {
                let mut chunk = vec![0u8; CHUNK_BYTES.min(remaining as usize)];
                if let Err(e) = file.read_exact(&mut chunk).await {
                    let _ = tx
                        .send(Err(Status::internal(format!("reading the artifact: {e}"))))
                        .await;
                    return;
                }
                remaining -= chunk.len() as u64;
                if tx
                    .send(Ok(pb::ArtifactChunk { data: chunk }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
