//! `fleet-controller issue-admin --config controller.toml --out DIR [--name NAME]`: a new
//! admin credential made with the CA key on the controller's host, for when every admin
//! credential is lost, expired or revoked (break glass). It writes `client.key` (0600),
//! `client.pem`, `ca.pem` and `client.toml` into DIR, like `fleetctl credentials create`.
//!
//! It is recorded: with the controller stopped, the certificate and a
//! `credential.issued_break_glass` event go into the store at once; with the controller
//! running (its store is locked), the controller records it at its first use, with a
//! `credential.learned` event (see `FleetState::flush_credential_uses`).

use crate::config::ControllerConfig;
use crate::model::EventRecord;
use crate::store::{CertificateRecord, Store, StoreError};
use fleet_pki::ca::Authority;
use fleet_pki::Role;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Who `issued_by` and the event name for a break-glass credential.
pub const ISSUED_BY: &str = "fleet-controller issue-admin";

#[derive(Debug, Error)]
pub enum BreakGlassError {
    #[error("{path} already exists: pass --out with a new directory")]
    Exists { path: PathBuf },
    #[error("credential name {0:?} is invalid: use lowercase letters, digits and '-', at most 63 characters")]
    Name(String),
    #[error("cannot read {path}: {source}; run issue-admin on the controller's host with the controller.toml that names its CA key")]
    ReadCa {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot use the CA: {0}")]
    Ca(String),
    #[error("cannot write {path}: {source}; pass --out with a directory you can write")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the credential is written, but the store could not record it: {0}")]
    Store(#[from] StoreError),
}

/// Where the credential went and whether the store recorded it already.
#[derive(Debug)]
pub struct IssuedAdmin {
    pub name: String,
    pub serial: String,
    pub dir: PathBuf,
    /// False when the controller runs (its store is locked): it records the credential at its
    /// first use.
    pub recorded: bool,
}

/// Makes a new admin credential `name` with the CA of `config` and writes it into `out`.
pub fn issue_admin(
    config: &ControllerConfig,
    out: &Path,
    name: &str,
) -> Result<IssuedAdmin, BreakGlassError> {
    if fleet_proto::names::check_app(name).is_err() {
        return Err(BreakGlassError::Name(name.to_string()));
    }
    let key_path = out.join("client.key");
    if key_path.exists() {
        return Err(BreakGlassError::Exists { path: key_path });
    }
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| BreakGlassError::ReadCa {
            path: path.to_path_buf(),
            source,
        })
    };
    let ca_pem = read(&config.tls.ca)?;
    let authority = Authority::load(&ca_pem, &read(&config.tls.ca_key)?)
        .map_err(|e| BreakGlassError::Ca(e.to_string()))?;
    let issued = authority
        .issue_client(name, Role::Admin, config.certificate_ttl)
        .map_err(|e| BreakGlassError::Ca(e.to_string()))?;
    let write = |path: PathBuf, text: &str, mode: u32| -> Result<(), BreakGlassError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .and_then(|mut file| file.write_all(text.as_bytes()))
            .map_err(|source| BreakGlassError::Write { path, source })
    };
    std::fs::create_dir_all(out).map_err(|source| BreakGlassError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    write(
        key_path,
        issued.key_pem.as_deref().unwrap_or_default(),
        0o600,
    )?;
    write(out.join("client.pem"), &issued.cert_pem, 0o644)?;
    write(out.join("ca.pem"), &ca_pem, 0o644)?;
    write(
        out.join("client.toml"),
        &format!(
            "# fleetctl configuration: an admin credential from `{ISSUED_BY}`. The controller's\n\
             # address as seen from the controller's own host; change it to the one you dial.\n\
             controller = \"https://{}\"\n",
            local_address(config.listen)
        ),
        0o644,
    )?;
    let record = CertificateRecord {
        serial: issued.serial.clone(),
        name: name.to_string(),
        role: Role::Admin.as_str().to_string(),
        issued_unix_ms: fleet_proto::now_unix_ms(),
        not_after_unix_ms: issued.not_after_unix_ms,
        issued_by: ISSUED_BY.to_string(),
        labels: None,
    };
    let recorded = record_if_stopped(&config.data_dir, &record)?;
    Ok(IssuedAdmin {
        name: name.to_string(),
        serial: issued.serial,
        dir: out.to_path_buf(),
        recorded,
    })
}

/// The address to dial the controller at from its own host: its listen address, or loopback
/// for an unspecified one (`0.0.0.0`, `::`).
fn local_address(listen: SocketAddr) -> SocketAddr {
    if listen.ip().is_unspecified() {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), listen.port())
    } else {
        listen
    }
}

/// Records the certificate and an event in the store when no controller holds it open;
/// `Ok(false)` when one does (it learns the credential at its first use).
fn record_if_stopped(data_dir: &Path, record: &CertificateRecord) -> Result<bool, StoreError> {
    if !data_dir.join(crate::store::STORE_FILE).exists() {
        // A controller that never ran: nothing to record into yet; it learns the credential
        // at its first use.
        return Ok(false);
    }
    let store = match Store::open(data_dir) {
        Ok(store) => store,
        Err(StoreError::Db(e)) if matches!(*e, redb::Error::DatabaseAlreadyOpen) => {
            return Ok(false)
        }
        Err(e) => return Err(e),
    };
    store.record_certificate(record)?;
    store.append_event(EventRecord {
        seq: 0,
        unix_ms: fleet_proto::now_unix_ms(),
        actor: ISSUED_BY.to_string(),
        kind: "credential.issued_break_glass".to_string(),
        app: String::new(),
        host: String::new(),
        message: format!(
            "admin credential `{}` (certificate {}) made with the CA key by `{ISSUED_BY}` on the controller's host",
            record.name, record.serial
        ),
    })?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unspecified_listen_address_is_dialled_on_loopback() {
        for (listen, expect) in [
            ("0.0.0.0:7700", "127.0.0.1:7700"),
            ("[::]:7700", "127.0.0.1:7700"),
            ("10.0.0.5:7700", "10.0.0.5:7700"),
        ] {
            assert_eq!(
                local_address(listen.parse().unwrap()).to_string(),
                expect,
                "{listen}"
            );
        }
    }
}
