//! `fleetctl init`: makes a new fleet in a directory: the fleet CA (`ca.pem`, `ca.key`), the
//! controller's certificate (`controller.pem`, `controller.key`; DNS names `fleet-controller`
//! and `localhost`, plus the listen IP and the host of every `--url`), an admin credential for
//! fleetctl (`client.pem`, `client.key`: CN `admin`, role admin, valid for `--certificate-ttl`,
//! default 30 days, renewed by fleetctl itself), `controller.toml` (`listen`,
//! `data_dir = "data"`, `certificate_ttl`, and the TLS files, relative to the directory) and `client.toml`
//! (`controller = "https://HOST:PORT"`, or an array of them: the `--url` addresses hosts,
//! operators and CI dial, else the listen address). Private keys are written with mode 0600.
//! Every call to the controller is authenticated with mutual TLS, so any listen address is
//! allowed; an unspecified one (`0.0.0.0`, `::`) needs `--url`, since nobody can dial it. An
//! existing controller.toml is never overwritten.

use crate::client::{usage, CliError, CA_FILE, CLIENT_CERT_FILE, CLIENT_KEY_FILE};
use crate::parse::ControllerUrls;
use fleet_pki::ca::{self, Authority};
use fleet_pki::Role;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
    /// The address fleetctl, bootstrap and `credentials create` use: the first of
    /// `controller_urls`.
    pub controller_url: String,
    /// Every address the controller is dialled at (`--url`), as client.toml holds them.
    pub controller_urls: Vec<String>,
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

/// The addresses client.toml gets: the `--url` ones, else the listen address when it is one a
/// host can dial. Port 0 in a URL (the port a local controller picks, read from
/// `controller.addr`) only goes with a listen port of 0.
fn controller_urls(
    addr: SocketAddr,
    urls: Option<&ControllerUrls>,
) -> Result<Vec<String>, CliError> {
    let Some(urls) = urls else {
        if addr.ip().is_unspecified() {
            return Err(usage(format!(
                "--listen {addr} accepts connections on every address of this machine, so it is no address that hosts, operators and CI can dial: pass the one they reach the controller at too, e.g. --url https://controller.example.com:{port} (several: --url URL1,URL2)",
                port = addr.port()
            )));
        }
        return Ok(vec![format!("https://{addr}")]);
    };
    if let Some(url) = urls.0.iter().find(|url| url.port == 0 && addr.port() != 0) {
        return Err(usage(format!(
            "--url {} has port 0, which only a controller that picks its own port (--listen IP:0) can use: write the port hosts reach the controller at (--listen gives {})",
            url.url,
            addr.port()
        )));
    }
    Ok(urls.0.iter().map(|url| url.url.clone()).collect())
}

/// Writes the CA, the certificates, controller.toml and client.toml into `dir` (created if
/// missing). `urls` are the addresses hosts, operators and CI dial (`--url`); without them,
/// the listen address, which must then be a specific one. Certificates get the default
/// lifetime (see [`init_dir_with_ttl`]).
pub fn init_dir(
    dir: &Path,
    listen: &str,
    urls: Option<&ControllerUrls>,
) -> Result<InitOutcome, CliError> {
    init_dir_with_options(dir, listen, urls, DEFAULT_HTTP_LISTEN, None)
}

/// Like [`init_dir`], with `--certificate-ttl`: how long the certificates the controller
/// issues are valid (`certificate_ttl` in controller.toml, written only when given), the admin
/// credential's included; 30 days without it.
pub fn init_dir_with_ttl(
    dir: &Path,
    listen: &str,
    urls: Option<&ControllerUrls>,
    certificate_ttl: Option<Duration>,
) -> Result<InitOutcome, CliError> {
    init_dir_with_options(dir, listen, urls, DEFAULT_HTTP_LISTEN, certificate_ttl)
}

/// The HTTP listener (metrics, status page) `init` writes unless `--http-listen` says otherwise.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:7701";

