//! The agent's configuration: from flags or a TOML file with the same keys (`controller`,
//! `name`, `advertise`, `data_dir`, `labels = {k = "v"}`, `ca`, `join_token`, `stop_apps_on_exit`,
//! `peer_port`), validated
//! before anything starts. `controller` is one URL or several (`--controller URL1,URL2`, or a
//! TOML array): the controllers of one fleet, dialled in turn (see [`crate::controllers`]).
//! The controller speaks only mutual TLS, so each URL is `https://`.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// A validated agent configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `https://HOST:PORT` of each controller of the fleet, never empty, in the order they are
    /// tried.
    pub controllers: Vec<String>,
    /// This host's name, as the controller knows it.
    pub host_name: String,
    /// The address instances bind and the controller shows; given to instances as FLEET_ADDR.
    pub advertise: IpAddr,
    /// Everything the agent writes lives under here.
    pub data_dir: PathBuf,
    /// Labels the controller selects hosts by.
    pub labels: BTreeMap<String, String>,
    /// The fleet CA the controller is verified against (`fleetctl init` wrote it as ca.pem).
    /// Needed to join; later starts use the copy kept in `DATA/tls/ca.pem` when it is absent.
    pub ca: Option<PathBuf>,
    /// A one-time join token (`fleetctl join-token create`), needed only on the first start.
    pub join_token: Option<String>,
    /// Stop every instance when the agent stops (a local fleet); by default they keep running
    /// and the agent's next run adopts them.
    pub stop_apps_on_exit: bool,
    /// The port this host serves artifact chunks to its peers on, on `advertise`; 0: none
    /// (every fetch then comes from the controller, and this host serves no peer).
    pub peer_port: u16,
}

/// The default `--peer-port`.
pub const DEFAULT_PEER_PORT: u16 = 7702;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0} is missing: give it as a flag or in the config file")]
    Missing(&'static str),
    #[error("controller {url:?} is invalid: {why}; write it like https://controller.example.com:7700 (several: URL1,URL2)")]
    Controller { url: String, why: &'static str },
    #[error("advertise address {0:?} is invalid: give an IP address like 127.0.0.2")]
    Advertise(String),
    #[error(transparent)]
    Name(#[from] fleet_proto::names::NameError),
}

/// The keys of the TOML config file; every one may also come from a flag.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// `controller = "https://…"` or `controller = ["https://…", "https://…"]`.
    pub controller: Option<ControllerField>,
    pub name: Option<String>,
    pub advertise: Option<String>,
    pub data_dir: Option<PathBuf>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub ca: Option<PathBuf>,
    pub join_token: Option<String>,
    /// `stop_apps_on_exit = true`: as `--stop-apps-on-exit`.
    #[serde(default)]
    pub stop_apps_on_exit: bool,
    /// `peer_port = 7702`: as `--peer-port` (0 turns the peer listener off).
    pub peer_port: Option<u16>,
}

/// agent.toml's `controller`: one URL, or an array of them (several controllers).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum ControllerField {
    One(String),
    Several(Vec<String>),
}

impl ConfigFile {
    /// Reads a config file. A relative `data_dir` in it is taken relative to the file.
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut file: ConfigFile = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.message().to_string(),
        })?;
        if let Some(dir) = &file.data_dir {
            if dir.is_relative() {
                let base = path.parent().unwrap_or(Path::new("."));
                file.data_dir = Some(base.join(dir));
            }
        }
        if let Some(ca) = &file.ca {
            if ca.is_relative() {
                let base = path.parent().unwrap_or(Path::new("."));
                file.ca = Some(base.join(ca));
            }
        }
        Ok(file)
    }
}

