//! `fleetctl upgrade-agents`: a new agent binary across the fleet, wave by wave, with no app
//! restarted. Each host is upgraded in place over SSH exactly as `bootstrap` upgrades it (the
//! same targets file serves both): the old agent stops, leaving its apps running, and the new
//! one adopts them. The first wave is one host; each later wave (`--batch`) starts only after
//! every host of the one before reconnected with the new agent and every app it ran is running
//! its release again. The first wave with a failure halts the upgrade: the hosts after it keep
//! the agent they have. The waves are [`upgrade_waves`], a plain function.

use crate::args::UpgradeAgentsArgs;
use crate::bootstrap::{self, HostResult, Prepared};
use crate::client::{usage, CliError, EXIT_FAILED, EXIT_OK};
use crate::commands::Context;
use crate::output;
use fleet_proto::pb;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

/// How long an upgraded host may take, after its agent registered again, until every app it
/// ran is running again.
const APPS_BACK_DEADLINE: Duration = Duration::from_secs(60);
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// The waves of an upgrade of `n` hosts: one host first, then `batch` at a time (`N` hosts, or
/// `P%` of all of them rounded up, at least one). Each wave is a range of indexes. Pure.
pub fn upgrade_waves(n: usize, batch: &str) -> Vec<std::ops::Range<usize>> {
    let size = match batch.strip_suffix('%') {
        Some(percent) => {
            let percent: usize = percent.parse().unwrap_or(100);
            (n * percent).div_ceil(100).max(1)
        }
        None => batch.parse::<usize>().unwrap_or(1).max(1),
    };
    let mut waves = Vec::new();
    if n == 0 {
        return waves;
    }
    waves.push(0..1);
    let mut start = 1;
    while start < n {
        let end = (start + size).min(n);
        waves.push(start..end);
        start = end;
    }
    waves
}

/// One host's upgrade, as `--output json` prints it.
#[derive(Debug, serde::Serialize)]
pub struct HostUpgrade {
    pub name: String,
    pub wave: usize,
    pub ok: bool,
    /// The agent's version and architecture before and after.
    pub from: String,
    pub to: String,
    /// What failed, or the apps that kept running.
    pub message: String,
    pub install: HostResult,
}

#[derive(Debug, serde::Serialize)]
pub struct UpgradeReport {
    pub hosts: Vec<HostUpgrade>,
    /// The hosts not upgraded because an earlier wave failed.
    pub not_upgraded: Vec<String>,
}

fn agent_of(host: &pb::Host) -> String {
    if host.agent_version.is_empty() {
        "unknown".to_string()
    } else {
        format!("{} {}", host.agent_version, host.agent_arch)
    }
}

