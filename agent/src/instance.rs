//! One app instance as a process: started from origin state and stopped gracefully.
//!
//! Start from origin: `DATA/instances/<app>` is wiped and made afresh from the release directory
//! on *every* start, so nothing an earlier instance wrote survives: for an app that runs as a
//! user of its own (a root agent, see [`crate::app_user`]), of hard links to the release's
//! files, which the app can read but not change, so a start costs the same for any release
//! size; for an agent that is not root, a copy. When a linked instance replaces another, its
//! directory is made beside the live one (`.next-<app>`) while the old instance stops, then
//! renamed into place, the old directory moved aside and removed in the background
//! ([`Instance::stage`], [`Instance::start_staged`]). The command runs in that directory, as the
//! app's user, in its own process group (its pid is the group id), with stdin closed and
//! stdout and stderr appended to `DATA/logs/<app>.log` (0600, rotated: [`crate::app_log`]). A relative `command[0]` is resolved
//! inside the instance directory (a bare name that is not there is looked up on `PATH`), and
//! `${VAR}` in the arguments is replaced from the instance environment.
//!
//! The instance environment is built from scratch (the agent's own environment does not leak
//! in, except `PATH`, `HOME`, `LANG` and `TZ`): the manifest's `[process].env`, then the
//! release's env (which wins), then `FLEET_APP`, `FLEET_VERSION`, `FLEET_HOST`, `FLEET_ADDR`,
//! and `FLEET_INSTANCE_ID`, a random token by which a restarted agent recognises its instances.
//!
//! Graceful stop: the manifest's stop signal to the process group, up to `stop_timeout` for the
//! leader to exit, then SIGKILL to the group. Leftover processes that still carry the token in
//! their environment (looked for among the processes started since the leader) are SIGKILLed
//! one by one through their pidfds and waited for on them; a pid is never signalled on a guess.

use crate::app_user::RunAs;
use crate::model::DataLayout;
use crate::state::{SavedInstance, INSTANCE_ID_VAR};
use fleet_proto::manifest::{substitute, Manifest, StopSignal};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;

/// How long to wait for a SIGKILLed process to go away before giving up on it.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// Variables of the agent's own environment that instances inherit.
const INHERITED_VARS: &[&str] = &["PATH", "HOME", "LANG", "TZ"];
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

#[derive(Debug, Error)]
pub enum InstanceError {
    #[error("cannot prepare the instance directory {path} from the release: {source}")]
    Prepare {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the instance log {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the app runs as uid {uid}, which cannot reach its instance directory: {closed} is not searchable by other users; make it so (chmod o+x), or give the agent a data directory under searchable directories (like /var/lib/fleet-agent)")]
    Unreachable { uid: u32, closed: PathBuf },
    #[error("cannot start {program:?}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
}

/// What an instance is started with, apart from the release itself.
#[derive(Debug, Clone)]
pub struct InstanceVars {
    pub app: String,
    pub version: String,
    pub host_name: String,
    pub advertise: String,
    /// The release's configured environment (wins over the manifest's).
    pub release_env: BTreeMap<String, String>,
    /// The release's secrets (win over both).
    pub secrets: fleet_proto::secrets::Secrets,
    /// `FLEET_STATE_DIR`, the app's lasting directory (absolute).
    pub state_dir: PathBuf,
    /// Who the instance, its release hook and its exec checks run as.
    pub run_as: RunAs,
}

/// The variables an instance sees (without its token and its secrets): what `${VAR}` in a
/// command or a smoke check is replaced from, and what smoke checks run with. Secrets are not
/// among them, so a secret never lands in a command line (`ps`) or a check's report.
pub fn instance_env(vars: &InstanceVars, manifest: &Manifest) -> BTreeMap<String, String> {
    let mut env = manifest.process.env.clone();
    env.extend(vars.release_env.clone());
    env.insert("FLEET_APP".into(), vars.app.clone());
    env.insert("FLEET_VERSION".into(), vars.version.clone());
    env.insert("FLEET_HOST".into(), vars.host_name.clone());
    env.insert("FLEET_ADDR".into(), vars.advertise.clone());
    env.insert(
        "FLEET_STATE_DIR".into(),
        vars.state_dir.to_string_lossy().into_owned(),
    );
    env
}

/// The environment of the instance's process and of the release hook: [`instance_env`] and the
/// release's secrets (which win). Their only way in.
pub fn process_env(vars: &InstanceVars, manifest: &Manifest) -> BTreeMap<String, String> {
    let mut env = instance_env(vars, manifest);
    env.extend(vars.secrets.0.clone());
    env
}

/// The base environment every child of the agent gets before its own variables.
pub fn inherited_env() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for name in INHERITED_VARS {
        if let Ok(value) = std::env::var(name) {
            out.push((name.to_string(), value));
        } else if *name == "PATH" {
            out.push(("PATH".into(), DEFAULT_PATH.into()));
        }
    }
    out
}

/// Resolves a command's program: absolute as is; relative inside `dir`; a bare name that is not
/// in `dir` goes to the `PATH` lookup.
pub fn resolve_program(program: &str, dir: &Path) -> PathBuf {
    let path = Path::new(program);
    if path.is_absolute() {
        return path.to_path_buf();
    }
    let inside = dir.join(path);
    if program.contains('/') || inside.exists() {
        inside
    } else {
        path.to_path_buf()
    }
}

/// Wipes `instance_dir` and fills it afresh from `release_dir`, for `run_as`. Blocking.
///
/// For another user (a root agent): the directories are made anew, owned by that user (0700);
/// every file is a hard link to the release's own file, which is owned by root and the app's
/// group, 0640 (0750 when executable). The app can read and run its files, and remove or
/// replace them, but not change their bytes, which the release and every later start share.
/// No byte is copied, whatever the release's size; where a link cannot be made (another file
/// system), a copy with the same owner and mode. For the agent's own user, a copy: a link
/// would let the app change the release itself.
pub fn prepare_from_origin(
    release_dir: &Path,
    instance_dir: &Path,
    run_as: &RunAs,
) -> std::io::Result<()> {
    match std::fs::remove_dir_all(instance_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    match run_as.ids() {
        Some((uid, gid)) => link_tree(release_dir, instance_dir, uid, gid),
        None => copy_tree(release_dir, instance_dir),
    }
}

fn link_tree(from: &Path, to: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{lchown, MetadataExt, PermissionsExt};
    std::fs::create_dir(to)?;
    lchown(to, Some(uid), Some(gid))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o700))?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let source = entry.path();
        let target = to.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&source)?, &target)?;
            lchown(&target, Some(uid), Some(gid))?;
        } else if kind.is_dir() {
            link_tree(&source, &target, uid, gid)?;
        } else if kind.is_file() {
            // The release's file, as shipped, for the app's group only: root owns it.
            let meta = entry.metadata()?;
            let mode = if meta.mode() & 0o111 != 0 {
                0o750
            } else {
                0o640
            };
            if meta.uid() != 0 || meta.gid() != gid {
                lchown(&source, Some(0), Some(gid))?;
            }
            if meta.mode() & 0o7777 != mode {
                std::fs::set_permissions(&source, std::fs::Permissions::from_mode(mode))?;
            }
            if std::fs::hard_link(&source, &target).is_err() {
                std::fs::copy(&source, &target)?;
                lchown(&target, Some(0), Some(gid))?;
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))?;
            }
        }
    }
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let source = entry.path();
        let target = to.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&source)?, &target)?;
        } else if kind.is_dir() {
            copy_tree(&source, &target)?;
        } else if kind.is_file() {
            std::fs::copy(&source, &target)?;
        }
    }
    Ok(())
}

