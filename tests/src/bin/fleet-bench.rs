//! `fleet-bench`: measures what fleet adds on top of the app it deploys, on this machine and on
//! loopback only, and prints a small table.
//!
//! - `rollout`: 20 agents, rollouts with `--canary 1 --batch 25%` back and forth between two
//!   releases (11, the median); the wall time minus the example app's own start-until-healthy
//!   time (measured here first), per wave. Target: under 20 ms per wave (issue 12). It prints
//!   where a wave's time goes (`fleet_tests::bench::waves`), as `pace` does.
//! - `artifact`: a 200 MB artifact (incompressible bytes) rolled out to 10 agents, against
//!   reading the same bytes 10 times from disk (the file's cached pages dropped before each
//!   read); the ratio disk time / fleet time. Target: at least 0.5. For context it also shows
//!   the ratio against reads from a warm page cache, and this disk's own rate of writing the
//!   same bytes durably, which every agent must do.
//! - `memory`: the agent's resident memory (VmRSS) while idle with one instance running.
//!   Target: under 15 MB.
//! - `bootstrap`: `fleetctl bootstrap` of 10 hosts in one command against one host, through a
//!   real sshd on loopback (each "host" its own remote dir). Target: 10 hosts in under 2x the
//!   time of one. The hosts share this machine's cores, so it also shows the floor their own
//!   CPU (sshd, the agents) puts under the ratio here.
//!
//! - `start`: the start of an instance from origin state (make its directory afresh from the
//!   release, spawn) of a 1 MiB and of a 1 GiB release, each of 64 files, the median of 21
//!   starts; side by side, the same starts by copying the release (what every start did before,
//!   and what an agent that is not root still does). Target: the 1 GiB start takes at most 1.1x
//!   the 1 MiB one. Needs root (apps then run as users of their own and the start links).
//!
//! - `pace`: a rollout at the app's own pace. 20 agents run a small Python web app (about 80 ms
//!   from exec to a healthy `/healthz`); rollouts with `--canary 1 --batch 25%`, back and forth
//!   between two releases, each paired with the floor: a plain loop that, wave by wave, stops
//!   the old processes and starts and checks the new ones (1 ms polls), with nothing else, on
//!   other loopback addresses. 10 interleaved pairs; the ratio of the medians. Target: 1.2x.
//!   It prints where a wave's time goes, from the controller's and agents' logs
//!   (`fleet_tests::bench::waves`).
//!
//! - `scale --agents N [--output json]`: N simulated agents on one controller (see
//!   `fleet_tests::bench::scale`); not part of `all`.
//! - `artifact --agents N --size-mb M [--pairs P] [--output json]`: artifact fan-out through
//!   peers against the direct fetch ([`fleet_tests::bench::fanout`]).
//!
//! - `bootstrap-ansible` (`src/fleet_bench/bootstrap_ansible.rs`, a module of this binary; not part of `all`: it installs
//!   Ansible from PyPI the first time): `fleetctl bootstrap` of 10 hosts against an Ansible
//!   playbook doing the same on 10 others, interleaved pairs. Target: at least 5x faster.
//!
//! Run it with `cargo run --release -p fleet-tests --bin fleet-bench -- [rollout|artifact|memory|bootstrap|start|pace|bootstrap-ansible|all]`.
//! When started by cargo it first runs `cargo build --workspace --bins` for its own profile so
//! the controller, agent and app it measures are built the same way (when that build fails, it
//! measures the binaries already built and says so). Every process it starts is
//! killed by pid at the end of each part; every wait is bounded.
#![forbid(unsafe_code)]

/// Benchmarks that use this binary's shared pieces (`Row`, `CpuSplit`, `timed_bootstrap`).
#[path = "../fleet_bench/bootstrap_ansible.rs"]
mod bootstrap_ansible;

use anyhow::{bail, Context, Result};
use fleet_tests::bench::waves;
use fleet_tests::fleet::Fleet;
use fleet_tests::net::AddressRange;
use fleet_tests::process::{self, ChildGuard};
use fleet_tests::{bins, http, incompressible_bytes, web_manifest, WEB_PORT};
use std::process::Command;
use std::time::{Duration, Instant};

const ROLLOUT_HOSTS: usize = 20;
const ARTIFACT_HOSTS: usize = 10;
const ARTIFACT_BYTES: usize = 200 * 1024 * 1024;
const BASELINE_RUNS: usize = 5;
const ROLLOUT_TARGET_MS: f64 = 20.0;
/// Rollouts measured by `rollout`, back and forth between two releases.
const ROLLOUT_RUNS: usize = 11;
const ARTIFACT_TARGET_RATIO: f64 = 0.5;
const MEMORY_TARGET_KIB: u64 = 15 * 1024;
/// How long the agent is left alone before its memory is read.
const IDLE_SETTLE: Duration = Duration::from_secs(3);
const LONG_CTL_DEADLINE: Duration = Duration::from_secs(600);

/// One row of the result table.
struct Row {
    bench: &'static str,
    measurement: String,
    value: String,
    target: String,
    ok: Option<bool>,
}

impl Row {
    /// A figure shown for context, with no target to meet.
    fn info(bench: &'static str, measurement: impl Into<String>, value: impl Into<String>) -> Row {
        Row {
            bench,
            measurement: measurement.into(),
            value: value.into(),
            target: String::new(),
            ok: None,
        }
    }
}

