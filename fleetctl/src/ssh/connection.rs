//! One SSH connection for `fleetctl bootstrap`, through russh: connect, check the host key
//! against known_hosts (fail closed; see [`known_hosts`]), authenticate with a key file or
//! ssh-agent, and run commands with bytes on their stdin.
//!
//! The server's key is checked inside the handshake, before any credential is sent: a refused
//! key ends the connection with the refusal as its error.

use crate::ssh::known_hosts::{self, HostKeyError, Verdict};
use crate::ssh::pacing::{self, Pacer, WindowNews};
use crate::ssh::targets::SshAddress;
use russh::client::{AuthResult, Handle};
use russh::keys::agent::client::AgentClient;
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg};
use russh::ChannelMsg;
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;

/// How the known_hosts file is used.
#[derive(Debug, Clone)]
pub struct HostKeyPolicy {
    pub known_hosts: PathBuf,
    /// Record the key of a host the file does not know (never replaces a known one).
    pub accept_new: bool,
}

/// Where the credential comes from.
#[derive(Debug, Clone)]
pub enum Credential {
    /// A private key file (OpenSSH or PEM); encrypted keys belong in ssh-agent.
    KeyFile(PathBuf),
    /// Every identity ssh-agent at `SSH_AUTH_SOCK` offers.
    Agent,
}

/// Every way the SSH part can fail.
#[derive(Debug, Error)]
pub enum SshError {
    #[error(transparent)]
    HostKey(#[from] HostKeyError),
    #[error("cannot connect to {address}: {source}")]
    Connect {
        address: String,
        source: std::io::Error,
    },
    #[error("no SSH answer from {address} within {seconds}s")]
    ConnectTimeout { address: String, seconds: u64 },
    #[error("cannot read the identity {path}: {message}")]
    Identity { path: PathBuf, message: String },
    #[error("cannot use ssh-agent: {0}")]
    Agent(String),
    #[error(
        "{address} refused the login of {user} with {tried}: is the public key in \
         ~{user}/.ssh/authorized_keys on the host?"
    )]
    AuthRefused {
        address: String,
        user: String,
        tried: String,
    },
    #[error("ssh: {0}")]
    Protocol(#[from] russh::Error),
    #[error("the command `{command}` on {address} failed (exit status {status}): {stderr}")]
    CommandFailed {
        address: String,
        command: String,
        status: String,
        stderr: String,
    },
}

/// What a remote command printed and how it ended.
#[derive(Debug, Default)]
pub struct ExecOutput {
    /// None when the server sent no exit status (the command was killed by a signal).
    pub exit_status: Option<u32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl ExecOutput {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).trim().to_string()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).trim().to_string()
    }
}

/// What the host-key check did, for the report line.
#[derive(Debug, Clone, Default)]
pub struct HostKeyOutcome {
    pub fingerprint: String,
    /// True when the key was new and recorded because of `--accept-new-host-key`.
    pub recorded: bool,
}

/// Serialises reading and appending known_hosts between the connections of one fleetctl run.
static KNOWN_HOSTS_LOCK: Mutex<()> = Mutex::new(());

/// russh's callbacks: the host-key check.
struct ClientHandler {
    host: String,
    port: u16,
    policy: HostKeyPolicy,
    outcome: Arc<Mutex<HostKeyOutcome>>,
}

impl russh::client::Handler for ClientHandler {
    type Error = SshError;

