//! `fleet-bench failover [--kills N] [--seed S] [--output json]`: three controllers on a
//! three-member etcd cluster, four agents and the example app (each wave held 1 s by
//! `min_healthy`). N times: a rollout starts, the leader is SIGKILLed at a random moment of it
//! (0–4 s in, seeded), and the time until another controller is listed as the leader (asked
//! through the two others every 50 ms) is the failover time; the killed controller is started
//! again on its address and the rollout must end `succeeded` with every host serving its
//! version. Prints the failover times (p50, p95, max) against the target, the lease plus 3 s.

use crate::etcd::Etcd;
use crate::etcd_fleet::{free_addr, leader_via, slow_manifest, start_controller};
use crate::faults::rng::Rng;
use crate::fleet::Fleet;
use crate::process::ChildGuard;
use anyhow::{bail, Context, Result};
use std::time::{Duration, Instant};

/// The leader's lease (`fleet_controller::leader::DEFAULT_LEASE`) and the target above it.
const LEASE: Duration = Duration::from_secs(5);
const TARGET: Duration = Duration::from_secs(8);

struct Options {
    kills: usize,
    seed: u64,
    json: bool,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut options = Options {
        kills: 20,
        seed: 1,
        json: false,
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = || args.next().context("a value after the flag");
        match arg.as_str() {
            "--kills" => options.kills = value()?.parse().context("--kills N")?,
            "--seed" => options.seed = value()?.parse().context("--seed S")?,
            "--output" => options.json = value()? == "json",
            other => bail!("unknown flag {other:?}: use --kills N, --seed S, --output json"),
        }
    }
    if !(1..=1000).contains(&options.kills) {
        bail!("--kills must be between 1 and 1000");
    }
    Ok(options)
}

/// The `q` quantile (0..=1) of sorted `values`, nearest rank.
fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

