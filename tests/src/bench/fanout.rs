//! `fleet-bench artifact --agents N --size-mb M [--pairs P] [--output json]`: artifact fan-out
//! through peers against today's direct fetch, in one run on one fleet. Each pair rolls a
//! fresh release (M MB of incompressible bytes, so every host fetches it) out to all N hosts
//! twice, once with the agents serving peers (`--peer-port 7702`) and once with peers off
//! (`--peer-port 0`: every byte from the controller), in alternating order, the agents
//! restarted between modes (their instances outlive them). For each rollout: the wall time
//! (`fetch_s`: the fetch dominates it; the example app starts in milliseconds) and the bytes
//! the controller sent divided by the artifact's size (`controller_egress_ratio`, from the
//! controller's own counter in `Status`). Medians over the pairs. Loopback only; every process
//! is killed by pid when the fleet is dropped.
//!
//! `--link-mb-s R` caps the controller's link as a real uplink would be: the controller runs in
//! a network namespace of the benchmark's own ([`crate::netns`], root only), listening on its
//! end of the namespace's veth link, whose egress is capped at R MB/s with `tc` (a token
//! bucket); the agents stay on loopback addresses of this host, so their links to each other
//! are not capped. The namespace goes with the benchmark.

use crate::fleet::Fleet;
use crate::{grpc, incompressible_bytes, wait_until, web_manifest};
use anyhow::{bail, Context, Result};
use fleet_proto::pb;
use std::time::{Duration, Instant};

const PEER_PORT: &str = "7702";
const ROLLOUT_DEADLINE: Duration = Duration::from_secs(1200);
const RESTART_DEADLINE: Duration = Duration::from_secs(120);

struct Args {
    agents: usize,
    size_mb: usize,
    pairs: usize,
    json: bool,
    /// The controller's link capped at this many MB/s (`--link-mb-s`), in a namespace.
    link_mb_s: Option<u32>,
}

fn parse(args: &[String]) -> Result<Args> {
    let mut parsed = Args {
        agents: 10,
        size_mb: 200,
        pairs: 3,
        json: false,
        link_mb_s: None,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().context(format!("{flag} needs a value"));
        match flag.as_str() {
            "--agents" => parsed.agents = value()?.parse().context("--agents N")?,
            "--size-mb" => parsed.size_mb = value()?.parse().context("--size-mb M")?,
            "--pairs" => parsed.pairs = value()?.parse().context("--pairs P")?,
            "--output" => parsed.json = value()? == "json",
            "--link-mb-s" => {
                parsed.link_mb_s = Some(value()?.parse().context("--link-mb-s MB_PER_S")?)
            }
            other => bail!(
                "unknown flag {other:?}: fleet-bench artifact --agents N --size-mb M [--pairs P] [--link-mb-s MB_PER_S] [--output json]"
            ),
        }
    }
    if parsed.agents < 2 || parsed.agents > 200 || parsed.size_mb == 0 || parsed.pairs == 0 {
        bail!("--agents is 2..=200, --size-mb and --pairs at least 1");
    }
    if parsed.link_mb_s == Some(0) {
        bail!("--link-mb-s is at least 1 (MB/s)");
    }
    Ok(parsed)
}

fn bytes_sent(fleet: &Fleet) -> Result<u64> {
    grpc::runtime().block_on(async {
        let channel = grpc::channel(fleet, Some(grpc::admin_identity(fleet))).await;
        Ok(pb::fleet_service_client::FleetServiceClient::new(channel)
            .status(pb::StatusRequest::default())
            .await
            .context("status")?
            .into_inner()
            .artifact_bytes_sent)
    })
}

/// Restarts every agent with `FLEET_PEER_PORT=port` and waits until its listener is up (or
/// gone) and the fleet is ready again.
fn switch_mode(fleet: &mut Fleet, port: &str) {
    let names = fleet.host_names();
    for name in &names {
        fleet.set_agent_env(name, "FLEET_PEER_PORT", port);
        fleet.restart_agent(name);
    }
    let listening = port != "0";
    wait_until(
        RESTART_DEADLINE,
        "every agent's peer listener as asked",
        || {
            names.iter().all(|name| {
                let addr = (fleet.agent(name).advertise.as_str(), 7702);
                std::net::TcpStream::connect(addr).is_ok() == listening
            })
        },
    );
    fleet.wait_hosts_ready(names.len());
}

struct Run {
    wall_s: f64,
    egress_ratio: f64,
}

