//! The known_hosts file of `fleetctl bootstrap`: which host keys are trusted for which host, and
//! recording a first-time key when the operator asked for it (`--accept-new-host-key`).
//!
//! It reads the OpenSSH format (plain, `[host]:port`, comma lists, `*`/`?` wildcards, `!`
//! negations, hashed `|1|salt|hash` names, `@revoked` and `@cert-authority` markers) and fails
//! closed: a file that exists but cannot be read, a host with recorded keys none of which is the
//! presented one (whatever their type), and a revoked key are all refusals. russh's own
//! `check_known_hosts_path` treats an unreadable file as empty and a recorded key of another
//! type as unknown, which would let `--accept-new-host-key` add a second key for a known host;
//! this module does not.

use ring::hmac;
use russh::keys::{Algorithm, HashAlg, PublicKey};
use std::io::Write;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// What the known_hosts file says about a presented host key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A line for this host records exactly this key.
    Known { line_number: usize },
    /// No line names this host.
    Unknown,
}

/// Why a host key was refused, or the file could not be used.
#[derive(Debug, Error)]
pub enum HostKeyError {
    #[error(
        "the host key of {host_name} is unknown: it presented {algorithm} key {fingerprint}, \
         which {path} does not record; check the fingerprint (on the host: ssh-keygen -lf \
         /etc/ssh/ssh_host_{short_algorithm}_key.pub) and pass --accept-new-host-key to record it"
    )]
    Unknown {
        host_name: String,
        algorithm: String,
        short_algorithm: String,
        fingerprint: String,
        path: PathBuf,
    },
    #[error(
        "the host key of {host_name} has CHANGED: it presented {algorithm} key {fingerprint}, \
         but {path} line {line_number} records another key for it ({recorded_line}); someone may \
         be intercepting the connection, or the host was reinstalled: check, and if it was \
         reinstalled remove that line (ssh-keygen -R '{host_name}' -f {path})"
    )]
    Changed {
        host_name: String,
        algorithm: String,
        fingerprint: String,
        path: PathBuf,
        line_number: usize,
        recorded_line: String,
    },
    #[error(
        "the host key of {host_name} is revoked: it presented {algorithm} key {fingerprint}, \
         which {path} line {line_number} marks @revoked; refusing to connect"
    )]
    Revoked {
        host_name: String,
        algorithm: String,
        fingerprint: String,
        path: PathBuf,
        line_number: usize,
    },
    #[error("cannot read the known_hosts file {path}: {source}; fix its permissions or pass --known-hosts FILE")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot record the host key of {host_name} in {path}: {source}")]
    Write {
        host_name: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The name a host goes by in known_hosts: `host` on port 22, `[host]:port` otherwise.
pub fn host_name_in_file(host: &str, port: u16) -> String {
    let host = host.to_ascii_lowercase();
    if port == 22 {
        host
    } else {
        format!("[{host}]:{port}")
    }
}

/// `SHA256:…`, the fingerprint OpenSSH shows.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// One line of the file that names the host.
#[derive(Debug)]
struct MatchingLine {
    line_number: usize,
    marker: Option<String>,
    /// None when the key does not parse (an unknown type): it still counts as a recorded key.
    key: Option<PublicKey>,
    text: String,
}

/// Reads the file (a missing file is an empty one) and returns the lines that name the host.
fn matching_lines(path: &Path, host_name: &str) -> Result<Vec<MatchingLine>, HostKeyError> {
    let text = match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(HostKeyError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let mut found = Vec::new();
    for (idx, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let mut fields = trimmed.split_whitespace();
        let Some(mut first) = fields.next() else {
            continue;
        };
        let mut marker = None;
        if first.starts_with('@') {
            marker = Some(first.to_string());
            let Some(next) = fields.next() else {
                continue;
            };
            first = next;
        }
        let (Some(_key_type), Some(base64)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !patterns_match(first, host_name) {
            continue;
        }
        found.push(MatchingLine {
            line_number: idx + 1,
            marker,
            key: russh::keys::parse_public_key_base64(base64).ok(),
            text: shorten(trimmed),
        });
    }
    Ok(found)
}

/// A known_hosts line as shown in a message: the key material cut short.
fn shorten(line: &str) -> String {
    if line.len() <= 80 {
        return line.to_string();
    }
    let cut = (0..=77)
        .rev()
        .find(|i| line.is_char_boundary(*i))
        .unwrap_or(0);
    format!("{}...", &line[..cut])
}

fn same_key(a: &PublicKey, b: &PublicKey) -> bool {
    a.key_data() == b.key_data()
}

/// Checks the key `host:port` presented against the file at `path`.
pub fn check(
    path: &Path,
    host: &str,
    port: u16,
    presented: &PublicKey,
) -> Result<Verdict, HostKeyError> {
    let host_name = host_name_in_file(host, port);
    let lines = matching_lines(path, &host_name)?;
    let algorithm = presented.algorithm().to_string();
    let fingerprint = fingerprint(presented);
    for line in &lines {
        if line.marker.as_deref() == Some("@revoked")
            && line.key.as_ref().is_some_and(|k| same_key(k, presented))
        {
            return Err(HostKeyError::Revoked {
                host_name,
                algorithm,
                fingerprint,
                path: path.to_path_buf(),
                line_number: line.line_number,
            });
        }
    }
    // Host certificates are not used: @cert-authority lines neither trust nor count as keys.
    let plain: Vec<&MatchingLine> = lines.iter().filter(|l| l.marker.is_none()).collect();
    if let Some(line) = plain
        .iter()
        .find(|l| l.key.as_ref().is_some_and(|k| same_key(k, presented)))
    {
        return Ok(Verdict::Known {
            line_number: line.line_number,
        });
    }
    if let Some(line) = plain.first() {
        return Err(HostKeyError::Changed {
            host_name,
            algorithm,
            fingerprint,
            path: path.to_path_buf(),
            line_number: line.line_number,
            recorded_line: line.text.clone(),
        });
    }
    Ok(Verdict::Unknown)
}

/// The key algorithms the file records for the host, in file order, so that the SSH handshake
/// asks the server for a key type that can be checked (as OpenSSH does). Empty when unknown.
pub fn recorded_algorithms(
    path: &Path,
    host: &str,
    port: u16,
) -> Result<Vec<Algorithm>, HostKeyError> {
    let host_name = host_name_in_file(host, port);
    let mut algorithms: Vec<Algorithm> = Vec::new();
    for line in matching_lines(path, &host_name)? {
        if line.marker.is_some() {
            continue;
        }
        let Some(key) = line.key else { continue };
        let recorded = key.algorithm();
        let expanded = if recorded.clone().is_rsa() {
            vec![
                Algorithm::Rsa {
                    hash: Some(HashAlg::Sha512),
                },
                Algorithm::Rsa {
                    hash: Some(HashAlg::Sha256),
                },
            ]
        } else {
            vec![recorded]
        };
        for algorithm in expanded {
            if !algorithms.contains(&algorithm) {
                algorithms.push(algorithm);
            }
        }
    }
    Ok(algorithms)
}

/// Appends `host_name keytype base64` to the file (created 0600, its directory 0700).
pub fn record(path: &Path, host: &str, port: u16, key: &PublicKey) -> Result<(), HostKeyError> {
    let host_name = host_name_in_file(host, port);
    let write_error = |source| HostKeyError::Write {
        host_name: host_name.clone(),
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(write_error)?;
        }
    }
    let existing = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(write_error(e)),
    };
    let key_text = key
        .to_openssh()
        .map_err(|e| write_error(std::io::Error::other(e)))?;
    // Only the type and the base64 blob: no comment.
    let mut key_fields = key_text.split_whitespace();
    let (Some(key_type), Some(base64)) = (key_fields.next(), key_fields.next()) else {
        return Err(write_error(std::io::Error::other(
            "the key has no OpenSSH form",
        )));
    };
    let mut line = String::new();
    if !existing.is_empty() && !existing.ends_with(b"\n") {
        line.push('\n');
    }
    line.push_str(&format!("{host_name} {key_type} {base64}\n"));
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(write_error)?;
    file.write_all(line.as_bytes()).map_err(write_error)?;
    file.sync_all().map_err(write_error)
}

/// Whether a comma-separated pattern list names `host_name`: at least one positive pattern
/// matches and no negated one does.
fn patterns_match(patterns: &str, host_name: &str) -> bool {
    let mut matched = false;
    for pattern in patterns.split(',') {
        if let Some(hashed) = pattern.strip_prefix("|1|") {
            if hashed_matches(hashed, host_name) {
                matched = true;
            }
            continue;
        }
        let (negated, pattern) = match pattern.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, pattern),
        };
        if glob_match(&pattern.to_ascii_lowercase(), host_name) {
            if negated {
                return false;
            }
            matched = true;
        }
    }
    matched
}

