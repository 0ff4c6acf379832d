//! The rules for calls that speak for one host (agent certificates): an agent says only its
//! own host's name, fetches only the artifacts of the releases its own host should run, and
//! loses an open session once its certificate is revoked. The gRPC handlers of
//! `AgentService` call these right after [`super::require`].

use super::Identity;
use crate::fleet_state::FleetState;
use crate::status::store_status;
use tonic::Status;

/// Refuses an agent that speaks for a host other than the one its certificate names.
pub fn require_own_host(identity: &Identity, claimed_host: &str) -> Result<(), Status> {
    if claimed_host == identity.name {
        return Ok(());
    }
    Err(Status::permission_denied(format!(
        "this agent's certificate is for host `{}`: it cannot speak for host `{claimed_host}`",
        identity.name
    )))
}

/// Refuses a fetch of an artifact that is not one of a release in the caller's own host's
/// desired state (whether the digest exists at all is not told).
pub fn require_artifact_of_own_host(
    fleet: &FleetState,
    identity: &Identity,
    digest: &str,
) -> Result<(), Status> {
    let digests = fleet
        .desired_digests(&identity.name)
        .map_err(store_status)?;
    if digests.iter().any(|d| d == digest) {
        return Ok(());
    }
    Err(Status::permission_denied(format!(
        "host `{}` has no assigned release with artifact {}: an agent fetches only what its own host is assigned",
        identity.name,
        fleet_proto::names::quoted(digest)
    )))
}

/// `Err` with the explicit revoked answer (see `fleet_proto::refusal`) once the certificate of
/// an open session was revoked (`fleetctl remove`): the session ends with it, so the agent
/// hears why. A store that cannot be read keeps the session (the next heartbeat asks again).
pub fn session_still_allowed(fleet: &FleetState, identity: &Identity) -> Result<(), Status> {
    match fleet.revocation(&identity.serial) {
        Ok(None) => Ok(()),
        Ok(Some(revocation)) => Err(fleet_proto::refusal::revoked_status(
            super::revoked(identity),
            revocation.purge,
        )),
        Err(e) => {
            tracing::warn!("cannot check whether {} was revoked: {e}", identity.name);
            Ok(())
        }
    }
}