    async fn check_server_key(
        &mut self,
        server_key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, SshError> {
        // We advertise no certificate algorithms (russh's default), so servers present plain
        // keys. Should one present a certificate anyway, the key it certifies is checked
        // against known_hosts, as OpenSSH does when no @cert-authority line matches.
        let server_public_key = &server_key.public_key();
        let _guard = KNOWN_HOSTS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let path = &self.policy.known_hosts;
        let fingerprint = known_hosts::fingerprint(server_public_key);
        let recorded = match known_hosts::check(path, &self.host, self.port, server_public_key)? {
            Verdict::Known { .. } => false,
            Verdict::Unknown if self.policy.accept_new => {
                known_hosts::record(path, &self.host, self.port, server_public_key)?;
                true
            }
            Verdict::Unknown => {
                let algorithm = server_public_key.algorithm();
                return Err(HostKeyError::Unknown {
                    host_name: known_hosts::host_name_in_file(&self.host, self.port),
                    algorithm: algorithm.to_string(),
                    short_algorithm: algorithm
                        .as_str()
                        .trim_start_matches("ssh-")
                        .split('-')
                        .next()
                        .unwrap_or("ed25519")
                        .to_string(),
                    fingerprint,
                    path: path.clone(),
                }
                .into());
            }
        };
        let mut outcome = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        outcome.fingerprint = fingerprint;
        outcome.recorded |= recorded;
        Ok(true)
    }
}

/// An authenticated SSH connection.
pub struct SshSession {
    handle: Handle<ClientHandler>,
    address: String,
    pub host_key: HostKeyOutcome,
}

impl SshSession {
    /// Connects, checks the host key and logs in; `timeout` bounds the TCP connect and the
    /// handshake.
    pub async fn connect(
        address: &SshAddress,
        policy: &HostKeyPolicy,
        credential: &Credential,
        timeout: Duration,
    ) -> Result<SshSession, SshError> {
        let shown = address.to_string();
        let mut config = russh::client::Config {
            inactivity_timeout: Some(Duration::from_secs(300)),
            keepalive_interval: Some(Duration::from_secs(15)),
            keepalive_max: 4,
            nodelay: true,
            ..Default::default()
        };
        // AES-GCM first: with AES instructions (every server CPU of the last decade) it costs
        // both ends less than ChaCha20-Poly1305 for the agent binary's megabytes.
        let aes_gcm = russh::cipher::AES_256_GCM;
        let mut ciphers = vec![aes_gcm];
        ciphers.extend(
            config
                .preferred
                .cipher
                .iter()
                .filter(|c| **c != aes_gcm)
                .cloned(),
        );
        config.preferred.cipher = Cow::Owned(ciphers);
        // Ask for a key type the file can check, as OpenSSH does.
        let recorded = {
            let _guard = KNOWN_HOSTS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            known_hosts::recorded_algorithms(&policy.known_hosts, &address.host, address.port)?
        };
        if !recorded.is_empty() {
            let supported: Vec<_> = config
                .preferred
                .key
                .iter()
                .filter(|a| recorded.contains(a))
                .cloned()
                .collect();
            if !supported.is_empty() {
                config.preferred.key = Cow::Owned(supported);
            }
        }
        let outcome = Arc::new(Mutex::new(HostKeyOutcome::default()));
        let handler = ClientHandler {
            host: address.host.clone(),
            port: address.port,
            policy: policy.clone(),
            outcome: outcome.clone(),
        };
        let connect = async {
            let stream = tokio::net::TcpStream::connect((address.host.as_str(), address.port))
                .await
                .map_err(|source| SshError::Connect {
                    address: shown.clone(),
                    source,
                })?;
            let _ = stream.set_nodelay(true);
            russh::client::connect_stream(Arc::new(config), stream, handler).await
        };
        let mut handle = tokio::time::timeout(timeout, connect).await.map_err(|_| {
            SshError::ConnectTimeout {
                address: shown.clone(),
                seconds: timeout.as_secs(),
            }
        })??;
        let host_key = outcome.lock().unwrap_or_else(|e| e.into_inner()).clone();
        authenticate(&mut handle, address, credential).await?;
        Ok(SshSession {
            handle,
            address: shown,
            host_key,
        })
    }

    /// Runs `command` (through the login shell of the user), writes the `stdin` parts to it in
    /// order and closes its input, and collects its output until it exits.
    pub async fn exec(&self, command: &str, stdin: &[&[u8]]) -> Result<ExecOutput, SshError> {
        let all: Vec<u8> = stdin.concat();
        let output = self
            .exec_then(command, &all, async { Ok::<_, String>(Vec::new()) })
            .await?;
        Ok(output.0)
    }

    /// Like [`SshSession::exec`], with stdin made of `head`, sent paced ([`pacing`]), then what `tail`
    /// resolves to, as soon as it does: the head's bytes travel while the tail is still being
    /// made. When `tail` fails the input is cut off (the command sees a truncated stream) and
    /// its error is returned beside the output.
    pub async fn exec_then<E>(
        &self,
        command: &str,
        head: &[u8],
        tail: impl std::future::Future<Output = Result<Vec<u8>, E>>,
    ) -> Result<(ExecOutput, Option<E>), SshError> {
        let channel = self.handle.channel_open_session().await?;
        channel.exec(true, command).await?;
        let (mut reader, writer) = channel.split();
        let (news_tx, news_rx) = tokio::sync::watch::channel(WindowNews::default());
        let send = async {
            // Large writes: russh cuts them into packets as large as the channel allows
            // (`data()` would copy through an 8 KiB buffer: four times the packets).
            use tokio::io::AsyncWriteExt;
            let mut stream = writer.make_writer();
            let head_sent = async {
                let (mut pacer, mut news) = (Pacer::default(), news_rx);
                for piece in head.chunks(pacing::PIECE) {
                    pacer.update(*news.borrow_and_update());
                    while !pacer.may_send(piece.len()) {
                        match tokio::time::timeout(pacing::STALL, news.changed()).await {
                            Ok(Ok(())) => pacer.update(*news.borrow_and_update()),
                            // Silent server or closed channel: the window alone limits.
                            _ => pacer.give_up(),
                        }
                    }
                    stream.write_all(piece).await?;
                    pacer.sent(piece.len());
                }
                Ok::<_, std::io::Error>(())
            };
            let (head_sent, tail) = tokio::join!(head_sent, tail);
            head_sent.map_err(russh::Error::from)?;
            let tail_error = match tail {
                Ok(bytes) => {
                    stream.write_all(&bytes).await.map_err(russh::Error::from)?;
                    stream.flush().await.map_err(russh::Error::from)?;
                    writer.eof().await?;
                    None
                }
                Err(error) => {
                    let _ = writer.close().await;
                    Some(error)
                }
            };
            Ok::<_, SshError>(tail_error)
        };
        let receive = async {
            let mut output = ExecOutput::default();
            let mut adjustments = 0;
            // Ends when the server closes the channel.
            while let Some(message) = reader.wait().await {
                match message {
                    ChannelMsg::WindowAdjusted { new_size } => {
                        adjustments += 1;
                        let _ = news_tx.send(WindowNews {
                            adjustments,
                            window: new_size,
                        });
                    }
                    ChannelMsg::Data { data } => output.stdout.extend_from_slice(&data),
                    ChannelMsg::ExtendedData { data, ext: 1 } => {
                        output.stderr.extend_from_slice(&data)
                    }
                    ChannelMsg::ExitStatus { exit_status } => {
                        output.exit_status = Some(exit_status)
                    }
                    _ => {}
                }
            }
            output
        };
        let (sent, output) = tokio::join!(send, receive);
        match sent {
            Ok(tail_error) => Ok((output, tail_error)),
            // A command that exits before reading all its input closes the channel under the
            // writer; its exit status says more than the write error.
            Err(_) if output.exit_status.is_some() => Ok((output, None)),
            Err(error) => Err(error),
        }
    }

