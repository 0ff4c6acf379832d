//! The agent's identity: its key, its certificate (CN = the host name, role agent, signed by
//! the fleet CA) and the fleet CA, kept in `DATA/tls/` (`agent.key`, `agent.pem`, `ca.pem`,
//! each mode 0600). On the first start there are none: the agent makes its own key (it never
//! leaves the host), sends a certificate request with the one-time join token over TLS (the
//! controller verified against `--ca`, no client certificate yet) and writes what it got
//! back. Later starts use the files and need no token. This is also the one place that sets
//! up TLS to the controller, for the session and for fetches alike.

use crate::config::Config;
use crate::controllers::{Failure, Target};
use fleet_proto::pb;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use thiserror::Error;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// How long the agent keeps trying to reach the controller to join before giving up.
const JOIN_DEADLINE: Duration = Duration::from_secs(60);
/// How long one join attempt may take.
const JOIN_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

pub const TLS_DIR: &str = "tls";
pub const KEY_FILE: &str = "agent.key";
pub const CERT_FILE: &str = "agent.pem";
pub const CA_FILE: &str = "ca.pem";
/// A renewed key and certificate, complete, before they take the place of `agent.key` and
/// `agent.pem` (see [`keep_renewed`]).
pub const RENEWED_KEY_FILE: &str = "agent.key.renewed";
pub const RENEWED_CERT_FILE: &str = "agent.pem.renewed";

#[derive(Debug, Error)]
pub enum JoinError {
    #[error("this host has no certificate yet: start it once with --join-token TOKEN (from `fleetctl join-token create`) and --ca FILE (the fleet's ca.pem)")]
    NoToken,
    #[error("joining needs the fleet CA to verify the controller: pass --ca FILE (the ca.pem `fleetctl init` wrote)")]
    NoCa,
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the certificate in {path} is for host `{found}`, not `{expected}`: use another data directory for another host name")]
    WrongHost {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("cannot make a key: {0}")]
    Key(String),
    #[error("the controller refused to let this host join: {0}")]
    Refused(String),
    #[error("cannot reach the controller at {url} to join: {message}")]
    Unreachable { url: String, message: String },
}

/// The agent's TLS material, all PEM.
#[derive(Clone)]
pub struct Credentials {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").finish_non_exhaustive()
    }
}

/// The client TLS config every connection to the controller uses: the controller verified
/// against the fleet CA as `fleet-controller`, and this host's certificate presented.
pub fn client_tls(credentials: &Credentials) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&credentials.ca_pem))
        .domain_name(fleet_pki::CONTROLLER_TLS_NAME)
        .identity(Identity::from_pem(
            &credentials.cert_pem,
            &credentials.key_pem,
        ))
}

/// Returns this host's credentials from `DATA/tls`, joining with the token first when there
/// are none.
pub async fn ensure_credentials(
    config: &Config,
    data_dir: &Path,
) -> Result<Credentials, JoinError> {
    let dir = data_dir.join(TLS_DIR);
    let key_path = dir.join(KEY_FILE);
    let cert_path = dir.join(CERT_FILE);
    finish_renewal(&dir)?;
    if key_path.is_file() && cert_path.is_file() {
        // The CA bundle kept here is the one the controller sent last (a CA rotation changes
        // it); `--ca` is for joining, and for a data directory that has none.
        let kept_ca = dir.join(CA_FILE);
        let ca_path = if kept_ca.is_file() {
            kept_ca
        } else {
            config.ca.clone().unwrap_or(kept_ca)
        };
        let credentials = Credentials {
            ca_pem: read(&ca_path)?,
            cert_pem: read(&cert_path)?,
            key_pem: read(&key_path)?,
        };
        let found =
            fleet_pki::identity::common_name_of_pem(&credentials.cert_pem).unwrap_or_default();
        if found != config.host_name {
            return Err(JoinError::WrongHost {
                path: cert_path,
                found,
                expected: config.host_name.clone(),
            });
        }
        if config.join_token.is_some() {
            tracing::info!("this host already joined; the join token is not needed any more");
        }
        return Ok(credentials);
    }
    let token = config.join_token.as_deref().ok_or(JoinError::NoToken)?;
    let ca_path = config.ca.as_deref().ok_or(JoinError::NoCa)?;
    let ca_pem = read(ca_path)?;
    // The key is kept before the join: an agent that dies before the answer comes (or whose
    // answer is lost) asks again with the same key, which the controller answers again.
    let key_pem = if key_path.is_file() {
        read(&key_path)?
    } else {
        let key_pem = fleet_pki::request::new_key().map_err(|e| JoinError::Key(e.to_string()))?;
        create_private_dir(&dir)?;
        write_private(&key_path, &key_pem)?;
        key_pem
    };
    let csr_pem = fleet_pki::request::request_for(&config.host_name, &key_pem)
        .map_err(|e| JoinError::Key(e.to_string()))?;
    let response = join(
        &config.controllers,
        &ca_pem,
        token,
        &config.host_name,
        csr_pem,
    )
    .await?;

    write_private(&dir.join(CA_FILE), &ca_pem)?;
    // The certificate last: both files present means the join is complete.
    write_private(&cert_path, &response.certificate_pem)?;
    tracing::info!(host = %config.host_name, "joined the fleet; certificate kept in {}", dir.display());
    Ok(Credentials {
        ca_pem,
        cert_pem: response.certificate_pem,
        key_pem,
    })
}

