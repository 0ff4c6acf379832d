//! The controller's domain records: hosts, releases, rollouts and events, as the store keeps
//! them. They know nothing of gRPC; `api::convert` turns them into wire types at the edge.

use fleet_proto::names::quoted;
use fleet_proto::secrets::Secrets;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A registered host and what the controller wants it to run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HostRecord {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub advertise_addr: String,
    pub registered_unix_ms: i64,
    pub last_seen_unix_ms: i64,
    /// The desired release of each app on this host.
    pub desired: BTreeMap<String, Desired>,
    /// Set while the host is drained: it keeps `desired` but runs nothing until undrained.
    #[serde(default)]
    pub drain: Option<DrainRecord>,
    /// What its agent said of itself in its last session (empty in a record from before).
    #[serde(default)]
    pub agent: AgentInfo,
}

/// An agent's version and the CPU architecture it was built for.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentInfo {
    pub version: String,
    pub arch: String,
}

/// Who drained a host, when, and when its last instance was seen gone.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DrainRecord {
    pub requested_by: String,
    pub requested_unix_ms: i64,
    pub drained_unix_ms: Option<i64>,
}

/// A host's state as operators see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostState {
    Ready,
    Lost,
    Draining,
    Drained,
}

impl HostState {
    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Ready => "ready",
            HostState::Lost => "lost",
            HostState::Draining => "draining",
            HostState::Drained => "drained",
        }
    }
}

/// One app's desired release on one host, as sent to the agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Desired {
    pub version: String,
    pub rollout_id: String,
    /// Bumped by every rollout that touches the host, so the agent starts a fresh instance.
    pub generation: u64,
    pub smoke_timeout_ms: u64,
    /// Run the manifest's release hook before this start (the first canary host of a rollout).
    #[serde(default)]
    pub run_release_hook: bool,
    /// The rollout's `--min-healthy`, when it gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_healthy_ms: Option<u64>,
    /// The deployment (`DeploymentRecord::key`) this release was given for, by a rollout or the
    /// converger; `None` for what was set before deployments existed, which the converger never
    /// takes away.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
}

/// An immutable release: an app version pointing at an artifact digest and its config.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReleaseRecord {
    pub app: String,
    pub version: String,
    pub artifact_digest: String,
    pub artifact_size: u64,
    pub env: BTreeMap<String, String>,
    pub created_unix_ms: i64,
    pub created_by: String,
    /// From the manifest: each smoke check's timeout (they run one after another) and whether
    /// a release hook runs first, so a wave waits as long as the release may take to prove
    /// itself.
    #[serde(default)]
    pub smoke_timeouts_ms: Vec<u64>,
    #[serde(default)]
    pub has_release_hook: bool,
    /// From the manifest: how long an instance must stay up after its checks (`min_healthy`).
    #[serde(default)]
    pub min_healthy_ms: u64,
    /// The bytes of all the artifact's entries: what a host needs on disk to unpack it (0 for
    /// releases made before it was recorded).
    #[serde(default)]
    pub unpacked_size: u64,
    /// Given to instances like `env`, never shown (`KEY=***`).
    #[serde(default, skip_serializing_if = "Secrets::is_empty")]
    pub secrets: Secrets,
    /// The sha256 of the secrets (see [`secrets_sha256`]): part of the release's identity, so
    /// the same version with other secrets is refused like other config.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub secrets_sha256: String,
}

/// A digest of a release's secrets (keys and values, in key order, length-prefixed); empty
/// when it has none.
pub fn secrets_sha256(secrets: &Secrets) -> String {
    use sha2::Digest;
    if secrets.is_empty() {
        return String::new();
    }
    let mut hasher = sha2::Sha256::new();
    for (key, value) in &secrets.0 {
        for part in [key, value] {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part.as_bytes());
        }
    }
    hex::encode(hasher.finalize())
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    Running,
    Paused,
    Succeeded,
    Failed,
    RolledBack,
    Aborted,
}

