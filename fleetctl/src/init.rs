//! `fleetctl init`: makes a new fleet in a directory: the fleet CA (`ca.pem`, `ca.key`), the
//! controller's certificate (`controller.pem`, `controller.key`; DNS names `fleet-controller`
//! and `localhost`, plus the listen IP), an admin credential for fleetctl (`client.pem`,
//! `client.key`: CN `admin`, role admin), `controller.toml` (`listen`, `data_dir = "data"`, and
//! the TLS files, relative to the directory) and `client.toml` (`controller =
//! "https://ADDR:PORT"`). Private keys are written with mode 0600. Every call to the controller
//! is authenticated with mutual TLS, so any listen address is allowed. An existing
//! controller.toml is never overwritten.

use crate::client::{usage, CliError, CA_FILE, CLIENT_CERT_FILE, CLIENT_KEY_FILE};
use fleet_pki::ca::{self, Authority};
use fleet_pki::Role;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// File names `init` writes, beside controller.toml.
pub const CA_KEY_FILE: &str = "ca.key";
pub const CONTROLLER_CERT_FILE: &str = "controller.pem";
pub const CONTROLLER_KEY_FILE: &str = "controller.key";

/// What `init` wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InitOutcome {
    pub dir: PathBuf,
    pub controller_config: PathBuf,
    pub client_config: PathBuf,
    /// The fleet CA certificate: agents need it (`fleet-agent --ca`).
    pub ca: PathBuf,
    pub listen: String,
    pub controller_url: String,
}

/// Checks the listen address: `IP:PORT`, any address.
pub fn parse_listen(listen: &str) -> Result<SocketAddr, CliError> {
    listen.trim().parse().map_err(|_| {
        usage(format!(
            "listen address {listen:?} is invalid: write it as IP:PORT, e.g. 127.0.0.1:7700 or 0.0.0.0:7700"
        ))
    })
}

/// Writes a file that must not exist yet, with `mode`, and syncs it.
fn write_new(path: &Path, text: &str, mode: u32) -> Result<(), CliError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                usage(format!(
                    "{} already exists: this directory already holds a fleet; pass --dir NEW_DIR for another one",
                    path.display()
                ))
            } else {
                usage(format!("cannot write {}: {e}", path.display()))
            }
        })?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| usage(format!("cannot write {}: {e}", path.display())))
}

/// Writes the CA, the certificates, controller.toml and client.toml into `dir` (created if
/// missing).
pub fn init_dir(dir: &Path, listen: &str) -> Result<InitOutcome, CliError> {
    let addr = parse_listen(listen)?;
    std::fs::create_dir_all(dir).map_err(|e| {
        usage(format!(
            "cannot create {}: {e}; pass --dir with a directory you can write",
            dir.display()
        ))
    })?;
    let controller_config = dir.join("controller.toml");
    let client_config = dir.join("client.toml");
    if controller_config.exists() {
        return Err(usage(format!(
            "{} already exists: this directory already holds a controller; pass --dir NEW_DIR for another one, or delete the file (and its data directory) to start over",
            controller_config.display()
        )));
    }
    let controller_url = format!("https://{addr}");
    let failed = |e: ca::CaError| CliError::Failed(e.to_string());

    let (ca_pem, ca_key) = ca::generate_ca().map_err(failed)?;
    let authority = Authority::load(&ca_pem, &ca_key).map_err(failed)?;
    let controller_cert = authority
        .issue_controller(Some(addr.ip()))
        .map_err(failed)?;
    let admin = authority
        .issue_client("admin", Role::Admin)
        .map_err(failed)?;

    write_new(&dir.join(CA_KEY_FILE), &ca_key, 0o600)?;
    write_new(&dir.join(CA_FILE), &ca_pem, 0o644)?;
    write_new(
        &dir.join(CONTROLLER_KEY_FILE),
        controller_cert.key_pem.as_deref().unwrap_or_default(),
        0o600,
    )?;
    write_new(
        &dir.join(CONTROLLER_CERT_FILE),
        &controller_cert.cert_pem,
        0o644,
    )?;
    write_new(
        &dir.join(CLIENT_KEY_FILE),
        admin.key_pem.as_deref().unwrap_or_default(),
        0o600,
    )?;
    write_new(&dir.join(CLIENT_CERT_FILE), &admin.cert_pem, 0o644)?;

    let controller_text = format!(
        "# fleet-controller configuration, written by `fleetctl init`.\n\
         # Start the controller with: fleet-controller --config {}\n\
         listen = {}\n\
         # Relative paths are relative to this file's directory.\n\
         data_dir = \"data\"\n\
         # Mutual TLS: the fleet CA (it signs agents' and credentials' certificates) and the\n\
         # controller's own certificate. Keep ca.key secret: whoever holds it can mint credentials.\n\
         ca = \"{CA_FILE}\"\n\
         ca_key = \"{CA_KEY_FILE}\"\n\
         cert = \"{CONTROLLER_CERT_FILE}\"\n\
         key = \"{CONTROLLER_KEY_FILE}\"\n",
        controller_config.display(),
        toml_string(&addr.to_string()),
    );
    write_new(&controller_config, &controller_text, 0o644)?;
    write_client_toml(&client_config, &controller_url)?;

    Ok(InitOutcome {
        dir: dir.to_path_buf(),
        controller_config,
        client_config,
        ca: dir.join(CA_FILE),
        listen: addr.to_string(),
        controller_url,
    })
}

