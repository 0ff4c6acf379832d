//! `ReplicaService`: what the controllers of one fleet (state in etcd) call on each other so
//! that an artifact outlives any one of them (`crate::replicas`): a pushed copy received,
//! checked against its digest and kept, and a stored artifact streamed to a controller that
//! misses it. Only a certificate with the role `controller` may call it (see `crate::auth`).

use crate::auth::{self, Role};
use crate::fleet_state::FleetState;
use crate::replicas::{self, ReplicaError, Replicas};
use fleet_proto::pb;
use std::sync::Arc;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

pub struct ReplicaApi {
    pub fleet: Arc<FleetState>,
}

/// A controller without replicas (the redb store) takes no copies and gives none.
fn replicas_of(fleet: &FleetState) -> Result<&Arc<Replicas>, Status> {
    fleet.replicas().ok_or_else(|| {
        Status::failed_precondition(
            "this controller keeps its state in a file of its own (no [etcd] in controller.toml): it shares no artifacts with other controllers",
        )
    })
}

/// The status of a replication error.
pub fn replica_status(e: ReplicaError) -> Status {
    match e {
        e @ ReplicaError::BadDigest(_) => Status::invalid_argument(e.to_string()),
        e @ ReplicaError::NotHeld { .. } => Status::not_found(e.to_string()),
        e @ (ReplicaError::OnlyOneController | ReplicaError::NotStored { .. }) => {
            Status::failed_precondition(e.to_string())
        }
        e @ ReplicaError::Peers(_) => Status::unavailable(e.to_string()),
        e @ ReplicaError::Store(crate::artifacts::ArtifactStoreError::DigestMismatch { .. }) => {
            Status::data_loss(e.to_string())
        }
        e @ ReplicaError::Store(
            crate::artifacts::ArtifactStoreError::Busy(_)
            | crate::artifacts::ArtifactStoreError::DiskFull { .. },
        ) => Status::resource_exhausted(e.to_string()),
        e @ ReplicaError::Store(crate::artifacts::ArtifactStoreError::Invalid(_)) => {
            Status::invalid_argument(e.to_string())
        }
        e => {
            tracing::error!("{e}");
            Status::internal(e.to_string())
        }
    }
}

/// Before an artifact is served to an agent: fetched from another controller when this one
/// does not hold it (several controllers only; with one, nothing to do).
pub async fn ensure_local(fleet: &FleetState, digest: &str) -> Result<(), Status> {
    if let Some(replicas) = fleet.replicas() {
        replicas
            .ensure_local(digest)
            .await
            .map_err(replica_status)?;
    }
    Ok(())
}

/// The next message of a push, refused after [`replicas::IDLE_TIMEOUT`] without one.
async fn next_message(
    stream: &mut Streaming<pb::PushArtifactRequest>,
) -> Result<Option<pb::PushArtifactRequest>, Status> {
    let idle = replicas::IDLE_TIMEOUT;
    tokio::time::timeout(idle, stream.message())
        .await
        .map_err(|_| {
            Status::deadline_exceeded(format!(
                "the copy sent nothing for {idle:?}: it was dropped"
            ))
        })?
}

#[tonic::async_trait]
impl pb::replica_service_server::ReplicaService for ReplicaApi {
    async fn push_artifact(
        &self,
        request: Request<Streaming<pb::PushArtifactRequest>>,
    ) -> Result<Response<pb::PushArtifactResponse>, Status> {
        let identity = auth::require(&self.fleet, &request, Role::Controller)?;
        let replicas = replicas_of(&self.fleet)?;
        let mut stream = request.into_inner();
        let Some(first) = next_message(&mut stream).await? else {
            return Err(Status::invalid_argument(
                "a push names its artifact's digest in its first message",
            ));
        };
        let digest = first.digest;
        let Some(mut receiving) = replicas.begin_receive(&digest).map_err(replica_status)? else {
            return Ok(Response::new(pb::PushArtifactResponse {
                already_held: true,
            }));
        };
        if !first.data.is_empty() {
            receiving = receiving.write(first.data).await.map_err(replica_status)?;
        }
        while let Some(message) = next_message(&mut stream).await? {
            if !message.digest.is_empty() && message.digest != digest {
                return Err(Status::invalid_argument(
                    "a push carries one artifact: only its first message names a digest",
                ));
            }
            receiving = receiving
                .write(message.data)
                .await
                .map_err(replica_status)?;
        }
        receiving.finish().await.map_err(replica_status)?;
        tracing::info!(%digest, from = %identity.name, "artifact copy stored");
        Ok(Response::new(pb::PushArtifactResponse {
            already_held: false,
        }))
    }

    type PullArtifactStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::ArtifactChunk, Status>> + Send>,
    >;

    async fn pull_artifact(
        &self,
        request: Request<pb::PullArtifactRequest>,
    ) -> Result<Response<Self::PullArtifactStream>, Status> {
        auth::require(&self.fleet, &request, Role::Controller)?;
        let replicas = replicas_of(&self.fleet)?;
        let digest = request.into_inner().digest;
        // Only what it holds: a controller never asks its own peers for another.
        let path = replicas.path_of(&digest).map_err(replica_status)?;
        if !self.fleet.artifacts().holds(&digest) {
            return Err(Status::not_found(format!(
                "this controller does not hold artifact {digest}"
            )));
        }
        let chunks = replicas::read_chunks(path).map(move |chunk| match chunk {
            Ok(data) => Ok(pb::ArtifactChunk { data }),
            Err(e) => Err(Status::internal(format!(
                "the controller cannot read its artifact {digest}: {e}"
            ))),
        });
        Ok(Response::new(Box::pin(chunks)))
    }
}
