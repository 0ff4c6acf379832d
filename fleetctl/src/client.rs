//! How fleetctl reaches the controller: where the controller's URL comes from (`--controller`,
//! `FLEET_CONTROLLER`, `DIR/client.toml`), the mutual-TLS connection (the controller is verified
//! against `DIR/ca.pem` as `fleet-controller`, whatever address is dialled; fleetctl presents
//! `DIR/client.pem` and `DIR/client.key`), the `x-fleet-actor` metadata sent on every call, and
//! `CliError`, which maps every failure to the exit code of the CLI contract.

use fleet_proto::pb::fleet_service_client::FleetServiceClient;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Exit code: done as asked.
pub const EXIT_OK: u8 = 0;
/// Exit code: the operation failed (a rollout that halted, rolled back, failed or was aborted).
pub const EXIT_FAILED: u8 = 1;
/// Exit code: bad usage or bad input.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: the controller could not be reached or refused the credentials.
pub const EXIT_UNREACHABLE: u8 = 3;

/// How long fleetctl waits for one controller to accept a connection (TLS included) before it
/// tries the next URL.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long connecting may take in all, however many URLs are configured.
pub const CONNECT_BUDGET: Duration = Duration::from_secs(12);

/// Every way a fleetctl verb can fail, each with the exit code the CLI contract gives it.
#[derive(Debug, Error)]
pub enum CliError {
    /// Bad usage or bad input (exit 2).
    #[error("{0}")]
    Usage(String),
    /// The operation ran and failed (exit 1).
    #[error("{0}")]
    Failed(String),
    /// The controller could not be reached or refused the credentials (exit 3).
    #[error("{0}")]
    Unreachable(String),
}

impl CliError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => EXIT_USAGE,
            CliError::Failed(_) => EXIT_FAILED,
            CliError::Unreachable(_) => EXIT_UNREACHABLE,
        }
    }

    /// Maps a gRPC status from the controller to the exit code the contract gives its class.
    pub fn from_status(status: tonic::Status, controller_url: &str) -> CliError {
        use tonic::Code;
        let message = status.message().to_string();
        match status.code() {
            Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::FailedPrecondition
            | Code::OutOfRange => CliError::Usage(message),
            // A redirect fleetctl could not follow (`crate::redirect` says why).
            Code::Unavailable if fleet_proto::leader::leader_of(&status).is_some() => {
                CliError::Unreachable(format!("the controller at {controller_url}: {message}"))
            }
            Code::Unavailable => CliError::Unreachable(format!(
                "cannot reach the controller at {controller_url}: {message}; is fleet-controller running?"
            )),
            Code::Unauthenticated | Code::PermissionDenied => CliError::Unreachable(format!(
                "the controller at {controller_url} refused the credentials: {message}"
            )),
            // A status made on this side from a broken connection (the controller's own
            // statuses carry no source): with mutual TLS most often the controller refusing a
            // certificate from another CA, which TLS 1.3 reports only once a call is sent.
            _ if std::error::Error::source(&status).is_some() => {
                CliError::Unreachable(format!(
                    "the connection to the controller at {controller_url} failed: {}; if this keeps happening, check that --config-dir holds a credential from this fleet's CA",
                    fleet_proto::error_text::with_sources(&status)
                ))
            }
            _ => CliError::Failed(format!("the controller answered: {message}")),
        }
    }
}

/// Shorthand for a usage error (exit 2).
pub fn usage(message: impl Into<String>) -> CliError {
    CliError::Usage(message.into())
}

/// The default configuration directory: `~/.config/fleet`.
pub fn default_config_dir() -> PathBuf {
    match std::env::var_os("HOME") {
        Some(home) if !home.is_empty() => PathBuf::from(home).join(".config").join("fleet"),
        _ => PathBuf::from(".config").join("fleet"),
    }
}