/// Writes `client.toml` naming the controller (fleetctl reads the TLS files beside it).
pub fn write_client_toml(path: &Path, controller_url: &str) -> Result<(), CliError> {
    let text = format!(
        "# fleetctl configuration. The credential is client.pem and client.key beside this file,\n\
         # the fleet CA is ca.pem.\n\
         controller = {}\n",
        toml_string(controller_url),
    );
    std::fs::write(path, text).map_err(|e| usage(format!("cannot write {}: {e}", path.display())))
}

/// A TOML basic string (quotes and backslashes escaped).
fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn listen_is_any_ip_and_port() {
        for (listen, ok) in [
            ("127.0.0.1:7700", true),
            ("127.0.0.1:0", true),
            ("[::1]:7700", true),
            ("0.0.0.0:7700", true),
            ("10.0.0.1:7700", true),
            ("localhost:7700", false),
            ("127.0.0.1", false),
        ] {
            assert_eq!(parse_listen(listen).is_ok(), ok, "{listen}");
        }
        assert_eq!(parse_listen("x").unwrap_err().exit_code(), 2);
    }

    #[test]
    fn writes_the_fleet_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("fleet");
        let outcome = init_dir(&target, "127.0.0.1:7701").unwrap();
        assert_eq!(outcome.controller_url, "https://127.0.0.1:7701");

        // That fleet-controller starts from this file, every end-to-end test shows.
        let config: toml::Table =
            toml::from_str(&std::fs::read_to_string(target.join("controller.toml")).unwrap())
                .unwrap();
        assert_eq!(config["listen"].as_str(), Some("127.0.0.1:7701"));
        assert_eq!(config["data_dir"].as_str(), Some("data"));
        assert_eq!(config["ca_key"].as_str(), Some("ca.key"));
        #[derive(serde::Deserialize)]
        struct ClientToml {
            controller: String,
        }
        let client: ClientToml =
            toml::from_str(&std::fs::read_to_string(target.join("client.toml")).unwrap()).unwrap();
        assert_eq!(client.controller, "https://127.0.0.1:7701");
        for key in ["ca.key", "controller.key", "client.key"] {
            let mode = std::fs::metadata(target.join(key))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
        let ca_pem = std::fs::read_to_string(target.join("ca.pem")).unwrap();
        let ca_key = std::fs::read_to_string(target.join("ca.key")).unwrap();
        Authority::load(&ca_pem, &ca_key).unwrap();

        let again = init_dir(&target, "127.0.0.1:7702").unwrap_err();
        assert_eq!(again.exit_code(), 2);
        assert!(again.to_string().contains("already exists"));
        let unchanged = std::fs::read_to_string(target.join("controller.toml")).unwrap();
        assert!(unchanged.contains("127.0.0.1:7701"));
    }
}
