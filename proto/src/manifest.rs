//! `fleet.toml`, the manifest at the root of every artifact: how to run the app and how to
//! check it. Parsing validates everything a host will later rely on, so a release that was
//! accepted can always be started.

use crate::duration::parse_duration;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;
use thiserror::Error;

/// The manifest file's name at the root of an artifact.
pub const MANIFEST_FILE: &str = "fleet.toml";
/// How long a release hook may run before the agent kills it and fails the deploy; the
/// controller waits at least this long for the first wave of a release that has one.
pub const RELEASE_HOOK_TIMEOUT: Duration = Duration::from_secs(600);

/// A manifest larger than this is refused before it is parsed.
pub const MAX_MANIFEST_BYTES: u64 = 64 * 1024;

#[derive(Debug, Error)]
pub enum ManifestError {
    #[error("fleet.toml is not valid: {0}")]
    Toml(String),
    #[error("fleet.toml: {0}")]
    Invalid(String),
}

/// A parsed and validated `fleet.toml`.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    pub process: Process,
    pub smoke: Vec<SmokeCheck>,
    pub release_hook: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Process {
    /// Program and arguments; a relative program is resolved inside the instance directory.
    pub command: Vec<String>,
    pub stop_signal: StopSignal,
    pub stop_timeout: Duration,
    pub env: BTreeMap<String, String>,
    /// How long an instance must stay up after its smoke checks passed before it counts as
    /// running (`min_healthy`; default 0 with smoke checks, [`MIN_HEALTHY_WITHOUT_CHECKS`]
    /// without, since staying up is then the only signal there is).
    pub min_healthy: Duration,
    /// The host user the instance runs as (`user`), when the agent runs as root. Without it, a
    /// root agent runs each app as a user of its own (a reserved uid, no passwd entry).
    pub user: Option<String>,
}

/// The signals an app may ask to be stopped with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    Term,
    Int,
    Quit,
    Hup,
    Usr1,
    Usr2,
}

impl StopSignal {
    fn parse(text: &str) -> Option<StopSignal> {
        Some(match text.trim_start_matches("SIG") {
            "TERM" => StopSignal::Term,
            "INT" => StopSignal::Int,
            "QUIT" => StopSignal::Quit,
            "HUP" => StopSignal::Hup,
            "USR1" => StopSignal::Usr1,
            "USR2" => StopSignal::Usr2,
            _ => return None,
        })
    }
}