/// The nix signal for a manifest stop signal.
pub fn nix_signal(signal: StopSignal) -> Signal {
    match signal {
        StopSignal::Term => Signal::SIGTERM,
        StopSignal::Int => Signal::SIGINT,
        StopSignal::Quit => Signal::SIGQUIT,
        StopSignal::Hup => Signal::SIGHUP,
        StopSignal::Usr1 => Signal::SIGUSR1,
        StopSignal::Usr2 => Signal::SIGUSR2,
    }
}

/// Says how a process ended, for reports: "exited with status 3", "killed by SIGKILL".
pub fn describe_exit(status: &ExitStatus) -> String {
    if let Some(code) = status.code() {
        format!("exited with status {code}")
    } else if let Some(signal) = status.signal() {
        match Signal::try_from(signal) {
            Ok(signal) => format!("killed by {signal}"),
            Err(_) => format!("killed by signal {signal}"),
        }
    } else {
        format!("ended: {status}")
    }
}

/// How an instance ended, as far as the agent can tell: the exit status of a child it started;
/// none for an instance it adopted after its own restart (not its child: it only sees it go).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit(pub Option<ExitStatus>);

impl Exit {
    /// For reports: "exited with status 3", "killed by SIGKILL", "ended".
    pub fn describe(&self) -> String {
        match &self.0 {
            Some(status) => describe_exit(status),
            None => {
                "ended (it was adopted after the agent's restart, so its exit status is not known)"
                    .to_string()
            }
        }
    }

    fn signal(&self) -> Option<i32> {
        self.0.and_then(|status| status.signal())
    }
}

/// What the agent holds of an instance's leader process.
enum Leader {
    /// A child this agent started.
    Child(tokio::process::Child),
    /// A process an earlier run of the agent started, found alive and adopted: a thread waits
    /// on its pidfd (readable once it exits) and says so here.
    Adopted(tokio::sync::watch::Receiver<bool>),
}

/// `/proc/PID` entries are stamped (ctime) when the kernel first makes them, with its coarse
/// clock, which lags the precise one by up to a tick (10 ms at HZ=100): an entry must be this
/// much older than a spawn to count as older than it.
const COARSE_CLOCK_LAG: Duration = Duration::from_millis(50);
/// How far the wall clock may have moved apart from the monotonic one between a spawn and a
/// stop (a step of the clock, a suspend) before entries' stamps are not trusted any more.
const CLOCK_DRIFT_ALLOWED: Duration = Duration::from_secs(1);

/// The clocks just before an instance's leader was spawned: what tells the processes surely
/// older than the instance (nothing of it) apart from the others, from a `stat` of their
/// `/proc` entry alone ([`older_cutoff`]).
#[derive(Debug, Clone, Copy)]
pub struct SpawnClocks {
    wall: std::time::SystemTime,
    mono: Instant,
}

impl SpawnClocks {
    fn now() -> SpawnClocks {
        SpawnClocks {
            wall: std::time::SystemTime::now(),
            mono: Instant::now(),
        }
    }
}

/// The stamp before which a `/proc/PID` entry belongs to a process that started before an
/// instance spawned at `spawned_wall`, `mono_elapsed` ago on the monotonic clock, given the
/// wall clock now. An entry is made at the first lookup of a live process, so never before
/// the process started; every process the instance started (and so every one carrying its
/// token) has an entry stamped after the spawn, less the coarse clock's lag. `None` when the
/// wall clock did not move with the monotonic one (stepped or suspended): then no stamp is
/// trusted. Pure.
pub fn older_cutoff(
    spawned_wall: std::time::SystemTime,
    mono_elapsed: Duration,
    now_wall: std::time::SystemTime,
) -> Option<std::time::SystemTime> {
    let wall_elapsed = now_wall.duration_since(spawned_wall).ok()?;
    let drift = wall_elapsed.abs_diff(mono_elapsed);
    if drift > CLOCK_DRIFT_ALLOWED {
        return None;
    }
    spawned_wall.checked_sub(COARSE_CLOCK_LAG)
}