impl RolloutState {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Running => "running",
            RolloutState::Paused => "paused",
            RolloutState::Succeeded => "succeeded",
            RolloutState::Failed => "failed",
            RolloutState::RolledBack => "rolled_back",
            RolloutState::Aborted => "aborted",
        }
    }

    /// Whether the rollout has ended and will never change again.
    pub fn is_final(self) -> bool {
        !matches!(self, RolloutState::Running | RolloutState::Paused)
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WaveState {
    Pending,
    Running,
    Passed,
    Failed,
}

impl WaveState {
    pub fn as_str(self) -> &'static str {
        match self {
            WaveState::Pending => "pending",
            WaveState::Running => "running",
            WaveState::Passed => "passed",
            WaveState::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HostResult {
    Pending,
    Deploying,
    Passed,
    Failed,
    RolledBack,
    /// Left out of the rollout: drained, or lost with `--skip-lost`.
    Skipped,
}

impl HostResult {
    pub fn as_str(self) -> &'static str {
        match self {
            HostResult::Pending => "pending",
            HostResult::Deploying => "deploying",
            HostResult::Passed => "passed",
            HostResult::Failed => "failed",
            HostResult::RolledBack => "rolled_back",
            HostResult::Skipped => "skipped",
        }
    }
}

/// How many hosts a wave after the canary takes.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Batch {
    Hosts(u32),
    Percent(u32),
}

impl Batch {
    /// Parses `N` or `P%`.
    pub fn parse(text: &str) -> Result<Batch, String> {
        let bad = || {
            format!(
                "batch {} is invalid: write a host count like 2 or a share like 25%",
                quoted(text)
            )
        };
        if let Some(percent) = text.strip_suffix('%') {
            let p: u32 = percent.parse().map_err(|_| bad())?;
            if !(1..=100).contains(&p) {
                return Err(bad());
            }
            Ok(Batch::Percent(p))
        } else {
            let n: u32 = text.parse().map_err(|_| bad())?;
            if n == 0 {
                return Err(bad());
            }
            Ok(Batch::Hosts(n))
        }
    }

    pub fn to_text(self) -> String {
        match self {
            Batch::Hosts(n) => n.to_string(),
            Batch::Percent(p) => format!("{p}%"),
        }
    }
}

/// What the operator asked for when starting a rollout.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RolloutPolicy {
    pub selector: BTreeMap<String, String>,
    pub canary: u32,
    pub batch: Batch,
    pub pause_after_canary_ms: u64,
    pub smoke_timeout_ms: u64,
    pub auto_rollback: bool,
    /// Leave lost hosts out instead of halting on them.
    #[serde(default)]
    pub skip_lost: bool,
    /// `--min-healthy`: overrides the manifest's `min_healthy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_healthy_ms: Option<u64>,
    /// `--max-unavailable`: the unavailability budget asked for, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<Batch>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WaveHost {
    pub host: String,
    /// The version the host ran before this rollout touched it, if any.
    pub previous_version: Option<String>,
    /// The deployment that had given it that version (`Desired::deployment`), restored with
    /// it by a rollback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_deployment: Option<String>,
    pub result: HostResult,
    pub message: String,
    /// Where this rollout's rollback stands with the host: `None` until it reaches it. Written
    /// in the same transaction as the desired state it hands back, so a restarted controller
    /// goes on with the rollback where it stood.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<RollbackMark>,
}

/// A host's place in its rollout's rollback (see `step::rollback`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RollbackMark {
    /// Its previous release was handed back; once it runs it again, its result is
    /// `rolled_back`.
    Sent,
    /// The rollback went on without it: its previous release failed, a later change took it
    /// over, or its batch's deadline passed. Its message says which.
    NotBack,
    /// It was lost on its way back: it gets its previous release when it returns, and the
    /// rollback went on without it.
    Lost,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Wave {
    pub hosts: Vec<WaveHost>,
    pub state: WaveState,
}

/// A rollout: its plan, where it stands, and each host's result. Persisted after every step,
/// so a restarted controller finds it where it stood.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RolloutRecord {
    pub id: String,
    pub app: String,
    pub version: String,
    pub state: RolloutState,
    pub started_by: String,
    pub started_unix_ms: i64,
    pub finished_unix_ms: i64,
    pub waves: Vec<Wave>,
    pub current_wave: usize,
    pub message: String,
    pub policy: RolloutPolicy,
    pub is_rollback: bool,
    /// Orders rollouts and numbers the generations they hand to agents.
    pub seq: u64,
    /// While the canary pause (`--pause-after-canary`) runs: when it ends (0 otherwise). Kept
    /// so a controller restarted during the pause waits out the rest of it.
    #[serde(default)]
    pub hold_until_unix_ms: i64,
    /// The unavailability budget it runs with (see `budget::effective`); 0 for rollouts made
    /// before budgets.
    #[serde(default)]
    pub max_unavailable: u32,
    /// The selected hosts that were unavailable when it started, and why (`h5: drained`): what
    /// spent the budget before it began.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unavailable_at_start: Vec<String>,
}

/// A standing deployment: the release every host whose labels match `selector` runs, as the
/// last completed rollout of `(app, selector)` left it. Hosts that join, return or change
/// labels converge to it on their own.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeploymentRecord {
    pub app: String,
    pub selector: BTreeMap<String, String>,
    pub version: String,
    /// The rollout that completed it.
    pub rollout_id: String,
    pub updated_unix_ms: i64,
    pub updated_by: String,
    /// The completing rollout's sequence number: orders deployments whatever the clock did.
    #[serde(default)]
    pub seq: u64,
}

