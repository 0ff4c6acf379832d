//! SSH bootstrap of hosts, the SSH half of `fleetctl bootstrap` and `fleetctl replace`:
//! `targets` (what to work on: `ssh://` addresses and the targets file), `known_hosts` (which
//! host keys are trusted; fail closed), `connection` (one russh connection: host-key check, key-file or
//! ssh-agent login, commands with stdin), `pacing` (uploads that do not flood the server),
//! `install` (what is uploaded and run on the host), `deb` (the fleet-agent package of
//! `--agent-deb`, read and checked before any host is touched).
//!
//! [`bootstrap_host`] does one host up to a started agent; the CLI (the `bootstrap` verb) adds what
//! needs the controller (a join token before, waiting for the host to register after), so this
//! module knows nothing of gRPC.
//!
//! **Architecture Invariant:** nothing here talks to the controller; the join token and the CA
//! come in as plain values.

// The errors of this module carry everything a person needs to act (host, key fingerprint,
// known_hosts path and line) and happen once per host at most: their size costs nothing.
#![allow(clippy::result_large_err)]

pub mod connection;
pub mod deb;
pub mod install;
pub mod known_hosts;
pub mod pacing;
pub mod targets;

use connection::{Credential, HostKeyPolicy, SshError, SshSession};
use install::{AgentSource, InstallError, InstallOutcome, InstallPlan};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;
use targets::SshAddress;
use thiserror::Error;

/// How long the TCP connect plus the SSH handshake may take.
pub const SSH_CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Error)]
pub enum BootstrapError {
    #[error(transparent)]
    Ssh(#[from] SshError),
    #[error(transparent)]
    Install(#[from] InstallError),
}

/// One host, fully resolved: where to log in and what the agent there is told.
#[derive(Debug, Clone)]
pub struct HostJob {
    pub address: SshAddress,
    pub host_name: String,
    pub advertise: String,
    pub labels: BTreeMap<String, String>,
    pub remote_dir: PathBuf,
}

/// What every host of one run shares.
#[derive(Debug, Clone)]
pub struct SharedSettings {
    pub policy: HostKeyPolicy,
    pub credential: Credential,
    /// The URLs the agent dials, in turn.
    pub controller_urls: Vec<String>,
    pub ca_pem: Option<String>,
}

/// A host with a started agent, and the connection to it (to watch the agent until it
/// registered).
pub struct Bootstrapped {
    pub session: SshSession,
    pub outcome: InstallOutcome,
}

/// Logs in to one host, uploads the agent, its config, the CA and the token `join_token`
/// resolves to (awaited only once the binary is on its way), and starts the
/// agent (under systemd where it runs, detached otherwise). `binary_entry` is
/// [`AgentSource::tar_entry`] of `agent` (the binary, or the .deb dpkg installs), made once
/// for all hosts. `progress` hears
/// each step.
pub async fn bootstrap_host(
    job: &HostJob,
    shared: &SharedSettings,
    agent: &AgentSource,
    binary_entry: &[u8],
    join_token: impl std::future::Future<Output = Result<Option<String>, String>>,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Bootstrapped, BootstrapError> {
    progress(&format!("connecting to {}", job.address));
    let session = SshSession::connect(
        &job.address,
        &shared.policy,
        &shared.credential,
        SSH_CONNECT_TIMEOUT,
    )
    .await?;
    if session.host_key.recorded {
        progress(&format!(
            "host key {} was new: recorded in {}",
            session.host_key.fingerprint,
            shared.policy.known_hosts.display()
        ));
    }
    progress(&format!(
        "logged in; installing the agent in {}",
        job.remote_dir.display()
    ));
    let plan = InstallPlan {
        remote_dir: job.remote_dir.clone(),
        agent,
        controller_urls: shared.controller_urls.clone(),
        host_name: job.host_name.clone(),
        advertise: job.advertise.clone(),
        labels: job.labels.clone(),
        ca_pem: shared.ca_pem.clone(),
    };
    let outcome = match install::install(&session, &plan, binary_entry, join_token).await {
        Ok(outcome) => outcome,
        Err(e) => {
            session.close().await;
            return Err(e.into());
        }
    };
    Ok(Bootstrapped { session, outcome })
}

/// The `fleet-agent` beside the running executable (fleetctl), where `cargo build` and the
/// release archives put it.
pub fn default_agent_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let path = exe.parent()?.join("fleet-agent");
    path.is_file().then_some(path)
}

/// `~/.ssh/known_hosts`.
pub fn default_known_hosts() -> PathBuf {
    home_dir().join(".ssh").join("known_hosts")
}

/// The key files OpenSSH tries when none is given, that exist here.
pub fn default_identities() -> Vec<PathBuf> {
    let ssh_dir = home_dir().join(".ssh");
    ["id_ed25519", "id_ecdsa", "id_rsa"]
        .iter()
        .map(|name| ssh_dir.join(name))
        .filter(|path| path.is_file())
        .collect()
}

fn home_dir() -> PathBuf {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}