/// A running (or just exited) instance process.
pub struct Instance {
    leader: Leader,
    pid: i32,
    /// When the leader started, in clock ticks after boot (`/proc/PID/stat`): with the token,
    /// what tells it from a later process that reuses its pid.
    start_ticks: Option<u64>,
    /// The clocks just before the spawn, when this run of the agent spawned it.
    spawned: Option<SpawnClocks>,
    token: String,
    stop_signal: Signal,
    stop_timeout: Duration,
    /// Set once the leader has been reaped; the group is not signalled after that.
    exit_status: Option<Exit>,
    /// Set once `stop` finished, or the instance was left running on purpose (`detach`): the
    /// drop guard then has nothing to do.
    stopped: bool,
    pub started_at: Instant,
}

/// An instance directory made afresh from a release beside the app's instance directory
/// (`DATA/instances/.next-<app>`, a name no app can have), while the instance before still
/// runs or stops: [`Instance::start_staged`] then only renames it into place. Made only by
/// linking (an app of its own user): a copy would need the release's bytes twice on disk.
#[derive(Debug)]
pub struct Staged {
    dir: PathBuf,
}

/// Where the directory of the next instance of the app whose instance directory is
/// `instance_dir` is made, and the prefix of where its last ones go while they are removed.
fn staging_dirs(instance_dir: &Path) -> (PathBuf, PathBuf) {
    let name = instance_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let parent = instance_dir.parent().unwrap_or(Path::new("."));
    (
        parent.join(format!(".next-{name}")),
        parent.join(format!(".old-{name}-")),
    )
}

