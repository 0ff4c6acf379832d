//! `fleet-controller backup`: asks the running controller that `controller.toml` describes for
//! a store snapshot over its API, authenticated by an admin certificate signed here with the
//! CA key for this one call, then writes the backup with the artifacts and TLS files read from
//! disk (see the module doc of `backup`).

use super::{BackupError, Contents, Manifest, Target};
use crate::config::ControllerConfig;
use fleet_pki::Role;
use fleet_proto::pb;
use std::io::{Seek, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// The name the backup's own certificate carries (and the event log shows).
pub const BACKUP_IDENTITY: &str = "fleet-controller-backup";
/// How long the connection to the controller may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Takes a backup of the running controller of `config` (read from `config_path`) into `to`.
pub async fn take(
    config_path: &Path,
    config: &ControllerConfig,
    to: &Path,
) -> Result<Manifest, BackupError> {
    // The target first: a path that cannot be written is refused before anything else.
    let target = Target::create(to)?;
    let config_files = super::read_config_files(config_path, &config.tls)?;
    let text = |name: &str| String::from_utf8_lossy(&config_files[name]).into_owned();
    let authority = fleet_pki::ca::Authority::load(&text("ca.pem"), &text("ca.key"))
        .map_err(|e| BackupError::Controller(format!("cannot load the fleet CA: {e}")))?;
    let credential = authority
        .issue_client(BACKUP_IDENTITY, Role::Admin, config.certificate_ttl)
        .map_err(|e| {
            BackupError::Controller(format!("cannot sign the backup's credential: {e}"))
        })?;

    let addr = controller_addr(config)?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(text("ca.pem")))
        .identity(Identity::from_pem(
            &credential.cert_pem,
            credential.key_pem.unwrap_or_default(),
        ))
        .domain_name(fleet_pki::CONTROLLER_TLS_NAME);
    let unreachable = |e: &dyn std::fmt::Display| {
        BackupError::Controller(format!(
            "cannot reach the controller at {addr}: {e}; backup copies a running controller: start it (`fleet-controller --config {}`) and run backup again",
            config_path.display()
        ))
    };
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .map_err(|e| unreachable(&e))?
        .tls_config(tls)
        .map_err(|e| unreachable(&e))?
        .connect_timeout(CONNECT_TIMEOUT)
        .connect()
        .await
        .map_err(|e| unreachable(&std::error::Error::source(&e).unwrap_or(&e)))?;
    let mut client = pb::fleet_service_client::FleetServiceClient::new(channel)
        .max_decoding_message_size(4 << 20);
    let refused = |status: tonic::Status| {
        BackupError::Controller(format!(
            "the controller at {addr} did not give its store snapshot: {}",
            status.message()
        ))
    };
    let mut stream = client
        .export_store(pb::ExportStoreRequest {})
        .await
        .map_err(refused)?
        .into_inner();
    let mut dump = target.scratch()?;
    while let Some(chunk) = stream.message().await.map_err(refused)? {
        dump.write_all(&chunk.data)
            .map_err(|e| target.unwritable(e))?;
    }
    dump.seek(std::io::SeekFrom::Start(0))
        .map_err(|e| target.unwritable(e))?;
    let artifact_digests = crate::store::dump_artifact_digests(&mut dump)?;
    dump.seek(std::io::SeekFrom::Start(0))
        .map_err(|e| target.unwritable(e))?;
    super::write(
        target,
        Contents {
            store_dump: dump,
            config: config_files,
            data_dir: config.data_dir.clone(),
            artifact_digests,
        },
    )
}

/// Where the running controller listens: its address file (written once it listens), with an
/// unspecified IP (`0.0.0.0`, `::`) dialled on loopback.
fn controller_addr(config: &ControllerConfig) -> Result<SocketAddr, BackupError> {
    let text = std::fs::read_to_string(&config.addr_file).map_err(|e| {
        BackupError::Controller(format!(
            "the controller does not seem to run: {} cannot be read ({e}); a running controller writes it. Backup copies a running controller: start it and run backup again",
            config.addr_file.display()
        ))
    })?;
    let mut addr: SocketAddr = text.trim().parse().map_err(|_| {
        BackupError::Controller(format!(
            "{} does not hold an address: start the controller again, then run backup",
            config.addr_file.display()
        ))
    })?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    Ok(addr)
}