impl DeploymentRecord {
    /// The store key: one deployment per app and selector.
    pub fn key(app: &str, selector: &BTreeMap<String, String>) -> String {
        format!("{app}/{}", fleet_proto::names::format_labels(selector))
    }

    /// `env=prod,zone=a`, or `(every host)`.
    pub fn selector_text(&self) -> String {
        if self.selector.is_empty() {
            return "(every host)".to_string();
        }
        fleet_proto::names::format_labels(&self.selector)
    }
}

/// How a convergence ended, once its host said.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ConvergenceResult {
    /// Given to the host; its agent has not said how it went yet.
    Converging,
    /// The release runs there and passed its checks (and stayed up `min_healthy`).
    Passed,
    /// The release failed its checks there: the host stays failed, nothing else is touched.
    Failed,
    /// The app was taken away and its instance stopped.
    Stopped,
    /// Something else (a rollout, a newer convergence, a removal) changed the host first.
    Superseded,
}

impl ConvergenceResult {
    pub fn as_str(self) -> &'static str {
        match self {
            ConvergenceResult::Converging => "converging",
            ConvergenceResult::Passed => "passed",
            ConvergenceResult::Failed => "failed",
            ConvergenceResult::Stopped => "stopped",
            ConvergenceResult::Superseded => "superseded",
        }
    }
}

/// One host moved to (or off) an app's release between rollouts, by the converger or by
/// `replace`: what `history APP` shows beside the rollouts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConvergenceRecord {
    /// `converge<seq>`, also the `rollout_id` of the desired release it wrote, so the host's
    /// reports name it (`replace` gives several apps under one id: see [`ConvergenceRecord::key`]).
    pub id: String,
    pub seq: u64,
    pub app: String,
    pub host: String,
    /// What the host was given before (`None`: nothing).
    pub from_version: Option<String>,
    /// What it is given (`None`: the app stops there).
    pub to_version: Option<String>,
    /// The deployment, as its selector text (`env=prod`, `(every host)`).
    pub deployment: String,
    /// The deployment's key (`DeploymentRecord::key`): what the convergence counts against.
    pub deployment_key: String,
    /// Why it moved (`joined`, `undrained by ann`, `relabeled by ann`, `back from lost`,
    /// `replaces web-1`).
    pub why: String,
    pub actor: String,
    pub started_unix_ms: i64,
    /// 0 while converging.
    pub finished_unix_ms: i64,
    pub result: ConvergenceResult,
    pub message: String,
}

impl ConvergenceRecord {
    /// The store key: `replace` gives one host several apps under one id, a record each.
    pub fn key(&self) -> String {
        format!("{}/{}", self.id, self.app)
    }
}

/// One line of the event log: who did what, to which app or host, when.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EventRecord {
    pub seq: u64,
    pub unix_ms: i64,
    pub actor: String,
    pub kind: String,
    pub app: String,
    pub host: String,
    pub message: String,
}

/// Every event kind the controller records: what `events` globs must match at least one of.
pub const EVENT_KINDS: &[&str] = &[
    "ca.rotation_finished",
    "ca.rotation_started",
    "credential.issued",
    "credential.learned",
    "credential.revoked",
    "host.certificate_renewed",
    "host.connected",
    "host.converging",
    "host.disconnected",
    "host.drained",
    "host.draining",
    "host.joined",
    "host.labeled",
    "host.labels_ignored",
    "host.lost",
    "host.ready",
    "host.registered",
    "host.removed",
    "host.undrained",
    "instance.crashed",
    "instance.failed",
    "join_token.created",
    "release.created",
    "release.pruned",
    "rollback.started",
    "rollout.aborted",
    "rollout.failed",
    "rollout.halted",
    "rollout.paused",
    "rollout.recovered",
    "rollout.resumed",
    "rollout.rolled_back",
    "rollout.started",
    "rollout.succeeded",
    "store.exported",
    "webhook.failed",
];

/// Whether `text` matches `glob`, where `*` matches any run of characters (none too).
pub fn glob_matches(glob: &str, text: &str) -> bool {
    let parts: Vec<&str> = glob.split('*').collect();
    if parts.len() == 1 {
        return glob == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches() {
        for (text, expect) in [
            ("2", Some(Batch::Hosts(2))),
            ("25%", Some(Batch::Percent(25))),
            ("100%", Some(Batch::Percent(100))),
            ("0", None),
            ("0%", None),
            ("101%", None),
            ("-1", None),
            ("x", None),
        ] {
            assert_eq!(Batch::parse(text).ok(), expect, "{text:?}");
        }
    }
}
