//! `DATA/state.json`: what must survive the agent's own restart, even a SIGKILL. It holds the
//! current assignments (so the agent brings them up again without the controller), for each
//! live instance its pid and the random `FLEET_INSTANCE_ID` token it was started with (so a
//! restarted agent can find and stop it, and never signals a pid that is not provably its own),
//! and each app's last release hook run (so a hook never runs twice for one rollout, and a
//! release whose hook failed is never started).
//!
//! Every write rewrites the file atomically: write a temp file, fsync it, rename it over the
//! old one, fsync the directory. A change is either written through (`set_*`: durable when
//! they return) or staged (`stage_*`: in memory at once, durable once a later
//! [`StateStore::flush_to`] of its number returns). Writes are group commits: one write takes
//! every change staged before it, so changes staged while a write is under way share the next
//! one, and a write that finds its change already on disk does nothing.

use crate::model::Assignment;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use thiserror::Error;

/// The environment variable holding an instance's token.
pub const INSTANCE_ID_VAR: &str = "FLEET_INSTANCE_ID";

#[derive(Debug, Error)]
pub enum StateError {
    #[error("cannot read the agent state {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("agent state {path} is corrupt ({message}): move it away to start afresh")]
    Corrupt { path: PathBuf, message: String },
    #[error("cannot write the agent state {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The persisted state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentState {
    pub assignments: Vec<Assignment>,
    /// Live instances by app.
    pub instances: BTreeMap<String, SavedInstance>,
    /// The last release hook run of each app: a hook runs once per rollout, whatever is
    /// resent or restarted after it.
    #[serde(default)]
    pub hooks: BTreeMap<String, HookRun>,
    /// False in a file written before hook runs were recorded: its assignments' hooks ran then.
    #[serde(default)]
    pub hooks_recorded: bool,
}

/// One run of an app's release hook, for one deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookRun {
    /// The deployment it ran for (a rollback within the rollout is another release).
    pub assignment: Assignment,
    pub succeeded: bool,
}

impl HookRun {
    /// Whether this run was for `assignment`'s deployment.
    pub fn is_for(&self, assignment: &Assignment) -> bool {
        self.assignment.same_deployment(assignment)
    }
}

/// One live instance: enough to recognise it and stop it after the agent's restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedInstance {
    pub version: String,
    /// The artifact the instance was started from (empty in a file from before it was kept).
    #[serde(default)]
    pub artifact_digest: String,
    /// When its leader started, in clock ticks after boot, if known: a pid reused since by
    /// another process is never taken for it.
    #[serde(default)]
    pub start_ticks: Option<u64>,
    /// The pid of the instance's leader, which is also its process group id.
    pub pid: i32,
    /// The random `FLEET_INSTANCE_ID` in the instance's environment.
    pub token: String,
    /// The manifest's stop signal, like `TERM`.
    pub stop_signal: String,
    pub stop_timeout_ms: u64,
}

/// The state file and its in-memory copy.
pub struct StateStore {
    path: PathBuf,
    /// The state as changed so far, and how many changes that is.
    state: Mutex<(AgentState, u64)>,
    /// How many changes are on disk; held while the file is written, so writes go one at a
    /// time and never put an older state over a newer one.
    durable: Mutex<u64>,
}

impl StateStore {
    /// Opens the state file, or starts empty when there is none.
    pub fn open(path: PathBuf) -> Result<StateStore, StateError> {
        let state = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
                path: path.clone(),
                message: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => AgentState::default(),
            Err(source) => return Err(StateError::Read { path, source }),
        };
        Ok(StateStore {
            path,
            state: Mutex::new((state, 0)),
            durable: Mutex::new(0),
        })
    }

    pub fn snapshot(&self) -> AgentState {
        self.lock().0.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (AgentState, u64)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the state in memory only; returns the change's number, for [`Self::flush_to`].
    fn stage(&self, change: impl FnOnce(&mut AgentState)) -> u64 {
        let mut guard = self.lock();
        let (state, changes) = &mut *guard;
        change(state);
        state.hooks_recorded = true;
        *changes += 1;
        *changes
    }

    /// Changes the state and writes it through: durable when this returns.
    fn update(&self, change: impl FnOnce(&mut AgentState)) -> Result<(), StateError> {
        let change = self.stage(change);
        self.flush_to(change)
    }

    /// Makes change number `change` (and every one before it) durable: at once when a write
    /// already took it, else by one write of everything staged so far. Blocking (an fsync):
    /// call it off the runtime thread.
    pub fn flush_to(&self, change: u64) -> Result<(), StateError> {
        let mut durable = self.durable.lock().unwrap_or_else(|p| p.into_inner());
        if *durable >= change {
            return Ok(());
        }
        let (state, changes) = self.lock().clone();
        write_atomically(&self.path, &state).map_err(|source| StateError::Write {
            path: self.path.clone(),
            source,
        })?;
        *durable = changes;
        Ok(())
    }

    /// The number of the last change staged: [`Self::flush_to`] it to make everything so far
    /// durable.
    pub fn last_change(&self) -> u64 {
        self.lock().1
    }

    pub fn set_assignments(&self, assignments: Vec<Assignment>) -> Result<(), StateError> {
        self.update(|s| s.assignments = assignments)
    }

    /// Like [`Self::set_assignments`], in memory only: durable with the next write.
    pub fn stage_assignments(&self, assignments: Vec<Assignment>) -> u64 {
        self.stage(|s| s.assignments = assignments)
    }

    pub fn set_instance(
        &self,
        app: &str,
        instance: Option<SavedInstance>,
    ) -> Result<(), StateError> {
        let change = self.stage_instance(app, instance);
        self.flush_to(change)
    }

    /// Like [`Self::set_instance`], in memory only: durable with the next write.
    pub fn stage_instance(&self, app: &str, instance: Option<SavedInstance>) -> u64 {
        self.stage(|s| match instance {
            Some(instance) => {
                s.instances.insert(app.to_string(), instance);
            }
            None => {
                s.instances.remove(app);
            }
        })
    }

    pub fn hook_run(&self, app: &str) -> Option<HookRun> {
        self.lock().0.hooks.get(app).cloned()
    }

    pub fn record_hook_run(&self, app: &str, run: HookRun) -> Result<(), StateError> {
        self.update(|s| {
            s.hooks.insert(app.to_string(), run);
        })
    }

    pub fn clear_instances(&self) -> Result<(), StateError> {
        self.update(|s| s.instances.clear())
    }
}

