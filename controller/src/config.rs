//! `controller.toml`: where the controller listens, where it keeps its data, and the TLS files
//! `fleetctl init` made (the fleet CA's certificate and key, the controller's certificate and
//! key), and how long the certificates it issues live (`certificate_ttl`, older name
//! `host_certificate_ttl`). Read once at start and validated; relative paths are taken
//! relative to the file's own directory. The controller serves only mutual TLS, so it may
//! listen on any address; its operators' HTTP listener (`http_listen`: metrics, health, the
//! status page) is unauthenticated, so it stays on loopback unless `http_allow_remote = true`.
//! `[[webhook]]` entries are checked here too (see `http::webhooks`).

use crate::model::{glob_matches, EVENT_KINDS};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use thiserror::Error;

pub use fleet_proto::etcd_config::EtcdFile;

/// Checks an `[etcd]` table (or `--etcd` flags; see `fleet_proto::etcd_config::check`) and
/// makes it the store's config, paths taken relative to `base`. Pure.
pub fn check_etcd(file: &EtcdFile, base: &Path) -> Result<crate::store::etcd::EtcdConfig, String> {
    let prefix = fleet_proto::etcd_config::check(file)?;
    Ok(crate::store::etcd::EtcdConfig {
        endpoints: file.endpoints.clone(),
        prefix,
        ca: file.ca.as_ref().map(|p| base.join(p)),
        cert: file.cert.as_ref().map(|p| base.join(p)),
        key: file.key.as_ref().map(|p| base.join(p)),
    })
}

/// The name of the file the controller writes its bound address to, beside `controller.toml`.
pub const ADDR_FILE: &str = "controller.addr";
/// The name of the file the controller writes its HTTP listener's bound address to.
pub const HTTP_ADDR_FILE: &str = "controller.http.addr";
/// Where `fleetctl init` puts the HTTP listener unless told otherwise.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:7701";

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}; create it with `fleetctl init --dir DIR`")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The file as written by `fleetctl init`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerFile {
    pub listen: String,
    pub data_dir: String,
    /// How often agents send a heartbeat, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_interval_ms: Option<u64>,
    /// How long a host may stay silent before it shows as lost, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_after_ms: Option<u64>,
    /// Heartbeats a second the controller aims to take at most: past that many hosts per
    /// heartbeat interval, the interval (and `lost_after_ms` with it) grows (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeats_per_second: Option<u64>,
    /// Release uploads at once; more are refused until one ends (default 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_uploads: Option<u32>,
    /// How long an upload may send nothing before it is dropped, in milliseconds (default
    /// 30000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_idle_timeout_ms: Option<u64>,
    /// The free space, in MiB, that uploads leave on the data directory's disk (default 1024).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_free_disk_mb: Option<u64>,
    /// The largest unpacked size of a release, in MiB (default 4096).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unpacked_mb: Option<u64>,
    /// The largest ratio of a release's unpacked size to its artifact's (default 200: a
    /// decompression bomb is refused at upload).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_compression_ratio: Option<u64>,
    /// How long a client's TLS handshake may take, in milliseconds (default 10000); a
    /// connection that has not finished it by then is closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handshake_timeout_ms: Option<u64>,
    /// How long a connection may leave an answer unread, in milliseconds (default 60000): one
    /// that took nothing of what the controller has to send it for that long is closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_stall_timeout_ms: Option<u64>,
    /// How many events the event log keeps (default 10000); older ones are deleted in batches
    /// as new ones are written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_events: Option<u64>,
    /// How long the certificates the controller issues (hosts' and clients') are valid, like
    /// `30d` or `12h` (default 30 days, at least 1 minute, at most 365 days); each holder
    /// renews its own once two thirds of it passed. `host_certificate_ttl`, its older name,
    /// is read too.
    #[serde(
        default,
        alias = "host_certificate_ttl",
        skip_serializing_if = "Option::is_none"
    )]
    pub certificate_ttl: Option<String>,
    /// The operators' HTTP listener (`/metrics`, `/healthz`, `/readyz`, the status page), like
    /// `127.0.0.1:7701`; none when absent. Unauthenticated and read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_listen: Option<String>,
    /// Allows `http_listen` on an address other machines reach (see SECURITY.md first).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub http_allow_remote: bool,
    /// `[[webhook]]`: where notifications of events go.
    #[serde(default, rename = "webhook", skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<WebhookFile>,
    /// `[etcd]`: keep the store in etcd instead of the redb file in the data directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd: Option<EtcdFile>,
    /// Where fleetctl and agents reach this controller, `https://HOST:PORT`: what the other
    /// controllers of a fleet on etcd name in their redirects. Default: `https://` and the
    /// address it listens on (which must then not be 0.0.0.0 or [::]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// The fleet CA's certificate: clients and agents must present a certificate it signed.
    pub ca: String,
    /// The fleet CA's private key: the controller signs agents' and credentials' certificates.
    pub ca_key: String,
    /// The controller's own certificate (DNS name `fleet-controller`) and key.
    pub cert: String,
    pub key: String,
}

