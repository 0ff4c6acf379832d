//! `[etcd]` in controller.toml, as `fleetctl init --etcd` writes it and the controller reads
//! it, and its one check, shared so that both refuse the same bad input with the same words:
//! at least one URL, each `https://HOST:PORT` (with the CA of etcd's certificate) or
//! `http://` on a loopback address, a client certificate only with its key, a key prefix like
//! `/fleet`.

use serde::{Deserialize, Serialize};

/// The default key prefix of a fleet's records in etcd.
pub const DEFAULT_PREFIX: &str = "/fleet";

/// `[etcd]` (paths relative to controller.toml's directory).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdFile {
    /// `https://HOST:PORT` of each etcd member (`http://` only on loopback).
    pub endpoints: Vec<String>,
    /// The key prefix the fleet's records live under (default `/fleet`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// The CA of etcd's certificate; required for https.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    /// A client certificate and key, for an etcd that requires them (both or neither).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// The host and port of `url` after its scheme, if it is `HOST:PORT` (`[V6]:PORT`) with
/// nothing after but an optional `/`.
fn host_and_port(rest: &str) -> Option<(&str, u16)> {
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#', '@', ' ']) {
        return None;
    }
    let (host, port) = authority.rsplit_once(':')?;
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.strip_suffix(']')?,
        None if host.contains(':') => return None,
        None => host,
    };
    if host.is_empty() {
        return None;
    }
    Some((host, port.parse().ok()?))
}

/// Checks `[etcd]` and returns its key prefix (the default when none is given). Pure.
pub fn check(file: &EtcdFile) -> Result<String, String> {
    if file.endpoints.is_empty() {
        return Err("etcd: give at least one URL, like https://10.0.0.5:2379".into());
    }
    for url in &file.endpoints {
        let (https, rest) = if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(format!(
                "etcd URL {url:?} must start with https:// (or http:// on loopback), like https://10.0.0.5:2379"
            ));
        };
        let Some((host, _port)) = host_and_port(rest) else {
            return Err(format!(
                "etcd URL {url:?} needs a host and a port and nothing else, like https://10.0.0.5:2379"
            ));
        };
        let loopback = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if !https && !loopback {
            return Err(format!(
                "etcd URL {url} is plain http to another machine: use https://, with the CA of etcd's certificate (--etcd-ca)"
            ));
        }
        if https && file.ca.is_none() {
            return Err(
                "etcd URLs are https: give the CA of etcd's certificate (--etcd-ca, or ca in [etcd])"
                    .into(),
            );
        }
    }
    if file.cert.is_some() != file.key.is_some() {
        return Err(
            "etcd: a client certificate needs its key and a key its certificate (--etcd-cert with --etcd-key)"
                .into(),
        );
    }
    let prefix = file
        .prefix
        .clone()
        .unwrap_or_else(|| DEFAULT_PREFIX.to_string());
    if !prefix.starts_with('/')
        || prefix.len() < 2
        || prefix.ends_with('/')
        || prefix.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "etcd prefix {prefix:?} must start with / and not end with one, without spaces, like /fleet"
        ));
    }
    Ok(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_tables_are_checked_at_the_edge() {
        let file =
            |endpoints: &[&str], ca: bool, cert: bool, key: bool, prefix: Option<&str>| EtcdFile {
                endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
                prefix: prefix.map(str::to_string),
                ca: ca.then(|| "ca.pem".to_string()),
                cert: cert.then(|| "client.pem".to_string()),
                key: key.then(|| "client.key".to_string()),
            };
        let https = ["https://10.0.0.5:2379"];
        let local = ["http://127.0.0.1:2379"];
        let cases: Vec<(&str, EtcdFile, Result<&str, &str>)> = vec![
            (
                "https with a CA",
                file(
                    &["https://10.0.0.5:2379", "https://etcd-2:2379/"],
                    true,
                    true,
                    true,
                    None,
                ),
                Ok("/fleet"),
            ),
            (
                "http on loopback",
                file(
                    &[
                        "http://127.0.0.1:2379",
                        "http://[::1]:2379",
                        "http://localhost:2379",
                    ],
                    false,
                    false,
                    false,
                    Some("/a/b"),
                ),
                Ok("/a/b"),
            ),
            (
                "no URL",
                file(&[], false, false, false, None),
                Err("give at least one URL"),
            ),
            (
                "http elsewhere",
                file(&["http://10.0.0.5:2379"], false, false, false, None),
                Err("plain http to another machine: use https://"),
            ),
            (
                "https without a CA",
                file(&https, false, false, false, None),
                Err("give the CA of etcd's certificate"),
            ),
            (
                "another scheme",
                file(&["etcd://10.0.0.5:2379"], false, false, false, None),
                Err("must start with https://"),
            ),
            (
                "no port",
                file(&["https://10.0.0.5"], true, false, false, None),
                Err("needs a host and a port"),
            ),
            (
                "a path",
                file(&["https://10.0.0.5:2379/v3"], true, false, false, None),
                Err("needs a host and a port"),
            ),
            (
                "a bare v6",
                file(&["http://::1:2379"], false, false, false, None),
                Err("needs a host and a port"),
            ),
            (
                "a certificate without its key",
                file(&https, true, true, false, None),
                Err("needs its key"),
            ),
            (
                "a relative prefix",
                file(&local, false, false, false, Some("fleet")),
                Err("must start with /"),
            ),
            (
                "a prefix ending in /",
                file(&local, false, false, false, Some("/fleet/")),
                Err("not end with one"),
            ),
            (
                "the root",
                file(&local, false, false, false, Some("/")),
                Err("must start with /"),
            ),
        ];
        for (what, file, expect) in cases {
            match (expect, check(&file)) {
                (Ok(prefix), Ok(got)) => assert_eq!(got, prefix, "{what}"),
                (Err(text), Err(error)) => assert!(error.contains(text), "{what}: {error}"),
                (expect, got) => panic!("{what}: expected {expect:?}, got {got:?}"),
            }
        }
    }
}