fn main() -> Result<()> {
    let which = std::env::args().nth(1).unwrap_or_else(|| "all".to_string());
    let rest: Vec<String> = std::env::args().skip(2).collect();
    if which == "scale" {
        build_binaries()?;
        return fleet_tests::bench::scale::run(&rest);
    }
    if which == "failover" {
        build_binaries()?;
        return fleet_tests::bench::failover::run(&rest);
    }
    if which == "artifact" && !rest.is_empty() {
        build_binaries()?;
        return fleet_tests::bench::fanout::run(&rest);
    }
    let parts: &[&str] = match which.as_str() {
        "rollout" => &["rollout"],
        "artifact" => &["artifact"],
        "memory" => &["memory"],
        "bootstrap" => &["bootstrap"],
        "start" => &["start"],
        "pace" => &["pace"],
        "bootstrap-ansible" => &["bootstrap-ansible"],
        "all" => &[
            "rollout",
            "artifact",
            "memory",
            "bootstrap",
            "start",
            "pace",
        ],
        other => {
            bail!("unknown benchmark {other:?}: use rollout, artifact, memory, bootstrap, start, pace, bootstrap-ansible, scale, failover or all")
        }
    };
    build_binaries()?;
    waves::enable_timing_logs();
    let mut rows = Vec::new();
    for part in parts {
        eprintln!("fleet-bench: running {part}");
        let before = CpuTicks::read();
        match *part {
            "rollout" => rows.extend(bench_rollout()?),
            "artifact" => rows.extend(bench_artifact()?),
            "bootstrap" => rows.extend(bench_bootstrap()?),
            "start" => rows.extend(bench_start()?),
            "pace" => rows.extend(bench_pace()?),
            "bootstrap-ansible" => rows.extend(bootstrap_ansible::run()?),
            _ => rows.extend(bench_memory()?),
        }
        if let (Some(before), Some(after)) = (before, CpuTicks::read()) {
            rows.push(Row::info(
                part,
                "CPU time the hypervisor took (steal) while this part ran, of all CPU time",
                format!("{:.0}%", after.steal_percent_since(&before)),
            ));
        }
    }
    print_table(&rows);
    Ok(())
}

/// When run by cargo, builds every binary of the workspace in this binary's profile.
fn build_binaries() -> Result<()> {
    let Some(cargo) = std::env::var_os("CARGO") else {
        return Ok(());
    };
    let Some(manifest_dir) = std::env::var_os("CARGO_MANIFEST_DIR") else {
        return Ok(());
    };
    let release = bins::bin_dir().file_name().is_some_and(|n| n == "release");
    let mut command = Command::new(cargo);
    command
        .args(["build", "--workspace", "--bins"])
        .current_dir(manifest_dir);
    if release {
        command.arg("--release");
    }
    eprintln!("fleet-bench: {command:?}");
    let status = command.status().context("run cargo build")?;
    if !status.success() {
        let dir = bins::bin_dir();
        let built = [
            "fleet-controller",
            "fleet-agent",
            "fleetctl",
            "fleet-example-web",
        ]
        .iter()
        .all(|name| dir.join(name).is_file());
        if !built {
            bail!("cargo build --workspace --bins failed: fix the build, then run the benchmark again");
        }
        eprintln!(
            "fleet-bench: warning: cargo build failed; measuring the binaries already in {}",
            dir.display()
        );
    }
    Ok(())
}