/// Checks `--http-listen`: `IP:PORT` on loopback (the listener has no authentication; a wider
/// address is a deliberate edit of controller.toml, see SECURITY.md).
pub fn parse_http_listen(text: &str) -> Result<SocketAddr, CliError> {
    let addr: SocketAddr = text.trim().parse().map_err(|_| {
        usage(format!(
            "--http-listen {text:?} is invalid: write it as IP:PORT, e.g. {DEFAULT_HTTP_LISTEN}"
        ))
    })?;
    if !addr.ip().is_loopback() {
        return Err(usage(format!(
            "--http-listen {text:?} is not a loopback address: the HTTP listener (metrics, status page) has no authentication; keep it on 127.0.0.1 and put a proxy with authentication in front (see SECURITY.md), or set http_listen and http_allow_remote = true in controller.toml yourself"
        )));
    }
    Ok(addr)
}

/// The `[etcd]` table of controller.toml (empty without etcd).
fn etcd_table(etcd: Option<&fleet_proto::etcd_config::EtcdFile>) -> String {
    #[derive(serde::Serialize)]
    struct Table<'a> {
        etcd: &'a fleet_proto::etcd_config::EtcdFile,
    }
    match etcd {
        None => String::new(),
        Some(etcd) => format!(
            "# The controller's state is in etcd (several controllers may share it), not in the\n\
             # redb file of data_dir; data_dir keeps the artifact cache and uploads.\n{}",
            toml::to_string(&Table { etcd }).expect("[etcd] serialises")
        ),
    }
}

/// [`init_dir`] with the HTTP listener's address (`--http-listen`).
pub fn init_dir_with_http(
    dir: &Path,
    listen: &str,
    urls: Option<&ControllerUrls>,
    http_listen: &str,
) -> Result<InitOutcome, CliError> {
    init_dir_with_options(dir, listen, urls, http_listen, None)
}

/// [`init_dir`] with every option of `fleetctl init`: the HTTP listener's address
/// (`--http-listen`) and the certificates' lifetime (`--certificate-ttl`, see
/// [`init_dir_with_ttl`]).
pub fn init_dir_with_options(
    dir: &Path,
    listen: &str,
    urls: Option<&ControllerUrls>,
    http_listen: &str,
    certificate_ttl: Option<Duration>,
) -> Result<InitOutcome, CliError> {
    init_dir_with_etcd(dir, listen, urls, http_listen, certificate_ttl, None)
}