/// `fleetctl upgrade-agents`: exit 0 only when every selected host was upgraded and runs its
/// apps again.
pub async fn upgrade_agents(
    ctx: &Context,
    config_dir: &Path,
    args: &UpgradeAgentsArgs,
) -> Result<u8, CliError> {
    let specs = bootstrap::read_targets(&args.targets, args.targets_file.as_deref())?;
    let prepared = bootstrap::prepare(ctx, config_dir, specs, &args.flags).await?;
    let fleet: BTreeMap<String, pb::Host> = crate::commands::list_hosts(ctx)
        .await?
        .hosts
        .into_iter()
        .map(|h| (h.name.clone(), h))
        .collect();
    let unknown: Vec<&str> = prepared
        .jobs
        .iter()
        .filter(|job| !fleet.contains_key(&job.host_name))
        .map(|job| job.host_name.as_str())
        .collect();
    if !unknown.is_empty() {
        return Err(usage(format!(
            "{} not in the fleet: upgrade-agents upgrades hosts that joined; bring a new host in with `fleetctl bootstrap`",
            unknown.join(", ")
        )));
    }
    let selector: BTreeMap<String, String> = args
        .selector
        .as_ref()
        .map(|s| s.0.iter().cloned().collect())
        .unwrap_or_default();
    let jobs: Vec<_> = prepared
        .jobs
        .iter()
        .filter(|job| {
            let labels = &fleet[&job.host_name].labels;
            selector.iter().all(|(k, v)| labels.get(k) == Some(v))
        })
        .cloned()
        .collect();
    if jobs.is_empty() {
        return Err(usage(
            "no host of the targets matches --selector: check the labels with `fleetctl hosts`",
        ));
    }

    let waves = upgrade_waves(jobs.len(), &args.batch);
    let mut report = UpgradeReport {
        hosts: Vec::new(),
        not_upgraded: Vec::new(),
    };
    for (idx, range) in waves.iter().enumerate() {
        let wave_jobs = jobs[range.clone()].to_vec();
        let names: Vec<&str> = wave_jobs.iter().map(|j| j.host_name.as_str()).collect();
        if !ctx.json() {
            println!(
                "wave {}/{}: upgrading the agent of {}",
                idx + 1,
                waves.len(),
                names.join(", ")
            );
        }
        let wave = Prepared {
            jobs: wave_jobs,
            shared: prepared.shared.clone(),
            agent: prepared.agent.clone(),
            binary_entry: prepared.binary_entry.clone(),
            deadline: prepared.deadline,
        };
        let results = bootstrap::run_jobs(ctx, &wave).await;
        let mut wave_ok = true;
        for result in results {
            let before = &fleet[&result.name];
            let apps: BTreeSet<String> = before.apps.iter().map(|a| a.app.clone()).collect();
            let (ok, after, message) = if result.ok {
                apps_back(ctx, &result.name, &apps).await?
            } else {
                (
                    false,
                    None,
                    result
                        .error
                        .clone()
                        .unwrap_or_else(|| "the install failed".to_string()),
                )
            };
            wave_ok &= ok;
            let upgrade = HostUpgrade {
                name: result.name.clone(),
                wave: idx + 1,
                ok,
                from: agent_of(before),
                to: after.as_ref().map(agent_of).unwrap_or_default(),
                message,
                install: result,
            };
            if !ctx.json() {
                println!(
                    "  {}  {}  agent {} -> {}: {}",
                    upgrade.name,
                    if upgrade.ok { "ok" } else { "FAILED" },
                    upgrade.from,
                    if upgrade.to.is_empty() {
                        "?"
                    } else {
                        &upgrade.to
                    },
                    upgrade.message
                );
            }
            report.hosts.push(upgrade);
        }
        if !wave_ok {
            report.not_upgraded = jobs[range.end..]
                .iter()
                .map(|j| j.host_name.clone())
                .collect();
            break;
        }
    }
    let all_ok = report.not_upgraded.is_empty() && report.hosts.iter().all(|h| h.ok);
    if ctx.json() {
        output::print_json(&report);
    } else if !all_ok {
        println!(
            "upgrade halted at a failed wave{}: fix the host above, then run upgrade-agents again (upgraded hosts are left as they are)",
            if report.not_upgraded.is_empty() {
                String::new()
            } else {
                format!("; not upgraded: {}", report.not_upgraded.join(", "))
            }
        );
    } else {
        println!(
            "every agent upgraded ({} hosts); no app was stopped",
            report.hosts.len()
        );
    }
    Ok(if all_ok { EXIT_OK } else { EXIT_FAILED })
}

/// Waits until host `name` is connected and each of `apps` runs its desired release again.
async fn apps_back(
    ctx: &Context,
    name: &str,
    apps: &BTreeSet<String>,
) -> Result<(bool, Option<pb::Host>, String), CliError> {
    let until = Instant::now() + APPS_BACK_DEADLINE;
    loop {
        let hosts = crate::commands::list_hosts(ctx).await?;
        let host = hosts.hosts.into_iter().find(|h| h.name == name);
        if let Some(host) = &host {
            if host.connected && bootstrap::converged(host, apps) {
                let message = if apps.is_empty() {
                    "no apps".to_string()
                } else {
                    format!(
                        "{} kept running",
                        apps.iter().cloned().collect::<Vec<_>>().join(", ")
                    )
                };
                return Ok((true, Some(host.clone()), message));
            }
        }
        if Instant::now() >= until {
            let state = host
                .as_ref()
                .map(bootstrap::describe_apps)
                .unwrap_or_else(|| "the host is gone".to_string());
            return Ok((
                false,
                host,
                format!(
                    "its apps did not run again within {}s after the new agent registered: {state}",
                    APPS_BACK_DEADLINE.as_secs()
                ),
            ));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::single_range_in_vec_init)] // a list of waves that holds one
    fn one_host_first_then_batches() {
        for (n, batch, expect) in [
            (0, "1", vec![]),
            (1, "1", vec![0..1]),
            (4, "1", vec![0..1, 1..2, 2..3, 3..4]),
            (5, "2", vec![0..1, 1..3, 3..5]),
            (10, "25%", vec![0..1, 1..4, 4..7, 7..10]),
            (3, "100%", vec![0..1, 1..3]),
            (2, "1%", vec![0..1, 1..2]),
        ] {
            assert_eq!(upgrade_waves(n, batch), expect, "{n} hosts, batch {batch}");
        }
    }
}
