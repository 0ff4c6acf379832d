//! Name rules: app and host names are `[a-z0-9][a-z0-9-]*` (at most 63 characters), versions
//! are `[0-9A-Za-z.+_-]` (at most 128), label keys and values are short and printable. Every
//! name that arrives from a user, a host or the network passes through here before it is used
//! as a key or a path component.

use thiserror::Error;

/// How many characters of a refused input an error message quotes.
pub const QUOTED_CHARS: usize = 64;

/// `text` quoted for an error message, at most [`QUOTED_CHARS`] characters of it: an error
/// says what was refused without echoing a huge input back (which would also overflow gRPC's
/// metadata limit and hide the message behind `RESOURCE_EXHAUSTED`).
pub fn quoted(text: &str) -> String {
    match text.char_indices().nth(QUOTED_CHARS) {
        None => format!("{text:?}"),
        Some((cut, _)) => format!("{:?}... ({} bytes)", &text[..cut], text.len()),
    }
}

/// The errors hold the refused input already [`quoted`].
#[derive(Debug, Error, PartialEq, Eq)]
pub enum NameError {
    #[error("{kind} name {name} is invalid: use lowercase letters, digits and '-', starting with a letter or digit, at most 63 characters")]
    BadName { kind: &'static str, name: String },
    #[error("version {0} is invalid: use letters, digits and '.', '+', '_', '-', at most 128 characters, not starting with '.'")]
    BadVersion(String),
    #[error("label {0} is invalid: write labels as key=value, keys like names, values of letters, digits and '.', '_', '-' (at most 63)")]
    BadLabel(String),
}

/// Checks an app name.
pub fn check_app(name: &str) -> Result<(), NameError> {
    check_dns_name("app", name)
}

/// Checks a host name.
pub fn check_host(name: &str) -> Result<(), NameError> {
    check_dns_name("host", name)
}

fn check_dns_name(kind: &'static str, name: &str) -> Result<(), NameError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(NameError::BadName {
            kind,
            name: quoted(name),
        })
    }
}

/// Checks a release version. A version is also a path component on hosts, so `.` and `..`
/// (and anything starting with a dot) are refused.
pub fn check_version(version: &str) -> Result<(), NameError> {
    let ok = !version.is_empty()
        && version.len() <= 128
        && !version.starts_with('.')
        && version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(NameError::BadVersion(quoted(version)))
    }
}

/// Parses `k=v,k2=v2` into pairs, checking each key and value.
pub fn parse_labels(text: &str) -> Result<Vec<(String, String)>, NameError> {
    let mut labels = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| NameError::BadLabel(quoted(part)))?;
        check_label(key, value)?;
        labels.push((key.to_string(), value.to_string()));
    }
    Ok(labels)
}

/// Labels (or a selector) as `k=v,k2=v2`, sorted by key: the one text form, the reverse of
/// [`parse_labels`].
pub fn format_labels<'a>(pairs: impl IntoIterator<Item = (&'a String, &'a String)>) -> String {
    let mut pairs: Vec<_> = pairs.into_iter().collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Checks one label pair.
pub fn check_label(key: &str, value: &str) -> Result<(), NameError> {
    let key_ok = check_dns_name("label", key).is_ok();
    let value_ok = value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if key_ok && value_ok {
        Ok(())
    } else {
        Err(NameError::BadLabel(quoted(&format!("{key}={value}"))))
    }
}

/// Checks an environment variable name given with `--env KEY=VALUE`.
pub fn check_env_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 128
        && !key.as_bytes()[0].is_ascii_digit()
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_quote_a_bounded_prefix_of_what_they_refuse() {
        assert_eq!(quoted("web"), "\"web\"");
        let huge = "x".repeat(10_000);
        let text = check_label("zone", &huge).unwrap_err().to_string();
        assert!(text.len() < 300, "{text}");
        assert!(text.contains("(10005 bytes)"), "{text}");
        let text = check_app(&"é".repeat(5_000)).unwrap_err().to_string();
        assert!(text.len() < 400, "{text}");
        assert!(check_version(&"v".repeat(1 << 20))
            .unwrap_err()
            .to_string()
            .contains("(1048576 bytes)"));
    }

    #[test]
    fn names() {
        for (name, ok) in [
            ("web", true),
            ("web-1", true),
            ("1web", true),
            ("", false),
            ("-web", false),
            ("Web", false),
            ("we_b", false),
            ("../etc", false),
            (&"a".repeat(63), true),
            (&"a".repeat(64), false),
        ] {
            assert_eq!(check_app(name).is_ok(), ok, "{name:?}");
        }
    }

    #[test]
    fn versions() {
        for (version, ok) in [
            ("1.4.2", true),
            ("1.4.2+build_7-rc1", true),
            ("", false),
            (".", false),
            ("..", false),
            ("1/2", false),
            ("1 2", false),
            (&"1".repeat(128), true),
            (&"1".repeat(129), false),
        ] {
            assert_eq!(check_version(version).is_ok(), ok, "{version:?}");
        }
    }

    #[test]
    fn labels() {
        assert_eq!(
            parse_labels("env=prod, zone=a-1").unwrap(),
            vec![
                ("env".to_string(), "prod".to_string()),
                ("zone".to_string(), "a-1".to_string())
            ]
        );
        assert!(parse_labels("env").is_err());
        assert!(parse_labels("env=a b").is_err());
        assert!(parse_labels("").unwrap().is_empty());
    }
}