/// The validated configuration the controller runs with.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// The store in etcd (`[etcd]`); `None`: the redb file in `data_dir`.
    pub etcd: Option<crate::store::etcd::EtcdConfig>,
    /// `advertise` (or `--advertise`): this controller's URL for the others; `None`: from
    /// the address it listens on ([`ControllerConfig::advertise_url`]).
    pub advertise: Option<String>,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Where the bound address is written once listening (`controller.addr`).
    pub addr_file: PathBuf,
    pub heartbeat_interval_ms: u64,
    pub lost_after_ms: u64,
    /// `heartbeats_per_second`: see [`crate::heartbeat`].
    pub heartbeats_per_second: u64,
    pub uploads: UploadLimits,
    /// How many events the event log keeps (`max_events`).
    pub max_events: u64,
    pub tls: TlsPaths,
    /// How long the certificates the controller issues (hosts' and clients') are valid
    /// (`certificate_ttl`).
    pub certificate_ttl: std::time::Duration,
    /// `handshake_timeout_ms`: how long a TLS handshake may take.
    pub handshake_timeout: std::time::Duration,
    /// `write_stall_timeout_ms`: how long a connection may leave an answer unread.
    pub write_stall_timeout: std::time::Duration,
    /// The operators' HTTP listener, if any.
    pub http: Option<HttpListen>,
    /// Where the HTTP listener's bound address is written (`controller.http.addr`).
    pub http_addr_file: PathBuf,
    /// Checked `[[webhook]]` entries, in file order.
    pub webhooks: Vec<Webhook>,
}

/// Where the operators' HTTP listener binds (`http_listen`), and whether a non-loopback
/// address is allowed (`http_allow_remote`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpListen {
    pub addr: SocketAddr,
    pub allow_remote: bool,
}

/// The body a webhook is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// `{"text": ...}`, for Slack, Mattermost and Rocket.Chat incoming webhooks.
    Slack,
    /// The event and, for a rollout's events, the rollout (and the same `text`).
    #[default]
    Json,
}

/// A `[[webhook]]` entry as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookFile {
    pub url: String,
    /// Globs over event kinds (`*` matches anything, dots too): `rollout.*`, `host.lost`.
    pub events: Vec<String>,
    #[serde(default)]
    pub format: Format,
}

/// A checked webhook.
#[derive(Debug, Clone)]
pub struct Webhook {
    /// Its place in controller.toml, from 1: how messages name it.
    pub idx: usize,
    pub url: http::Uri,
    pub events: Vec<String>,
    pub format: Format,
}

