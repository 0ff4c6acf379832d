//! The release hook (`[hooks] release` in `fleet.toml`): a command run once per rollout, on the
//! first host that takes the release, before its instance starts — a database migration, say.
//! It runs in a fresh copy of the release (`DATA/hooks/<app>`, removed afterwards) as the app's
//! user with the instance's environment, its output appended to the app's log, in its own process group so
//! a timeout kills all of it. A hook that fails or times out fails the deploy on that host
//! before the old instance is touched.

use crate::instance::{
    inherited_env, instance_env, prepare_from_origin, process_env, resolve_program, InstanceVars,
};
use crate::model::DataLayout;
use fleet_proto::manifest::{substitute, Manifest};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

/// How long a release hook may run.
pub const HOOK_TIMEOUT: Duration = fleet_proto::manifest::RELEASE_HOOK_TIMEOUT;

/// Runs the manifest's release hook, if it has one; returns what to report.
pub async fn run_release_hook(
    layout: &DataLayout,
    release_dir: &Path,
    manifest: &Manifest,
    vars: &InstanceVars,
    timeout: Duration,
) -> Result<String, String> {
    let Some(hook) = &manifest.release_hook else {
        return Ok("no release hook".to_string());
    };
    let hook_dir = layout.root().join("hooks").join(&vars.app);
    let (from, to, run_as) = (
        release_dir.to_path_buf(),
        hook_dir.clone(),
        vars.run_as.clone(),
    );
    tokio::task::spawn_blocking(move || prepare_from_origin(&from, &to, &run_as))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        .map_err(|e| {
            format!(
                "cannot prepare {} for the release hook: {e}",
                hook_dir.display()
            )
        })?;
    let result = run_in(&hook_dir, hook, layout, manifest, vars, timeout).await;
    let _ = tokio::fs::remove_dir_all(&hook_dir).await;
    result
}

async fn run_in(
    dir: &Path,
    hook: &[String],
    layout: &DataLayout,
    manifest: &Manifest,
    vars: &InstanceVars,
    timeout: Duration,
) -> Result<String, String> {
    // A migration keeps its data in the app's lasting directory, which the supervisor made.
    let env = instance_env(vars, manifest);
    let command: Vec<String> = hook.iter().map(|arg| substitute(arg, &env)).collect();
    let log_path = layout.log_file(&vars.app);
    let open_log = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("cannot open {}: {e}", log_path.display()))
    };
    let (stdout, stderr) = (open_log()?, open_log()?);
    let mut child = tokio::process::Command::new(resolve_program(&command[0], dir));
    vars.run_as.apply(&mut child);
    let mut child = child
        .args(&command[1..])
        .current_dir(dir)
        .env_clear()
        .envs(inherited_env())
        .envs(process_env(vars, manifest))
        .stdin(Stdio::null())
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr))
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("release hook {:?} cannot start: {e}", command[0]))?;
    // Whatever way this ends — done, timed out, or the deploy superseded and this future
    // dropped — nothing of the hook's process group outlives it.
    let _group = GroupGuard(child.id().map(|p| Pid::from_raw(p as i32)));
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => {
            Ok(format!("release hook {:?} succeeded", command[0]))
        }
        Ok(Ok(status)) => Err(format!(
            "release hook {:?} {} (see the app's log)",
            command[0],
            crate::instance::describe_exit(&status)
        )),
        Ok(Err(e)) => Err(format!("release hook {:?}: {e}", command[0])),
        Err(_) => {
            if let Some(pid) = _group.0 {
                let _ = killpg(pid, Signal::SIGKILL);
            }
            let _ = child.wait().await;
            Err(format!(
                "release hook {:?} did not finish within {}",
                command[0],
                fleet_proto::duration::format_duration(timeout)
            ))
        }
    }
}

/// SIGKILLs a process group when dropped (a no-op once the group is gone).
struct GroupGuard(Option<Pid>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = killpg(pid, Signal::SIGKILL);
        }
    }
}