/// What `DIR/client.toml` holds.
#[derive(Debug, serde::Deserialize)]
struct ClientConfigFile {
    controller: Option<ControllerField>,
}

/// client.toml's `controller`: one URL, or an array of them (several controllers).
#[derive(Debug, serde::Deserialize)]
#[serde(untagged)]
enum ControllerField {
    One(String),
    Several(Vec<String>),
}

/// Works out the controller's URL: `--controller`/`FLEET_CONTROLLER` win, else
/// `CONFIG_DIR/client.toml`; the first of [`resolve_controller_urls`].
pub fn resolve_controller_url(
    controller_flag: Option<&str>,
    config_dir: &Path,
) -> Result<String, CliError> {
    let mut urls = resolve_controller_urls(controller_flag, config_dir)?;
    Ok(urls.swap_remove(0))
}

/// Every address of the controller, never empty: `--controller`/`FLEET_CONTROLLER` win (one
/// URL, or several separated by commas), else `CONFIG_DIR/client.toml`, whose `controller` is
/// a URL or an array of URLs. fleetctl dials them in order ([`connect_any`]);
/// `credentials create` passes them all on. When a URL names port 0 (a
/// controller told to pick a port), the port the controller wrote to
/// `CONFIG_DIR/controller.addr` is used instead, with the URL's host.
pub fn resolve_controller_urls(
    controller_flag: Option<&str>,
    config_dir: &Path,
) -> Result<Vec<String>, CliError> {
    if let Some(flag) = controller_flag.map(str::trim).filter(|u| !u.is_empty()) {
        let urls: Vec<String> = flag
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(normalize_url)
            .collect();
        if !urls.is_empty() {
            return Ok(urls);
        }
    }
    let no_controller = || {
        usage(
            "no controller configured: run `fleetctl init`, pass --controller URL or set FLEET_CONTROLLER",
        )
    };
    let client_toml = config_dir.join("client.toml");
    let text = match std::fs::read_to_string(&client_toml) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(no_controller()),
        Err(e) => {
            return Err(usage(format!(
                "cannot read {}: {e}; fix its permissions or pass --controller URL",
                client_toml.display()
            )))
        }
    };
    let parsed: ClientConfigFile = toml::from_str(&text).map_err(|e| {
        usage(format!(
            "{} is invalid: {}; it should hold controller = \"https://HOST:PORT\" (or an array of such URLs)",
            client_toml.display(),
            e.message()
        ))
    })?;
    let urls: Vec<String> = match parsed.controller {
        None => Vec::new(),
        Some(ControllerField::One(url)) => vec![url],
        Some(ControllerField::Several(urls)) => urls,
    }
    .iter()
    .map(|url| url.trim())
    .filter(|url| !url.is_empty())
    .map(normalize_url)
    .collect();
    if urls.is_empty() {
        return Err(no_controller());
    }
    let picked_port = std::fs::read_to_string(config_dir.join("controller.addr"))
        .ok()
        .and_then(|addr| addr.trim().parse::<std::net::SocketAddr>().ok())
        .map(|addr| addr.port());
    Ok(urls
        .into_iter()
        .map(|url| match (url.strip_suffix(":0"), picked_port) {
            (Some(host_part), Some(port)) => format!("{host_part}:{port}"),
            _ => url,
        })
        .collect())
}

/// Accepts `ADDR:PORT` as shorthand for `https://ADDR:PORT`.
fn normalize_url(url: &str) -> String {
    if url.contains("://") {
        url.trim_end_matches('/').to_string()
    } else {
        format!("https://{}", url.trim_end_matches('/'))
    }
}

/// The files fleetctl reads from its config directory for mutual TLS.
pub use crate::credential_files::{CA_FILE, CLIENT_CERT_FILE, CLIENT_KEY_FILE};

