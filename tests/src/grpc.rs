//! Raw gRPC to a test fleet's controller, for the tests that act as a client fleetctl would
//! never be: stolen or missing certificates, hostile requests, uploads held open.

use crate::fleet::Fleet;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// A mutual-TLS channel to the controller, presenting `identity` (certificate and key PEM)
/// when given, none otherwise.
pub async fn channel(fleet: &Fleet, identity: Option<(String, String)>) -> Channel {
    channel_to(fleet, &fleet.controller_url(), "fleet-controller", identity)
        .await
        .expect("a TLS connection")
}

/// A mutual-TLS channel to `url`, verifying the controller's certificate under `server_name`
/// against the fleet CA: the connection's error when it fails.
pub async fn channel_to(
    fleet: &Fleet,
    url: &str,
    server_name: &str,
    identity: Option<(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let ca = std::fs::read_to_string(fleet.config_dir().join("ca.pem")).unwrap();
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name(server_name);
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(url.to_string())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .timeout(Duration::from_secs(20))
        .connect()
        .await
}

/// The admin credential `fleetctl init` wrote.
pub fn admin_identity(fleet: &Fleet) -> (String, String) {
    (
        std::fs::read_to_string(fleet.config_dir().join("client.pem")).unwrap(),
        std::fs::read_to_string(fleet.config_dir().join("client.key")).unwrap(),
    )
}

/// A single-threaded runtime for a test's async part.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}