fn write_atomically(path: &Path, state: &AgentState) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("json.tmp");
    {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        // Makes the rename itself durable; a failure here only weakens crash safety.
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

/// A new random instance token: 128 bits from the kernel, as hex.
pub fn new_token() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    let filled = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if filled.is_err() {
        // Not secret, only unique: fall back to time and pid.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        bytes.copy_from_slice(&(nanos ^ u128::from(std::process::id()) << 64).to_le_bytes());
    }
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let store = StateStore::open(path.clone()).unwrap();
        assert_eq!(store.snapshot(), AgentState::default());
        let assignment = Assignment {
            app: "web".into(),
            version: "1.0".into(),
            artifact_digest: format!("sha256:{}", "a".repeat(64)),
            artifact_size: 10,
            env: BTreeMap::from([("K".into(), "v".into())]),
            secrets: Default::default(),
            min_healthy_ms: None,
            unpacked_size: 0,
            rollout_id: "r1".into(),
            generation: 2,
            smoke_timeout_ms: 0,
            run_release_hook: false,
        };
        store.set_assignments(vec![assignment.clone()]).unwrap();
        store
            .set_instance(
                "web",
                Some(SavedInstance {
                    version: "1.0".into(),
                    artifact_digest: "sha256:00".into(),
                    start_ticks: Some(7),
                    pid: 42,
                    token: new_token(),
                    stop_signal: "TERM".into(),
                    stop_timeout_ms: 1000,
                }),
            )
            .unwrap();
        let reopened = StateStore::open(path.clone()).unwrap().snapshot();
        assert_eq!(reopened.assignments, vec![assignment]);
        assert_eq!(reopened.instances["web"].pid, 42);
        assert_eq!(reopened.instances["web"].token.len(), 32);
        store.set_instance("web", None).unwrap();
        assert!(StateStore::open(path.clone())
            .unwrap()
            .snapshot()
            .instances
            .is_empty());
        assert!(!path.with_extension("json.tmp").exists());

        std::fs::write(&path, "{not json").unwrap();
        assert!(matches!(
            StateStore::open(path),
            Err(StateError::Corrupt { .. })
        ));
        assert_ne!(new_token(), new_token());
    }

    #[test]
    fn staged_changes_share_one_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let store = StateStore::open(path.clone()).unwrap();
        let instance = |pid| SavedInstance {
            version: "1.0".into(),
            artifact_digest: String::new(),
            start_ticks: None,
            pid,
            token: "t".into(),
            stop_signal: "TERM".into(),
            stop_timeout_ms: 1000,
        };
        // Staged: in memory at once, nothing on disk yet.
        let first = store.stage_instance("web", Some(instance(1)));
        let second = store.stage_instance("api", Some(instance(2)));
        assert_eq!(store.snapshot().instances.len(), 2);
        assert!(!path.exists());
        // Flushing the first writes both.
        store.flush_to(first).unwrap();
        let on_disk = StateStore::open(path.clone()).unwrap().snapshot();
        assert_eq!(on_disk.instances.len(), 2);
        // The second is on disk already: no write (the file removed stays removed).
        std::fs::remove_file(&path).unwrap();
        store.flush_to(second).unwrap();
        assert!(!path.exists());
        // A write-through change writes everything again.
        store.set_instance("api", None).unwrap();
        let on_disk = StateStore::open(path.clone()).unwrap().snapshot();
        assert_eq!(on_disk.instances.keys().collect::<Vec<_>>(), ["web"]);
        assert_eq!(store.last_change(), 3);
        store.flush_to(store.last_change()).unwrap();
    }
}