/// [`init_dir_with_options`] with the store in etcd (`--etcd` and its TLS flags), written to
/// controller.toml as `[etcd]` after the same check the controller makes.
pub fn init_dir_with_etcd(
    dir: &Path,
    listen: &str,
    urls: Option<&ControllerUrls>,
    http_listen: &str,
    certificate_ttl: Option<Duration>,
    etcd: Option<&fleet_proto::etcd_config::EtcdFile>,
) -> Result<InitOutcome, CliError> {
    if let Some(etcd) = etcd {
        fleet_proto::etcd_config::check(etcd).map_err(usage)?;
    }
    let lifetime = certificate_ttl.unwrap_or(fleet_pki::lifetime::DEFAULT_LIFETIME);
    fleet_pki::lifetime::check_lifetime(lifetime)
        .map_err(|e| usage(format!("--certificate-ttl {e}")))?;
    let addr = parse_listen(listen)?;
    let http_addr = parse_http_listen(http_listen)?;
    let controller_urls = controller_urls(addr, urls)?;
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
    let failed = |e: ca::CaError| CliError::Failed(e.to_string());

    let (ca_pem, ca_key) = ca::generate_ca().map_err(failed)?;
    let authority = Authority::load(&ca_pem, &ca_key).map_err(failed)?;
    // The certificate names every host the controller is dialled at, and its listen address.
    let mut names: Vec<String> = urls
        .map(|urls| urls.0.iter().map(|url| url.host.clone()).collect())
        .unwrap_or_default();
    names.push(addr.ip().to_string());
    let controller_cert = authority.issue_controller(&names).map_err(failed)?;
    let admin = authority
        .issue_client("admin", Role::Admin, lifetime)
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

    let ttl_line = match certificate_ttl {
        Some(ttl) => format!(
            "certificate_ttl = {}",
            toml_string(&fleet_pki::lifetime::format_lifetime(ttl))
        ),
        None => "# certificate_ttl = \"30d\"".to_string(),
    };
    let controller_text = format!(
        "# fleet-controller configuration, written by `fleetctl init`.\n\
         # Start the controller with: fleet-controller --config {}\n\
         listen = {}\n\
         # Metrics (/metrics), /healthz, /readyz and the status page (/): plain HTTP without\n\
         # authentication, so loopback only unless http_allow_remote = true (see SECURITY.md).\n\
         http_listen = {}\n\
         # Relative paths are relative to this file's directory.\n\
         data_dir = \"data\"\n\
         # How long the certificates the controller issues to hosts and to clients (operators,\n\
         # CI) are valid, at least 1m, at most 365d (default 30d): each renews its own after\n\
         # two thirds of it. A credential made with `fleetctl credentials create --ttl` keeps its own.\n\
         {ttl_line}\n\
         # Mutual TLS: the fleet CA (it signs agents' and credentials' certificates) and the\n\
         # controller's own certificate. Keep ca.key secret: whoever holds it can mint credentials.\n\
         ca = \"{CA_FILE}\"\n\
         ca_key = \"{CA_KEY_FILE}\"\n\
         cert = \"{CONTROLLER_CERT_FILE}\"\n\
         key = \"{CONTROLLER_KEY_FILE}\"\n{}",
        controller_config.display(),
        toml_string(&addr.to_string()),
        toml_string(&http_addr.to_string()),
        etcd_table(etcd),
    );
    write_new(&controller_config, &controller_text, 0o644)?;
    write_client_toml(&client_config, &controller_urls)?;

    Ok(InitOutcome {
        dir: dir.to_path_buf(),
        controller_config,
        client_config,
        ca: dir.join(CA_FILE),
        listen: addr.to_string(),
        controller_url: controller_urls[0].clone(),
        controller_urls,
    })
}

