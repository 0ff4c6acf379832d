//! What must hold after every try of a fault, each a check that returns what broke:
//!
//! - every host ends on one release of the app and serves it ([`converged`]);
//! - no instance runs twice on a host and none is orphaned: every example-app process under the
//!   fleet's directory is the one instance some host serves, one per host ([`processes`]);
//! - no acknowledged record is lost: every rollout id the controller gave the runner is in
//!   `history` ([`history`]);
//! - never more hosts down at once than the rollout's budget beyond those the fault itself
//!   took down ([`health_sampler`], sampling every host's `/healthz` during the try);
//! - the open files of the controller and of each agent back to their baseline (a small slack),
//!   and their resident memory within 10% of it ([`Baseline`], [`resources`]).
//!
//! The rollout's own end within its deadline is checked by the runner, which waits for it.

use super::bench::Bench;
use crate::fleet::Fleet;
use crate::process::{peak_rss_kib, rss_kib};
use crate::sampler::Sampler;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// Open files a process may hold above its baseline (a connection being reestablished, a log
/// file rotated, a blocking-pool thread's file).
pub const FD_SLACK: usize = 12;
/// Resident memory may grow by this share of the baseline…
pub const RSS_SHARE: f64 = 0.10;
/// …and by at least this much (small processes move by a few allocator pages).
pub const RSS_SLACK_KIB: u64 = 2 * 1024;
/// How long the processes get to settle back to their baseline.
const SETTLE_DEADLINE: Duration = Duration::from_secs(20);
/// How often the health sampler looks at every host.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

/// The open files and memory of one process.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub fds: usize,
    pub rss_kib: u64,
    /// The most resident memory the process has had (`VmHWM`).
    pub peak_rss_kib: u64,
}

impl Usage {
    pub fn of(pid: u32) -> Option<Usage> {
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
        Some(Usage {
            fds,
            rss_kib: rss_kib(pid)?,
            peak_rss_kib: peak_rss_kib(pid)?,
        })
    }
}

/// Each process's usage once the fleet has settled after its warm-up rollouts, by role
/// (`controller`, `h1`, …), so a process restarted by a fault is compared with the one it
/// replaced. Its memory is the peak of the warm-up (`VmHWM`): a rollout moves an agent's
/// resident memory by a few MiB (1 MiB slices in, 4 MiB blocks out), more than 10% of a
/// 30 MiB process, so memory after a try is held against what a plain rollout needed, and a
/// leak still shows as growth past it.
#[derive(Debug, Clone, Default)]
pub struct Baseline {
    pub usage: BTreeMap<String, Usage>,
}

/// The pid of each role now.
fn pids(fleet: &Fleet) -> BTreeMap<String, u32> {
    let mut pids = BTreeMap::from([("controller".to_string(), fleet.controller_pid())]);
    for name in fleet.host_names() {
        pids.insert(name.clone(), fleet.agent_pid(&name));
    }
    pids
}

impl Baseline {
    /// The usage of every process, taken twice a second apart, the larger of each kept.
    pub fn settle(fleet: &Fleet) -> Baseline {
        let mut usage: BTreeMap<String, Usage> = BTreeMap::new();
        for round in 0..2 {
            if round > 0 {
                std::thread::sleep(Duration::from_secs(1));
            }
            for (role, pid) in pids(fleet) {
                if let Some(now) = Usage::of(pid) {
                    let kept = usage.entry(role).or_default();
                    kept.fds = kept.fds.max(now.fds);
                    kept.rss_kib = kept.rss_kib.max(now.rss_kib).max(now.peak_rss_kib);
                }
            }
        }
        Baseline { usage }
    }
}

/// The usage of every process now, by role.
pub fn usage_now(fleet: &Fleet) -> BTreeMap<String, Usage> {
    pids(fleet)
        .into_iter()
        .filter_map(|(role, pid)| Some((role, Usage::of(pid)?)))
        .collect()
}