impl Webhook {
    /// Checks a `[[webhook]]` entry: the URL is http(s) with a host, every glob matches some
    /// event kind.
    pub fn check(idx: usize, file: &WebhookFile) -> Result<Webhook, String> {
        let bad_url = |why: &str| {
            format!(
                "webhook {idx}: url {:?} {why}: write it like https://hooks.slack.com/services/T0/B0/XXXX or http://127.0.0.1:9000/hook",
                file.url
            )
        };
        let url: http::Uri = file.url.parse().map_err(|_| bad_url("is not a URL"))?;
        match url.scheme_str() {
            Some("http") | Some("https") => {}
            _ => return Err(bad_url("is not http:// or https://")),
        }
        if url.host().is_none_or(str::is_empty) {
            return Err(bad_url("has no host"));
        }
        if file.events.is_empty() {
            return Err(format!(
                "webhook {idx}: events is empty: name the events to send, like events = [\"rollout.*\", \"host.lost\"]"
            ));
        }
        for glob in &file.events {
            if !EVENT_KINDS.iter().any(|kind| glob_matches(glob, kind)) {
                return Err(format!(
                    "webhook {idx}: events glob {glob:?} matches no event kind; the kinds are {}",
                    EVENT_KINDS.join(", ")
                ));
            }
        }
        Ok(Webhook {
            idx,
            url,
            events: file.events.clone(),
            format: file.format,
        })
    }

    /// The URL without its path and query (which may hold a secret).
    pub fn display_url(&self) -> String {
        format!(
            "{}://{}/…",
            self.url.scheme_str().unwrap_or("http"),
            self.url.authority().map(|a| a.as_str()).unwrap_or("")
        )
    }

    pub fn wants(&self, kind: &str) -> bool {
        self.events.iter().any(|glob| glob_matches(glob, kind))
    }
}

impl ControllerConfig {
    /// `fleet-controller --http-listen ADDR`: replaces `http_listen`, checked the same way.
    /// `--listen`: another address than controller.toml's `listen`.
    pub fn override_listen(&mut self, text: &str) -> Result<(), String> {
        self.listen = check_listen(text)?;
        Ok(())
    }

    /// `--data-dir`: another data directory than controller.toml's, for a controller that
    /// shares its config directory with others: what it writes for itself (its address files,
    /// its artifact cache and uploads, its lock) goes there, not beside controller.toml.
    pub fn override_data_dir(&mut self, dir: &Path) {
        self.data_dir = dir.to_path_buf();
        self.addr_file = dir.join(ADDR_FILE);
        self.http_addr_file = dir.join(HTTP_ADDR_FILE);
    }

    /// `--advertise URL`: another URL than controller.toml's `advertise`.
    pub fn override_advertise(&mut self, url: &str) -> Result<(), String> {
        check_advertise(url)?;
        self.advertise = Some(url.trim_end_matches('/').to_string());
        Ok(())
    }

    /// This controller's URL for the other controllers of its fleet (and so for the clients
    /// and agents they redirect): `advertise`, else `https://` and the bound address `bound`.
    /// A controller on etcd listening on every address (0.0.0.0) must name one; one on redb is
    /// the only controller, redirects no one, and goes by its bound address.
    pub fn advertise_url(&self, bound: SocketAddr) -> Result<String, String> {
        if let Some(url) = &self.advertise {
            return Ok(url.trim_end_matches('/').to_string());
        }
        if bound.ip().is_unspecified() && self.etcd.is_some() {
            return Err(format!(
                "this controller listens on {bound}, which names no one address that others can reach: set advertise = \"https://HOST:PORT\" in controller.toml (or pass --advertise) to the URL clients and agents reach it at"
            ));
        }
        Ok(format!("https://{bound}"))
    }

    pub fn override_http_listen(&mut self, text: &str) -> Result<(), String> {
        let allow_remote = self.http.is_some_and(|h| h.allow_remote);
        let addr = check_http_listen(text, allow_remote)?;
        self.http = Some(HttpListen { addr, allow_remote });
        Ok(())
    }
}