/// Calls `Join` on each controller of `urls` in turn (on the leader first when one sends the
/// agent there), retrying while none can be reached (they may still be starting), failing at
/// once when one refuses.
async fn join(
    urls: &[String],
    ca_pem: &str,
    token: &str,
    host: &str,
    csr_pem: String,
) -> Result<pb::JoinResponse, JoinError> {
    let unreachable = |url: &str, message: String| JoinError::Unreachable {
        url: url.to_string(),
        message,
    };
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(fleet_pki::CONTROLLER_TLS_NAME);
    let request = pb::JoinRequest {
        token: token.to_string(),
        host_name: host.to_string(),
        csr_pem,
    };
    let started = Instant::now();
    let mut backoff = Duration::from_millis(200);
    let mut target = Target::Listed(0);
    // The last failure of each controller tried, for the error when none answers.
    let mut failures: Vec<(String, String)> = Vec::new();
    loop {
        let url = match &target {
            Target::Listed(idx) => urls.get(*idx).cloned().unwrap_or_default(),
            Target::Leader { url, .. } => url.clone(),
        };
        // Err((retry, failure, message)): retry when the controller could not be reached.
        let attempt = async {
            let endpoint = Endpoint::from_shared(url.clone())
                .map_err(|e| (true, Failure::Lost, e.to_string()))?
                .tls_config(tls.clone())
                .map_err(|e| (true, Failure::Lost, e.to_string()))?
                .connect_timeout(Duration::from_secs(3))
                .tcp_nodelay(true)
                .timeout(JOIN_ATTEMPT_TIMEOUT);
            let channel: Channel = endpoint.connect().await.map_err(|e| {
                (
                    true,
                    Failure::Lost,
                    fleet_proto::error_text::with_sources(&e),
                )
            })?;
            pb::agent_service_client::AgentServiceClient::new(channel)
                .join(request.clone())
                .await
                .map(|r| r.into_inner())
                .map_err(|status| {
                    let failure = match fleet_proto::leader::leader_of(&status) {
                        Some(leader) => Failure::NotLeader(Some(leader)),
                        None => Failure::Lost,
                    };
                    (
                        retried(status.code()),
                        failure,
                        status.message().to_string(),
                    )
                })
        };
        match attempt.await {
            Ok(response) => return Ok(response),
            Err((false, _, message)) => return Err(JoinError::Refused(message)),
            Err((true, failure, message)) => {
                failures.retain(|(tried, _)| tried != &url);
                failures.push((url.clone(), message.clone()));
                if started.elapsed() >= JOIN_DEADLINE {
                    return Err(match failures.as_slice() {
                        [(url, message)] => unreachable(url, message.clone()),
                        _ => unreachable(
                            &urls.join(","),
                            failures
                                .iter()
                                .map(|(url, message)| format!("{url}: {message}"))
                                .collect::<Vec<_>>()
                                .join("; "),
                        ),
                    });
                }
                tracing::warn!(
                    "cannot join through the controller at {url} yet, retrying: {message}"
                );
                target = crate::controllers::next(urls, &target, &failure);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Whether a join that ended with `code` is tried again. The controller pushes back on a crowd
/// of joins by saying `UNAVAILABLE` (too many at once) and, at its edge, by closing connections
/// past its limits right after the handshake, which the call sees as `CANCELLED` or `UNKNOWN`
/// (a transport error): all of those are retried, so 10,000 hosts joining at once all join.
/// A refusal (a bad token, a taken host name) is not. Pure.
fn retried(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::Unknown
            | tonic::Code::ResourceExhausted
    )
}

/// Keeps renewed credentials in `DATA/tls`: the CA bundle, then the new key and certificate
/// beside the old ones, then each renamed into place, the key first. A crash before the
/// certificate is complete leaves the old pair; after it, [`finish_renewal`] completes the
/// renames at the next start.
pub fn keep_renewed(data_dir: &Path, credentials: &Credentials) -> Result<(), JoinError> {
    let dir = data_dir.join(TLS_DIR);
    write_private(&dir.join(CA_FILE), &credentials.ca_pem)?;
    write_private(&dir.join(RENEWED_KEY_FILE), &credentials.key_pem)?;
    write_private(&dir.join(RENEWED_CERT_FILE), &credentials.cert_pem)?;
    finish_renewal(&dir)
}

/// Moves a complete renewed pair into place (both files, or the certificate alone when the
/// key was moved before a crash); a renewed key without its certificate is dropped.
fn finish_renewal(dir: &Path) -> Result<(), JoinError> {
    let rename = |from: &str, to: &str| {
        std::fs::rename(dir.join(from), dir.join(to)).map_err(|source| JoinError::Write {
            path: dir.join(to),
            source,
        })
    };
    let renewed_key = dir.join(RENEWED_KEY_FILE);
    if dir.join(RENEWED_CERT_FILE).is_file() {
        if renewed_key.is_file() {
            rename(RENEWED_KEY_FILE, KEY_FILE)?;
        }
        rename(RENEWED_CERT_FILE, CERT_FILE)?;
    } else if renewed_key.is_file() {
        let _ = std::fs::remove_file(&renewed_key);
    }
    Ok(())
}

fn read(path: &Path) -> Result<String, JoinError> {
    std::fs::read_to_string(path).map_err(|source| JoinError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn create_private_dir(dir: &Path) -> Result<(), JoinError> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(JoinError::Write {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// Writes a file with mode 0600 through a temporary file and a rename.
fn write_private(path: &Path, text: &str) -> Result<(), JoinError> {
    fleet_pki::files::write_private_atomically(path, text).map_err(|source| JoinError::Write {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_pressure_is_retried_and_refusals_are_not() {
        use tonic::Code;
        let table = [
            (Code::Unavailable, true),
            (Code::DeadlineExceeded, true),
            (Code::Cancelled, true),
            (Code::Unknown, true),
            (Code::ResourceExhausted, true),
            (Code::PermissionDenied, false),
            (Code::FailedPrecondition, false),
            (Code::InvalidArgument, false),
            (Code::Unauthenticated, false),
        ];
        for (code, expected) in table {
            assert_eq!(retried(code), expected, "{code:?}");
        }
    }

    #[test]
    fn a_renewal_cut_at_any_point_leaves_a_matching_pair() {
        let read = |dir: &Path, name: &str| std::fs::read_to_string(dir.join(name)).ok();
        // (renewed key written, renewed cert written, key already renamed) -> which pair is kept
        for (key_written, cert_written, key_moved, expect_new) in [
            (false, false, false, false),
            (true, false, false, false),
            (true, true, false, true),
            (true, true, true, true),
        ] {
            let data = tempfile::tempdir().unwrap();
            let dir = data.path().join(TLS_DIR);
            create_private_dir(&dir).unwrap();
            write_private(&dir.join(KEY_FILE), "old key").unwrap();
            write_private(&dir.join(CERT_FILE), "old cert").unwrap();
            if key_written {
                write_private(&dir.join(RENEWED_KEY_FILE), "new key").unwrap();
            }
            if cert_written {
                write_private(&dir.join(RENEWED_CERT_FILE), "new cert").unwrap();
            }
            if key_moved {
                std::fs::rename(dir.join(RENEWED_KEY_FILE), dir.join(KEY_FILE)).unwrap();
            }
            finish_renewal(&dir).unwrap();
            let pair = (
                read(&dir, KEY_FILE).unwrap(),
                read(&dir, CERT_FILE).unwrap(),
            );
            let expected = if expect_new {
                ("new key".to_string(), "new cert".to_string())
            } else {
                ("old key".to_string(), "old cert".to_string())
            };
            assert_eq!(pair, expected, "{key_written} {cert_written} {key_moved}");
            assert!(
                read(&dir, RENEWED_KEY_FILE).is_none() && read(&dir, RENEWED_CERT_FILE).is_none()
            );
        }
        let data = tempfile::tempdir().unwrap();
        create_private_dir(&data.path().join(TLS_DIR)).unwrap();
        keep_renewed(
            data.path(),
            &Credentials {
                ca_pem: "ca".into(),
                cert_pem: "cert".into(),
                key_pem: "key".into(),
            },
        )
        .unwrap();
        let dir = data.path().join(TLS_DIR);
        assert_eq!(read(&dir, CA_FILE).as_deref(), Some("ca"));
        assert_eq!(read(&dir, CERT_FILE).as_deref(), Some("cert"));
        assert_eq!(read(&dir, KEY_FILE).as_deref(), Some("key"));
    }

    #[test]
    fn private_files_are_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        write_private(&path, "secret").unwrap();
        write_private(&path, "secret2").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "secret2");
    }
}
