//! The contract shared by `fleet-controller`, `fleetctl` and `fleet-agent`: the gRPC types
//! generated from `fleet.proto`, the artifact format (`fleet.toml` and the tarball rules), and
//! the rules for names, versions and durations, the revoked answer ([`refusal`]) and the
//! redirect to the leader ([`leader`]).
//!
//! **Architecture Invariant:** controller and agent never depend on each other; this crate is
//! all they share. It does no I/O beyond reading an artifact it is handed.
#![forbid(unsafe_code)]

pub mod artifact;
pub mod duration;
pub mod error_text;
pub mod etcd_config;
pub mod instance_state;
pub mod leader;
pub mod manifest;
pub mod names;
pub mod refusal;
pub mod secrets;

/// Types and service stubs generated from `proto/fleet.proto`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("fleet.v1");
}

/// The gRPC metadata key fleetctl puts the operator's name in (`USER@HOSTNAME`); the
/// controller records it beside the certificate's name as who made a change.
pub const ACTOR_HEADER: &str = "x-fleet-actor";

/// The longest a join token may live (7 days): the controller refuses a longer one, and
/// fleetctl checks `--ttl` against it before asking.
pub const MAX_JOIN_TOKEN_TTL_MS: u64 = 7 * 24 * 3_600_000;

/// Unix time in milliseconds, the one clock format on the wire and in the store.
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