/// Checks `advertise`: a controller URL, `https://HOST:PORT`.
fn check_advertise(url: &str) -> Result<(), String> {
    fleet_proto::leader::check_controller_url(url)
        .map_err(|why| format!("advertise {url:?} is not a controller URL: {why}; write it like https://c1.example.com:7700"))
}

/// Parses `http_listen`: `IP:PORT` on a loopback address, or any address with
/// `http_allow_remote = true`. The listener is unauthenticated.
pub fn check_http_listen(text: &str, allow_remote: bool) -> Result<SocketAddr, String> {
    let addr: SocketAddr = text
        .parse()
        .map_err(|_| format!("http_listen {text:?} is not IP:PORT, like {DEFAULT_HTTP_LISTEN}"))?;
    if !addr.ip().is_loopback() && !allow_remote {
        return Err(format!(
            "http_listen {text:?} is not a loopback address: the HTTP listener (metrics, status page) has no authentication; keep it on 127.0.0.1, or set http_allow_remote = true after reading SECURITY.md (\"The operators' HTTP listener\")"
        ));
    }
    Ok(addr)
}

/// The default `handshake_timeout_ms`.
pub const DEFAULT_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// The default `write_stall_timeout_ms`.
pub const DEFAULT_WRITE_STALL_TIMEOUT_MS: u64 = 60_000;

/// Parses `certificate_ttl` (or its older name `host_certificate_ttl`): a duration within
/// [`fleet_pki::lifetime::check_lifetime`]'s bounds, 30 days when absent.
pub fn parse_certificate_ttl(text: Option<&str>) -> Result<std::time::Duration, String> {
    let Some(text) = text else {
        return Ok(fleet_pki::lifetime::DEFAULT_LIFETIME);
    };
    let ttl =
        fleet_proto::duration::parse_duration(text).map_err(|e| format!("certificate_ttl: {e}"))?;
    fleet_pki::lifetime::check_lifetime(ttl).map_err(|_| {
        format!(
            "certificate_ttl {} must be at least 1m and at most 365d, like \"30d\" (how long the certificates of hosts and clients are valid)",
            fleet_proto::names::quoted(text)
        )
    })
}

/// What release uploads may take: how many at once, how long one may idle, and the disk space
/// they must leave free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadLimits {
    pub max_concurrent: usize,
    pub idle_timeout: std::time::Duration,
    pub min_free_bytes: u64,
    pub max_unpacked_bytes: u64,
    pub max_compression_ratio: u64,
}

impl Default for UploadLimits {
    fn default() -> UploadLimits {
        UploadLimits {
            max_concurrent: 4,
            idle_timeout: std::time::Duration::from_secs(30),
            min_free_bytes: 1024 << 20,
            max_unpacked_bytes: 4096 << 20,
            max_compression_ratio: 200,
        }
    }
}

