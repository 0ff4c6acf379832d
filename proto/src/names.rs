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

/// Natural order of names: runs of digits compare as numbers, so `web-2` comes before
/// `web-10`; everything else compares byte by byte. Names equal but for leading zeros
/// (`web-02`, `web-2`) fall back to plain order, so the order is total. Every list of hosts
/// (hosts, status, history, a rollout's waves) is sorted with it.
pub fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    let (a_bytes, b_bytes) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    while i < a_bytes.len() && j < b_bytes.len() {
        if a_bytes[i].is_ascii_digit() && b_bytes[j].is_ascii_digit() {
            let a_end = i + a_bytes[i..]
                .iter()
                .take_while(|c| c.is_ascii_digit())
                .count();
            let b_end = j + b_bytes[j..]
                .iter()
                .take_while(|c| c.is_ascii_digit())
                .count();
            // Without leading zeros, a longer run of digits is a larger number.
            let a_digits = a[i..a_end].trim_start_matches('0');
            let b_digits = b[j..b_end].trim_start_matches('0');
            let order = a_digits
                .len()
                .cmp(&b_digits.len())
                .then_with(|| a_digits.cmp(b_digits));
            if order != Ordering::Equal {
                return order;
            }
            (i, j) = (a_end, b_end);
        } else {
            if a_bytes[i] != b_bytes[j] {
                return a_bytes[i].cmp(&b_bytes[j]);
            }
            i += 1;
            j += 1;
        }
    }
    (a_bytes.len() - i)
        .cmp(&(b_bytes.len() - j))
        .then_with(|| a.cmp(b))
}

/// Sorts names in [`natural_cmp`] order.
pub fn sort_naturally<T: AsRef<str>>(names: &mut [T]) {
    names.sort_by(|a, b| natural_cmp(a.as_ref(), b.as_ref()));
}

#[cfg(test)]
mod tests {
    #[test]
    fn natural_order() {
        use std::cmp::Ordering::{Equal, Greater, Less};
        for (a, b, expect) in [
            ("web-2", "web-10", Less),
            ("web-10", "web-2", Greater),
            ("web-2", "web-2", Equal),
            ("web-9", "web-10", Less),
            ("web", "web-1", Less),
            ("web-1", "web-1a", Less),
            ("web-1a", "web-2", Less),
            ("db-10", "web-2", Less),
            ("a2b10", "a2b9", Greater),
            ("a10b1", "a9b9", Greater),
            ("web-02", "web-2", Less),
            ("web-002", "web-02", Less),
            ("web-007", "web-10", Less),
            ("h1", "h01", Greater),
            ("", "a", Less),
            ("1", "", Greater),
            ("99999999999999999999999", "100000000000000000000000", Less),
            ("10.0.0.2", "10.0.0.10", Less),
        ] {
            assert_eq!(super::natural_cmp(a, b), expect, "{a} vs {b}");
        }
        let mut hosts = vec!["web-10", "web-2", "db-1", "web-1", "web-20", "web-3"];
        super::sort_naturally(&mut hosts);
        assert_eq!(
            hosts,
            ["db-1", "web-1", "web-2", "web-3", "web-10", "web-20"]
        );
    }

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