fn rollout(fleet: &Fleet, version: &str, blob: &[u8]) -> Result<Run> {
    let artifact = fleet.web_artifact(
        &web_manifest("60s"),
        &[("data/blob", blob), ("NOTE", version.as_bytes())],
    );
    let size = std::fs::metadata(&artifact)?.len();
    fleet
        .ctl_with_deadline(
            &[
                "release",
                "create",
                "web",
                version,
                &artifact.display().to_string(),
            ],
            ROLLOUT_DEADLINE,
        )
        .expect_code(0);
    std::fs::remove_file(&artifact)?;
    let before = bytes_sent(fleet)?;
    let start = Instant::now();
    fleet
        .ctl_with_deadline(
            &[
                "rollout", "web", version, "--canary", "1", "--batch", "100%",
            ],
            ROLLOUT_DEADLINE,
        )
        .expect_code(0);
    let wall_s = start.elapsed().as_secs_f64();
    let sent = bytes_sent(fleet)? - before;
    Ok(Run {
        wall_s,
        egress_ratio: sent as f64 / size as f64,
    })
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// Runs the benchmark with the flags after `artifact`; prints a JSON object or a table.
pub fn run(args: &[String]) -> Result<()> {
    let args = parse(args)?;
    eprintln!(
        "fleet-bench artifact: {} agents, {} MB, {} interleaved pairs (peers / direct)",
        args.agents, args.size_mb, args.pairs
    );
    // With a capped link the controller runs in a namespace of the benchmark's own, every
    // byte to the agents crossing its link; the agents' links to each other stay loopback.
    let netns = match args.link_mb_s {
        Some(rate) => {
            if let Some(why) = crate::netns::unavailable() {
                bail!("--link-mb-s {rate}: {why}");
            }
            crate::netns::remove_leftovers();
            let netns = crate::netns::Netns::create(0).map_err(anyhow::Error::msg)?;
            netns.cap_egress(rate).map_err(anyhow::Error::msg)?;
            Some(netns)
        }
        None => None,
    };
    let mut fleet = match &netns {
        Some(netns) => Fleet::start_with_controller_in(args.agents, netns),
        None => Fleet::start(args.agents),
    };
    let blob = incompressible_bytes(args.size_mb * 1_000_000);
    let (mut peers, mut direct) = (Vec::new(), Vec::new());
    let mut mode = None;
    for pair in 0..args.pairs {
        // Alternate which mode goes first, so neither always runs on a warmer machine.
        let order: [&str; 2] = if pair % 2 == 0 {
            [PEER_PORT, "0"]
        } else {
            ["0", PEER_PORT]
        };
        for port in order {
            if mode != Some(port) {
                switch_mode(&mut fleet, port);
                mode = Some(port);
            }
            let version = format!("1.{pair}.{port}");
            let run = rollout(&fleet, &version, &blob)?;
            eprintln!(
                "  pair {pair} {}: {:.2} s, controller egress {:.2}x",
                if port == "0" { "direct" } else { "peers" },
                run.wall_s,
                run.egress_ratio
            );
            if port == "0" {
                direct.push(run);
            } else {
                peers.push(run);
            }
        }
    }
    let fetch_s = median(peers.iter().map(|r| r.wall_s).collect());
    let egress = median(peers.iter().map(|r| r.egress_ratio).collect());
    let direct_s = median(direct.iter().map(|r| r.wall_s).collect());
    let direct_egress = median(direct.iter().map(|r| r.egress_ratio).collect());
    let result = serde_json::json!({
        "agents": args.agents,
        "size_mb": args.size_mb,
        "pairs": args.pairs,
        "controller_egress_ratio": egress,
        "fetch_s": fetch_s,
        "direct_controller_egress_ratio": direct_egress,
        "direct_fetch_s": direct_s,
        "fetch_vs_direct": fetch_s / direct_s,
        "fetch_s_runs": peers.iter().map(|r| r.wall_s).collect::<Vec<_>>(),
        "direct_fetch_s_runs": direct.iter().map(|r| r.wall_s).collect::<Vec<_>>(),
        "link": match args.link_mb_s {
            Some(rate) => format!("the controller's link capped at {rate} MB/s (tc tbf in a network namespace)"),
            None => "loopback, uncapped".to_string(),
        },
    });
    if args.json {
        println!("{result}");
    } else {
        println!(
            "artifact fan-out, {} agents, {} MB (medians of {} pairs)",
            args.agents, args.size_mb, args.pairs
        );
        println!("  peers : fetch {fetch_s:.2} s, controller egress {egress:.2}x the artifact (target <= 1.5x)");
        println!(
            "  direct: fetch {direct_s:.2} s, controller egress {direct_egress:.2}x the artifact"
        );
        println!(
            "  peers / direct wall time: {:.2}x (target: <= 1.1x on loopback, < 1x on a capped link)",
            fetch_s / direct_s
        );
        println!("  link: {}", result["link"].as_str().unwrap_or_default());
    }
    // The fleet's processes go before the namespace they run in.
    drop(fleet);
    drop(netns);
    Ok(())
}