/// Removes what is left of an app's earlier instance directories moved aside (by a start that a
/// crash of the agent interrupted, or whose removal is still under way: then one of the two
/// removals gives up, and the next start takes what is left). Blocking.
fn remove_moved_aside(old_prefix: &Path) {
    let (Some(parent), Some(prefix)) = (old_prefix.parent(), old_prefix.file_name()) else {
        return;
    };
    let prefix = prefix.to_string_lossy();
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        // The prefix and a token (32 hex digits): `.old-web-` must not take `.old-web-api-…`.
        let ours = name
            .strip_prefix(&*prefix)
            .is_some_and(|token| token.len() == 32 && token.bytes().all(|b| b.is_ascii_hexdigit()));
        if ours {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn absolute_instance_dir(layout: &DataLayout, app: &str) -> PathBuf {
    std::path::absolute(layout.instance_dir(app)).unwrap_or_else(|_| layout.instance_dir(app))
}

impl Instance {
    /// Makes the next instance's directory from `release_dir` beside the live one, for an app
    /// that runs as a user of its own (`None` otherwise: [`Instance::start`] copies then).
    pub async fn stage(
        layout: &DataLayout,
        release_dir: &Path,
        vars: &InstanceVars,
    ) -> Option<Result<Staged, InstanceError>> {
        vars.run_as.ids()?;
        let (next, old_prefix) = staging_dirs(&absolute_instance_dir(layout, &vars.app));
        let (from, to, run_as) = (release_dir.to_path_buf(), next.clone(), vars.run_as.clone());
        let made = tokio::task::spawn_blocking(move || {
            remove_moved_aside(&old_prefix);
            prepare_from_origin(&from, &to, &run_as)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        Some(
            made.map(|()| Staged { dir: next.clone() })
                .map_err(|source| InstanceError::Prepare { path: next, source }),
        )
    }

    /// Starts a fresh instance of a release from origin state.
    pub async fn start(
        layout: &DataLayout,
        release_dir: &Path,
        manifest: &Manifest,
        vars: &InstanceVars,
    ) -> Result<Instance, InstanceError> {
        let instance_dir = absolute_instance_dir(layout, &vars.app);
        let (from, to, run_as) = (
            release_dir.to_path_buf(),
            instance_dir.clone(),
            vars.run_as.clone(),
        );
        tokio::task::spawn_blocking(move || prepare_from_origin(&from, &to, &run_as))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            .map_err(|source| InstanceError::Prepare {
                path: instance_dir.clone(),
                source,
            })?;
        Instance::spawn(layout, manifest, vars, instance_dir).await
    }

    /// Starts a fresh instance in a directory [`Instance::stage`] made: the last instance's
    /// directory (its process stopped) is moved aside and removed on the blocking pool, the
    /// staged one renamed into its place, and the process spawned there.
    pub async fn start_staged(
        layout: &DataLayout,
        staged: Staged,
        manifest: &Manifest,
        vars: &InstanceVars,
    ) -> Result<Instance, InstanceError> {
        let instance_dir = absolute_instance_dir(layout, &vars.app);
        let (_, old_prefix) = staging_dirs(&instance_dir);
        let mut old = old_prefix.into_os_string();
        old.push(crate::state::new_token());
        let old = PathBuf::from(old);
        let swap = || -> std::io::Result<()> {
            match std::fs::rename(&instance_dir, &old) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            std::fs::rename(&staged.dir, &instance_dir)
        };
        swap().map_err(|source| InstanceError::Prepare {
            path: instance_dir.clone(),
            source,
        })?;
        tokio::task::spawn_blocking(move || {
            let _ = std::fs::remove_dir_all(&old);
        });
        Instance::spawn(layout, manifest, vars, instance_dir).await
    }

    /// Spawns the instance's process in `instance_dir`, made afresh from the release.
    async fn spawn(
        layout: &DataLayout,
        manifest: &Manifest,
        vars: &InstanceVars,
        instance_dir: PathBuf,
    ) -> Result<Instance, InstanceError> {
        if let Some((uid, _)) = vars.run_as.ids() {
            // The instance directory is the app's own; every one above it must be searchable.
            let above = instance_dir.parent().unwrap_or(&instance_dir);
            if let Some(closed) = crate::app_user::unreachable_for_others(above) {
                return Err(InstanceError::Unreachable { uid, closed });
            }
        }
        let env = instance_env(vars, manifest);
        let token = crate::state::new_token();
        let command: Vec<String> = manifest
            .process
            .command
            .iter()
            .map(|arg| substitute(arg, &env))
            .collect();
        let program = resolve_program(&command[0], &instance_dir);

        let log_path = layout.log_file(&vars.app);
        let log_error = |source| InstanceError::Log {
            path: log_path.clone(),
            source,
        };
        // Opened for the child itself (no pipe through the agent), so an instance adopted after
        // the agent's restart keeps logging; see `crate::app_log` for the bounds.
        let mut log = crate::app_log::open_append(&log_path).map_err(log_error)?;
        writeln!(
            log,
            "--- fleet-agent: starting {} {} at unix_ms {} ---",
            vars.app,
            vars.version,
            fleet_proto::now_unix_ms()
        )
        .map_err(log_error)?;
        let stderr = log.try_clone().map_err(log_error)?;

        let mut cmd = tokio::process::Command::new(&program);
        cmd.args(&command[1..])
            .current_dir(&instance_dir)
            .env_clear()
            .envs(inherited_env())
            .envs(process_env(vars, manifest))
            .env(INSTANCE_ID_VAR, &token)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr))
            .process_group(0)
            .kill_on_drop(false);
        vars.run_as.apply(&mut cmd);
        let spawned = SpawnClocks::now();
        let child = cmd.spawn().map_err(|source| InstanceError::Spawn {
            program: command[0].clone(),
            source,
        })?;
        let pid = child.id().map(|p| p as i32).unwrap_or(0);
        Ok(Instance {
            leader: Leader::Child(child),
            pid,
            start_ticks: start_ticks(pid),
            spawned: Some(spawned),
            token,
            stop_signal: nix_signal(manifest.process.stop_signal),
            stop_timeout: manifest.process.stop_timeout,
            exit_status: None,
            stopped: false,
            started_at: Instant::now(),
        })
    }

    /// Adopts the instance an earlier run of the agent started, when it still runs: its pid
    /// carries the recorded token and, when recorded, started at the recorded time. `None`
    /// when it is gone or the pid is now another process's.
    pub fn adopt(saved: &SavedInstance) -> Option<Instance> {
        if saved.pid <= 0 || !has_token(saved.pid, &saved.token) {
            return None;
        }
        if saved.start_ticks.is_some() && saved.start_ticks != start_ticks(saved.pid) {
            return None;
        }
        let pid = rustix::process::Pid::from_raw(saved.pid)?;
        let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()?;
        let (exited_tx, exited) = tokio::sync::watch::channel(false);
        // A plain thread, not the blocking pool: it may wait as long as the process runs, and
        // the runtime must not wait for it when it shuts down.
        std::thread::Builder::new()
            .name(format!("pidfd-{}", saved.pid))
            .spawn(move || {
                use rustix::event::{poll, PollFd, PollFlags};
                loop {
                    let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
                    match poll(&mut fds, None) {
                        Ok(_) if !fds[0].revents().is_empty() => break,
                        Ok(_) | Err(rustix::io::Errno::INTR) => continue,
                        Err(_) => break,
                    }
                }
                let _ = exited_tx.send(true);
            })
            .ok()?;
        Some(Instance {
            leader: Leader::Adopted(exited),
            pid: saved.pid,
            start_ticks: start_ticks(saved.pid),
            spawned: None,
            token: saved.token.clone(),
            stop_signal: signal_by_name(&saved.stop_signal).unwrap_or(Signal::SIGTERM),
            stop_timeout: Duration::from_millis(saved.stop_timeout_ms),
            exit_status: None,
            stopped: false,
            started_at: Instant::now(),
        })
    }

    /// Leaves the instance running when this value goes (the agent is stopping or being
    /// upgraded; its next run adopts the instance).
    pub fn detach(&mut self) {
        self.stopped = true;
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    /// What `state.json` records about this instance, started from release `version` with
    /// the artifact `digest`.
    pub fn saved(&self, version: &str, digest: &str) -> SavedInstance {
        SavedInstance {
            version: version.to_string(),
            artifact_digest: digest.to_string(),
            start_ticks: self.start_ticks,
            pid: self.pid,
            token: self.token.clone(),
            stop_signal: self
                .stop_signal
                .as_str()
                .trim_start_matches("SIG")
                .to_string(),
            stop_timeout_ms: self.stop_timeout.as_millis() as u64,
        }
    }

    /// Waits for the leader to exit on its own. Cancel safe; returns at once once exited.
    pub async fn wait(&mut self) -> Exit {
        if let Some(exit) = self.exit_status {
            return exit;
        }
        let exit = match &mut self.leader {
            Leader::Child(child) => match child.wait().await {
                Ok(status) => Exit(Some(status)),
                Err(e) => {
                    tracing::warn!(pid = self.pid, "cannot wait for the instance: {e}");
                    Exit(Some(ExitStatus::from_raw(0x7f00)))
                }
            },
            Leader::Adopted(exited) => {
                // An error means the waiting thread is gone, which it is only once it saw the
                // exit (or could not wait): either way the process is taken as ended.
                let _ = exited.wait_for(|exited| *exited).await;
                Exit(None)
            }
        };
        self.exit_status = Some(exit);
        exit
    }

    /// Stops the instance: stop signal to the group, `stop_timeout`, then SIGKILL to the group;
    /// stragglers carrying the token are killed too. Idempotent. Returns what happened.
    pub async fn stop(&mut self) -> String {
        if self.stopped {
            return "already stopped".into();
        }
        let outcome = if let Some(exit) = self.exit_status {
            exit.describe()
        } else {
            let group = Pid::from_raw(self.pid);
            let _ = killpg(group, self.stop_signal);
            match tokio::time::timeout(self.stop_timeout, self.wait()).await {
                Ok(exit) if exit.signal() == Some(self.stop_signal as i32) || exit.0.is_none() => {
                    format!("stopped by {}", self.stop_signal)
                }
                Ok(exit) => format!("{} after {}", exit.describe(), self.stop_signal),
                Err(_) => {
                    let _ = killpg(group, Signal::SIGKILL);
                    let _ = tokio::time::timeout(KILL_WAIT, self.wait()).await;
                    format!(
                        "did not stop within {} of {}; killed with SIGKILL",
                        fleet_proto::duration::format_duration(self.stop_timeout),
                        self.stop_signal
                    )
                }
            }
        };
        kill_token_holders(&self.token, self.start_ticks, self.spawned).await;
        self.stopped = true;
        outcome
    }
}

impl Drop for Instance {
    /// The safety net: an instance dropped without `stop` (a panic, a test) leaves nothing.
    fn drop(&mut self) {
        if !self.stopped && self.exit_status.is_none() && self.pid > 0 {
            let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
        }
    }
}

/// When process `pid` started, in clock ticks after boot (field 22 of `/proc/PID/stat`).
pub fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from its end.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// Whether process `pid` carries `FLEET_INSTANCE_ID=<token>` in its environment.
pub fn has_token(pid: i32, token: &str) -> bool {
    let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let wanted = format!("{INSTANCE_ID_VAR}={token}");
    environ
        .split(|b| *b == 0)
        .any(|var| var == wanted.as_bytes())
}

/// Every live process that carries the token (an instance's leader and whatever it started).
/// Whatever carries the token was started by the instance, after its leader, so only younger
/// processes are read: with `spawned` (when the leader was spawned, by this run of the agent),
/// a process whose `/proc` entry is stamped before it ([`older_cutoff`]) is passed over on a
/// `stat` of that entry, which costs a few microseconds; with `since_ticks` (when the leader
/// started), a process that started before it, read from `/proc/PID/stat`, which costs tens
/// of microseconds on a busy host. What is left has its environment read. On a host where the
/// agent's apps run beside hundreds of other processes, a stop then reads almost nothing.
fn token_holders(token: &str, since_ticks: Option<u64>, spawned: Option<SpawnClocks>) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let cutoff = spawned.and_then(|spawned| {
        older_cutoff(
            spawned.wall,
            spawned.mono.elapsed(),
            std::time::SystemTime::now(),
        )
    });
    let surely_older = |pid: i32| {
        let Some(cutoff) = cutoff else {
            return false;
        };
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/proc/{pid}")).is_ok_and(|meta| {
            let stamp = std::time::UNIX_EPOCH
                + Duration::new(meta.ctime().max(0) as u64, meta.ctime_nsec().max(0) as u32);
            stamp < cutoff
        })
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != std::process::id() as i32)
        .filter(|pid| !surely_older(*pid))
        .filter(
            |pid| match (since_ticks, since_ticks.and_then(|_| start_ticks(*pid))) {
                (Some(since), Some(started)) => started >= since,
                // Unknown (or gone meanwhile): read its environment.
                _ => true,
            },
        )
        .filter(|pid| has_token(*pid, token))
        .collect()
}

