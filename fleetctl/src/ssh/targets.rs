//! What `fleetctl bootstrap` works on: `ssh://USER@HOST[:PORT]` addresses, and the targets file
//! (one host a line: the address, then optional `name=`, `advertise=`, `labels=`, `remote_dir=`).
//! Pure parsing: nothing here touches the network.

use std::fmt;
use std::path::PathBuf;
use thiserror::Error;

/// The SSH port when the address names none.
pub const DEFAULT_SSH_PORT: u16 = 22;

/// `ssh://USER@HOST:PORT`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshAddress {
    pub user: String,
    /// A host name or an IP address (IPv6 without brackets).
    pub host: String,
    pub port: u16,
}

impl fmt::Display for SshAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "ssh://{}@[{}]:{}", self.user, self.host, self.port)
        } else {
            write!(f, "ssh://{}@{}:{}", self.user, self.host, self.port)
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TargetError {
    #[error("{text:?} is not an SSH address: {why}; write it like ssh://root@10.0.0.5 or ssh://admin@web-1:2222")]
    Address { text: String, why: &'static str },
    #[error("line {line_number} of the targets file: {message}")]
    Line { line_number: usize, message: String },
}

/// Parses `ssh://[USER@]HOST[:PORT]`; the user defaults to `default_user`.
pub fn parse_ssh_address(text: &str, default_user: &str) -> Result<SshAddress, TargetError> {
    let bad = |why| TargetError::Address {
        text: text.to_string(),
        why,
    };
    let rest = text
        .trim()
        .strip_prefix("ssh://")
        .ok_or_else(|| bad("it does not start with ssh://"))?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '?', '#', ' ']) {
        return Err(bad("it has a path, a query or spaces"));
    }
    let (user, host_port) = match rest.rsplit_once('@') {
        Some((user, host_port)) => (user.to_string(), host_port),
        None => (default_user.to_string(), rest),
    };
    if user.is_empty() || user.contains([':', '@']) {
        return Err(bad("the user name is empty or holds ':' or '@'"));
    }
    let (host, port) = if let Some(bracketed) = host_port.strip_prefix('[') {
        let (host, after) = bracketed
            .split_once(']')
            .ok_or_else(|| bad("an IPv6 address lacks its closing ']'"))?;
        match after {
            "" => (host.to_string(), None),
            _ => (
                host.to_string(),
                Some(
                    after
                        .strip_prefix(':')
                        .ok_or_else(|| bad("text follows the IPv6 address"))?,
                ),
            ),
        }
    } else {
        match host_port.split_once(':') {
            Some((host, port)) => (host.to_string(), Some(port)),
            None => (host_port.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err(bad("the host is empty"));
    }
    let port = match port {
        None => DEFAULT_SSH_PORT,
        Some(port) => match port.parse::<u16>() {
            Ok(port) if port > 0 => port,
            _ => return Err(bad("the port is not a number from 1 to 65535")),
        },
    };
    Ok(SshAddress { user, host, port })
}

/// One host to bootstrap, with what the targets file or the flags said about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSpec {
    pub address: SshAddress,
    pub name: Option<String>,
    pub advertise: Option<String>,
    /// `k=v,k2=v2`, as on the command line.
    pub labels: Option<String>,
    pub remote_dir: Option<PathBuf>,
}

impl TargetSpec {
    pub fn new(address: SshAddress) -> TargetSpec {
        TargetSpec {
            address,
            name: None,
            advertise: None,
            labels: None,
            remote_dir: None,
        }
    }
}

/// Parses a targets file: one host a line, `#` comments and blank lines ignored.
pub fn parse_targets_file(text: &str, default_user: &str) -> Result<Vec<TargetSpec>, TargetError> {
    let mut targets = Vec::new();
    for (idx, line) in text.lines().enumerate() {
        let line_error = |message: String| TargetError::Line {
            line_number: idx + 1,
            message,
        };
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut fields = line.split_whitespace();
        let Some(address) = fields.next() else {
            continue;
        };
        let address =
            parse_ssh_address(address, default_user).map_err(|e| line_error(e.to_string()))?;
        let mut target = TargetSpec::new(address);
        for field in fields {
            let Some((key, value)) = field.split_once('=') else {
                return Err(line_error(format!(
                    "{field:?} is not KEY=VALUE (keys: name, advertise, labels, remote_dir)"
                )));
            };
            let slot = match key {
                "name" => &mut target.name,
                "advertise" => &mut target.advertise,
                "labels" => &mut target.labels,
                "remote_dir" | "remote-dir" => {
                    target.remote_dir = Some(PathBuf::from(value));
                    continue;
                }
                other => {
                    return Err(line_error(format!(
                        "unknown key {other:?} (keys: name, advertise, labels, remote_dir)"
                    )))
                }
            };
            *slot = Some(value.to_string());
        }
        targets.push(target);
    }
    Ok(targets)
}

/// A host name derived from an SSH host when none was given: lowercase, every character that a
/// host name cannot hold turned into '-', at most 63 characters (`10.0.0.5` -> `10-0-0-5`).
pub fn default_host_name(ssh_host: &str) -> String {
    let mapped: String = ssh_host
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = mapped.trim_matches('-');
    let mut name: String = trimmed.chars().take(63).collect();
    while name.ends_with('-') {
        name.pop();
    }
    if name.is_empty() {
        "host".to_string()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(user: &str, host: &str, port: u16) -> SshAddress {
        SshAddress {
            user: user.into(),
            host: host.into(),
            port,
        }
    }

    #[test]
    fn ssh_addresses() {
        for (text, expect) in [
            ("ssh://root@10.0.0.5", Some(address("root", "10.0.0.5", 22))),
            (
                "ssh://root@10.0.0.5:2222",
                Some(address("root", "10.0.0.5", 2222)),
            ),
            ("ssh://web-1", Some(address("me", "web-1", 22))),
            ("ssh://admin@web-1/", Some(address("admin", "web-1", 22))),
            ("ssh://a@[::1]:2200", Some(address("a", "::1", 2200))),
            ("ssh://a@[::1]", Some(address("a", "::1", 22))),
            ("root@10.0.0.5", None),
            ("ssh://", None),
            ("ssh://root@", None),
            ("ssh://@host", None),
            ("ssh://root@host:0", None),
            ("ssh://root@host:99999", None),
            ("ssh://root@host:ssh", None),
            ("ssh://root@host/path", None),
            ("ssh://a@[::1", None),
        ] {
            assert_eq!(parse_ssh_address(text, "me").ok(), expect, "{text}");
        }
        assert_eq!(
            address("a", "::1", 22).to_string(),
            "ssh://a@[::1]:22".to_string()
        );
    }

    #[test]
    fn targets_files() {
        let text = "# the web tier\n\
                    ssh://root@10.0.0.5 name=web-1 advertise=10.0.0.5 labels=env=prod,zone=a\n\
                    \n\
                    ssh://10.0.0.6:2222   remote_dir=/srv/fleet # second\n";
        let targets = parse_targets_file(text, "me").unwrap();
        assert_eq!(targets.len(), 2);
        assert_eq!(targets[0].name.as_deref(), Some("web-1"));
        assert_eq!(targets[0].labels.as_deref(), Some("env=prod,zone=a"));
        assert_eq!(targets[1].address, address("me", "10.0.0.6", 2222));
        assert_eq!(targets[1].remote_dir, Some(PathBuf::from("/srv/fleet")));
        let error = parse_targets_file("ssh://a@b\nssh://a@c colour=blue\n", "me").unwrap_err();
        assert!(
            matches!(error, TargetError::Line { line_number: 2, .. }),
            "{error}"
        );
        assert!(parse_targets_file("ssh://a@b name\n", "me").is_err());
        assert!(parse_targets_file("a@b\n", "me").is_err());
    }

    #[test]
    fn default_names() {
        for (host, expect) in [
            ("10.0.0.5", "10-0-0-5"),
            ("Web-1.example.com", "web-1-example-com"),
            ("::1", "1"),
            ("...", "host"),
        ] {
            assert_eq!(default_host_name(host), expect);
            fleet_proto::names::check_host(expect).unwrap();
        }
    }
}
