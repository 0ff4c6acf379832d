//! The parsers behind fleetctl's arguments: they check names, versions, durations,
//! selectors, batches and `--env` pairs before anything is sent, so bad input fails at once
//! with exit code 2 and a message that says what to write. They know nothing of clap.

use std::time::Duration;

/// A label selector: hosts must carry every one of these labels.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector(pub Vec<(String, String)>);

/// Checks an app name.
pub fn parse_app(text: &str) -> Result<String, String> {
    fleet_proto::names::check_app(text)
        .map(|()| text.to_string())
        .map_err(|e| e.to_string())
}

/// Checks a host name.
pub fn parse_host(text: &str) -> Result<String, String> {
    fleet_proto::names::check_host(text)
        .map(|()| text.to_string())
        .map_err(|e| e.to_string())
}

/// Checks a release version.
pub fn parse_version(text: &str) -> Result<String, String> {
    fleet_proto::names::check_version(text)
        .map(|()| text.to_string())
        .map_err(|e| e.to_string())
}

/// Parses a duration like `90s` or `5m`.
pub fn parse_duration_arg(text: &str) -> Result<Duration, String> {
    fleet_proto::duration::parse_duration(text)
}

/// Parses a certificate's lifetime (`init --certificate-ttl`, `credentials create --ttl`):
/// at least 1 minute, at most 365 days.
pub fn parse_certificate_ttl(text: &str) -> Result<Duration, String> {
    fleet_pki::lifetime::check_lifetime(parse_duration_arg(text)?).map_err(|_| {
        format!(
            "{} is not a certificate lifetime: write at least 1m and at most 365d, like 30d or 12h",
            fleet_proto::names::quoted(text)
        )
    })
}

/// Parses `join-token create --ttl`: more than 0 and at most 7 days (`7d`, `168h`), the
/// longest the controller lets a join token live.
pub fn parse_join_token_ttl(text: &str) -> Result<Duration, String> {
    let ttl = parse_duration_arg(text)?;
    let max = Duration::from_millis(fleet_proto::MAX_JOIN_TOKEN_TTL_MS);
    if ttl.is_zero() {
        return Err("--ttl 0 makes a token nobody can use: write a duration like 1h".to_string());
    }
    if ttl > max {
        return Err(format!(
            "--ttl {} is longer than a join token may live: write at most 7d (168h), and make a new token when it runs out",
            fleet_proto::names::quoted(text)
        ));
    }
    Ok(ttl)
}

/// Parses `--max-unavailable`: `N` hosts (N > 0) or `P%` (1 to 100).
pub fn parse_max_unavailable(text: &str) -> Result<String, String> {
    if matches!(text.trim(), "0" | "0%") {
        return Err(
            "--max-unavailable 0 lets no host be updated: allow at least 1 host (or 1%)".into(),
        );
    }
    parse_batch(text).map_err(|_| {
        format!(
            "--max-unavailable {} is invalid: write a host count like 2 or a share like 25% (1% to 100%)",
            fleet_proto::names::quoted(text)
        )
    })
}

/// Parses `--min-healthy`: a duration from 0 to 1h.
pub fn parse_min_healthy_arg(text: &str) -> Result<Duration, String> {
    fleet_proto::manifest::parse_min_healthy(text)
}

/// Parses `k=v,k2=v2`; an empty selector is refused (leave the flag out to select every host).
pub fn parse_selector(text: &str) -> Result<Selector, String> {
    let labels = fleet_proto::names::parse_labels(text).map_err(|e| e.to_string())?;
    if labels.is_empty() {
        return Err(
            "selector is empty: write it like env=prod,zone=a, or leave --selector out to select every host"
                .to_string(),
        );
    }
    let mut seen = std::collections::BTreeSet::new();
    for (key, _) in &labels {
        if !seen.insert(key.as_str()) {
            return Err(format!(
                "selector names label {key:?} twice: a host has one value per label"
            ));
        }
    }
    Ok(Selector(labels))
}

/// Label changes: `k=v` sets, `k-` removes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LabelChanges {
    pub set: Vec<(String, String)>,
    pub remove: Vec<String>,
}

/// Parses `k=v,k2-`: labels to set and keys to remove.
pub fn parse_label_change(text: &str) -> Result<LabelChanges, String> {
    let mut changes = LabelChanges::default();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some(key) = part.strip_suffix('-').filter(|k| !k.contains('=')) {
            fleet_proto::names::check_label(key, "").map_err(|e| e.to_string())?;
            changes.remove.push(key.to_string());
        } else {
            let labels = fleet_proto::names::parse_labels(part).map_err(|e| e.to_string())?;
            changes.set.extend(labels);
        }
    }
    if changes.set.is_empty() && changes.remove.is_empty() {
        return Err("write label changes like zone=b (set) or tier- (remove)".to_string());
    }
    Ok(changes)
}

