//! The domain types the agent's parts share: the data directory layout, an assignment, the
//! instance states, and the [`Reporter`] that carries instance reports to the session. Prost
//! types are converted to and from these at the session edge.

use fleet_proto::secrets::Secrets;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tokio::sync::mpsc;

/// Where everything lives under the agent's data directory:
///
/// ```text
/// DATA/state.json                               assignments + instance pids and tokens
/// DATA/artifacts/<hex>.partial                  a download in progress (resumable)
/// DATA/artifacts/<hex>.tar.gz                   a verified artifact
/// DATA/releases/<app>/<version>-<hex12>/        an unpacked release, immutable
/// DATA/releases/<app>/.unpack-*                 an unpack in progress
/// DATA/instances/<app>/                         the running instance's files, fresh each start
/// DATA/hooks/<app>/                             the release hook's, while it runs
/// DATA/app-state/<app>/                         FLEET_STATE_DIR: kept across starts and releases
/// DATA/logs/<app>.log                           the instance's stdout and stderr
/// ```
#[derive(Debug, Clone)]
pub struct DataLayout {
    root: PathBuf,
}

impl DataLayout {
    pub fn new(root: &Path) -> DataLayout {
        DataLayout {
            root: root.to_path_buf(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates the directories of the layout (not the per-app ones) with their modes, also
    /// when they existed with looser ones. Others may only pass through the root (0711) to the
    /// directories apps run in (`instances`, `hooks`, `app-state`: 0711, each app's own
    /// directory below is its user's); the rest, where release environments (secrets),
    /// artifacts and logs live, is private (0700).
    pub fn create_all(&self) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let make = |dir: &Path, mode: u32| {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
        };
        make(&self.root, 0o711)?;
        for dir in [
            self.artifacts_dir(),
            self.root.join("releases"),
            self.logs_dir(),
        ] {
            make(&dir, 0o700)?;
        }
        for dir in ["instances", "hooks", "app-state"] {
            make(&self.root.join(dir), 0o711)?;
        }
        Ok(())
    }

    pub fn state_file(&self) -> PathBuf {
        self.root.join("state.json")
    }

    pub fn artifacts_dir(&self) -> PathBuf {
        self.root.join("artifacts")
    }

    /// The verified artifact for a digest's hex part.
    pub fn artifact_file(&self, hex: &str) -> PathBuf {
        self.artifacts_dir().join(format!("{hex}.tar.gz"))
    }

    /// The download in progress for a digest's hex part.
    pub fn partial_file(&self, hex: &str) -> PathBuf {
        self.artifacts_dir().join(format!("{hex}.partial"))
    }

    pub fn app_releases_dir(&self, app: &str) -> PathBuf {
        self.root.join("releases").join(app)
    }

    /// `releases/<app>/<version>-<first 12 hex of digest>`.
    pub fn release_dir(&self, app: &str, version: &str, hex: &str) -> PathBuf {
        self.app_releases_dir(app)
            .join(release_dir_name(version, hex))
    }

    pub fn instance_dir(&self, app: &str) -> PathBuf {
        self.root.join("instances").join(app)
    }

    /// The app's own lasting directory (`FLEET_STATE_DIR`): origin state wipes what an
    /// instance writes elsewhere; this survives starts, releases and rollbacks.
    pub fn app_state_dir(&self, app: &str) -> PathBuf {
        self.root.join("app-state").join(app)
    }

    pub fn logs_dir(&self) -> PathBuf {
        self.root.join("logs")
    }

    pub fn log_file(&self, app: &str) -> PathBuf {
        self.logs_dir().join(format!("{app}.log"))
    }
}

/// The name of a release directory: `<version>-<first 12 hex of the digest>`.
pub fn release_dir_name(version: &str, hex: &str) -> String {
    format!("{version}-{}", &hex[..hex.len().min(12)])
}

/// The hex part of a `sha256:<hex>` digest (the digest must have been checked).
pub fn digest_hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

/// What the controller wants one app on this host to run: a release plus why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub app: String,
    pub version: String,
    /// `sha256:<hex>`, checked at the session edge.
    pub artifact_digest: String,
    pub artifact_size: u64,
    /// The release's configured environment; wins over the manifest's `[process].env`.
    pub env: BTreeMap<String, String>,
    /// The release's secrets: for the instance's environment only (after `env`), never shown.
    #[serde(default, skip_serializing_if = "Secrets::is_empty")]
    pub secrets: Secrets,
    pub rollout_id: String,
    /// Bumped by the controller to force a fresh start of the same release.
    pub generation: u64,
    /// When non-zero, caps every smoke check's timeout.
    pub smoke_timeout_ms: u64,
    /// Run the manifest's release hook before starting (the first host of a rollout).
    #[serde(default)]
    pub run_release_hook: bool,
    /// How long the instance must stay up after its checks before it counts as running; `None`:
    /// the manifest's `min_healthy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_healthy_ms: Option<u64>,
    /// The bytes of all the artifact's entries (0: not known), for the free-space check.
    #[serde(default)]
    pub unpacked_size: u64,
}

impl Assignment {
    /// Whether `self` asks for exactly what `other` asked for, so that nothing needs doing.
    pub fn same_deployment(&self, other: &Assignment) -> bool {
        self.version == other.version
            && self.generation == other.generation
            && self.rollout_id == other.rollout_id
            && self.artifact_digest == other.artifact_digest
    }

