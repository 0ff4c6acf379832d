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

#[cfg(test)]
mod tests {
    use super::*;

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
