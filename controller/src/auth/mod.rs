//! Who may call what. Every connection to the controller is TLS; every call but
//! `AgentService.Join` must carry a client certificate signed by the fleet's CA, and the
//! identity in it (subject CN = the name, subject OU = the role, see [`identity`]) decides what
//! the call may do. Each gRPC handler starts with one line, `auth::require(...)?`, so the
//! rules live here and nowhere else:
//!
//! | role | may call |
//! | --- | --- |
//! | `admin` | every FleetService call |
//! | `deployer` | release create, rollout, rollback, rollout status/pause/resume/abort, the read verbs (hosts, releases, status, history, events), and `RenewCredential` for its own credential |
//! | `agent` | only `AgentService.Session`, `FetchArtifact` and `Renew`, and only for its own host |
//! | `controller` | only `ReplicaService` (artifact copies between the controllers of one fleet, `crate::replicas`) |
//!
//! A certificate whose serial is on the revoked list (`Store::revoke_host`,
//! `Store::revoke_credential`) is refused on every call, also on a connection opened before it
//! was revoked: the list is read per call, not per connection. The refusal is the explicit
//! revoked answer of `fleet_proto::refusal` (`UNAUTHENTICATED` with a `Refusal` detail, and
//! whether to purge), the only refusal an agent ends on. Every call of an operator or CI
//! credential is noted in memory for `credentials list`'s last use.
//!
//! The fleet CA and the identity in a certificate are `fleet_pki`'s (shared with fleetctl and
//! the agent). Here:
//! - [`host_scope`]: what an agent certificate may do beyond its role: speak only for its own
//!   host, fetch only its host's artifacts, lose its session once revoked.
//! - [`tokens`]: one-time join tokens (made here, stored only as sha256).

pub mod host_scope;
pub mod tokens;

pub use fleet_pki::{Identity, Role};

use crate::fleet_state::FleetState;
use crate::status::store_status;
use tonic::{Request, Status};

/// The identity of the caller, when it has the role `needed` (admin also covers deployer), its
/// certificate is not revoked, and it presented one at all. Otherwise `Unauthenticated` (no or
/// unreadable certificate, revoked) or `PermissionDenied` naming the role the call needs.
pub fn require<T>(
    fleet: &FleetState,
    request: &Request<T>,
    needed: Role,
) -> Result<Identity, Status> {
    let identity = match request.extensions().get::<Identity>() {
        // The edge read it and checked it is not revoked, for this very request.
        Some(identity) => identity.clone(),
        None => identity_of(fleet, request)?,
    };
    if !identity.role.grants(needed) {
        return Err(Status::permission_denied(format!(
            "this call needs the {} role; your credential `{}` has role {}",
            needed.as_str(),
            identity.name,
            identity.role.as_str()
        )));
    }
    Ok(identity)
}

/// The identity in the request's client certificate, refused when there is none, it cannot be
/// read, or it was revoked.
fn identity_of<T>(fleet: &FleetState, request: &Request<T>) -> Result<Identity, Status> {
    let certs = request.peer_certs();
    let Some(leaf) = certs.as_ref().and_then(|certs| certs.first()) else {
        return Err(Status::unauthenticated(
            "this call needs a client certificate from the fleet's CA: use the directory written by `fleetctl init` or `fleetctl credentials create` (--config-dir DIR)",
        ));
    };
    let identity =
        Identity::from_der(leaf.as_ref()).map_err(|e| Status::unauthenticated(unreadable(e)))?;
    match fleet.revocation(&identity.serial) {
        Ok(None) => {
            fleet.note_credential_use(&identity);
            Ok(identity)
        }
        Ok(Some(revocation)) => Err(fleet_proto::refusal::revoked_status(
            revoked(&identity),
            revocation.purge,
        )),
        Err(e) => Err(store_status(e)),
    }
}

/// Why a revoked certificate is refused, and what to do.
pub fn revoked(identity: &Identity) -> String {
    if identity.role == Role::Agent {
        format!(
            "the certificate of host `{}` (serial {}) was revoked: the host was removed with `fleetctl remove`; to bring it back, join it again with a new token",
            identity.name, identity.serial
        )
    } else {
        format!(
            "the certificate of `{}` (serial {}) was revoked: ask an admin for a new credential (`fleetctl credentials create`)",
            identity.name, identity.serial
        )
    }
}

fn unreadable(e: impl std::fmt::Display) -> String {
    format!("the client certificate is not a fleet credential: {e}")
}

/// Who presents a client certificate (DER, verified against the fleet CA), for the edge to
/// refuse a revoked or unreadable one, and an agent's outside the agent service, before any
/// request body is read; a store that cannot be read refuses it too (fail closed). The identity
/// it returns travels with the request, so [`require`] does not read the certificate again.
pub fn classify(fleet: &FleetState, der: &[u8]) -> crate::edge::Caller {
    use crate::edge::Caller;
    let identity = match Identity::from_der(der) {
        Ok(identity) => identity,
        Err(e) => return Caller::Refused(unreadable(e)),
    };
    match fleet.revocation(&identity.serial) {
        Ok(None) => {}
        Ok(Some(revocation)) => {
            return Caller::Revoked {
                why: revoked(&identity),
                purge: revocation.purge,
            }
        }
        // Fail closed: nothing is let through unchecked.
        Err(e) => {
            tracing::error!("{e}");
            return Caller::Refused(format!(
                "the controller cannot check this certificate against its revoked list ({e}): its data directory may be damaged or full; try again, and tell its operator"
            ));
        }
    }
    if identity.role == Role::Agent {
        Caller::Agent(identity)
    } else {
        fleet.note_credential_use(&identity);
        Caller::Client(identity)
    }
}