/// `release prune --keep N`: how many of the newest releases stay, at least 1.
pub fn parse_keep(text: &str) -> Result<u32, String> {
    match text.trim().parse::<u32>() {
        Ok(0) => Err(
            "--keep 0 would delete every release of the app: keep at least 1, like --keep 5"
                .to_string(),
        ),
        Ok(keep) => Ok(keep),
        Err(_) => Err(format!(
            "--keep {} is not a count: give how many of the newest releases stay, like --keep 5",
            fleet_proto::names::quoted(text)
        )),
    }
}

/// Parses a batch size: `N` hosts (N > 0) or `P%` of the selected hosts (1 to 100), and returns
/// it in the form the controller reads.
pub fn parse_batch(text: &str) -> Result<String, String> {
    let bad = || {
        format!(
            "batch {text:?} is invalid: write a host count like 2 or a share like 25% (1% to 100%)"
        )
    };
    let text = text.trim();
    if let Some(percent) = text.strip_suffix('%') {
        let percent: u32 = all_digits(percent).ok_or_else(bad)?;
        if (1..=100).contains(&percent) {
            return Ok(format!("{percent}%"));
        }
        return Err(bad());
    }
    let count: u32 = all_digits(text).ok_or_else(bad)?;
    if count == 0 {
        return Err(bad());
    }
    Ok(count.to_string())
}

fn all_digits(text: &str) -> Option<u32> {
    if text.is_empty() || text.len() > 9 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Parses one `--secret KEY=VALUE`. Unlike [`parse_env_pair`], an error never quotes the
/// value (nor text that may be one).
pub fn parse_secret(text: &str) -> Result<(String, String), String> {
    let Some((key, value)) = text.split_once('=') else {
        return Err(
            "a --secret is invalid: write it as KEY=VALUE (or use --secret-file KEY=FILE)"
                .to_string(),
        );
    };
    if !fleet_proto::names::check_env_key(key) {
        return Err(format!(
            "secret name {} is invalid: use letters, digits and '_', not starting with a digit",
            fleet_proto::names::quoted(key)
        ));
    }
    Ok((key.to_string(), value.to_string()))
}

/// Parses one `--env KEY=VALUE`; the value may hold anything, `=` included.
pub fn parse_env_pair(text: &str) -> Result<(String, String), String> {
    let (key, value) = text.split_once('=').ok_or_else(|| {
        format!("--env {text:?} is invalid: write it as KEY=VALUE, e.g. --env LOG_LEVEL=debug")
    })?;
    if !fleet_proto::names::check_env_key(key) {
        return Err(format!(
            "environment variable name {key:?} is invalid: use letters, digits and '_', not starting with a digit"
        ));
    }
    Ok((key.to_string(), value.to_string()))
}

/// One address of the controller, as hosts, operators and CI dial it: `https://HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerUrl {
    /// The URL as written to client.toml and agent.toml: `https://HOST:PORT`, the host
    /// lowercased, an IPv6 address in brackets.
    pub url: String,
    /// The host: a DNS name or an IP address (IPv6 without brackets), as the controller's
    /// certificate names it.
    pub host: String,
    /// 0 only for a local fleet whose controller picks its port (`--listen IP:0`).
    pub port: u16,
}

/// `fleetctl init --url URL[,URL...]`: the controller's addresses, at least one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerUrls(pub Vec<ControllerUrl>);

/// Parses `https://HOST:PORT[,https://HOST2:PORT...]`: each must be https (the controller
/// speaks only mutual TLS), name a host that can be dialled (a DNS name or an IP address, not
/// `0.0.0.0` or `::`) and a port, and carry nothing after the port.
pub fn parse_controller_urls(text: &str) -> Result<ControllerUrls, String> {
    let urls = text
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .map(parse_controller_url)
        .collect::<Result<Vec<_>, _>>()?;
    if urls.is_empty() {
        return Err(
            "--url is empty: write the address hosts dial, e.g. https://controller.example.com:7700"
                .to_string(),
        );
    }
    Ok(ControllerUrls(urls))
}