/// The client side of mutual TLS from `config_dir`: the fleet CA (required) and the client
/// credential (sent when present; without one, every call but an agent's join is refused by
/// the controller with a message saying so), read as `credential_files::read_credential` does.
pub fn tls_config(config_dir: &Path) -> Result<ClientTlsConfig, CliError> {
    let ca_path = config_dir.join(CA_FILE);
    let ca = std::fs::read_to_string(&ca_path).map_err(|e| {
        usage(format!(
            "cannot read the fleet CA {}: {e}; pass --config-dir with a directory written by `fleetctl init` or `fleetctl credentials create`",
            ca_path.display()
        ))
    })?;
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name(fleet_pki::CONTROLLER_TLS_NAME);
    // Read under the lock another fleetctl renewing this credential takes.
    match crate::credential_files::read_credential(config_dir) {
        Ok(Some((cert, key))) => tls = tls.identity(Identity::from_pem(cert, key)),
        Ok(None) => {}
        Err(e) => {
            return Err(usage(format!(
                "cannot read the credential in {}: {e}; a credential is client.pem and client.key together",
                config_dir.display()
            )))
        }
    }
    Ok(tls)
}

/// Adds `x-fleet-actor: USER@HOSTNAME` to every request.
#[derive(Debug, Clone)]
pub struct ActorInterceptor {
    actor: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
}

impl ActorInterceptor {
    /// Builds the interceptor for the person running fleetctl.
    pub fn for_current_user() -> ActorInterceptor {
        let actor = current_actor();
        ActorInterceptor {
            actor: actor
                .parse()
                .unwrap_or_else(|_| tonic::metadata::MetadataValue::from_static("unknown")),
        }
    }
}

impl tonic::service::Interceptor for ActorInterceptor {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert(fleet_proto::ACTOR_HEADER, self.actor.clone());
        Ok(request)
    }
}

/// `USER@HOSTNAME`, reduced to printable ASCII so it fits in gRPC metadata.
pub fn current_actor() -> String {
    let user = ["USER", "LOGNAME"]
        .iter()
        .find_map(|key| std::env::var(key).ok().filter(|v| !v.is_empty()))
        .or_else(|| {
            // No USER in the environment (a service, a container): ask the user database.
            nix::unistd::User::from_uid(nix::unistd::getuid())
                .ok()
                .flatten()
                .map(|user| user.name)
        })
        .unwrap_or_else(|| "unknown".to_string());
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|v| !v.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "localhost".to_string());
    sanitize_actor(&format!("{user}@{host}"))
}

fn sanitize_actor(actor: &str) -> String {
    actor
        .chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
        .take(128)
        .collect()
}

/// The client every verb uses.
pub type FleetClient =
    FleetServiceClient<InterceptedService<crate::redirect::RedirectChannel, ActorInterceptor>>;

/// A connected client plus the URL it talks to, for error messages.
#[derive(Clone)]
pub struct Connection {
    pub client: FleetClient,
    pub url: String,
    /// Every address of the controller, `url` first: what `credentials create` writes into
    /// the client.toml it makes.
    pub controller_urls: Vec<String>,
    /// What a connection to another controller of the fleet (its leader) uses.
    tls: ClientTlsConfig,
}

impl Connection {
    /// Maps a gRPC status from this controller to a `CliError`.
    pub fn error(&self, status: tonic::Status) -> CliError {
        CliError::from_status(status, &self.url)
    }