/// The flags, each overriding the config file's key of the same meaning.
#[derive(Debug, Default, Clone)]
pub struct ConfigFlags {
    /// `URL` or `URL1,URL2,…`; replaces the file's list when given.
    pub controller: Option<String>,
    pub name: Option<String>,
    pub advertise: Option<String>,
    pub data_dir: Option<PathBuf>,
    /// `k=v,k2=v2`; replaces the file's labels when given.
    pub labels: Option<String>,
    pub ca: Option<PathBuf>,
    pub join_token: Option<String>,
    /// `--stop-apps-on-exit` (either it or the file turns it on).
    pub stop_apps_on_exit: bool,
    /// `--peer-port PORT`.
    pub peer_port: Option<u16>,
}

impl Config {
    /// Merges flags over the file (flags win) and validates the result.
    pub fn build(file: ConfigFile, flags: ConfigFlags) -> Result<Config, ConfigError> {
        let controllers: Vec<String> = match (flags.controller, file.controller) {
            (Some(flag), _) => flag.split(',').map(str::to_string).collect(),
            (None, Some(ControllerField::One(url))) => vec![url],
            (None, Some(ControllerField::Several(urls))) => urls,
            (None, None) => Vec::new(),
        }
        .iter()
        .map(|url| url.trim())
        .filter(|url| !url.is_empty())
        .map(|url| url.trim_end_matches('/').to_string())
        .collect();
        if controllers.is_empty() {
            return Err(ConfigError::Missing("--controller"));
        }
        let host_name = flags
            .name
            .or(file.name)
            .ok_or(ConfigError::Missing("--name"))?;
        let advertise = flags
            .advertise
            .or(file.advertise)
            .ok_or(ConfigError::Missing("--advertise"))?;
        let data_dir = flags
            .data_dir
            .or(file.data_dir)
            .ok_or(ConfigError::Missing("--data-dir"))?;
        let labels = match flags.labels {
            Some(text) => fleet_proto::names::parse_labels(&text)?
                .into_iter()
                .collect(),
            None => {
                for (key, value) in &file.labels {
                    fleet_proto::names::check_label(key, value)?;
                }
                file.labels
            }
        };
        fleet_proto::names::check_host(&host_name)?;
        for url in &controllers {
            fleet_proto::leader::check_controller_url(url).map_err(|why| {
                ConfigError::Controller {
                    url: url.clone(),
                    why,
                }
            })?;
        }
        let advertise: IpAddr = advertise
            .parse()
            .map_err(|_| ConfigError::Advertise(advertise.clone()))?;
        let join_token = flags
            .join_token
            .or(file.join_token)
            .map(|token| token.trim().to_string())
            .filter(|token| !token.is_empty());
        Ok(Config {
            controllers,
            host_name,
            advertise,
            data_dir,
            labels,
            ca: flags.ca.or(file.ca),
            join_token,
            stop_apps_on_exit: flags.stop_apps_on_exit || file.stop_apps_on_exit,
            peer_port: flags
                .peer_port
                .or(file.peer_port)
                .unwrap_or(DEFAULT_PEER_PORT),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(controller: &str, name: &str, advertise: &str, labels: Option<&str>) -> ConfigFlags {
        ConfigFlags {
            controller: Some(controller.into()),
            name: Some(name.into()),
            advertise: Some(advertise.into()),
            data_dir: Some(PathBuf::from("data")),
            labels: labels.map(str::to_string),
            ca: None,
            join_token: None,
            stop_apps_on_exit: false,
            peer_port: None,
        }
    }

    #[test]
    fn validates_flags() {
        for (controller, name, advertise, labels, ok) in [
            (
                "https://127.0.0.1:7070",
                "web-1",
                "127.0.0.2",
                Some("env=prod"),
                true,
            ),
            ("https://127.0.0.1:7070/", "web-1", "::1", None, true),
            (
                "https://127.0.0.1:7070,https://127.0.0.2:7070",
                "web-1",
                "127.0.0.2",
                None,
                true,
            ),
            (
                "https://127.0.0.1:7070,http://127.0.0.2:7070",
                "web-1",
                "127.0.0.2",
                None,
                false,
            ),
            ("https://localhost:7070", "h", "127.0.0.2", None, true),
            ("http://127.0.0.1:7070", "web-1", "127.0.0.2", None, false),
            ("127.0.0.1:7070", "web-1", "127.0.0.2", None, false),
            ("http://127.0.0.1", "web-1", "127.0.0.2", None, false),
            ("http://127.0.0.1:x", "web-1", "127.0.0.2", None, false),
            (
                "https://127.0.0.1:7070/api",
                "web-1",
                "127.0.0.2",
                None,
                false,
            ),
            ("https://127.0.0.1:7070", "Web_1", "127.0.0.2", None, false),
            ("https://127.0.0.1:7070", "", "127.0.0.2", None, false),
            ("https://127.0.0.1:7070", "web-1", "localhost", None, false),
            (
                "https://127.0.0.1:7070",
                "web-1",
                "127.0.0.2",
                Some("env"),
                false,
            ),
            (
                "https://127.0.0.1:7070",
                "web-1",
                "127.0.0.2",
                Some("env=a b"),
                false,
            ),
        ] {
            let result = Config::build(
                ConfigFile::default(),
                flags(controller, name, advertise, labels),
            );
            assert_eq!(
                result.is_ok(),
                ok,
                "{controller} {name} {advertise} {labels:?}: {result:?}"
            );
        }
    }

    #[test]
    fn flags_override_the_file_and_missing_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            "controller = \"https://127.0.0.1:1\"\nname = \"a\"\nadvertise = \"127.0.0.3\"\n\
             data_dir = \"d\"\nlabels = { env = \"prod\" }\n",
        )
        .unwrap();
        let file = ConfigFile::load(&path).unwrap();
        let config = Config::build(
            file.clone(),
            ConfigFlags {
                name: Some("b".into()),
                ..ConfigFlags::default()
            },
        )
        .unwrap();
        assert_eq!(config.host_name, "b");
        assert_eq!(config.data_dir, dir.path().join("d"));
        assert_eq!(config.labels.get("env").map(String::as_str), Some("prod"));

        let err = Config::build(ConfigFile::default(), ConfigFlags::default()).unwrap_err();
        assert!(err.to_string().contains("--controller"), "{err}");

        // Several controllers: an array in the file, a list in the flag (which wins); a bad
        // entry is named.
        std::fs::write(
            &path,
            "controller = [\"https://127.0.0.1:1\", \"https://127.0.0.9:2/\"]\nname = \"a\"\n\
             advertise = \"127.0.0.3\"\ndata_dir = \"d\"\n",
        )
        .unwrap();
        let file = ConfigFile::load(&path).unwrap();
        let config = Config::build(file.clone(), ConfigFlags::default()).unwrap();
        assert_eq!(
            config.controllers,
            ["https://127.0.0.1:1", "https://127.0.0.9:2"]
        );
        let config = Config::build(
            file.clone(),
            ConfigFlags {
                controller: Some("https://127.0.0.5:5, https://127.0.0.6:6".into()),
                ..ConfigFlags::default()
            },
        )
        .unwrap();
        assert_eq!(
            config.controllers,
            ["https://127.0.0.5:5", "https://127.0.0.6:6"]
        );
        let err = Config::build(
            file,
            ConfigFlags {
                controller: Some("https://127.0.0.5:5,127.0.0.6:6".into()),
                ..ConfigFlags::default()
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("\"127.0.0.6:6\""), "{err}");
        assert!(err.to_string().contains("not https://"), "{err}");

        std::fs::write(&path, "bogus = 1\n").unwrap();
        assert!(ConfigFile::load(&path).is_err());
        std::fs::write(&path, "labels = { \"Bad Key\" = \"x\" }\n").unwrap();
        let file = ConfigFile::load(&path).unwrap();
        let err = Config::build(file, flags("https://127.0.0.1:1", "a", "127.0.0.2", None));
        assert!(err.is_err());
    }
}