/// SIGKILLs every process still carrying the token, and waits (bounded) for them to go: on
/// each one's pidfd, so the wait ends when the last of them does, not at a poll.
async fn kill_token_holders(token: &str, since_ticks: Option<u64>, spawned: Option<SpawnClocks>) {
    let deadline = tokio::time::Instant::now() + KILL_WAIT;
    loop {
        let holders = token_holders(token, since_ticks, spawned);
        if holders.is_empty() || tokio::time::Instant::now() >= deadline {
            return;
        }
        let mut gone = Vec::new();
        for pid in holders {
            // The pidfd first, then the check: the signal goes to the process that was checked.
            let Some(exit) = ProcessExit::watch(pid) else {
                continue;
            };
            if has_token(pid, token) {
                let _ = exit.send(Signal::SIGKILL);
                gone.push(exit);
            }
        }
        for exit in &gone {
            exit.wait_until(deadline).await;
        }
    }
}

/// The exit of a process that need not be our child, through its pidfd (readable once the
/// process has exited): a wait that ends when it does, with no polling.
struct ProcessExit {
    pidfd: Arc<std::os::fd::OwnedFd>,
}

impl ProcessExit {
    /// `None` when `pid` is gone (or invalid).
    fn watch(pid: i32) -> Option<ProcessExit> {
        let pid = rustix::process::Pid::from_raw(pid)?;
        let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()?;
        Some(ProcessExit {
            pidfd: Arc::new(pidfd),
        })
    }

    /// Sends `signal` to the process (never to a later one that reuses its pid).
    fn send(&self, signal: Signal) -> std::io::Result<()> {
        let signal = rustix::process::Signal::from_named_raw(signal as i32)
            .ok_or_else(|| std::io::Error::other("unknown signal"))?;
        rustix::process::pidfd_send_signal(&*self.pidfd, signal).map_err(std::io::Error::from)
    }

    /// Waits until the process exits or `until`; whether it exited. The wait (a `poll` on the
    /// pidfd) runs on the blocking pool, never on the agent's one runtime thread.
    async fn wait_until(&self, until: tokio::time::Instant) -> bool {
        let pidfd = self.pidfd.clone();
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        tokio::task::spawn_blocking(move || {
            use rustix::event::{poll, PollFd, PollFlags, Timespec};
            let deadline = Instant::now() + left;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let timeout = Timespec {
                    tv_sec: left.as_secs() as _,
                    tv_nsec: left.subsec_nanos() as _,
                };
                let mut fds = [PollFd::new(&*pidfd, PollFlags::IN)];
                match poll(&mut fds, Some(&timeout)) {
                    Ok(_) if !fds[0].revents().is_empty() => return true,
                    Ok(_) if left.is_zero() => return false,
                    Ok(_) | Err(rustix::io::Errno::INTR) => continue,
                    Err(_) => return false,
                }
            }
        })
        .await
        .unwrap_or(false)
    }
}