    /// The same connection, to the fleet's leader when the controller it reached follows
    /// another: asked with `controllers` (a controller that does not know the call, or names
    /// no leader, is kept). For a call a follower could not send on itself: an artifact's
    /// upload is sent once, and a follower answers it with the redirect only.
    pub async fn to_leader(&self) -> Connection {
        let mut client = self.client.clone();
        let Ok(answer) = client
            .list_controllers(fleet_proto::pb::ListControllersRequest {})
            .await
        else {
            return self.clone();
        };
        let answer = answer.into_inner();
        let Some(leader) = answer.controllers.iter().find(|c| c.leader) else {
            return self.clone();
        };
        if leader.url == answer.answered_by
            || fleet_proto::leader::check_controller_url(&leader.url).is_err()
        {
            return self.clone();
        }
        match connect_one(&leader.url, &self.tls, CONNECT_TIMEOUT).await {
            Ok(channel) => Connection {
                client: FleetServiceClient::with_interceptor(
                    crate::redirect::RedirectChannel::new(channel, self.tls.clone()),
                    ActorInterceptor::for_current_user(),
                ),
                url: leader.url.clone(),
                controller_urls: self.controller_urls.clone(),
                tls: self.tls.clone(),
            },
            Err(_) => self.clone(),
        }
    }
}

/// Connects to the controller at `url` (https only) with the TLS files of `config_dir`.
pub async fn connect(url: &str, config_dir: &Path) -> Result<Connection, CliError> {
    connect_any(&[url.to_string()], config_dir).await
}

/// Connects to the first of `urls` that answers as a fleet controller, trying them in order:
/// one that refuses, times out ([`CONNECT_TIMEOUT`]) or fails the TLS check (not this fleet's
/// controller) is skipped for the next; all of them together take at most
/// [`CONNECT_BUDGET`]. Every URL is checked before any is dialled (a bad one is a usage
/// error naming it); when none answers, the error names each URL tried and why it failed.
pub async fn connect_any(urls: &[String], config_dir: &Path) -> Result<Connection, CliError> {
    for url in urls {
        if let Err(why) = fleet_proto::leader::check_controller_url(url.trim_end_matches('/')) {
            return Err(usage(format!(
                "controller URL {url:?} is invalid: {why}; write it like https://127.0.0.1:7700 (several: URL1,URL2)"
            )));
        }
    }
    if urls.is_empty() {
        return Err(usage(
            "no controller configured: run `fleetctl init`, pass --controller URL or set FLEET_CONTROLLER",
        ));
    }
    let tls = tls_config(config_dir)?;
    let started = tokio::time::Instant::now();
    let mut failures: Vec<String> = Vec::new();
    for url in urls {
        let left = CONNECT_BUDGET.saturating_sub(started.elapsed());
        if left.is_zero() {
            failures.push(format!(
                "{url}: not tried, the {}s for connecting ran out",
                CONNECT_BUDGET.as_secs()
            ));
            continue;
        }
        match connect_one(url, &tls, CONNECT_TIMEOUT.min(left)).await {
            Ok(channel) => {
                let channel = crate::redirect::RedirectChannel::new(channel, tls.clone());
                let client = FleetServiceClient::with_interceptor(
                    channel,
                    ActorInterceptor::for_current_user(),
                );
                return Ok(Connection {
                    client,
                    url: url.to_string(),
                    controller_urls: urls.to_vec(),
                    tls: tls.clone(),
                });
            }
            Err(why) => failures.push(format!("{url}: {why}")),
        }
    }
    Err(CliError::Unreachable(match failures.as_slice() {
        [one] => format!("cannot reach the controller at {one}; is fleet-controller running?"),
        _ => format!(
            "cannot reach any of the {} controllers: {}; is fleet-controller running, and is each URL one of this fleet's controllers?",
            failures.len(),
            failures.join("; ")
        ),
    }))
}