/// What is wrong with the processes' usage against `baseline`, waited for up to a deadline.
pub fn resources(fleet: &Fleet, baseline: &Baseline) -> Result<(), String> {
    let started = Instant::now();
    loop {
        let mut wrong = Vec::new();
        for (role, pid) in pids(fleet) {
            let Some(base) = baseline.usage.get(&role) else {
                continue;
            };
            let Some(now) = Usage::of(pid) else {
                wrong.push(format!("{role} (pid {pid}) is gone"));
                continue;
            };
            if now.fds > base.fds + FD_SLACK {
                wrong.push(format!(
                    "{role} holds {} open files (baseline {})",
                    now.fds, base.fds
                ));
            }
            let limit = ((base.rss_kib as f64) * (1.0 + RSS_SHARE)) as u64;
            let limit = limit.max(base.rss_kib + RSS_SLACK_KIB);
            if now.rss_kib > limit {
                wrong.push(format!(
                    "{role} resident memory {} KiB (baseline {} KiB, limit {limit} KiB)",
                    now.rss_kib, base.rss_kib
                ));
            }
        }
        if wrong.is_empty() {
            return Ok(());
        }
        if started.elapsed() > SETTLE_DEADLINE {
            return Err(wrong.join("; "));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Waits until every host serves `version` and `status` shows it running there.
pub fn converged(fleet: &Fleet, version: &str, deadline: Duration) -> Result<(), String> {
    converged_to(fleet, |_, _| Some(version.to_string()), deadline)
}

/// After a rollout that halted without rolling back: waits until every host serves the release
/// `status` says it should run (its desired version), one of `allowed`, and shows it running
/// there; which host was left on which, as `h1 1.4.0, h2 1.3.0`.
pub fn converged_as_desired(
    fleet: &Fleet,
    allowed: &[&str],
    deadline: Duration,
) -> Result<String, String> {
    let mut left = BTreeMap::new();
    converged_to(
        fleet,
        |name, status| {
            let desired = status["hosts"]
                .as_array()?
                .iter()
                .find(|h| h["name"] == name)?["apps"]
                .as_array()?
                .iter()
                .find(|a| a["app"] == "web")?["desired_version"]
                .as_str()?
                .to_string();
            left.insert(name.to_string(), desired.clone());
            (allowed.is_empty() || allowed.contains(&desired.as_str())).then_some(desired)
        },
        deadline,
    )?;
    Ok(left
        .iter()
        .map(|(host, version)| format!("{host} {version}"))
        .collect::<Vec<_>>()
        .join(", "))
}

/// Waits until every host serves the version `expect` gives it (from `status`; `None`: no
/// acceptable version) and `status` shows it running there.
fn converged_to(
    fleet: &Fleet,
    mut expect: impl FnMut(&str, &serde_json::Value) -> Option<String>,
    deadline: Duration,
) -> Result<(), String> {
    let started = Instant::now();
    loop {
        let status = fleet.ctl(&["status", "web"]);
        let mut wrong = Vec::new();
        for name in fleet.host_names() {
            let Some(version) = expect(&name, &status.json) else {
                wrong.push(format!("{name}: no acceptable desired release in status"));
                continue;
            };
            let version = version.as_str();
            let expect = format!("web {version} on {name}\n");
            let served = fleet.web_get(&name, "/");
            if served.as_deref() != Some(expect.as_str()) {
                wrong.push(format!(
                    "{name} serves {:?}, not {version}",
                    served.as_deref().map(str::trim)
                ));
                continue;
            }
            let actual = (status.code == 0)
                .then(|| Fleet::actual_of(&status.json, &name, "web").cloned())
                .flatten();
            let running = actual
                .as_ref()
                .is_some_and(|a| a["state"] == "running" && a["version"] == version);
            if !running {
                wrong.push(format!(
                    "{name}: status shows {}",
                    actual.map_or("nothing".to_string(), |a| format!(
                        "{} {}",
                        a["version"], a["state"]
                    ))
                ));
            }
        }
        if wrong.is_empty() {
            return Ok(());
        }
        if started.elapsed() > deadline {
            return Err(wrong.join("; "));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The example app's processes running under `dir`, by the host whose data directory holds
/// their executable (`hosts/hN/…`; `?` when outside every host's).
fn app_processes(dir: &Path, web_name: &str) -> BTreeMap<String, Vec<u32>> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let hosts = dir.join("hosts");
    let mut found: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for pid in crate::process::pids_inside(&dir) {
        let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) else {
            continue;
        };
        let shown = exe.display().to_string();
        let is_app = exe
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n == web_name || n.starts_with(&format!("{web_name} ")));
        if !is_app || shown.contains("/target/") {
            continue;
        }
        let host = exe
            .strip_prefix(&hosts)
            .ok()
            .and_then(|rest| rest.iter().next())
            .map_or("?".to_string(), |h| h.to_string_lossy().into_owned());
        found.entry(host).or_default().push(pid);
    }
    found
}

/// Waits until each host runs exactly one instance, the one it serves, and no app process runs
/// outside them.
pub fn processes(fleet: &Fleet, deadline: Duration) -> Result<(), String> {
    let started = Instant::now();
    loop {
        let found = app_processes(fleet.dir(), "web");
        let mut wrong = Vec::new();
        for name in fleet.host_names() {
            let pids = found.get(&name).cloned().unwrap_or_default();
            let served = fleet.web_pid(&name);
            match (pids.as_slice(), served) {
                ([one], Some(pid)) if *one == pid => {}
                _ => wrong.push(format!(
                    "{name} runs app processes {pids:?} and serves from {served:?}"
                )),
            }
        }
        for (host, pids) in &found {
            if !fleet.host_names().contains(host) {
                wrong.push(format!("orphaned app processes {pids:?} under {host}"));
            }
        }
        if wrong.is_empty() {
            return Ok(());
        }
        if started.elapsed() > deadline {
            return Err(wrong.join("; "));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Every acknowledged rollout id is in `history web`.
pub fn history(fleet: &Fleet, acknowledged: &[String]) -> Result<(), String> {
    let out = fleet.ctl(&["history", "web", "--limit", "1000"]);
    let out = if out.code == 0 {
        out
    } else {
        fleet.ctl(&["history", "web"])
    };
    if out.code != 0 {
        return Err(format!("history web exited {}: {}", out.code, out.stderr));
    }
    let lost: Vec<&String> = acknowledged
        .iter()
        .filter(|id| !out.stdout.contains(&format!("\"{id}\"")))
        .collect();
    if lost.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "acknowledged rollouts missing from history: {lost:?}"
        ))
    }
}

/// Samples every host's `/healthz` (by name) every 100 ms until [`Sampler::finish`].
pub fn health_sampler(bench: &Bench) -> Sampler {
    Sampler::named(
        bench
            .fleet
            .agents()
            .iter()
            .map(|a| (a.name.clone(), a.advertise.clone()))
            .collect(),
        SAMPLE_INTERVAL,
    )
}
