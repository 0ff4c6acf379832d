//! `fleetctl init`: writes `DIR/controller.toml` (`listen`, `data_dir = "data"`) and
//! `DIR/client.toml` (`controller = "http://ADDR:PORT"`). Until mTLS lands, the controller
//! listens on loopback only, so any other address is refused. An existing controller.toml is
//! never overwritten.

use crate::cli::client::{usage, CliError};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// What `init` wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InitOutcome {
    pub dir: PathBuf,
    pub controller_config: PathBuf,
    pub client_config: PathBuf,
    pub listen: String,
    pub controller_url: String,
}

/// Checks the listen address: `IP:PORT` on loopback.
pub fn parse_listen(listen: &str) -> Result<SocketAddr, CliError> {
    let addr: SocketAddr = listen.trim().parse().map_err(|_| {
        usage(format!(
            "listen address {listen:?} is invalid: write it as IP:PORT, e.g. 127.0.0.1:7700"
        ))
    })?;
    if !addr.ip().is_loopback() {
        return Err(usage(format!(
            "refusing to listen on {addr}: until mTLS lands the controller listens only on loopback (use 127.0.0.1:PORT)"
        )));
    }
    Ok(addr)
}

/// Writes controller.toml and client.toml into `dir` (created if missing).
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
    let controller_url = format!("http://{addr}");

    let controller_text = format!(
        "# fleet-controller configuration, written by `fleetctl init`.\n\
         # Start the controller with: fleet-controller --config {}\n\
         listen = {}\n\
         # Relative paths are relative to this file's directory.\n\
         data_dir = \"data\"\n",
        controller_config.display(),
        toml_string(&addr.to_string()),
    );
    let client_text = format!(
        "# fleetctl configuration, written by `fleetctl init`.\n\
         controller = {}\n",
        toml_string(&controller_url),
    );

    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&controller_config)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                usage(format!(
                    "{} already exists: this directory already holds a controller; pass --dir NEW_DIR for another one, or delete the file (and its data directory) to start over",
                    controller_config.display()
                ))
            } else {
                usage(format!("cannot write {}: {e}", controller_config.display()))
            }
        })?;
    file.write_all(controller_text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| usage(format!("cannot write {}: {e}", controller_config.display())))?;
    std::fs::write(&client_config, client_text)
        .map_err(|e| usage(format!("cannot write {}: {e}", client_config.display())))?;

    Ok(InitOutcome {
        dir: dir.to_path_buf(),
        controller_config,
        client_config,
        listen: addr.to_string(),
        controller_url,
    })
}

/// A TOML basic string (quotes and backslashes escaped).
fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_must_be_loopback() {
        for (listen, ok) in [
            ("127.0.0.1:7700", true),
            ("127.0.0.1:0", true),
            ("[::1]:7700", true),
            ("0.0.0.0:7700", false),
            ("10.0.0.1:7700", false),
            ("localhost:7700", false),
            ("127.0.0.1", false),
        ] {
            assert_eq!(parse_listen(listen).is_ok(), ok, "{listen}");
        }
        let error = parse_listen("0.0.0.0:7700").unwrap_err();
        assert_eq!(error.exit_code(), 2);
        assert!(error
            .to_string()
            .contains("until mTLS lands the controller listens only on loopback"));
    }

    #[test]
    fn writes_both_files_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("fleet");
        let outcome = init_dir(&target, "127.0.0.1:7701").unwrap();
        assert_eq!(outcome.controller_url, "http://127.0.0.1:7701");

        #[derive(serde::Deserialize)]
        struct ControllerToml {
            listen: String,
            data_dir: String,
        }
        #[derive(serde::Deserialize)]
        struct ClientToml {
            controller: String,
        }
        let controller: ControllerToml =
            toml::from_str(&std::fs::read_to_string(target.join("controller.toml")).unwrap())
                .unwrap();
        assert_eq!(controller.listen, "127.0.0.1:7701");
        assert_eq!(controller.data_dir, "data");
        let client: ClientToml =
            toml::from_str(&std::fs::read_to_string(target.join("client.toml")).unwrap()).unwrap();
        assert_eq!(client.controller, "http://127.0.0.1:7701");

        let again = init_dir(&target, "127.0.0.1:7702").unwrap_err();
        assert_eq!(again.exit_code(), 2);
        assert!(again.to_string().contains("already exists"));
        let unchanged = std::fs::read_to_string(target.join("controller.toml")).unwrap();
        assert!(unchanged.contains("127.0.0.1:7701"));
    }
}