/// One connection attempt, TLS handshake included; the error says why it failed.
async fn connect_one(
    url: &str,
    tls: &ClientTlsConfig,
    timeout: Duration,
) -> Result<Channel, String> {
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| format!("invalid URL: {e}"))?
        .tls_config(tls.clone())
        .map_err(|e| {
            format!(
                "cannot set up TLS: {}",
                fleet_proto::error_text::with_sources(&e)
            )
        })?
        .connect_timeout(timeout)
        .tcp_nodelay(true);
    match tokio::time::timeout(timeout, endpoint.connect()).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(e)) => Err(fleet_proto::error_text::with_sources(&e)),
        Err(_) => Err(format!(
            "no answer within {}s (a TLS server that is not a fleet controller, or none)",
            timeout.as_secs_f32()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_map_to_exit_codes() {
        use tonic::{Code, Status};
        for (code, exit) in [
            (Code::InvalidArgument, EXIT_USAGE),
            (Code::NotFound, EXIT_USAGE),
            (Code::AlreadyExists, EXIT_USAGE),
            (Code::FailedPrecondition, EXIT_USAGE),
            (Code::Unavailable, EXIT_UNREACHABLE),
            (Code::Unauthenticated, EXIT_UNREACHABLE),
            (Code::PermissionDenied, EXIT_UNREACHABLE),
            (Code::Internal, EXIT_FAILED),
            (Code::Unknown, EXIT_FAILED),
            (Code::Aborted, EXIT_FAILED),
        ] {
            let error = CliError::from_status(Status::new(code, "x"), "http://127.0.0.1:1");
            assert_eq!(error.exit_code(), exit, "{code:?}");
        }
    }

    #[test]
    fn controller_url_comes_from_flag_then_client_toml() {
        let dir = tempfile::tempdir().unwrap();
        let missing = resolve_controller_url(None, dir.path()).unwrap_err();
        assert_eq!(missing.exit_code(), EXIT_USAGE);
        assert!(missing.to_string().contains("fleetctl init"));

        std::fs::write(
            dir.path().join("client.toml"),
            "controller = \"http://127.0.0.1:7700\"\n",
        )
        .unwrap();
        assert_eq!(
            resolve_controller_url(None, dir.path()).unwrap(),
            "http://127.0.0.1:7700"
        );
        assert_eq!(
            resolve_controller_url(Some("127.0.0.1:9"), dir.path()).unwrap(),
            "https://127.0.0.1:9"
        );

        std::fs::write(
            dir.path().join("client.toml"),
            "controller = \"https://127.0.0.1:0\"\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("controller.addr"), "127.0.0.1:4567\n").unwrap();
        assert_eq!(
            resolve_controller_url(None, dir.path()).unwrap(),
            "https://127.0.0.1:4567"
        );

        // Port 0 takes the picked port and keeps the URL's host.
        std::fs::write(
            dir.path().join("client.toml"),
            "controller = \"https://localhost:0\"\n",
        )
        .unwrap();
        assert_eq!(
            resolve_controller_url(None, dir.path()).unwrap(),
            "https://localhost:4567"
        );

        // Several controllers: an array, the first is dialled.
        std::fs::write(
            dir.path().join("client.toml"),
            "controller = [\"https://c1.example.com:7700\", \"https://c2.example.com:7700\"]\n",
        )
        .unwrap();
        assert_eq!(
            resolve_controller_urls(None, dir.path()).unwrap(),
            ["https://c1.example.com:7700", "https://c2.example.com:7700"]
        );
        assert_eq!(
            resolve_controller_url(None, dir.path()).unwrap(),
            "https://c1.example.com:7700"
        );
        assert_eq!(
            resolve_controller_urls(Some("https://a:1, https://b:2"), dir.path()).unwrap(),
            ["https://a:1", "https://b:2"]
        );
        std::fs::write(dir.path().join("client.toml"), "controller = []\n").unwrap();
        let empty = resolve_controller_url(None, dir.path()).unwrap_err();
        assert!(empty.to_string().contains("fleetctl init"), "{empty}");

        std::fs::write(dir.path().join("client.toml"), "controller = [").unwrap();
        assert_eq!(
            resolve_controller_url(None, dir.path())
                .unwrap_err()
                .exit_code(),
            EXIT_USAGE
        );
    }

    #[test]
    fn actor_is_ascii() {
        assert_eq!(sanitize_actor("jöe@host one"), "j_e@host_one");
        assert!(current_actor().contains('@'));
    }
}