/// After the agent's own restart: stops the instances an earlier run recorded, but only those
/// whose pid still carries the recorded token. Stop signal to the group, `stop_timeout`, then
/// SIGKILL; all of them at once.
pub async fn kill_leftovers(saved: &BTreeMap<String, SavedInstance>) {
    let stops = saved.iter().map(|(app, instance)| async move {
        if !has_token(instance.pid, &instance.token) {
            tracing::info!(%app, pid = instance.pid, "the instance recorded by the last run is gone");
            kill_token_holders(&instance.token, instance.start_ticks, None).await;
            return;
        }
        tracing::info!(%app, pid = instance.pid, "stopping the instance left by the last run");
        let group = Pid::from_raw(instance.pid);
        let signal = signal_by_name(&instance.stop_signal).unwrap_or(Signal::SIGTERM);
        // Watched before the signal, and checked again: the wait is on the process that was
        // checked, not on a later one that reuses its pid.
        let exit = ProcessExit::watch(instance.pid)
            .filter(|_| has_token(instance.pid, &instance.token));
        let _ = killpg(group, signal);
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(instance.stop_timeout_ms);
        let exited = match &exit {
            Some(exit) => exit.wait_until(deadline).await,
            None => true,
        };
        if !exited && has_token(instance.pid, &instance.token) {
            let _ = killpg(group, Signal::SIGKILL);
        }
        kill_token_holders(&instance.token, instance.start_ticks, None).await;
    });
    futures::future::join_all(stops).await;
}