/// Parses one `https://HOST:PORT`; see [`parse_controller_urls`].
pub fn parse_controller_url(text: &str) -> Result<ControllerUrl, String> {
    const EXAMPLE: &str = "https://controller.example.com:7700 or https://10.0.0.5:7700";
    let quoted = fleet_proto::names::quoted(text);
    let Some(rest) = text.strip_prefix("https://") else {
        return Err(format!(
            "controller URL {quoted} is not https: the controller speaks only mutual TLS; write it like {EXAMPLE}"
        ));
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#', '@']) {
        return Err(format!(
            "controller URL {quoted} has more than a host and a port: write it like {EXAMPLE}"
        ));
    }
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        // An IPv6 address: [ADDR]:PORT.
        let (addr, after) = bracketed
            .split_once(']')
            .ok_or_else(|| format!("controller URL {quoted} has an unclosed '[': write an IPv6 address like https://[fd00::1]:7700"))?;
        let ip: std::net::Ipv6Addr = addr.parse().map_err(|_| {
            format!("controller URL {quoted} has an invalid IPv6 address: write it like https://[fd00::1]:7700")
        })?;
        (ip.to_string(), after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host.to_ascii_lowercase(), Some(port)),
            None => (authority.to_ascii_lowercase(), None),
        }
    };
    if host.is_empty() {
        return Err(format!(
            "controller URL {quoted} has no host: write the name or address hosts dial, like {EXAMPLE}"
        ));
    }
    let Some(port) = port.filter(|p| !p.is_empty()) else {
        return Err(format!(
            "controller URL {quoted} has no port: add the port the controller is reached at, like {EXAMPLE}"
        ));
    };
    let port: u16 = port
        .parse()
        .ok()
        .filter(|_| port.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| {
            format!("controller URL {quoted} has an invalid port: write a number from 1 to 65535, like {EXAMPLE}")
        })?;
    if host.contains(':') && !authority.starts_with('[') {
        return Err(format!(
            "controller URL {quoted} has an IPv6 address without brackets: write it like https://[fd00::1]:7700"
        ));
    }
    let ip = host.parse::<std::net::IpAddr>().ok();
    if ip.is_some_and(|ip| ip.is_unspecified()) {
        return Err(format!(
            "controller URL {quoted} names no host ({host} means every address of the controller's machine, which no host can dial): write the name or address hosts dial, like {EXAMPLE}"
        ));
    }
    if ip.is_none() && !is_dns_name(&host) {
        return Err(format!(
            "controller URL {quoted} has an invalid host {}: write a DNS name (letters, digits, '-' and '.') or an IP address, like {EXAMPLE}",
            fleet_proto::names::quoted(&host)
        ));
    }
    let url = match ip {
        Some(std::net::IpAddr::V6(v6)) => format!("https://[{v6}]:{port}"),
        _ => format!("https://{host}:{port}"),
    };
    Ok(ControllerUrl { url, host, port })
}