/// Where the controller's TLS files are, resolved against the config file's directory.
#[derive(Debug, Clone)]
pub struct TlsPaths {
    pub ca: PathBuf,
    pub ca_key: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl ControllerConfig {
    /// Reads and validates `controller.toml`.
    pub fn load(path: &Path) -> Result<ControllerConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let file: ControllerFile = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        let listen = check_listen(&file.listen).map_err(invalid)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let data_dir = base.join(&file.data_dir);
        let heartbeat_interval_ms = file.heartbeat_interval_ms.unwrap_or(5_000);
        if !(100..=60_000).contains(&heartbeat_interval_ms) {
            return Err(invalid(
                "heartbeat_interval_ms must be between 100 and 60000".into(),
            ));
        }
        let lost_after_ms = file.lost_after_ms.unwrap_or(15_000);
        if lost_after_ms < 2 * heartbeat_interval_ms || lost_after_ms > 600_000 {
            return Err(invalid(
                "lost_after_ms must be at least two heartbeat intervals and at most 600000".into(),
            ));
        }
        let heartbeats_per_second = file
            .heartbeats_per_second
            .unwrap_or(crate::heartbeat::DEFAULT_PER_SECOND);
        if !(10..=100_000).contains(&heartbeats_per_second) {
            return Err(invalid(
                "heartbeats_per_second must be between 10 and 100000 (the heartbeats a second the controller aims to take at most; 100 unless set)".into(),
            ));
        }
        let defaults = UploadLimits::default();
        let max_uploads = file.max_uploads.unwrap_or(defaults.max_concurrent as u32);
        if !(1..=64).contains(&max_uploads) {
            return Err(invalid("max_uploads must be between 1 and 64".into()));
        }
        let upload_idle_ms = file
            .upload_idle_timeout_ms
            .unwrap_or(defaults.idle_timeout.as_millis() as u64);
        if !(100..=600_000).contains(&upload_idle_ms) {
            return Err(invalid(
                "upload_idle_timeout_ms must be between 100 and 600000".into(),
            ));
        }
        let min_free_mb = file
            .min_free_disk_mb
            .unwrap_or(defaults.min_free_bytes >> 20);
        if min_free_mb > (1 << 30) {
            return Err(invalid(
                "min_free_disk_mb must be at most 1073741824 (1 PiB)".into(),
            ));
        }
        let max_unpacked_mb = file
            .max_unpacked_mb
            .unwrap_or(defaults.max_unpacked_bytes >> 20);
        if !(1..=4096).contains(&max_unpacked_mb) {
            return Err(invalid(
                "max_unpacked_mb must be between 1 and 4096 (4 GiB, what an artifact may hold)"
                    .into(),
            ));
        }
        let max_compression_ratio = file
            .max_compression_ratio
            .unwrap_or(defaults.max_compression_ratio);
        if !(1..=100_000).contains(&max_compression_ratio) {
            return Err(invalid(
                "max_compression_ratio must be between 1 and 100000, like 200 for 200:1".into(),
            ));
        }
        let max_events = file.max_events.unwrap_or(crate::store::DEFAULT_MAX_EVENTS);
        if !(100..=100_000_000).contains(&max_events) {
            return Err(invalid(
                "max_events must be between 100 and 100000000, like 10000".into(),
            ));
        }
        let certificate_ttl =
            parse_certificate_ttl(file.certificate_ttl.as_deref()).map_err(invalid)?;
        let http = match &file.http_listen {
            Some(text) => Some(HttpListen {
                addr: check_http_listen(text, file.http_allow_remote).map_err(invalid)?,
                allow_remote: file.http_allow_remote,
            }),
            None => None,
        };
        let webhooks = file
            .webhooks
            .iter()
            .enumerate()
            .map(|(idx, hook)| Webhook::check(idx + 1, hook))
            .collect::<Result<Vec<_>, String>>()
            .map_err(invalid)?;
        let handshake_timeout_ms = file
            .handshake_timeout_ms
            .unwrap_or(DEFAULT_HANDSHAKE_TIMEOUT_MS);
        if !(500..=120_000).contains(&handshake_timeout_ms) {
            return Err(invalid(
                "handshake_timeout_ms must be between 500 and 120000, like 10000".into(),
            ));
        }
        let write_stall_timeout_ms = file
            .write_stall_timeout_ms
            .unwrap_or(DEFAULT_WRITE_STALL_TIMEOUT_MS);
        if !(500..=3_600_000).contains(&write_stall_timeout_ms) {
            return Err(invalid(
                "write_stall_timeout_ms must be between 500 and 3600000, like 60000".into(),
            ));
        }
        let etcd = file
            .etcd
            .as_ref()
            .map(|etcd| check_etcd(etcd, base))
            .transpose()
            .map_err(invalid)?;
        if let Some(url) = &file.advertise {
            check_advertise(url).map_err(invalid)?;
        }
        Ok(ControllerConfig {
            etcd,
            advertise: file.advertise.clone(),
            handshake_timeout: std::time::Duration::from_millis(handshake_timeout_ms),
            write_stall_timeout: std::time::Duration::from_millis(write_stall_timeout_ms),
            http,
            http_addr_file: base.join(HTTP_ADDR_FILE),
            webhooks,
            max_events,
            certificate_ttl,
            listen,
            data_dir,
            addr_file: base.join(ADDR_FILE),
            heartbeat_interval_ms,
            lost_after_ms,
            heartbeats_per_second,
            uploads: UploadLimits {
                max_concurrent: max_uploads as usize,
                idle_timeout: std::time::Duration::from_millis(upload_idle_ms),
                min_free_bytes: min_free_mb << 20,
                max_unpacked_bytes: max_unpacked_mb << 20,
                max_compression_ratio,
            },
            tls: TlsPaths {
                ca: base.join(&file.ca),
                ca_key: base.join(&file.ca_key),
                cert: base.join(&file.cert),
                key: base.join(&file.key),
            },
        })
    }
}