/// `salt|hash` (both base64): HMAC-SHA1(salt, host_name) == hash.
fn hashed_matches(salt_and_hash: &str, host_name: &str) -> bool {
    let Some((salt, hash)) = salt_and_hash.split_once('|') else {
        return false;
    };
    let (Some(salt), Some(hash)) = (base64_decode(salt), base64_decode(hash)) else {
        return false;
    };
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &salt);
    hmac::verify(&key, host_name.as_bytes(), &hash).is_ok()
}

/// Standard base64 with padding, as known_hosts writes it.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let bytes = text.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0u32;
    for &c in bytes {
        acc = (acc << 6) | value(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// `*` and `?` wildcards, as in OpenSSH host patterns.
fn glob_match(pattern: &str, text: &str) -> bool {
    let pattern = pattern.as_bytes();
    let text = text.as_bytes();
    let (mut p, mut t) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    // Bounded: each step advances t or moves back to the last star with t advanced.
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((star_p, star_t)) = star {
            p = star_p + 1;
            t = star_t + 1;
            star = Some((star_p, star_t + 1));
        } else {
            return false;
        }
    }
    while p < pattern.len() && pattern[p] == b'*' {
        p += 1;
    }
    p == pattern.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use russh::keys::ssh_key::private::{Ed25519Keypair, PrivateKey};

    fn key(seed: u8) -> PublicKey {
        PrivateKey::from(Ed25519Keypair::from_seed(&[seed; 32]))
            .public_key()
            .clone()
    }

    fn line(host: &str, key: &PublicKey) -> String {
        let text = key.to_openssh().unwrap();
        let mut fields = text.split_whitespace();
        format!(
            "{host} {} {}\n",
            fields.next().unwrap(),
            fields.next().unwrap()
        )
    }

    #[test]
    fn names_and_patterns() {
        assert_eq!(host_name_in_file("Example.COM", 22), "example.com");
        assert_eq!(host_name_in_file("127.0.0.1", 2222), "[127.0.0.1]:2222");
        for (patterns, name, expect) in [
            ("a.example", "a.example", true),
            ("b.example,a.example", "a.example", true),
            ("*.example", "a.example", true),
            ("*.example,!a.example", "a.example", false),
            ("a.exampl?", "a.example", true),
            ("a.example", "[a.example]:2222", false),
            ("[127.0.0.1]:2222", "[127.0.0.1]:2222", true),
            ("[127.0.0.1]:*", "[127.0.0.1]:2222", true),
            ("A.EXAMPLE", "a.example", true),
            ("*", "anything", true),
            ("", "a", false),
        ] {
            assert_eq!(
                patterns_match(patterns, name),
                expect,
                "{patterns} vs {name}"
            );
        }
    }

    #[test]
    fn hashed_names_match() {
        // What `ssh-keygen -H` writes for "[127.0.0.1]:2222", with a salt of twenty 0x01 bytes.
        let salt = [1u8; 20];
        let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &salt);
        let tag = hmac::sign(&key, b"[127.0.0.1]:2222");
        let salt_b64 = base64_encode(&salt);
        let hash_b64 = base64_encode(tag.as_ref());
        let pattern = format!("|1|{salt_b64}|{hash_b64}");
        assert!(patterns_match(&pattern, "[127.0.0.1]:2222"));
        assert!(!patterns_match(&pattern, "[127.0.0.1]:2223"));
    }

    fn base64_encode(bytes: &[u8]) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    #[test]
    fn base64_round_trips() {
        for len in 0..10 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 5) as u8).collect();
            assert_eq!(base64_decode(&base64_encode(&bytes)).unwrap(), bytes);
        }
    }

    #[test]
    fn unknown_known_changed_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ssh").join("known_hosts");
        let (ours, other) = (key(1), key(2));

        assert_eq!(
            check(&path, "127.0.0.1", 2222, &ours).unwrap(),
            Verdict::Unknown
        );
        record(&path, "127.0.0.1", 2222, &ours).unwrap();
        assert_eq!(
            check(&path, "127.0.0.1", 2222, &ours).unwrap(),
            Verdict::Known { line_number: 1 }
        );
        // Another port is another host.
        assert_eq!(
            check(&path, "127.0.0.1", 2223, &other).unwrap(),
            Verdict::Unknown
        );

        let changed = check(&path, "127.0.0.1", 2222, &other).unwrap_err();
        let message = changed.to_string();
        assert!(matches!(
            changed,
            HostKeyError::Changed { line_number: 1, .. }
        ));
        assert!(message.contains(&fingerprint(&other)), "{message}");
        assert!(message.contains("line 1"), "{message}");

        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(&format!("@revoked {}", line("*", &other)));
        text.push_str(&line("[127.0.0.1]:2224", &other));
        std::fs::write(&path, text).unwrap();
        assert!(matches!(
            check(&path, "127.0.0.1", 2224, &other).unwrap_err(),
            HostKeyError::Revoked { line_number: 2, .. }
        ));
        assert_eq!(
            recorded_algorithms(&path, "127.0.0.1", 2222).unwrap(),
            vec![Algorithm::Ed25519]
        );
        assert!(recorded_algorithms(&path, "127.0.0.1", 2299)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn a_line_without_newline_is_kept_apart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("known_hosts");
        std::fs::write(&path, line("a.example", &key(3)).trim_end()).unwrap();
        record(&path, "b.example", 22, &key(4)).unwrap();
        assert_eq!(
            check(&path, "a.example", 22, &key(3)).unwrap(),
            Verdict::Known { line_number: 1 }
        );
        assert_eq!(
            check(&path, "b.example", 22, &key(4)).unwrap(),
            Verdict::Known { line_number: 2 }
        );
    }

    #[test]
    fn an_unreadable_file_is_a_refusal() {
        let dir = tempfile::tempdir().unwrap();
        // A directory cannot be read as a file.
        assert!(matches!(
            check(dir.path(), "a.example", 22, &key(1)).unwrap_err(),
            HostKeyError::Read { .. }
        ));
    }
}
