//! Raw gRPC to a test fleet's controller, for the tests that act as a client fleetctl would
//! never be: stolen or missing certificates, hostile requests, uploads held open.

use crate::fleet::Fleet;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// A mutual-TLS channel to the controller, presenting `identity` (certificate and key PEM)
/// when given, none otherwise.
pub async fn channel(fleet: &Fleet, identity: Option<(String, String)>) -> Channel {
    let ca = std::fs::read_to_string(fleet.config_dir().join("ca.pem")).unwrap();
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("fleet-controller");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(fleet.controller_url())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .timeout(Duration::from_secs(20))
        .connect()
        .await
        .expect("a TLS connection")
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