/// Parses a listen address. Any address is allowed: every call is authenticated by mutual
/// TLS, so the controller may face other machines.
pub fn check_listen(text: &str) -> Result<SocketAddr, String> {
    text.parse()
        .map_err(|_| format!("listen address {text:?} is not IP:PORT, like 127.0.0.1:7700"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_is_ip_and_port_on_any_address() {
        assert!(check_listen("127.0.0.1:7700").is_ok());
        assert!(check_listen("[::1]:0").is_ok());
        assert!(check_listen("0.0.0.0:7700").is_ok());
        assert!(check_listen("10.0.0.1:7700").is_ok());
        assert!(check_listen("localhost").is_err());
        assert!(check_listen("127.0.0.1").is_err());
    }

    #[test]
    fn http_listen_is_loopback_unless_allowed() {
        for (text, allow_remote, ok) in [
            ("127.0.0.1:7701", false, true),
            ("[::1]:0", false, true),
            ("127.0.0.5:0", false, true),
            ("0.0.0.0:7701", false, false),
            ("10.0.0.1:7701", false, false),
            ("0.0.0.0:7701", true, true),
            ("localhost:7701", false, false),
            ("127.0.0.1", false, false),
        ] {
            assert_eq!(
                check_http_listen(text, allow_remote).is_ok(),
                ok,
                "{text} {allow_remote}"
            );
        }
        let error = check_http_listen("0.0.0.0:7701", false).unwrap_err();
        assert!(error.contains("http_allow_remote = true"), "{error}");
    }

    #[test]
    fn a_controller_names_itself_by_advertise_or_its_listen_address() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("controller.toml");
        let tls = "ca = \"ca.pem\"\nca_key = \"ca.key\"\ncert = \"c.pem\"\nkey = \"c.key\"\n";
        let load = |extra: &str| {
            std::fs::write(
                &path,
                format!("listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n{extra}{tls}"),
            )
            .unwrap();
            ControllerConfig::load(&path)
        };
        let bound: SocketAddr = "127.0.0.1:7700".parse().unwrap();
        let anywhere: SocketAddr = "0.0.0.0:7700".parse().unwrap();
        let plain = load("").unwrap();
        assert_eq!(
            plain.advertise_url(bound).unwrap(),
            "https://127.0.0.1:7700"
        );
        // One controller on redb, listening everywhere (what `fleetctl init --listen
        // 0.0.0.0:7700` writes): no one is redirected to it, it starts.
        assert_eq!(
            plain.advertise_url(anywhere).unwrap(),
            "https://0.0.0.0:7700"
        );
        let mut shared = plain.clone();
        shared.etcd = Some(crate::store::etcd::EtcdConfig {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: "/fleet".into(),
            ca: None,
            cert: None,
            key: None,
        });
        let error = shared.advertise_url(anywhere).unwrap_err();
        assert!(error.contains("set advertise = "), "{error}");
        assert_eq!(
            shared.advertise_url(bound).unwrap(),
            "https://127.0.0.1:7700"
        );
        let mut named = load("advertise = \"https://c1.example.com:7700/\"\n").unwrap();
        assert_eq!(
            named.advertise_url(anywhere).unwrap(),
            "https://c1.example.com:7700"
        );
        named
            .override_advertise("https://c2.example.com:7700")
            .unwrap();
        assert_eq!(
            named.advertise_url(bound).unwrap(),
            "https://c2.example.com:7700"
        );
        for bad in ["http://c1:7700", "https://c1", "c1:7700"] {
            let error = load(&format!("advertise = \"{bad}\"\n"))
                .unwrap_err()
                .to_string();
            assert!(error.contains("is not a controller URL"), "{bad}: {error}");
            assert!(named.override_advertise(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn webhooks_are_checked_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("controller.toml");
        let tls = "ca = \"ca.pem\"\nca_key = \"ca.key\"\ncert = \"c.pem\"\nkey = \"c.key\"\n";
        let write = |hook: &str| {
            std::fs::write(
                &path,
                format!(
                    "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n{tls}\n[[webhook]]\n{hook}\n"
                ),
            )
            .unwrap();
        };
        write("url = \"http://127.0.0.1:9/hook\"\nevents = [\"rollout.*\"]\nformat = \"slack\"");
        let config = ControllerConfig::load(&path).unwrap();
        assert_eq!(config.webhooks.len(), 1);
        write("url = \"not a url\"\nevents = [\"rollout.*\"]");
        let error = ControllerConfig::load(&path).unwrap_err().to_string();
        assert!(
            error.contains("webhook 1") && error.contains("url"),
            "{error}"
        );
        write("url = \"http://127.0.0.1:9/\"\nevents = [\"rolout.*\"]");
        let error = ControllerConfig::load(&path).unwrap_err().to_string();
        assert!(error.contains("matches no event"), "{error}");
        write("url = \"http://127.0.0.1:9/\"\nevents = [\"rollout.*\"]\nformat = \"xml\"");
        assert!(ControllerConfig::load(&path).is_err());
    }

    #[test]
    fn certificate_ttl_is_a_duration_of_at_least_a_minute_under_either_name() {
        use std::time::Duration;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("controller.toml");
        let tls = "ca = \"ca.pem\"\nca_key = \"ca.key\"\ncert = \"c.pem\"\nkey = \"c.key\"\n";
        let day = 86_400;
        // (lines added to controller.toml, the lifetime, or a part of the error)
        for (lines, expect) in [
            ("", Ok(30 * day)),
            ("certificate_ttl = \"1m\"", Ok(60)),
            ("certificate_ttl = \"2m\"", Ok(120)),
            ("certificate_ttl = \"90d\"", Ok(90 * day)),
            ("certificate_ttl = \"365d\"", Ok(365 * day)),
            ("certificate_ttl = \"1h30m\"", Ok(5400)),
            // The older name, as configs written before it changed have it.
            ("host_certificate_ttl = \"12h\"", Ok(12 * 3600)),
            (
                "certificate_ttl = \"59s\"",
                Err("at least 1m and at most 365d"),
            ),
            ("certificate_ttl = \"0s\"", Err("at least 1m")),
            ("certificate_ttl = \"400d\"", Err("at most 365d")),
            (
                "certificate_ttl = \"soon\"",
                Err("certificate_ttl: duration \"soon\" is invalid"),
            ),
            ("certificate_ttl = 60", Err("invalid type")),
            ("host_certificate_ttl = \"59s\"", Err("at least 1m")),
            (
                "certificate_ttl = \"1d\"\nhost_certificate_ttl = \"2d\"",
                Err("duplicate field"),
            ),
        ] {
            std::fs::write(
                &path,
                format!("listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n{lines}\n{tls}"),
            )
            .unwrap();
            match (ControllerConfig::load(&path), expect) {
                (Ok(config), Ok(secs)) => {
                    assert_eq!(config.certificate_ttl, Duration::from_secs(secs), "{lines}")
                }
                (Err(error), Err(part)) => {
                    let error = error.to_string();
                    assert!(error.contains(part), "{lines}: {error}");
                }
                (got, expect) => panic!("{lines}: got {got:?}, expected {expect:?}"),
            }
        }
    }

    #[test]
    fn heartbeats_per_second_defaults_to_a_hundred_and_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("controller.toml");
        let tls = "ca = \"ca.pem\"\nca_key = \"ca.key\"\ncert = \"c.pem\"\nkey = \"c.key\"\n";
        // (lines added to controller.toml, the rate, or a part of the error)
        for (lines, expect) in [
            ("", Ok(100)),
            ("heartbeats_per_second = 10", Ok(10)),
            ("heartbeats_per_second = 2000", Ok(2000)),
            ("heartbeats_per_second = 9", Err("between 10 and 100000")),
            (
                "heartbeats_per_second = 100001",
                Err("between 10 and 100000"),
            ),
        ] {
            std::fs::write(
                &path,
                format!("listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n{lines}\n{tls}"),
            )
            .unwrap();
            match (ControllerConfig::load(&path), expect) {
                (Ok(config), Ok(rate)) => assert_eq!(config.heartbeats_per_second, rate, "{lines}"),
                (Err(error), Err(part)) => {
                    let error = error.to_string();
                    assert!(error.contains(part), "{lines}: {error}");
                }
                (got, expect) => panic!("{lines}: got {got:?}, expected {expect:?}"),
            }
        }
    }

    #[test]
    fn tls_files_are_required_and_relative_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("controller.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n").unwrap();
        let error = ControllerConfig::load(&path).unwrap_err().to_string();
        assert!(error.contains("missing field"), "{error}");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\nca = \"ca.pem\"\nca_key = \"ca.key\"\ncert = \"controller.pem\"\nkey = \"controller.key\"\n",
        )
        .unwrap();
        let config = ControllerConfig::load(&path).unwrap();
        assert_eq!(config.tls.ca, dir.path().join("ca.pem"));
        assert_eq!(config.tls.key, dir.path().join("controller.key"));
        assert_eq!(config.max_events, crate::store::DEFAULT_MAX_EVENTS);
    }

    #[test]
    fn max_events_is_read_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("controller.toml");
        let tls = "ca = \"ca.pem\"\nca_key = \"ca.key\"\ncert = \"c.pem\"\nkey = \"c.key\"\n";
        let write = |max_events: &str| {
            std::fs::write(
                &path,
                format!("listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\nmax_events = {max_events}\n{tls}"),
            )
            .unwrap();
        };
        write("500");
        assert_eq!(ControllerConfig::load(&path).unwrap().max_events, 500);
        write("0");
        let error = ControllerConfig::load(&path).unwrap_err().to_string();
        assert!(error.contains("max_events must be between 100"), "{error}");
    }

    #[test]
    fn an_etcd_table_in_controller_toml_is_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("controller.toml");
        let tls = "ca = \"ca.pem\"\nca_key = \"ca.key\"\ncert = \"c.pem\"\nkey = \"c.key\"\n";
        let write = |etcd: &str| {
            std::fs::write(
                &path,
                format!("listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n{tls}\n{etcd}"),
            )
            .unwrap()
        };
        write("");
        assert_eq!(ControllerConfig::load(&path).unwrap().etcd, None);
        write("[etcd]\nendpoints = [\"https://10.0.0.5:2379\"]\nca = \"etcd-ca.pem\"\n");
        let etcd = ControllerConfig::load(&path).unwrap().etcd.unwrap();
        assert_eq!(etcd.ca, Some(dir.path().join("etcd-ca.pem")));
        assert_eq!(etcd.prefix, "/fleet");
        write("[etcd]\nendpoints = [\"https://10.0.0.5:2379\"]\n");
        let error = ControllerConfig::load(&path).unwrap_err().to_string();
        assert!(
            error.contains("give the CA of etcd's certificate"),
            "{error}"
        );
    }
}