/// A DNS name a certificate can carry: dot-separated labels of ASCII letters, digits and '-'
/// (not at either end of a label), at most 63 bytes each and 253 in all.
fn is_dns_name(host: &str) -> bool {
    host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_ttls() {
        for (text, expect) in [
            ("1m", Some(60)),
            ("30d", Some(30 * 86_400)),
            ("365d", Some(365 * 86_400)),
            ("1h30m", Some(5400)),
            ("59s", None),
            ("366d", None),
            ("0s", None),
            ("soon", None),
        ] {
            assert_eq!(
                parse_certificate_ttl(text).ok().map(|d| d.as_secs()),
                expect,
                "{text}"
            );
        }
        assert!(parse_certificate_ttl("30s")
            .unwrap_err()
            .contains("at least 1m and at most 365d"));
    }

    #[test]
    fn join_token_ttls() {
        for (text, expect) in [
            ("1h", Some(3600)),
            ("7d", Some(7 * 86_400)),
            ("168h", Some(7 * 86_400)),
            ("6d23h59m59s", Some(7 * 86_400 - 1)),
            ("7d1s", None),
            ("8d", None),
            ("169h", None),
            ("0s", None),
            ("soon", None),
        ] {
            assert_eq!(
                parse_join_token_ttl(text).ok(),
                expect.map(Duration::from_secs),
                "{text:?}"
            );
        }
        assert!(parse_join_token_ttl("7d1s")
            .unwrap_err()
            .contains("at most 7d"));
    }

    #[test]
    fn controller_urls() {
        for (text, expect) in [
            (
                "https://controller.example.com:7700",
                Some((
                    "https://controller.example.com:7700",
                    "controller.example.com",
                    7700,
                )),
            ),
            (
                "https://Controller.Example.com:7700/",
                Some((
                    "https://controller.example.com:7700",
                    "controller.example.com",
                    7700,
                )),
            ),
            (
                "https://10.0.0.5:7700",
                Some(("https://10.0.0.5:7700", "10.0.0.5", 7700)),
            ),
            (
                "https://[fd00::1]:7700",
                Some(("https://[fd00::1]:7700", "fd00::1", 7700)),
            ),
            (
                "https://localhost:0",
                Some(("https://localhost:0", "localhost", 0)),
            ),
            ("http://controller.example.com:7700", None),
            ("controller.example.com:7700", None),
            ("https://:7700", None),
            ("https://", None),
            ("https://controller.example.com", None),
            ("https://controller.example.com:", None),
            ("https://controller.example.com:70000", None),
            ("https://controller.example.com:+7", None),
            ("https://0.0.0.0:7700", None),
            ("https://[::]:7700", None),
            ("https://[fd00::1:7700", None),
            ("https://fd00::1:7700", None),
            ("https://controller.example.com:7700/api", None),
            ("https://admin@controller.example.com:7700", None),
            ("https://contr oller:7700", None),
            ("https://-bad.example.com:7700", None),
            ("https://a..b:7700", None),
        ] {
            let got = parse_controller_url(text).ok();
            let got = got
                .as_ref()
                .map(|u| (u.url.as_str(), u.host.as_str(), u.port));
            assert_eq!(got, expect, "{text:?}");
        }
        let urls =
            parse_controller_urls("https://a.example.com:7700, https://10.0.0.6:7700").unwrap();
        assert_eq!(urls.0.len(), 2);
        assert_eq!(urls.0[1].url, "https://10.0.0.6:7700");
        assert!(parse_controller_urls("").is_err());
        assert!(parse_controller_urls(",").is_err());
        assert!(parse_controller_urls("https://a.example.com:7700,http://b:7700").is_err());
        // Each refusal says what to write.
        for bad in [
            "http://c:7700",
            "https://:7700",
            "https://c",
            "https://0.0.0.0:7700",
        ] {
            let error = parse_controller_url(bad).unwrap_err();
            assert!(error.contains("like https://"), "{bad}: {error}");
        }
    }

    #[test]
    fn a_refused_secret_is_not_quoted() {
        assert_eq!(
            parse_secret("API_KEY=a=b").unwrap(),
            ("API_KEY".to_string(), "a=b".to_string())
        );
        for bad in ["hunter2", "1X=hunter2"] {
            let error = parse_secret(bad).unwrap_err();
            assert!(!error.contains("hunter2"), "{error}");
        }
    }

    #[test]
    fn label_changes() {
        let changes = parse_label_change("zone=b,tier-, env=prod").unwrap();
        assert_eq!(
            changes.set,
            [("zone".into(), "b".into()), ("env".into(), "prod".into())]
        );
        assert_eq!(changes.remove, ["tier"]);
        for bad in ["", ",", "Zone=b", "zone", "ti er-", "-"] {
            assert!(parse_label_change(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn batches() {
        for (text, expect) in [
            ("1", Some("1")),
            ("25", Some("25")),
            ("25%", Some("25%")),
            ("1%", Some("1%")),
            ("100%", Some("100%")),
            ("007", Some("7")),
            ("0", None),
            ("0%", None),
            ("101%", None),
            ("-1", None),
            ("%", None),
            ("", None),
            ("2.5", None),
            ("50 %", None),
            ("9999999999", None),
        ] {
            assert_eq!(parse_batch(text).ok().as_deref(), expect, "{text:?}");
        }
    }

    #[test]
    fn selectors() {
        assert_eq!(
            parse_selector("env=prod,zone=a").unwrap(),
            Selector(vec![
                ("env".into(), "prod".into()),
                ("zone".into(), "a".into())
            ])
        );
        assert!(parse_selector("").is_err());
        assert!(parse_selector("env").is_err());
        assert!(parse_selector("env=prod,env=staging").is_err());
        assert!(parse_selector("Env=prod").is_err());
    }

    #[test]
    fn env_pairs() {
        assert_eq!(
            parse_env_pair("DATABASE_URL=postgres://x?a=b").unwrap(),
            ("DATABASE_URL".into(), "postgres://x?a=b".into())
        );
        assert_eq!(
            parse_env_pair("EMPTY=").unwrap(),
            ("EMPTY".into(), "".into())
        );
        assert!(parse_env_pair("NOVALUE").is_err());
        assert!(parse_env_pair("1BAD=x").is_err());
        assert!(parse_env_pair("BAD-KEY=x").is_err());
        assert!(parse_env_pair("=x").is_err());
    }
}