/// The example app's own start: spawn until `/healthz` answers 200, median of a few runs.
fn app_start_baseline() -> Result<Duration> {
    let bins = bins::Bins::locate();
    let range = AddressRange::allocate(1, WEB_PORT);
    let addr = range.host_addr(0);
    let mut samples = Vec::new();
    for _ in 0..BASELINE_RUNS {
        let dir = tempfile::tempdir().context("a temp dir")?;
        let mut command = Command::new(&bins.web);
        command
            .args(["--listen", &format!("{addr}:{WEB_PORT}")])
            .current_dir(dir.path())
            .env("FLEET_VERSION", "baseline")
            .env("FLEET_HOST", "bench");
        let start = Instant::now();
        let mut app = ChildGuard::spawn("fleet-example-web", command, &dir.path().join("log"));
        let deadline = Duration::from_secs(10);
        loop {
            if matches!(http::get(&addr, WEB_PORT, "/healthz"), Ok((200, _))) {
                break;
            }
            if start.elapsed() > deadline || app.has_exited() {
                bail!("the example app did not become healthy within {deadline:?}");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        samples.push(start.elapsed());
        app.kill_now();
    }
    samples.sort();
    Ok(samples[samples.len() / 2])
}

fn bench_rollout() -> Result<Vec<Row>> {
    let baseline = app_start_baseline()?;
    let fleet = Fleet::start(ROLLOUT_HOSTS);
    let manifest = web_manifest("10s");
    fleet
        .create_web_release("1.0.0", &manifest, &[])
        .expect_code(0);
    // Other bytes for 1.1.0, so every host fetches an artifact as in a real rollout.
    let next = fleet.web_artifact(&manifest, &[("NOTE", b"1.1.0")]);
    fleet
        .create_release("web", "1.1.0", &next, &[])
        .expect_code(0);
    let rollout_args = |version| ["rollout", "web", version, "--canary", "1", "--batch", "25%"];
    fleet
        .ctl_with_deadline(&rollout_args("1.0.0"), LONG_CTL_DEADLINE)
        .expect_code(0);

    // Back and forth between the two releases (both cached after the first two), the median.
    let (mut walls, mut runs, mut n_waves) = (Vec::new(), Vec::new(), 1);
    for run in 0..ROLLOUT_RUNS {
        let version = if run % 2 == 0 { "1.1.0" } else { "1.0.0" };
        let (start, began_at) = (Instant::now(), std::time::SystemTime::now());
        let out = fleet
            .ctl_with_deadline(&rollout_args(version), LONG_CTL_DEADLINE)
            .expect_code(0);
        walls.push(start.elapsed());
        runs.push(waves::RolloutRun {
            id: out.json["id"].as_str().unwrap_or_default().to_string(),
            began: began_at,
            ended: std::time::SystemTime::now(),
        });
        if run == 0 {
            // fleetctl's own progress lines say how long each wave took.
            eprint!("{}", out.stderr);
        }
        n_waves = out.json["waves"].as_array().map_or(0, Vec::len).max(1);
    }
    print_breakdown("rollout", &fleet, &runs);
    let wall = median(walls);
    let overhead = wall.saturating_sub(baseline * n_waves as u32);
    let per_wave_ms = overhead.as_secs_f64() * 1000.0 / n_waves as f64;
    Ok(vec![
        Row::info(
            "rollout",
            format!("app start until healthy (median of {BASELINE_RUNS})"),
            format_ms(baseline),
        ),
        Row::info(
            "rollout",
            format!(
                "{ROLLOUT_HOSTS} hosts, canary 1, batch 25%: wall time (median of {ROLLOUT_RUNS})"
            ),
            format!("{} for {n_waves} waves", format_ms(wall)),
        ),
        Row {
            bench: "rollout",
            measurement: "fleet overhead per wave".into(),
            value: format!("{per_wave_ms:.0} ms"),
            target: format!("< {ROLLOUT_TARGET_MS:.0} ms"),
            ok: Some(per_wave_ms < ROLLOUT_TARGET_MS),
        },
    ])
}

fn bench_artifact() -> Result<Vec<Row>> {
    let baseline = app_start_baseline()?;
    let fleet = Fleet::start(ARTIFACT_HOSTS);
    let manifest = web_manifest("30s");
    let web = std::fs::read(&fleet.bins.web).context("read the example app")?;
    let blob = incompressible_bytes(ARTIFACT_BYTES);
    let artifact = fleet.write_artifact(&[
        ("fleet.toml", manifest.as_bytes(), 0o644),
        ("bin/web", &web, 0o755),
        ("data/blob", &blob, 0o644),
    ]);
    drop(blob);
    let artifact_text = artifact.display().to_string();
    let artifact_size = std::fs::metadata(&artifact)?.len();

    let upload_start = Instant::now();
    fleet
        .ctl_with_deadline(
            &["release", "create", "web", "1.0.0", &artifact_text],
            LONG_CTL_DEADLINE,
        )
        .expect_code(0);
    let upload = upload_start.elapsed();

    // Everything in one wave when the CLI allows a rollout without canary.
    let mut waves_note = "canary 0, batch 100%";
    let (controller_before, agents_before) = fleet_cpu(&fleet);
    let start = Instant::now();
    let mut out = fleet.ctl_with_deadline(
        &[
            "rollout", "web", "1.0.0", "--canary", "0", "--batch", "100%",
        ],
        LONG_CTL_DEADLINE,
    );
    if out.code == 2 {
        waves_note = "canary 1, then batch 100%";
        out = fleet.ctl_with_deadline(
            &[
                "rollout", "web", "1.0.0", "--canary", "1", "--batch", "100%",
            ],
            LONG_CTL_DEADLINE,
        );
    }
    let wall = start.elapsed();
    let (controller_after, agents_after) = fleet_cpu(&fleet);
    let controller_cpu = controller_after.saturating_sub(controller_before);
    let cpu = controller_cpu + agents_after.saturating_sub(agents_before);
    let agent_peak_kib = fleet
        .agents()
        .iter()
        .filter_map(|a| process::peak_rss_kib(fleet.agent_pid(&a.name)))
        .max()
        .unwrap_or_default();
    let rollout = out.expect_code(0).json;
    let n_waves = rollout["waves"].as_array().map_or(1, Vec::len).max(1);
    let delivery = wall.saturating_sub(baseline * n_waves as u32);

    // The same bytes read 10 times from the disk (the issue's yardstick: the file's cached
    // pages are dropped before each read), and 10 times from a warm page cache (stricter).
    let from_disk = time_reads(&artifact, true)?;
    let warm = time_reads(&artifact, false)?;
    let total_mb = (artifact_size as f64 * ARTIFACT_HOSTS as f64) / 1e6;
    let rate = |d: Duration| total_mb / d.as_secs_f64().max(1e-9);
    // The streaming itself, from the agents' logs: first "fetching" to last "unpacking".
    let fetch = fetch_phase_from_logs(&fleet);
    let (compared, compared_what) = match fetch {
        Some(fetch) => (fetch, "fetch phase"),
        None => (delivery, "fetch+verify+unpack"),
    };
    let ratio_to = |d: Duration| d.as_secs_f64() / compared.as_secs_f64().max(1e-9);
    // Every agent stores what it fetched durably: this disk's own rate for the same bytes
    // (written and fsynced 10 times) bounds the fetch phase from below.
    let durable = time_durable_writes(&artifact, &fleet.dir().join("durable-copy"))?;
    let timed = |d: Duration| format!("{} ({:.0} MB/s)", format_ms(d), rate(d));
    let mut rows = vec![
        Row::info(
            "artifact",
            format!(
                "release create ({:.0} MB upload)",
                artifact_size as f64 / 1e6
            ),
            format_ms(upload),
        ),
        Row::info(
            "artifact",
            format!(
                "rollout to {ARTIFACT_HOSTS} hosts ({waves_note}) minus app start: \
                 fetch+verify+unpack"
            ),
            timed(delivery),
        ),
        Row::info(
            "artifact",
            format!(
                "std::fs::read of the artifact {ARTIFACT_HOSTS}x from disk (its cached pages \
                 dropped before each)"
            ),
            timed(from_disk),
        ),
        Row::info(
            "artifact",
            format!("std::fs::read of the artifact {ARTIFACT_HOSTS}x (warm cache)"),
            timed(warm),
        ),
        Row::info(
            "artifact",
            format!(
                "this disk's own durable writes: the artifact written and fsynced \
                 {ARTIFACT_HOSTS}x"
            ),
            timed(durable),
        ),
    ];
    let per_gb = |d: Duration, what: &str| {
        let seconds_per_gb = d.as_secs_f64() / (total_mb / 1000.0);
        format!("{} ({seconds_per_gb:.2} s per GB {what})", format_ms(d))
    };
    rows.extend([
        Row::info(
            "artifact",
            "CPU time of the controller and the agents in that rollout (all of their threads)",
            per_gb(cpu, "delivered"),
        ),
        Row::info(
            "artifact",
            "CPU time of the controller alone in that rollout (it streams the artifact)",
            per_gb(controller_cpu, "sent"),
        ),
        Row::info(
            "artifact",
            "the largest agent's peak resident memory (VmHWM) in that rollout",
            format!("{:.1} MB", agent_peak_kib as f64 / 1024.0),
        ),
    ]);
    if let Some(fetch) = fetch {
        rows.push(Row::info(
            "artifact",
            format!(
                "fetch phase on {ARTIFACT_HOSTS} agents (agent logs: first fetching .. last \
                 unpacking)"
            ),
            timed(fetch),
        ));
    }
    let ratio = ratio_to(from_disk);
    rows.extend([
        Row {
            bench: "artifact",
            measurement: format!("ratio: read from disk time / fleet {compared_what} time"),
            value: format!("{ratio:.2}"),
            target: format!(">= {ARTIFACT_TARGET_RATIO}"),
            ok: Some(ratio >= ARTIFACT_TARGET_RATIO),
        },
        Row::info(
            "artifact",
            format!("ratio: warm-cache read time / fleet {compared_what} time"),
            format!("{:.2}", ratio_to(warm)),
        ),
        Row::info(
            "artifact",
            format!("ratio: durable write time / fleet {compared_what} time"),
            format!("{:.2}", ratio_to(durable)),
        ),
    ]);
    Ok(rows)
}

/// The CPU time the controller, and all agents together, have used so far (their app
/// instances not included).
fn fleet_cpu(fleet: &Fleet) -> (Duration, Duration) {
    let controller = own_cpu(fleet.controller_pid()).unwrap_or_default();
    let agents = fleet
        .agents()
        .iter()
        .filter_map(|a| own_cpu(fleet.agent_pid(&a.name)))
        .sum();
    (controller, agents)
}

/// Reads `path` whole [`ARTIFACT_HOSTS`] times; with `cold`, its pages are dropped from the
/// page cache before each read (it is written and synced, so they are clean), so each read
/// comes from the disk.
fn time_reads(path: &std::path::Path, cold: bool) -> Result<Duration> {
    use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
    let drop_cached = || -> Result<()> {
        let file = std::fs::File::open(path)?;
        file.sync_all()?;
        posix_fadvise(&file, 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED)
            .context("posix_fadvise(DONTNEED)")?;
        Ok(())
    };
    if !cold {
        std::hint::black_box(std::fs::read(path)?);
    }
    let mut total = Duration::ZERO;
    for _ in 0..ARTIFACT_HOSTS {
        if cold {
            drop_cached()?;
        }
        let start = Instant::now();
        std::hint::black_box(std::fs::read(path)?);
        total += start.elapsed();
    }
    Ok(total)
}

/// Copies `path` to `scratch` and fsyncs it, [`ARTIFACT_HOSTS`] times (the source comes from
/// the page cache); the scratch file is removed.
fn time_durable_writes(path: &std::path::Path, scratch: &std::path::Path) -> Result<Duration> {
    use std::io::Write;
    let bytes = std::fs::read(path)?;
    let mut total = Duration::ZERO;
    for _ in 0..ARTIFACT_HOSTS {
        let _ = std::fs::remove_file(scratch);
        let start = Instant::now();
        let mut file = std::fs::File::create(scratch)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        total += start.elapsed();
    }
    std::fs::remove_file(scratch)?;
    Ok(total)
}

/// The wall time of the fetch phase across every agent: from the first agent's "fetching" log
/// line to the last agent's "unpacking" line. `None` when the logs do not say.
fn fetch_phase_from_logs(fleet: &Fleet) -> Option<Duration> {
    let mut first_start: Option<f64> = None;
    let mut last_end: Option<f64> = None;
    for agent in fleet.agents() {
        let log = fleet.dir().join(format!("logs/agent-{}.log", agent.name));
        let text = std::fs::read_to_string(log).ok()?;
        let stamp_of = |needle: &str| {
            text.lines()
                .find(|line| line.contains(needle))
                .and_then(seconds_of_day)
        };
        let start = stamp_of("fetching sha256:")?;
        let end = stamp_of("unpacking")?;
        first_start = Some(first_start.map_or(start, |s| s.min(start)));
        last_end = Some(last_end.map_or(end, |e| e.max(end)));
    }
    let (start, end) = (first_start?, last_end?);
    (end >= start).then(|| Duration::from_secs_f64(end - start))
}

/// Seconds since midnight of the RFC 3339 timestamp a tracing log line starts with (colour
/// codes allowed), like `2026-11-25T14:52:02.869750Z`.
fn seconds_of_day(line: &str) -> Option<f64> {
    let after_t = &line[line.find('T')? + 1..];
    let clock = &after_t[..after_t.find('Z')?];
    let mut parts = clock.split(':');
    let hours: f64 = parts.next()?.parse().ok()?;
    let minutes: f64 = parts.next()?.parse().ok()?;
    let seconds: f64 = parts.next()?.parse().ok()?;
    Some(hours * 3600.0 + minutes * 60.0 + seconds)
}

fn bench_memory() -> Result<Vec<Row>> {
    let fleet = Fleet::start(1);
    fleet
        .create_web_release("1.0.0", &web_manifest("10s"), &[])
        .expect_code(0);
    fleet.ctl(&["rollout", "web", "1.0.0"]).expect_code(0);
    fleet.wait_all_serve("1.0.0", Duration::from_secs(10));
    // Idle means idle: let start-up allocations and the rollout's traffic settle.
    std::thread::sleep(IDLE_SETTLE);
    let agent_kib = process::rss_kib(fleet.agent_pid("h1")).context("read the agent's VmRSS")?;
    let controller_kib =
        process::rss_kib(fleet.controller_pid()).context("read the controller's VmRSS")?;
    Ok(vec![
        Row {
            bench: "memory",
            measurement: "agent VmRSS, idle, one instance running".into(),
            value: format!("{:.1} MB", agent_kib as f64 / 1024.0),
            target: format!("< {} MB", MEMORY_TARGET_KIB / 1024),
            ok: Some(agent_kib < MEMORY_TARGET_KIB),
        },
        Row::info(
            "memory",
            "controller VmRSS, one host (for reference)",
            format!("{:.1} MB", controller_kib as f64 / 1024.0),
        ),
    ])
}

const START_FILES: usize = 64;
const START_RUNS: usize = 21;
const START_COPY_RUNS: usize = 3;
const START_TARGET_RATIO: f64 = 1.1;

/// One start (and stop) of an instance of the release in `layout`, run as `run_as`: a start
/// that links for a user of its own, a copy for the agent's own user. Returns the start's time.
fn time_start(
    runtime: &tokio::runtime::Runtime,
    layout: &fleet_agent::model::DataLayout,
    release: &std::path::Path,
    run_as: &fleet_agent::app_user::RunAs,
) -> Result<Duration> {
    use fleet_agent::instance::{Instance, InstanceVars};
    let manifest = fleet_proto::manifest::Manifest::parse(START_MANIFEST)?;
    let vars = InstanceVars {
        app: "bench".into(),
        version: "1.0".into(),
        host_name: "bench".into(),
        advertise: "127.0.0.1".into(),
        release_env: Default::default(),
        secrets: Default::default(),
        state_dir: layout.app_state_dir("bench"),
        run_as: run_as.clone(),
    };
    let began = Instant::now();
    let mut instance = runtime.block_on(Instance::start(layout, release, &manifest, &vars))?;
    let took = began.elapsed();
    runtime.block_on(instance.stop());
    Ok(took)
}

const START_MANIFEST: &str = "[process]\ncommand = [\"/bin/true\"]\n";

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn bench_start() -> Result<Vec<Row>> {
    use fleet_agent::app_user::{self, RunAs};
    if !app_user::drops_privileges() {
        bail!("the start benchmark needs root: only a root agent runs apps as users of their own and links their files");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let chunk: Vec<u8> = incompressible_bytes(1 << 20);
    let sizes = [("1 MiB", 1usize << 20), ("1 GiB", 1usize << 30)];
    let mut setups = Vec::new();
    for (_, total) in sizes {
        let dir = tempfile::tempdir().context("a temp dir")?;
        let layout = fleet_agent::model::DataLayout::new(dir.path());
        layout.create_all()?;
        let release = layout.release_dir("bench", "1.0", "000000000000");
        std::fs::create_dir_all(release.join("lib"))?;
        std::fs::write(release.join("fleet.toml"), START_MANIFEST)?;
        let per_file = total / START_FILES;
        for idx in 0..START_FILES {
            let mut file = std::fs::File::create(release.join(format!("lib/part-{idx:02}")))?;
            let mut left = per_file;
            while left > 0 {
                let n = left.min(chunk.len());
                std::io::Write::write_all(&mut file, &chunk[..n])?;
                left -= n;
            }
        }
        let run_as = app_user::prepare(&layout, "bench", None).map_err(anyhow::Error::msg)?;
        setups.push((dir, layout, release, run_as));
    }
    // The releases' bytes on disk first, so that their writeback does not land in a start.
    nix::unistd::sync();
    // Linked starts of both sizes in turn (what a root agent does), then the copies.
    let mut linked = vec![Vec::new(), Vec::new()];
    for _ in 0..START_RUNS {
        for (idx, (_, layout, release, run_as)) in setups.iter().enumerate() {
            linked[idx].push(time_start(&runtime, layout, release, run_as)?);
        }
    }
    let linked: Vec<Duration> = linked.into_iter().map(median).collect();
    let mut rows = Vec::new();
    for (idx, (_, layout, release, _)) in setups.iter().enumerate() {
        let copies = (0..START_COPY_RUNS)
            .map(|_| time_start(&runtime, layout, release, &RunAs::Agent))
            .collect::<Result<Vec<_>>>()?;
        let label = sizes[idx].0;
        rows.push(Row::info(
            "start",
            format!(
                "start of a {label} release ({START_FILES} files), linked, median of {START_RUNS}"
            ),
            format!("{:.2} ms", linked[idx].as_secs_f64() * 1000.0),
        ));
        rows.push(Row::info(
            "start",
            format!("the same start copying the release (as before), median of {START_COPY_RUNS}"),
            format_ms(median(copies)),
        ));
    }
    let ratio = linked[1].as_secs_f64() / linked[0].as_secs_f64();
    rows.push(Row {
        bench: "start",
        measurement: "linked start: 1 GiB release / 1 MiB release".into(),
        value: format!("{ratio:.2}x"),
        target: format!("<= {START_TARGET_RATIO}x"),
        ok: Some(ratio <= START_TARGET_RATIO),
    });
    Ok(rows)
}

const PACE_HOSTS: usize = 20;
const PACE_PAIRS: usize = 10;
const PACE_TARGET_RATIO: f64 = 1.2;
const PYTHON: &str = "/usr/bin/python3";

/// A small Python web app: `/healthz`, and `/` answering `web VERSION on HOST`.
const PYTHON_APP: &str = r#"import http.server, os, signal, sys
addr, port = sys.argv[2].rsplit(":", 1)
text = ("web %s on %s\n" % (os.environ.get("FLEET_VERSION", "?"), os.environ.get("FLEET_HOST", "?"))).encode()
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"ok\n" if self.path == "/healthz" else text
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
signal.signal(signal.SIGTERM, lambda *args: os._exit(0))
http.server.HTTPServer((addr, int(port)), Handler).serve_forever()
"#;

/// The waves of `--canary 1 --batch 25%` over `n` hosts, as sizes.
fn pace_waves(n: usize) -> Vec<usize> {
    let batch = n.div_ceil(4).max(1);
    let mut waves = vec![1];
    let mut left = n - 1;
    while left > 0 {
        let wave = left.min(batch);
        waves.push(wave);
        left -= wave;
    }
    waves
}

/// The floor: wave by wave, stop the old process of each host of the wave and start and check
/// its new one, all hosts of a wave at once, with nothing else. Returns the wall time.
fn pace_floor(
    dir: &std::path::Path,
    range: &AddressRange,
    running: &mut [Option<ChildGuard>],
    version: &str,
) -> Result<Duration> {
    let began = Instant::now();
    let mut first = 0;
    for wave in pace_waves(running.len()) {
        let hosts: Vec<usize> = (first..first + wave).collect();
        first += wave;
        std::thread::scope(|scope| -> Result<()> {
            let mut handles = Vec::new();
            for (idx, slot) in running.iter_mut().enumerate() {
                if !hosts.contains(&idx) {
                    continue;
                }
                let addr = range.host_addr(idx);
                handles.push(scope.spawn(move || -> Result<()> {
                    if let Some(mut old) = slot.take() {
                        old.signal(nix::sys::signal::Signal::SIGTERM);
                        old.wait_exit(Duration::from_secs(10));
                        old.kill_now();
                    }
                    let mut command = Command::new(PYTHON);
                    command
                        .args(["app.py", "--listen", &format!("{addr}:{WEB_PORT}")])
                        .current_dir(dir)
                        .env("FLEET_VERSION", version)
                        .env("FLEET_HOST", format!("f{idx}"));
                    let mut app = ChildGuard::spawn(
                        "floor-app",
                        command,
                        &dir.join(format!("floor-{idx}.log")),
                    );
                    let until = Instant::now() + Duration::from_secs(10);
                    while !matches!(http::get(&addr, WEB_PORT, "/healthz"), Ok((200, _))) {
                        if Instant::now() > until || app.has_exited() {
                            bail!("the floor's app on {addr} did not become healthy");
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    *slot = Some(app);
                    Ok(())
                }));
            }
            for handle in handles {
                handle
                    .join()
                    .map_err(|_| anyhow::anyhow!("a floor thread panicked"))??;
            }
            Ok(())
        })?;
    }
    Ok(began.elapsed())
}

fn bench_pace() -> Result<Vec<Row>> {
    if !std::path::Path::new(PYTHON).exists() {
        bail!("the pace benchmark needs {PYTHON}");
    }
    let fleet = Fleet::start(PACE_HOSTS);
    let manifest = format!(
        "[process]\ncommand = [\"{PYTHON}\", \"app.py\", \"--listen\", \"${{FLEET_ADDR}}:{WEB_PORT}\"]\nstop_timeout = \"5s\"\n\n[[smoke]]\nhttp = \"http://${{FLEET_ADDR}}:{WEB_PORT}/healthz\"\ntimeout = \"10s\"\n"
    );
    for version in ["1.0.0", "1.1.0"] {
        let artifact = fleet.write_artifact(&[
            ("fleet.toml", manifest.as_bytes(), 0o644),
            ("app.py", PYTHON_APP.as_bytes(), 0o644),
            ("VERSION", version.as_bytes(), 0o644),
        ]);
        fleet
            .create_release("web", version, &artifact, &[])
            .expect_code(0);
    }
    let rollout_args = |version| ["rollout", "web", version, "--canary", "1", "--batch", "25%"];
    fleet
        .ctl_with_deadline(
            &["rollout", "web", "1.0.0", "--batch", "100%"],
            LONG_CTL_DEADLINE,
        )
        .expect_code(0);

    // The floor's own apps, on other loopback addresses.
    let floor_dir = tempfile::tempdir().context("a temp dir")?;
    std::fs::write(floor_dir.path().join("app.py"), PYTHON_APP)?;
    let floor_range = AddressRange::allocate(PACE_HOSTS, WEB_PORT);
    let mut floor_apps: Vec<Option<ChildGuard>> = (0..PACE_HOSTS).map(|_| None).collect();
    pace_floor(floor_dir.path(), &floor_range, &mut floor_apps, "1.0.0")?;

    let (mut fleet_times, mut floor_times, mut runs) = (Vec::new(), Vec::new(), Vec::new());
    for pair in 0..PACE_PAIRS {
        let version = if pair % 2 == 0 { "1.1.0" } else { "1.0.0" };
        let (began, began_at) = (Instant::now(), std::time::SystemTime::now());
        let out = fleet
            .ctl_with_deadline(&rollout_args(version), LONG_CTL_DEADLINE)
            .expect_code(0);
        fleet_times.push(began.elapsed());
        runs.push(waves::RolloutRun {
            id: out.json["id"].as_str().unwrap_or_default().to_string(),
            began: began_at,
            ended: std::time::SystemTime::now(),
        });
        floor_times.push(pace_floor(
            floor_dir.path(),
            &floor_range,
            &mut floor_apps,
            version,
        )?);
    }
    for app in floor_apps.iter_mut().flatten() {
        app.kill_now();
    }
    print_breakdown("pace", &fleet, &runs);
    let (fleet_median, floor_median) = (median(fleet_times), median(floor_times));
    let n_waves = pace_waves(PACE_HOSTS).len();
    let ratio = fleet_median.as_secs_f64() / floor_median.as_secs_f64();
    let per_wave =
        (fleet_median.saturating_sub(floor_median)).as_secs_f64() * 1000.0 / n_waves as f64;
    Ok(vec![
        Row::info(
            "pace",
            format!("{PACE_HOSTS} hosts, Python app, canary 1, batch 25% ({n_waves} waves): fleet, median of {PACE_PAIRS}"),
            format_ms(fleet_median),
        ),
        Row::info(
            "pace",
            format!("the floor (stop, start, check wave by wave, nothing else), median of {PACE_PAIRS}"),
            format_ms(floor_median),
        ),
        Row::info("pace", "fleet over the floor, per wave", format!("{per_wave:.0} ms")),
        Row {
            bench: "pace",
            measurement: "fleet / floor".into(),
            value: format!("{ratio:.2}x"),
            target: format!("<= {PACE_TARGET_RATIO}x"),
            ok: Some(ratio <= PACE_TARGET_RATIO),
        },
    ])
}

/// Prints where each wave's time went (median of `runs`) to stderr, as a markdown table.
fn print_breakdown(bench: &str, fleet: &Fleet, runs: &[waves::RolloutRun]) {
    let names: Vec<String> = fleet.agents().iter().map(|a| a.name.clone()).collect();
    let mut tables = Vec::new();
    for run in runs {
        match waves::breakdown(fleet.dir(), &names, run) {
            Ok(rows) => tables.push(rows),
            Err(e) => eprintln!(
                "fleet-bench {bench}: no breakdown of rollout {}: {e}",
                run.id
            ),
        }
    }
    if !tables.is_empty() {
        let rows = waves::median_rows(&tables);
        eprintln!(
            "fleet-bench {bench}: where a wave's time goes, ms (the wave's last host; median of {} rollouts):\n{}",
            tables.len(),
            waves::table(&rows)
        );
    }
}

fn format_ms(duration: Duration) -> String {
    format!("{:.0} ms", duration.as_secs_f64() * 1000.0)
}

fn print_table(rows: &[Row]) {
    let headers = ["benchmark", "measurement", "value", "target", "result"];
    let cells: Vec<[String; 5]> = rows
        .iter()
        .map(|row| {
            [
                row.bench.to_string(),
                row.measurement.clone(),
                row.value.clone(),
                row.target.clone(),
                match row.ok {
                    Some(true) => "ok".into(),
                    Some(false) => "MISSED".into(),
                    None => String::new(),
                },
            ]
        })
        .collect();
    let mut widths = headers.map(str::len);
    for row in &cells {
        for (idx, cell) in row.iter().enumerate() {
            widths[idx] = widths[idx].max(cell.len());
        }
    }
    let line = |row: [&str; 5]| {
        let padded: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers);
    line(widths.map(|w| "-".repeat(w)).each_ref().map(String::as_str));
    for row in &cells {
        line(row.each_ref().map(String::as_str));
    }
}

const BOOTSTRAP_HOSTS: usize = 10;
const BOOTSTRAP_TARGET_RATIO: f64 = 2.0;

/// Runs one `fleetctl bootstrap` over `targets_file` and returns its wall time.
fn timed_bootstrap(
    fleet: &Fleet,
    client: &fleet_tests::sshd::SshClient,
    targets_file: &std::path::Path,
) -> Result<Duration> {
    let identity = client.identity.display().to_string();
    let known_hosts = client.known_hosts.display().to_string();
    let targets = targets_file.display().to_string();
    let start = Instant::now();
    let out = fleet.ctl_with_deadline(
        &[
            "bootstrap",
            "--targets",
            &targets,
            "--identity",
            &identity,
            "--known-hosts",
            &known_hosts,
        ],
        LONG_CTL_DEADLINE,
    );
    let wall = start.elapsed();
    if out.code != 0 {
        bail!(
            "fleetctl bootstrap exited {}:\n{}\n{}",
            out.code,
            out.stdout,
            out.stderr
        );
    }
    Ok(wall)
}

fn bench_bootstrap() -> Result<Vec<Row>> {
    use fleet_tests::sshd::{RemoteAgents, SshClient, Sshd};
    let fleet = Fleet::start(0);
    let client = SshClient::new(&fleet.dir().join("ssh-client"));
    let Some(sshd) = Sshd::start(&fleet.dir().join("sshd"), &client.public_line) else {
        bail!("the bootstrap benchmark needs /usr/sbin/sshd: install openssh-server");
    };
    std::fs::write(&client.known_hosts, sshd.known_hosts_line() + "\n")?;
    let mut agents = RemoteAgents {
        remote_dirs: Vec::new(),
    };
    let url = sshd.url();
    let mut next_idx = 0;
    // Each round bootstraps `n` fresh hosts (new names, new remote dirs) in one command.
    let mut round = |n: usize, label: &str| -> Result<(Duration, CpuSplit)> {
        let mut lines = String::new();
        for _ in 0..n {
            let name = format!("{label}{next_idx}");
            let remote = fleet.dir().join("remote").join(&name);
            agents.remote_dirs.push(remote.clone());
            lines.push_str(&format!(
                "{url} name={name} advertise={} remote_dir={}\n",
                fleet.range.host_addr(next_idx),
                remote.display()
            ));
            next_idx += 1;
        }
        let file = fleet.dir().join(format!("targets-{label}.txt"));
        std::fs::write(&file, lines)?;
        let before = CpuSplit::read(&fleet, sshd.pid(), &[]);
        let wall = timed_bootstrap(&fleet, &client, &file)?;
        let new_dirs = &agents.remote_dirs[agents.remote_dirs.len() - n..];
        let after = CpuSplit::read(&fleet, sshd.pid(), new_dirs);
        Ok((wall, after.minus(&before)))
    };
    // A warm-up host first, so both measured rounds find the binary in the page cache.
    round(1, "warm")?;
    let (one, _) = round(1, "one")?;
    let (ten, cpu) = round(BOOTSTRAP_HOSTS, "ten")?;
    let ratio = ten.as_secs_f64() / one.as_secs_f64();
    drop(agents);
    drop(sshd);
    let per_host =
        |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1e3 / BOOTSTRAP_HOSTS as f64);
    let cpu_rows = [
        ("sshd peer (sessions, shell, tar)", cpu.sshd),
        ("the new agent (start, join, register)", cpu.agents),
        ("fleetctl", cpu.fleetctl),
        ("controller", cpu.controller),
    ]
    .map(|(what, d)| {
        Row::info(
            "bootstrap",
            format!("CPU per host in the {BOOTSTRAP_HOSTS}-host round: {what}"),
            per_host(d),
        )
    });
    let total = cpu.sshd + cpu.agents + cpu.fleetctl + cpu.controller;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // The ten "hosts" share this machine's cores with fleetctl and the controller: their own
    // work (sshd, its shell and tar, the agents) alone takes at least this long here, so no
    // bootstrap can show a lower ratio on this machine, whatever fleet itself costs.
    let hosts_own = (cpu.sshd + cpu.agents) / cores as u32;
    let floor_ratio = hosts_own.as_secs_f64() / one.as_secs_f64();
    let mut rows = Vec::from(cpu_rows);
    rows.extend([
        Row::info(
            "bootstrap",
            format!(
                "{BOOTSTRAP_HOSTS}-host round: all that CPU spread over this machine's {cores} \
                 cores"
            ),
            format_ms(total / cores as u32),
        ),
        Row::info(
            "bootstrap",
            format!(
                "{BOOTSTRAP_HOSTS}-host round: the hosts' own CPU alone (sshd peer, agents) over \
                 {cores} cores, / 1 host: the floor of the ratio here"
            ),
            format!("{} = {floor_ratio:.2}x", format_ms(hosts_own)),
        ),
        Row::info(
            "bootstrap",
            "1 host, one command (upload, start, registered)",
            format_ms(one),
        ),
        Row::info(
            "bootstrap",
            format!("{BOOTSTRAP_HOSTS} hosts, one command"),
            format_ms(ten),
        ),
        Row {
            bench: "bootstrap",
            measurement: format!("{BOOTSTRAP_HOSTS} hosts / 1 host"),
            value: format!("{ratio:.2}x"),
            target: format!("< {BOOTSTRAP_TARGET_RATIO:.1}x"),
            ok: Some(ratio < BOOTSTRAP_TARGET_RATIO),
        },
    ]);
    Ok(rows)
}

/// The machine's CPU time so far, from the `cpu` line of `/proc/stat`: on a VM the figures of
/// a run mean little without the share the hypervisor took (steal).
struct CpuTicks {
    total: u64,
    steal: u64,
}

impl CpuTicks {
    fn read() -> Option<CpuTicks> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let fields: Vec<u64> = stat
            .lines()
            .next()?
            .strip_prefix("cpu ")?
            .split_whitespace()
            .map(|f| f.parse().ok())
            .collect::<Option<_>>()?;
        // user nice system idle iowait irq softirq steal [guest guest_nice, inside user]
        Some(CpuTicks {
            total: fields.iter().take(8).sum(),
            steal: *fields.get(7)?,
        })
    }

    fn steal_percent_since(&self, before: &CpuTicks) -> f64 {
        let total = self.total.saturating_sub(before.total).max(1);
        100.0 * self.steal.saturating_sub(before.steal) as f64 / total as f64
    }
}

/// CPU time (user + system) spent by each party of a bootstrap, from `/proc/PID/stat`.
#[derive(Default)]
struct CpuSplit {
    /// The test sshd's reaped sessions and everything they ran (shell, tar, mv ...).
    sshd: Duration,
    /// The agents started from the given remote dirs (detached, so not sshd's children).
    agents: Duration,
    /// fleetctl runs as this benchmark's child: our reaped children's time.
    fleetctl: Duration,
    controller: Duration,
}

impl CpuSplit {
    fn read(fleet: &Fleet, sshd_pid: Option<u32>, agent_dirs: &[std::path::PathBuf]) -> CpuSplit {
        let agents = agent_dirs
            .iter()
            .filter_map(|dir| std::fs::read_to_string(dir.join("fleet-agent.pid")).ok())
            .filter_map(|pid| pid.trim().parse::<u32>().ok())
            .filter_map(run_time)
            .sum();
        CpuSplit {
            sshd: sshd_pid.and_then(reaped_cpu).unwrap_or_default(),
            agents,
            fleetctl: reaped_cpu(std::process::id()).unwrap_or_default(),
            controller: run_time(fleet.controller_pid()).unwrap_or_default(),
        }
    }

    fn minus(&self, before: &CpuSplit) -> CpuSplit {
        CpuSplit {
            sshd: self.sshd.saturating_sub(before.sshd),
            agents: self.agents.saturating_sub(before.agents),
            fleetctl: self.fleetctl.saturating_sub(before.fleetctl),
            controller: self.controller.saturating_sub(before.controller),
        }
    }
}

/// The CPU time a live process's threads ran, to the nanosecond (`/proc/PID/task/*/schedstat`).
fn run_time(pid: u32) -> Option<Duration> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let nanos = tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Some(Duration::from_nanos(nanos))
}

/// The CPU time (user + system) of a process's reaped children, from `cutime` and `cstime`
/// in `/proc/PID/stat`, in clock ticks (10 ms): what is left of processes that exited.
fn reaped_cpu(pid: u32) -> Option<Duration> {
    stat_cpu(pid, 13)
}

/// The CPU time (user + system) of a living process, all its threads, from `utime` and
/// `stime` in `/proc/PID/stat`, in clock ticks (10 ms).
fn own_cpu(pid: u32) -> Option<Duration> {
    stat_cpu(pid, 11)
}

/// Two tick counters of `/proc/PID/stat` summed, `skip` fields after the state field.
fn stat_cpu(pid: u32, skip: usize) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name, which may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let ticks: u64 = rest
        .split_whitespace()
        .skip(skip)
        .take(2)
        .map(|f| f.parse::<u64>().ok())
        .sum::<Option<u64>>()?;
    Some(Duration::from_secs_f64(
        ticks as f64 / CLOCK_TICKS_PER_SECOND,
    ))
}

/// `sysconf(_SC_CLK_TCK)`: 100 on every Linux this runs on.
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_clock_of_a_log_line() {
        let line = "\u{1b}[2m2026-11-25T14:52:02.500000Z\u{1b}[0m INFO fetching sha256:ab";
        assert_eq!(
            seconds_of_day(line),
            Some(14.0 * 3600.0 + 52.0 * 60.0 + 2.5)
        );
        assert_eq!(seconds_of_day("no clock here"), None);
    }

    #[test]
    fn reads_the_machine_cpu_time_and_its_steal() {
        let before = CpuTicks::read().expect("the cpu line of /proc/stat");
        let after = CpuTicks {
            total: before.total + 200,
            steal: before.steal + 50,
        };
        assert!(before.total > before.steal);
        assert_eq!(after.steal_percent_since(&before), 25.0);
    }
}