fn signal_by_name(name: &str) -> Option<Signal> {
    format!("SIG{}", name.trim_start_matches("SIG"))
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::kill;

    fn manifest(text: &str) -> Manifest {
        Manifest::parse(text).unwrap()
    }

    fn vars(layout: &DataLayout, app: &str) -> InstanceVars {
        InstanceVars {
            app: app.into(),
            version: "1.0".into(),
            host_name: "h1".into(),
            advertise: "127.0.0.1".into(),
            release_env: BTreeMap::from([("GREETING".into(), "from-release".into())]),
            secrets: Default::default(),
            state_dir: layout.app_state_dir(app),
            run_as: crate::app_user::prepare(layout, app, None).unwrap(),
        }
    }

    fn release(layout: &DataLayout, files: &[(&str, &str, u32)]) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let dir = layout.root().join("releases/app/1.0-000000000000");
        std::fs::create_dir_all(&dir).unwrap();
        for (path, text, mode) in files {
            let path = dir.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode)).unwrap();
        }
        dir
    }

    async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[test]
    fn builds_env_and_resolves_programs() {
        let m = manifest(
            "[process]\ncommand = [\"x\"]\nenv = { GREETING = \"manifest\", ONLY = \"m\" }\n",
        );
        let env = instance_env(&vars(&DataLayout::new(Path::new("/data")), "web"), &m);
        assert_eq!(env["GREETING"], "from-release");
        assert_eq!(env["ONLY"], "m");
        assert_eq!(env["FLEET_APP"], "web");
        assert_eq!(env["FLEET_ADDR"], "127.0.0.1");
        assert_eq!(env["FLEET_STATE_DIR"], "/data/app-state/web");
        let dir = Path::new("/srv/i");
        assert_eq!(resolve_program("/bin/sh", dir), PathBuf::from("/bin/sh"));
        assert_eq!(resolve_program("bin/web", dir), dir.join("bin/web"));
        assert_eq!(resolve_program("sh", dir), PathBuf::from("sh"));
        assert_eq!(signal_by_name("TERM"), Some(Signal::SIGTERM));
        assert_eq!(signal_by_name("SIGUSR1"), Some(Signal::SIGUSR1));
        assert_eq!(signal_by_name("NOPE"), None);
    }

    #[tokio::test]
    async fn every_start_begins_from_origin() {
        let dir = tempfile::tempdir().unwrap();
        let layout = DataLayout::new(dir.path());
        layout.create_all().unwrap();
        let release_dir = release(
            &layout,
            &[(
                "bin/run.sh",
                "echo \"$GREETING ${1}\" > written\nexec sleep 30\n",
                0o755,
            )],
        );
        let m = manifest(
            "[process]\ncommand = [\"/bin/sh\", \"bin/run.sh\", \"${FLEET_HOST}\"]\nstop_timeout = \"5s\"\n",
        );
        let written = layout.instance_dir("app").join("written");

        let mut first = Instance::start(&layout, &release_dir, &m, &vars(&layout, "app"))
            .await
            .unwrap();
        // The shell creates the file before `echo` fills it: wait for the whole line.
        eventually("the instance to write its file", || {
            std::fs::read_to_string(&written).is_ok_and(|text| text == "from-release h1\n")
        })
        .await;
        // The file appears before the shell execs `sleep`; while it execs, /proc/PID/environ
        // may not be readable.
        eventually("the instance to carry its token", || {
            has_token(first.pid(), first.token())
        })
        .await;
        std::fs::write(layout.instance_dir("app").join("junk"), "x").unwrap();
        let outcome = first.stop().await;
        assert!(outcome.contains("SIGTERM"), "{outcome}");
        assert!(!has_token(first.pid(), first.token()));

        let mut second = Instance::start(&layout, &release_dir, &m, &vars(&layout, "app"))
            .await
            .unwrap();
        assert!(
            !layout.instance_dir("app").join("junk").exists(),
            "what the earlier instance left must be gone"
        );
        eventually("the second instance to write its file", || written.exists()).await;
        second.stop().await;
        let log = std::fs::read_to_string(layout.log_file("app")).unwrap();
        assert_eq!(log.matches("--- fleet-agent: starting app 1.0").count(), 2);
        // The release itself was never written to.
        assert!(!release_dir.join("written").exists());
    }

    #[tokio::test]
    async fn a_replacement_made_beside_the_live_instance_begins_from_origin() {
        let dir = tempfile::tempdir().unwrap();
        let layout = DataLayout::new(dir.path());
        layout.create_all().unwrap();
        let release_dir = release(
            &layout,
            &[("bin/run.sh", "echo up > written\nexec sleep 30\n", 0o755)],
        );
        let m = manifest("[process]\ncommand = [\"/bin/sh\", \"bin/run.sh\"]\n");
        let vars = vars(&layout, "app");
        let Some(_) = vars.run_as.ids() else {
            // An agent that is not root copies, in place.
            assert!(Instance::stage(&layout, &release_dir, &vars)
                .await
                .is_none());
            return;
        };
        let inst = layout.instance_dir("app");
        let mut first = Instance::start(&layout, &release_dir, &m, &vars)
            .await
            .unwrap();
        eventually("the first instance to write", || {
            inst.join("written").exists()
        })
        .await;
        std::fs::write(inst.join("junk"), "x").unwrap();
        // Made while the first instance still runs, beside its directory.
        let staged = Instance::stage(&layout, &release_dir, &vars)
            .await
            .unwrap()
            .unwrap();
        assert!(
            inst.join("junk").exists(),
            "the live instance's directory is left alone"
        );
        first.stop().await;
        let mut second = Instance::start_staged(&layout, staged, &m, &vars)
            .await
            .unwrap();
        assert!(
            !inst.join("junk").exists(),
            "what the earlier instance left is gone"
        );
        eventually("the second instance to write", || {
            inst.join("written").exists()
        })
        .await;
        let instances = inst.parent().unwrap().to_path_buf();
        eventually("the old directory to be removed", || {
            std::fs::read_dir(&instances)
                .unwrap()
                .flatten()
                .all(|e| e.file_name() == "app")
        })
        .await;
        second.stop().await;
        assert!(!release_dir.join("written").exists());
    }

    #[tokio::test]
    async fn an_app_runs_as_its_own_user_and_cannot_change_its_release() {
        if !crate::app_user::drops_privileges() {
            eprintln!("skipped: running apps as other users needs the test to run as root");
            return;
        }
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let layout = DataLayout::new(dir.path());
        layout.create_all().unwrap();
        let release_dir = release(
            &layout,
            &[
                ("bin/run.sh", "id -u > uid\n(echo changed >> data.txt) 2>/dev/null && echo changed > write || echo refused > write\ncat ../../state.json > /dev/null 2>&1 && echo read > agent || echo refused > agent\nrm -f conf.txt && echo mine > conf.txt && echo replaced > replace\nexec sleep 30\n", 0o755),
                ("data.txt", "shipped\n", 0o600),
                ("conf.txt", "shipped\n", 0o644),
            ],
        );
        // As the agent writes it: private (its binary runs with umask 077).
        std::fs::write(layout.state_file(), "{}").unwrap();
        std::fs::set_permissions(
            layout.state_file(),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let m = manifest("[process]\ncommand = [\"/bin/sh\", \"bin/run.sh\"]\n");
        let vars = vars(&layout, "app");
        let (uid, gid) = vars.run_as.ids().unwrap();
        let mut instance = Instance::start(&layout, &release_dir, &m, &vars)
            .await
            .unwrap();
        let inst = layout.instance_dir("app");
        eventually("the instance to try its writes", || {
            inst.join("replace").exists()
        })
        .await;
        let read = |name: &str| std::fs::read_to_string(inst.join(name)).unwrap();
        assert_eq!(read("uid").trim(), uid.to_string(), "runs as its own user");
        assert_eq!(
            read("write").trim(),
            "refused",
            "cannot change a shipped file"
        );
        assert_eq!(
            read("agent").trim(),
            "refused",
            "cannot read the agent's state"
        );
        assert_eq!(
            read("replace").trim(),
            "replaced",
            "can replace a shipped file"
        );
        assert_eq!(read("conf.txt"), "mine\n");
        // The release is as shipped, and the instance's files are its very files (no copy).
        assert_eq!(
            std::fs::read_to_string(release_dir.join("data.txt")).unwrap(),
            "shipped\n"
        );
        assert_eq!(
            std::fs::read_to_string(release_dir.join("conf.txt")).unwrap(),
            "shipped\n"
        );
        for name in ["bin/run.sh", "data.txt"] {
            let (shipped, linked) = (
                std::fs::metadata(release_dir.join(name)).unwrap(),
                std::fs::metadata(inst.join(name)).unwrap(),
            );
            assert_eq!(shipped.ino(), linked.ino(), "{name} is a hard link");
            assert_eq!((shipped.uid(), shipped.gid()), (0, gid), "{name}");
        }
        assert_eq!(
            std::fs::metadata(release_dir.join("bin/run.sh"))
                .unwrap()
                .mode()
                & 0o777,
            0o750
        );
        assert_eq!(
            std::fs::metadata(release_dir.join("data.txt"))
                .unwrap()
                .mode()
                & 0o777,
            0o640
        );
        let state_dir = std::fs::metadata(layout.app_state_dir("app")).unwrap();
        assert_eq!(state_dir.uid(), uid, "FLEET_STATE_DIR is the app's");
        instance.stop().await;
    }

    #[tokio::test]
    async fn an_instance_left_running_is_adopted_only_by_its_token_and_start_time() {
        let dir = tempfile::tempdir().unwrap();
        let layout = DataLayout::new(dir.path());
        layout.create_all().unwrap();
        let release_dir = release(&layout, &[]);
        let m = manifest("[process]\ncommand = [\"sleep\", \"60\"]\n");
        let mut started = Instance::start(&layout, &release_dir, &m, &vars(&layout, "app"))
            .await
            .unwrap();
        let pid = started.pid();
        eventually("the token to show", || has_token(pid, started.token())).await;
        let saved = started.saved("1.0", "sha256:00");
        assert_eq!(saved.start_ticks, start_ticks(pid));
        assert!(saved.start_ticks.is_some());
        // The agent that started it goes away without stopping it.
        started.detach();
        drop(started);
        assert!(
            has_token(pid, &saved.token),
            "a detached instance keeps running"
        );

        let mut wrong = saved.clone();
        wrong.token = "0".repeat(32);
        assert!(Instance::adopt(&wrong).is_none(), "another token");
        let mut reused = saved.clone();
        reused.start_ticks = saved.start_ticks.map(|t| t + 1);
        assert!(Instance::adopt(&reused).is_none(), "a pid reused since");

        let mut adopted = Instance::adopt(&saved).expect("adopted");
        assert_eq!(adopted.pid(), pid);
        // Not its child, and still watched: its end is seen (with no exit status to tell).
        kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
        let exit = tokio::time::timeout(Duration::from_secs(5), adopted.wait())
            .await
            .expect("the adopted instance's end is seen");
        assert_eq!(exit, Exit(None));
        assert!(exit.describe().contains("adopted"), "{}", exit.describe());
        adopted.stop().await;
    }

    #[tokio::test]
    async fn graceful_stop_escalates_to_sigkill_for_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let layout = DataLayout::new(dir.path());
        layout.create_all().unwrap();
        let release_dir = release(&layout, &[]);
        // The shell ignores TERM and so does the child it leaves in the group.
        let m = manifest(
            "[process]\ncommand = [\"/bin/sh\", \"-c\", \"trap '' TERM; sleep 60 & echo ready > ready; wait\"]\nstop_timeout = \"300ms\"\n",
        );
        let mut instance = Instance::start(&layout, &release_dir, &m, &vars(&layout, "app"))
            .await
            .unwrap();
        let ready = layout.instance_dir("app").join("ready");
        eventually("the instance to be ready", || ready.exists()).await;
        let token = instance.token().to_string();
        // While the child execs `sleep`, its /proc/PID/environ may not be readable: wait.
        eventually("the leader and its child to carry the token", || {
            token_holders(&token, None, None).len() >= 2
        })
        .await;
        let started = Instant::now();
        let outcome = instance.stop().await;
        assert!(outcome.contains("killed with SIGKILL"), "{outcome}");
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(
            token_holders(&token, None, None).is_empty(),
            "nothing of the group survives"
        );
    }

    #[test]
    fn proc_entries_are_trusted_only_while_the_wall_clock_keeps_time() {
        let spawned = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let ms = Duration::from_millis;
        let s = Duration::from_secs;
        for (mono_elapsed, wall_now, expect) in [
            // The clocks moved together: entries stamped 50 ms before the spawn are older.
            (ms(200), spawned + ms(200), Some(spawned - COARSE_CLOCK_LAG)),
            (
                s(3600),
                spawned + s(3600) + ms(900),
                Some(spawned - COARSE_CLOCK_LAG),
            ),
            (
                s(3600),
                spawned + s(3600) - ms(900),
                Some(spawned - COARSE_CLOCK_LAG),
            ),
            // Stepped forward or back, or suspended: nothing is trusted.
            (ms(200), spawned + s(5), None),
            (s(10), spawned + s(2), None),
            (ms(200), spawned - s(1), None),
        ] {
            assert_eq!(
                older_cutoff(spawned, mono_elapsed, wall_now),
                expect,
                "{mono_elapsed:?} on the monotonic clock, {wall_now:?} on the wall"
            );
        }
    }

    #[tokio::test]
    async fn a_process_that_left_the_group_is_found_by_its_token_and_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let layout = DataLayout::new(dir.path());
        layout.create_all().unwrap();
        let release_dir = release(&layout, &[]);
        // The child moves to a session (and group) of its own: only its token gives it away.
        let m = manifest(
            "[process]\ncommand = [\"/bin/sh\", \"-c\", \"setsid -f sleep 60; echo ready > ready; exec sleep 60\"]\nstop_timeout = \"5s\"\n",
        );
        let mut instance = Instance::start(&layout, &release_dir, &m, &vars(&layout, "app"))
            .await
            .unwrap();
        let ready = layout.instance_dir("app").join("ready");
        eventually("the instance to be ready", || ready.exists()).await;
        let token = instance.token().to_string();
        eventually(
            "the leader and the escaped child to carry the token",
            || token_holders(&token, None, None).len() >= 2,
        )
        .await;
        // Found by the same scan a stop makes (the entries' stamps and start times first).
        assert!(
            token_holders(&token, instance.start_ticks, instance.spawned).len() >= 2,
            "the filters pass over nothing of the instance"
        );
        instance.stop().await;
        assert!(
            token_holders(&token, None, None).is_empty(),
            "the process that left the group is stopped too"
        );
    }

    #[tokio::test]
    async fn leftovers_are_stopped_only_when_the_token_matches() {
        let dir = tempfile::tempdir().unwrap();
        let layout = DataLayout::new(dir.path());
        layout.create_all().unwrap();
        let release_dir = release(&layout, &[]);
        // No shell: reading /proc/<pid>/environ while a shell execs may fail for a moment.
        let m = manifest("[process]\ncommand = [\"sleep\", \"60\"]\n");
        let mut instance = Instance::start(&layout, &release_dir, &m, &vars(&layout, "app"))
            .await
            .unwrap();
        let pid = instance.pid();
        eventually("the token to show", || has_token(pid, instance.token())).await;
        let mut wrong = instance.saved("1.0", "sha256:00");
        wrong.token = "0".repeat(32);
        kill_leftovers(&BTreeMap::from([("app".to_string(), wrong)])).await;
        assert!(
            has_token(pid, instance.token()),
            "a wrong token never kills"
        );

        let saved = instance.saved("1.0", "sha256:00");
        kill_leftovers(&BTreeMap::from([("app".to_string(), saved)])).await;
        let status = tokio::time::timeout(Duration::from_secs(5), instance.wait())
            .await
            .expect("the leftover instance is stopped");
        assert_eq!(status.describe(), "killed by SIGTERM");
        instance.stop().await;
    }
}
