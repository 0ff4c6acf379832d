//! The gRPC edge of the controller. Requests are validated here and turned into domain
//! values; domain errors become `tonic::Status` here. Nothing past this module sees a
//! generated type or a `Status`.

pub mod agent_service;
pub mod certificates;
pub mod convert;
pub mod fleet_service;
pub mod logs;
pub mod replica_service;

pub use crate::status::{rollout_status, store_status};

use tonic::Request;

/// Who made a request, for the record: the name in the caller's certificate (the identity the
/// fleet vouches for), followed by the operator fleetctl says ran it (`x-fleet-actor`, checked
/// to be short printable text), like `ci (deploy-bot@runner-7)`.
pub fn actor_of<T>(identity: &crate::auth::Identity, request: &Request<T>) -> String {
    let claimed = request
        .metadata()
        .get(fleet_proto::ACTOR_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()));
    match claimed {
        Some(claimed) if claimed != identity.name => format!("{} ({claimed})", identity.name),
        _ => identity.name.clone(),
    }
}