    /// An error naming `what` unless the command exited 0.
    pub fn check_exit(&self, what: &str, output: &ExecOutput) -> Result<(), SshError> {
        if output.exit_status == Some(0) {
            return Ok(());
        }
        let mut stderr = output.stderr_text();
        if stderr.is_empty() {
            stderr = output.stdout_text();
        }
        Err(SshError::CommandFailed {
            address: self.address.clone(),
            command: what.to_string(),
            status: output
                .exit_status
                .map(|s| s.to_string())
                .unwrap_or_else(|| "none: killed".to_string()),
            stderr: last_lines(&stderr, 5),
        })
    }

    /// Says goodbye to the server.
    pub async fn close(self) {
        let _ = self
            .handle
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
    }
}

/// The last `n` lines of a text, so a long error output stays readable.
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

async fn authenticate(
    handle: &mut Handle<ClientHandler>,
    address: &SshAddress,
    credential: &Credential,
) -> Result<(), SshError> {
    let refused = |tried: String| SshError::AuthRefused {
        address: address.to_string(),
        user: address.user.clone(),
        tried,
    };
    match credential {
        Credential::KeyFile(path) => {
            let key = Arc::new(load_identity(path)?);
            let hash = rsa_hash(handle, &key).await?;
            let result = handle
                .authenticate_publickey(address.user.clone(), PrivateKeyWithHashAlg::new(key, hash))
                .await?;
            match result {
                AuthResult::Success => Ok(()),
                AuthResult::Failure { .. } => Err(refused(format!("the key {}", path.display()))),
            }
        }
        Credential::Agent => {
            let mut agent = AgentClient::connect_env()
                .await
                .map_err(|e| SshError::Agent(format!("{e} (SSH_AUTH_SOCK)")))?;
            let identities = agent
                .request_identities()
                .await
                .map_err(|e| SshError::Agent(e.to_string()))?;
            if identities.is_empty() {
                return Err(SshError::Agent(
                    "ssh-agent holds no keys: add one with ssh-add, or pass --identity KEY"
                        .to_string(),
                ));
            }
            let rsa_hash = handle
                .best_supported_rsa_hash()
                .await?
                .flatten()
                .or(Some(HashAlg::Sha512));
            let n_keys = identities.len();
            for identity in identities {
                let key = identity.public_key().into_owned();
                let hash = key.algorithm().is_rsa().then_some(rsa_hash).flatten();
                let result = handle
                    .authenticate_publickey_with(address.user.clone(), key, hash, &mut agent)
                    .await
                    .map_err(|e| SshError::Agent(e.to_string()))?;
                if matches!(result, AuthResult::Success) {
                    return Ok(());
                }
            }
            Err(refused(format!("the {n_keys} key(s) of ssh-agent")))
        }
    }
}

/// The RSA signature hash the server accepts (SHA-512 when it does not say); None for other keys.
async fn rsa_hash(
    handle: &Handle<ClientHandler>,
    key: &PrivateKey,
) -> Result<Option<HashAlg>, SshError> {
    if !key.algorithm().is_rsa() {
        return Ok(None);
    }
    Ok(handle
        .best_supported_rsa_hash()
        .await?
        .flatten()
        .or(Some(HashAlg::Sha512)))
}

/// Loads a private key file; an encrypted one is refused with what to do instead.
pub fn load_identity(path: &Path) -> Result<PrivateKey, SshError> {
    let text = std::fs::read_to_string(path).map_err(|e| SshError::Identity {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    russh::keys::decode_secret_key(&text, None).map_err(|e| {
        let message = match e {
            russh::keys::Error::KeyIsEncrypted => {
                "it is encrypted: add it to ssh-agent (ssh-add) and leave out --identity"
                    .to_string()
            }
            other => format!("{other}; give an OpenSSH or PEM private key"),
        };
        SshError::Identity {
            path: path.to_path_buf(),
            message,
        }
    })
}