/// Writes `client.toml` naming the controller (fleetctl reads the TLS files beside it): one
/// URL as a string, several as an array.
pub fn write_client_toml(path: &Path, controller_urls: &[String]) -> Result<(), CliError> {
    let controller = match controller_urls {
        [url] => toml_string(url),
        urls => format!(
            "[{}]\n# fleetctl dials the first of these for now.",
            urls.iter()
                .map(|url| toml_string(url))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let text = format!(
        "# fleetctl configuration. The credential is client.pem and client.key beside this file,\n\
         # the fleet CA is ca.pem. `controller` is the address of the controller: a URL, or an\n\
         # array of them when there are several.\n\
         controller = {controller}\n",
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
    use crate::parse::parse_controller_urls;
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
    fn init_etcd_writes_an_etcd_table_and_refuses_bad_flags_before_writing_anything() {
        let dir = tempfile::tempdir().unwrap();
        let etcd = fleet_proto::etcd_config::EtcdFile {
            endpoints: vec![
                "https://10.0.0.5:2379".into(),
                "https://10.0.0.6:2379".into(),
            ],
            prefix: Some("/prod".into()),
            ca: Some("/etc/fleet/etcd-ca.pem".into()),
            cert: None,
            key: None,
        };
        let at = dir.path().join("a");
        init_dir_with_etcd(
            &at,
            "127.0.0.1:7700",
            None,
            "127.0.0.1:0",
            None,
            Some(&etcd),
        )
        .unwrap();
        #[derive(serde::Deserialize)]
        struct Written {
            etcd: fleet_proto::etcd_config::EtcdFile,
        }
        let text = std::fs::read_to_string(at.join("controller.toml")).unwrap();
        let written: Written = toml::from_str(&text).unwrap();
        assert_eq!(written.etcd, etcd);

        let no_ca = fleet_proto::etcd_config::EtcdFile { ca: None, ..etcd };
        let refused = dir.path().join("b");
        let error = init_dir_with_etcd(
            &refused,
            "127.0.0.1:7700",
            None,
            "127.0.0.1:0",
            None,
            Some(&no_ca),
        )
        .unwrap_err();
        assert_eq!(error.exit_code(), 2);
        assert!(error.to_string().contains("--etcd-ca"), "{error}");
        assert!(!refused.exists(), "nothing is written for refused flags");
    }

    #[test]
    fn the_http_listener_is_loopback_and_written_to_controller_toml() {
        for (text, ok) in [
            ("127.0.0.1:7701", true),
            ("[::1]:0", true),
            ("127.0.0.1:0", true),
            ("0.0.0.0:7701", false),
            ("10.0.0.1:7701", false),
            ("7701", false),
        ] {
            assert_eq!(parse_http_listen(text).is_ok(), ok, "{text}");
        }
        assert_eq!(parse_http_listen("0.0.0.0:1").unwrap_err().exit_code(), 2);
        let dir = tempfile::tempdir().unwrap();
        init_dir(&dir.path().join("a"), "127.0.0.1:7700", None).unwrap();
        init_dir_with_http(&dir.path().join("b"), "127.0.0.1:7700", None, "127.0.0.1:0").unwrap();
        for (sub, expect) in [("a", DEFAULT_HTTP_LISTEN), ("b", "127.0.0.1:0")] {
            let config: toml::Table = toml::from_str(
                &std::fs::read_to_string(dir.path().join(sub).join("controller.toml")).unwrap(),
            )
            .unwrap();
            assert_eq!(config["http_listen"].as_str(), Some(expect));
        }
    }

    #[test]
    fn writes_the_fleet_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("fleet");
        let outcome = init_dir(&target, "127.0.0.1:7701", None).unwrap();
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

        let again = init_dir(&target, "127.0.0.1:7702", None).unwrap_err();
        assert_eq!(again.exit_code(), 2);
        assert!(again.to_string().contains("already exists"));
        let unchanged = std::fs::read_to_string(target.join("controller.toml")).unwrap();
        assert!(unchanged.contains("127.0.0.1:7701"));
    }

    #[test]
    fn the_admin_credential_and_controller_toml_take_the_certificate_ttl() {
        let admin_lifetime = |dir: &Path| {
            let pem = std::fs::read_to_string(dir.join(CLIENT_CERT_FILE)).unwrap();
            let identity = fleet_pki::Identity::from_pem(&pem).unwrap();
            assert_eq!(
                (identity.name.as_str(), identity.role),
                ("admin", Role::Admin)
            );
            identity.lifetime()
        };
        let config = |dir: &Path| -> toml::Table {
            toml::from_str(&std::fs::read_to_string(dir.join("controller.toml")).unwrap()).unwrap()
        };
        let dir = tempfile::tempdir().unwrap();
        init_dir(dir.path(), "127.0.0.1:7700", None).unwrap();
        assert_eq!(admin_lifetime(dir.path()), Duration::from_secs(30 * 86_400));
        assert!(!config(dir.path()).contains_key("certificate_ttl"));

        let dir = tempfile::tempdir().unwrap();
        init_dir_with_ttl(
            dir.path(),
            "127.0.0.1:7700",
            None,
            Some(Duration::from_secs(60)),
        )
        .unwrap();
        assert_eq!(admin_lifetime(dir.path()), Duration::from_secs(60));
        assert_eq!(config(dir.path())["certificate_ttl"].as_str(), Some("1m"));
        // Back-dated against clock skew.
        let pem = std::fs::read_to_string(dir.path().join(CLIENT_CERT_FILE)).unwrap();
        let facts = fleet_pki::identity::facts_of_pem(&pem).unwrap();
        assert_eq!(
            facts.not_after_unix - facts.not_before_unix,
            60 + fleet_pki::lifetime::BACKDATE_SECS
        );

        let dir = tempfile::tempdir().unwrap();
        let error = init_dir_with_ttl(
            dir.path(),
            "127.0.0.1:7700",
            None,
            Some(Duration::from_secs(30)),
        )
        .unwrap_err();
        assert_eq!(error.exit_code(), 2);
        assert!(error.to_string().contains("between 1m and 365d"), "{error}");
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
    }

    fn client_controller(dir: &Path) -> toml::Value {
        let client: toml::Table =
            toml::from_str(&std::fs::read_to_string(dir.join("client.toml")).unwrap()).unwrap();
        client["controller"].clone()
    }

    /// The certificate's DNS names and IP addresses, as text.
    fn certificate_names(dir: &Path) -> Vec<String> {
        let pem = std::fs::read_to_string(dir.join(CONTROLLER_CERT_FILE)).unwrap();
        fleet_pki::identity::alt_names_of_pem(&pem)
    }

    #[test]
    fn an_unspecified_listen_address_needs_url() {
        for listen in ["0.0.0.0:7700", "[::]:7700"] {
            let dir = tempfile::tempdir().unwrap();
            let error = init_dir(dir.path(), listen, None).unwrap_err();
            assert_eq!(error.exit_code(), 2, "{listen}");
            assert!(
                error
                    .to_string()
                    .contains("--url https://controller.example.com:7700"),
                "{error}"
            );
            // Nothing written: the refusal comes first.
            assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
        }
    }

    #[test]
    fn url_goes_into_client_toml_and_the_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let urls = parse_controller_urls("https://Controller.Example.com:7700").unwrap();
        let outcome = init_dir(dir.path(), "0.0.0.0:7700", Some(&urls)).unwrap();
        assert_eq!(
            outcome.controller_url,
            "https://controller.example.com:7700"
        );
        assert_eq!(
            outcome.controller_urls,
            ["https://controller.example.com:7700"]
        );
        assert_eq!(
            client_controller(dir.path()).as_str(),
            Some("https://controller.example.com:7700")
        );
        let config: toml::Table =
            toml::from_str(&std::fs::read_to_string(dir.path().join("controller.toml")).unwrap())
                .unwrap();
        assert_eq!(config["listen"].as_str(), Some("0.0.0.0:7700"));
        let mut names = certificate_names(dir.path());
        names.sort();
        assert_eq!(
            names,
            ["controller.example.com", "fleet-controller", "localhost"]
        );
        let text = client_controller(dir.path());
        let back = crate::client::resolve_controller_urls(None, dir.path()).unwrap();
        assert_eq!(back, [text.as_str().unwrap()]);
    }

    #[test]
    fn several_urls_make_an_array_and_name_every_host() {
        let dir = tempfile::tempdir().unwrap();
        let urls =
            parse_controller_urls("https://c1.example.com:7700,https://10.0.0.7:7700").unwrap();
        let outcome = init_dir(dir.path(), "10.0.0.5:7700", Some(&urls)).unwrap();
        assert_eq!(outcome.controller_url, "https://c1.example.com:7700");
        let controller = client_controller(dir.path());
        let array: Vec<&str> = controller
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(
            array,
            ["https://c1.example.com:7700", "https://10.0.0.7:7700"]
        );
        let mut names = certificate_names(dir.path());
        names.sort();
        assert_eq!(
            names,
            [
                "10.0.0.5",
                "10.0.0.7",
                "c1.example.com",
                "fleet-controller",
                "localhost"
            ]
        );
        assert_eq!(
            crate::client::resolve_controller_url(None, dir.path()).unwrap(),
            "https://c1.example.com:7700"
        );
    }

    #[test]
    fn a_url_with_port_0_needs_a_picked_port() {
        let urls = parse_controller_urls("https://localhost:0").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let error = init_dir(dir.path(), "127.0.0.1:7700", Some(&urls)).unwrap_err();
        assert_eq!(error.exit_code(), 2);
        assert!(error.to_string().contains("port 0"), "{error}");
        init_dir(dir.path(), "127.0.0.1:0", Some(&urls)).unwrap();
        assert_eq!(
            client_controller(dir.path()).as_str(),
            Some("https://localhost:0")
        );
    }
}
