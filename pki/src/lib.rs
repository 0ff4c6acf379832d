//! The fleet's public-key infrastructure, the one copy that the controller, `fleetctl` and
//! the agent share: the fleet CA and what it signs ([`ca`]; [`grant`]: the peer-fetch grants it
//! signs), keys and certificate requests
//! ([`request`]), and the identity a certificate carries ([`identity`]: CN = name, OU = role,
//! the serial that revocation lists), and how long a certificate lives and when it is renewed
//! ([`lifetime`]).
//!
//! It knows nothing of gRPC: PEM text in, PEM text or an [`Identity`] out. Its one I/O is
//! [`files`]: writing a key or certificate privately and atomically.
#![forbid(unsafe_code)]

pub mod ca;
pub mod files;
pub mod grant;
pub mod identity;
pub mod lifetime;
pub mod request;

pub use identity::{Identity, Role};

/// The DNS name in the controller's certificate that every client (fleetctl, agents) verifies,
/// whatever address it dials. One constant, so the sides cannot drift apart.
pub const CONTROLLER_TLS_NAME: &str = "fleet-controller";

/// Unix time in seconds.
fn now_unix_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