pub fn run(args: &[String]) -> Result<()> {
    let options = parse(args)?;
    let Some(etcd) = Etcd::cluster(3) else {
        bail!("no etcd on the PATH: apt-get install etcd-server");
    };
    let url = etcd.urls().join(",");
    let mut fleet = Fleet::start_with_init_args(0, &["--etcd", &url, "--etcd-prefix", "/bench"]);
    let config = fleet.config_dir().join("controller.toml");
    let addrs = [free_addr(), free_addr()];
    let mut others: Vec<ChildGuard> = addrs
        .iter()
        .enumerate()
        .map(|(i, addr)| start_controller(&fleet, &config, &format!("c{}", i + 2), addr))
        .collect();
    let c1 = fleet.controller_url();
    let urls = [
        c1.clone(),
        format!("https://{}", addrs[0]),
        format!("https://{}", addrs[1]),
    ];
    let list = urls.join(",");
    crate::wait_until(
        Duration::from_secs(30),
        "three controllers, one leading",
        || matches!(leader_via(&fleet, &list), Some((Some(_), 3))),
    );
    fleet.set_agent_controller_url(&list);
    let hosts = ["h1", "h2", "h3", "h4"];
    for name in hosts {
        fleet.start_agent(name);
    }
    let manifest = slow_manifest("1s");
    let versions = ["1.0.0", "2.0.0"];
    for version in versions {
        let artifact = fleet.web_artifact(&manifest, &[]);
        let out = fleet.ctl_via(
            &list,
            &[
                "release",
                "create",
                "web",
                version,
                &artifact.display().to_string(),
            ],
        );
        if out.code != 0 {
            bail!("release create {version}: {}", out.stderr);
        }
    }
    crate::wait_until(Duration::from_secs(60), "four hosts connected", || {
        let out = fleet.ctl_via(&list, &["hosts"]);
        out.json["hosts"].as_array().is_some_and(|h| {
            h.len() == 4
                && h.iter()
                    .all(|h| h["connected"] == serde_json::Value::Bool(true))
        })
    });

    let mut rng = Rng::new(options.seed);
    let mut failovers = Vec::new();
    let mut succeeded = 0;
    for kill in 0..options.kills {
        let version = versions[kill % 2];
        let started = fleet.ctl_via(
            &list,
            &[
                "rollout", "web", version, "--canary", "1", "--batch", "1", "--detach",
            ],
        );
        if started.code != 0 {
            bail!("kill {kill}: rollout {version}: {}", started.stderr);
        }
        let id = started.json["id"]
            .as_str()
            .context("a rollout id")?
            .to_string();
        std::thread::sleep(rng.millis(0, 4000));
        let Some((Some(leader), _)) = leader_via(&fleet, &list) else {
            bail!("kill {kill}: no leader listed before the kill");
        };
        let idx = urls
            .iter()
            .position(|u| *u == leader)
            .context("the leader is one of ours")?;
        match idx {
            0 => fleet.kill_controller(),
            i => others[i - 1].kill_now(),
        }
        let killed = Instant::now();
        let survivors: Vec<&str> = urls
            .iter()
            .filter(|u| **u != leader)
            .map(String::as_str)
            .collect();
        let survivors = survivors.join(",");
        let mut took = None;
        for _ in 0..600 {
            if let Some((Some(now), _)) = leader_via(&fleet, &survivors) {
                if now != leader {
                    took = Some(killed.elapsed());
                    break;
                }
            }
            if killed.elapsed() > Duration::from_secs(60) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let took = took.with_context(|| format!("kill {kill}: no new leader within 60 s"))?;
        eprintln!("kill {kill}: {leader} SIGKILLed, another leads {took:?} later");
        failovers.push(took);
        match idx {
            0 => fleet.restart_controller(),
            i => {
                others[i - 1] =
                    start_controller(&fleet, &config, &format!("c{}", i + 1), &addrs[i - 1])
            }
        }
        let (ended, record) =
            crate::wait_for(Duration::from_secs(120), "the rollout to end", || {
                let out = fleet.ctl_via(&list, &["rollout", "status", &id]);
                let state = out.json["state"].as_str()?.to_string();
                (out.code == 0 && state != "running" && state != "paused")
                    .then_some((state, out.json))
            });
        let serving = hosts.iter().all(|h| {
            fleet.web_get(h, "/").as_deref() == Some(format!("web {version} on {h}\n").as_str())
        });
        if ended == "succeeded" && serving {
            succeeded += 1;
        } else {
            eprintln!(
                "kill {kill}: rollout {id} ended {ended}, every host serving {version}: {serving}: {record:#}"
            );
        }
    }
    failovers.sort();
    let (p50, p95, max) = (
        quantile(&failovers, 0.5),
        quantile(&failovers, 0.95),
        *failovers.last().unwrap_or(&Duration::ZERO),
    );
    if options.json {
        println!(
            "{}",
            serde_json::json!({
                "kills": options.kills,
                "seed": options.seed,
                "lease_s": LEASE.as_secs_f64(),
                "failover_p50_s": p50.as_secs_f64(),
                "failover_p95_s": p95.as_secs_f64(),
                "failover_max_s": max.as_secs_f64(),
                "rollouts_succeeded": succeeded,
            })
        );
    } else {
        println!("| what | figure | target |");
        println!("| --- | --- | --- |");
        println!(
            "| failover after a SIGKILL of the leader, {} kills (seed {}): p50 / p95 / max | {:.2} / {:.2} / {:.2} s | p95 <= lease + 3 s = {:.0} s: {} |",
            options.kills,
            options.seed,
            p50.as_secs_f64(),
            p95.as_secs_f64(),
            max.as_secs_f64(),
            TARGET.as_secs_f64(),
            if p95 <= TARGET { "met" } else { "missed" }
        );
        println!(
            "| rollouts under way at the kill that ended succeeded, every host serving | {succeeded} of {} | all |",
            options.kills
        );
    }
    for mut other in others {
        other.kill_now();
    }
    drop(fleet);
    drop(etcd);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_by_nearest_rank() {
        let ms = |v: &[u64]| {
            v.iter()
                .map(|&m| Duration::from_millis(m))
                .collect::<Vec<_>>()
        };
        let twenty = ms(&(1..=20).collect::<Vec<_>>());
        assert_eq!(quantile(&twenty, 0.95), Duration::from_millis(19));
        assert_eq!(quantile(&twenty, 0.5), Duration::from_millis(10));
        assert_eq!(quantile(&ms(&[7]), 0.95), Duration::from_millis(7));
        assert_eq!(quantile(&[], 0.5), Duration::ZERO);
    }
}