/// One smoke check; every check must pass before an instance counts as running.
#[derive(Debug, Clone, PartialEq)]
pub struct SmokeCheck {
    pub probe: Probe,
    /// The check is retried until this deadline.
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Probe {
    /// `GET url` must answer `expect_status`.
    Http { url: String, expect_status: u16 },
    /// A TCP connection to `host:port` must open.
    Tcp { addr: String },
    /// The command, run in the instance directory, must exit 0.
    Exec { command: Vec<String> },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    process: RawProcess,
    #[serde(default)]
    smoke: Vec<RawSmoke>,
    #[serde(default)]
    hooks: Option<RawHooks>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProcess {
    command: Vec<String>,
    stop_signal: Option<String>,
    stop_timeout: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    min_healthy: Option<String>,
    user: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSmoke {
    http: Option<String>,
    expect_status: Option<u16>,
    tcp: Option<String>,
    exec: Option<Vec<String>>,
    timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHooks {
    release: Option<Vec<String>>,
}

const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// `min_healthy` of a manifest that declares no smoke checks and names none.
pub const MIN_HEALTHY_WITHOUT_CHECKS: Duration = Duration::from_secs(5);
/// The longest `min_healthy` (manifest or `--min-healthy`).
pub const MAX_MIN_HEALTHY: Duration = Duration::from_secs(3600);
const DEFAULT_SMOKE_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

impl Manifest {
    /// Parses and validates the text of a `fleet.toml`.
    pub fn parse(text: &str) -> Result<Manifest, ManifestError> {
        let raw: RawManifest =
            toml::from_str(text).map_err(|e| ManifestError::Toml(e.message().to_string()))?;
        let invalid = |msg: String| ManifestError::Invalid(msg);

        if raw.process.command.is_empty() || raw.process.command[0].trim().is_empty() {
            return Err(invalid(
                "[process] command is empty: give the program and its arguments, like command = [\"bin/web\"]".into(),
            ));
        }
        check_command_strings("[process] command", &raw.process.command)?;
        let stop_signal = match &raw.process.stop_signal {
            None => StopSignal::Term,
            Some(s) => StopSignal::parse(s).ok_or_else(|| {
                invalid(format!(
                    "[process] stop_signal {} is not one of TERM, INT, QUIT, HUP, USR1, USR2",
                    crate::names::quoted(s)
                ))
            })?,
        };
        let min_healthy = match &raw.process.min_healthy {
            Some(text) => parse_min_healthy(text)
                .map_err(|e| invalid(format!("[process] min_healthy: {e}")))?,
            None if raw.smoke.is_empty() => MIN_HEALTHY_WITHOUT_CHECKS,
            None => Duration::ZERO,
        };
        if let Some(user) = &raw.process.user {
            if !is_user_name(user) {
                return Err(invalid(format!(
                    "[process] user {} is not a user name: use the name of a user of the hosts, like user = \"www-data\" (letters, digits, '_' and '-', at most 32), or leave it out to run the app as a user of its own",
                    crate::names::quoted(user)
                )));
            }
        }
        let stop_timeout = parse_timeout("[process] stop_timeout", &raw.process.stop_timeout)?
            .unwrap_or(DEFAULT_STOP_TIMEOUT);
        for (key, value) in &raw.process.env {
            if !crate::names::check_env_key(key) || value.contains('\0') {
                return Err(invalid(format!(
                    "[process] env key {} is invalid: use letters, digits and '_'",
                    crate::names::quoted(key)
                )));
            }
        }

        let mut smoke = Vec::with_capacity(raw.smoke.len());
        for (idx, check) in raw.smoke.into_iter().enumerate() {
            let name = format!("[[smoke]] #{}", idx + 1);
            let timeout = parse_timeout(&name, &check.timeout)?.unwrap_or(DEFAULT_SMOKE_TIMEOUT);
            let kinds = [
                check.http.is_some(),
                check.tcp.is_some(),
                check.exec.is_some(),
            ];
            if kinds.iter().filter(|k| **k).count() != 1 {
                return Err(invalid(format!(
                    "{name} must have exactly one of http, tcp or exec"
                )));
            }
            if check.expect_status.is_some() && check.http.is_none() {
                return Err(invalid(format!(
                    "{name}: expect_status only goes with http"
                )));
            }
            let probe = if let Some(url) = check.http {
                if !url.starts_with("http://") {
                    return Err(invalid(format!(
                        "{name}: http check {} must start with http://",
                        crate::names::quoted(&url)
                    )));
                }
                let expect_status = check.expect_status.unwrap_or(200);
                if !(100..=599).contains(&expect_status) {
                    return Err(invalid(format!(
                        "{name}: expect_status {expect_status} is not an HTTP status"
                    )));
                }
                Probe::Http { url, expect_status }
            } else if let Some(addr) = check.tcp {
                if !addr.contains(':') {
                    return Err(invalid(format!(
                        "{name}: tcp check {} must be HOST:PORT",
                        crate::names::quoted(&addr)
                    )));
                }
                Probe::Tcp { addr }
            } else {
                let command = check.exec.unwrap_or_default();
                if command.is_empty() || command[0].trim().is_empty() {
                    return Err(invalid(format!("{name}: exec command is empty")));
                }
                check_command_strings(&name, &command)?;
                Probe::Exec { command }
            };
            smoke.push(SmokeCheck { probe, timeout });
        }

        let release_hook = match raw.hooks.and_then(|h| h.release) {
            Some(cmd) if cmd.is_empty() => {
                return Err(invalid("[hooks] release is empty".into()));
            }
            other => other,
        };

        Ok(Manifest {
            process: Process {
                command: raw.process.command,
                stop_signal,
                stop_timeout,
                env: raw.process.env,
                min_healthy,
                user: raw.process.user,
            },
            smoke,
            release_hook,
        })
    }
}

/// Whether `name` is a portable user name: a letter or '_' first, then letters, digits, '_'
/// and '-', at most 32 bytes.
fn is_user_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    name.len() <= 32
        && bytes
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn check_command_strings(what: &str, command: &[String]) -> Result<(), ManifestError> {
    if command.iter().any(|arg| arg.contains('\0')) {
        return Err(ManifestError::Invalid(format!(
            "{what} contains a NUL byte"
        )));
    }
    Ok(())
}

/// Parses a `min_healthy` (manifest or `--min-healthy`): a duration from 0 to 1h.
pub fn parse_min_healthy(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration > MAX_MIN_HEALTHY {
        return Err(format!(
            "{} is over 1h: an instance that must stay up longer is better watched by alerts",
            crate::names::quoted(text)
        ));
    }
    Ok(duration)
}

fn parse_timeout(what: &str, text: &Option<String>) -> Result<Option<Duration>, ManifestError> {
    let Some(text) = text else { return Ok(None) };
    let duration =
        parse_duration(text).map_err(|e| ManifestError::Invalid(format!("{what}: {e}")))?;
    if duration.is_zero() || duration > MAX_TIMEOUT {
        return Err(ManifestError::Invalid(format!(
            "{what}: {text} must be more than 0 and at most 1h"
        )));
    }
    Ok(Some(duration))
}

/// Replaces `${NAME}` with the value from `vars`; unknown names are left as written.
pub fn substitute(text: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find('}') {
            Some(end) if vars.contains_key(&after[..end]) => {
                out.push_str(&vars[&after[..end]]);
                rest = &after[end + 1..];
            }
            _ => {
                out.push_str("${");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
[process]
command = ["bin/web", "--listen", "${FLEET_ADDR}:8080"]
stop_signal = "TERM"
stop_timeout = "10s"
env = { RUST_LOG = "info" }

[[smoke]]
http = "http://${FLEET_ADDR}:8080/healthz"
expect_status = 200
timeout = "20s"

[[smoke]]
exec = ["bin/selfcheck"]
timeout = "10s"

[hooks]
release = ["bin/migrate"]
"#;

    #[test]
    fn user_is_a_user_name_or_absent() {
        let with = |user: &str| {
            Manifest::parse(&format!(
                "[process]\ncommand = [\"x\"]\nuser = \"{user}\"\n"
            ))
        };
        assert_eq!(
            Manifest::parse("[process]\ncommand = [\"x\"]\n")
                .unwrap()
                .process
                .user,
            None
        );
        for good in ["www-data", "_app", "nobody", "a1"] {
            assert_eq!(with(good).unwrap().process.user.as_deref(), Some(good));
        }
        let too_long = "a".repeat(33);
        for bad in ["", "1abc", "a b", "../x", "a:b", too_long.as_str()] {
            let error = with(bad).unwrap_err().to_string();
            assert!(error.contains("[process] user"), "{error}");
            assert!(error.contains("leave it out"), "{error}");
        }
    }

    #[test]
    fn min_healthy_defaults_to_five_seconds_only_without_checks() {
        let with_checks = "[process]\ncommand = [\"x\"]\n[[smoke]]\ntcp = \"127.0.0.1:1\"\n";
        let without = "[process]\ncommand = [\"x\"]\n";
        assert_eq!(
            Manifest::parse(with_checks).unwrap().process.min_healthy,
            Duration::ZERO
        );
        assert_eq!(
            Manifest::parse(without).unwrap().process.min_healthy,
            MIN_HEALTHY_WITHOUT_CHECKS
        );
        let explicit = "[process]\ncommand = [\"x\"]\nmin_healthy = \"0s\"\n";
        assert_eq!(
            Manifest::parse(explicit).unwrap().process.min_healthy,
            Duration::ZERO
        );
        let explicit = "[process]\ncommand = [\"x\"]\nmin_healthy = \"30s\"\n";
        assert_eq!(
            Manifest::parse(explicit).unwrap().process.min_healthy,
            Duration::from_secs(30)
        );
        for bad in ["soon", "2h"] {
            let text = format!("[process]\ncommand = [\"x\"]\nmin_healthy = \"{bad}\"\n");
            let error = Manifest::parse(&text).unwrap_err().to_string();
            assert!(error.contains("min_healthy"), "{error}");
        }
    }

    #[test]
    fn parses_the_design_example() {
        let m = Manifest::parse(FULL).unwrap();
        assert_eq!(m.process.command[0], "bin/web");
        assert_eq!(m.process.stop_timeout, Duration::from_secs(10));
        assert_eq!(m.smoke.len(), 2);
        assert_eq!(m.release_hook, Some(vec!["bin/migrate".to_string()]));
    }

    #[test]
    fn refuses_bad_manifests() {
        for (text, needle) in [
            ("", "missing field `process`"),
            ("[process]\ncommand = []", "command is empty"),
            ("[process]\ncommand = [\"\"]", "command is empty"),
            (
                "[process]\ncommand = [\"x\"]\nstop_signal = \"KILL\"",
                "stop_signal",
            ),
            (
                "[process]\ncommand = [\"x\"]\nstop_timeout = \"soon\"",
                "stop_timeout",
            ),
            ("[process]\ncommand = [\"x\"]\nbogus = 1", "unknown field"),
            (
                "[process]\ncommand = [\"x\"]\n[[smoke]]\ntimeout = \"1s\"",
                "exactly one",
            ),
            (
                "[process]\ncommand = [\"x\"]\n[[smoke]]\nhttp = \"ftp://x\"",
                "http://",
            ),
            (
                "[process]\ncommand = [\"x\"]\n[[smoke]]\ntcp = \"x\"\nexpect_status = 200",
                "expect_status",
            ),
            (
                "[process]\ncommand = [\"x\"]\n[[smoke]]\nexec = []",
                "exec command is empty",
            ),
        ] {
            let err = Manifest::parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn substitutes_known_variables_only() {
        let vars = BTreeMap::from([("FLEET_ADDR".to_string(), "127.0.0.2".to_string())]);
        assert_eq!(
            substitute("http://${FLEET_ADDR}:80/${X}", &vars),
            "http://127.0.0.2:80/${X}"
        );
        assert_eq!(substitute("${", &vars), "${");
    }
}