    /// Whether an instance started for `self` runs exactly what `other` asks for, whatever the
    /// rollout: the same release (version, artifact, configuration). The generation is left
    /// out: every rollout and rollback hands out one of its own.
    pub fn same_release(&self, other: &Assignment) -> bool {
        self.version == other.version
            && self.artifact_digest == other.artifact_digest
            && self.env == other.env
            && self.secrets == other.secrets
    }
}

/// The instance lifecycle states: the one enum of `fleet-proto` that the controller and
/// fleetctl match on too.
pub use fleet_proto::instance_state::InstanceState;

/// One instance transition, converted into `pb::InstanceReport` by the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub app: String,
    pub version: String,
    pub state: InstanceState,
    pub message: String,
    pub since_unix_ms: i64,
    pub restarts: u32,
    pub rollout_id: String,
}

/// Carries reports from the app tasks to the session and remembers the latest one per app, so
/// a (re)connecting session can say in its `Hello` what runs right now.
///
/// A report is published under the same lock that [`Reporter::snapshot`] takes, so whatever
/// the session receives after a snapshot is newer than the snapshot: it never replays a stale
/// transition over a fresher one.
pub struct Reporter {
    inner: Mutex<ReporterInner>,
}

struct ReporterInner {
    latest: BTreeMap<String, Report>,
    tx: mpsc::UnboundedSender<Report>,
    rx: Option<mpsc::UnboundedReceiver<Report>>,
}

impl Default for Reporter {
    fn default() -> Self {
        Reporter::new()
    }
}

impl Reporter {
    pub fn new() -> Reporter {
        let (tx, rx) = mpsc::unbounded_channel();
        Reporter {
            inner: Mutex::new(ReporterInner {
                latest: BTreeMap::new(),
                tx,
                rx: Some(rx),
            }),
        }
    }

    /// The receiving end, for the one session task (`None` after the first call).
    pub fn take_receiver(&self) -> mpsc::UnboundedReceiver<Report> {
        self.lock()
            .rx
            .take()
            .expect("the report receiver is taken once, by the session")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ReporterInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records and sends one transition.
    pub fn publish(&self, report: Report) {
        tracing::info!(
            app = %report.app,
            version = %report.version,
            state = report.state.as_str(),
            restarts = report.restarts,
            "{}",
            report.message
        );
        let mut inner = self.lock();
        inner.latest.insert(report.app.clone(), report.clone());
        let _ = inner.tx.send(report);
    }

    /// Forgets an app that is no longer assigned (after its `stopped` report).
    pub fn forget(&self, app: &str) {
        self.lock().latest.remove(app);
    }

    /// Drops every queued report and returns the latest report per app.
    pub fn snapshot(&self, rx: &mut mpsc::UnboundedReceiver<Report>) -> Vec<Report> {
        let inner = self.lock();
        while rx.try_recv().is_ok() {}
        inner.latest.values().cloned().collect()
    }

    /// The latest report of one app.
    pub fn latest(&self, app: &str) -> Option<Report> {
        self.lock().latest.get(app).cloned()
    }
}
