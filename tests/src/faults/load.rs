//! The load run (`fleet-faults --load`): does the controller keep answering, and keep driving
//! a rollout at its pace, while many clients call it at once?
//!
//! A fleet of [`LOAD_HOSTS`] hosts rolls out releases of one host per wave (so each rollout
//! has `LOAD_HOSTS - 1` moments where the controller must widen). [`ROLLOUTS`] rollouts run
//! alone, then as many again while a load generator calls the controller: bursts of
//! [`STATUS_CALLS`] `Status`, [`HISTORY_CALLS`] `History` and [`CREATE_CALLS`] `CreateRelease`
//! (each of another app), all at once, each on a connection of its own as that many `fleetctl`
//! processes would, burst after burst until the rollout ended. The generator is this binary
//! again (`fleet-faults --load-worker`) in a cgroup of its own limited to half a core
//! ([`crate::cgroup`]), so that it does not simply take the machine's two cores from the
//! controller; without a writable cgroup the run is skipped, saying why.
//!
//! Figures: every call's latency (all answered within [`CALL_DEADLINE`]), and the controller's
//! delay between waves: from the moment the last host of wave N reported in (its agent's log)
//! to the moment the controller gave wave N+1 its release (the controller's log), minus the
//! rollout's `--min-healthy` that the controller waits by design; p99 under load against the
//! same unloaded, the target at most [`TARGET_RATIO`]x.

use super::bench::{Bench, Setup};
use crate::cgroup::CpuLimit;
use crate::fleet::Fleet;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const LOAD_HOSTS: usize = 5;
pub const ROLLOUTS: usize = 4;
pub const STATUS_CALLS: usize = 100;
pub const HISTORY_CALLS: usize = 100;
pub const CREATE_CALLS: usize = 20;
/// Every call must be answered within this.
pub const CALL_DEADLINE: Duration = Duration::from_secs(10);
/// The loaded p99 delay between waves against the unloaded one, at most.
pub const TARGET_RATIO: f64 = 1.5;
/// The generator's share of a core: `cpu.max = "50000 100000"`.
const QUOTA_US: u64 = 50_000;
const PERIOD_US: u64 = 100_000;
/// Bursts at most per rollout (bounds the generator's loop).
const MAX_BURSTS: u32 = 1_000;

/// One call the generator made.
#[derive(Debug, Clone)]
pub struct Call {
    pub kind: String,
    pub millis: u64,
    pub error: Option<String>,
}

impl Call {
    /// Whether the controller answered: done, or refused saying to try again later (it takes
    /// a few uploads at once, `ResourceExhausted` beyond), rather than the call failing.
    pub fn answered(&self) -> bool {
        self.error
            .as_deref()
            .is_none_or(|e| e.starts_with("ResourceExhausted"))
    }

    pub fn refused(&self) -> bool {
        self.answered() && self.error.is_some()
    }
}

/// What the load run measured.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub skipped: Option<String>,
    pub cgroup: String,
    /// The controller's delay between waves (ms), without and with load.
    pub unloaded_gaps: Vec<f64>,
    pub loaded_gaps: Vec<f64>,
    pub calls: Vec<Call>,
    pub bursts: u32,
    /// What broke: calls not answered in time, failed rollouts, a ratio over the target.
    pub broken: Vec<String>,
}

/// The `pct` percentile (nearest rank) of `values`.
pub fn percentile(values: &[f64], pct: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((pct / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl LoadReport {
    pub fn ratio(&self) -> f64 {
        let unloaded = percentile(&self.unloaded_gaps, 99.0);
        let loaded = percentile(&self.loaded_gaps, 99.0);
        if unloaded <= 0.0 {
            return f64::INFINITY;
        }
        loaded / unloaded
    }

    fn slowest(&self, kind: &str) -> (usize, u64) {
        let of_kind: Vec<&Call> = self.calls.iter().filter(|c| c.kind == kind).collect();
        (
            of_kind.len(),
            of_kind.iter().map(|c| c.millis).max().unwrap_or(0),
        )
    }
}

/// Runs the load run; see the module doc.
pub fn run(seed: u64, verbose: bool) -> LoadReport {
    let mut report = LoadReport::default();
    let limit = match CpuLimit::create("load", QUOTA_US, PERIOD_US) {
        Ok(limit) => limit,
        Err(why) => {
            report.skipped = Some(format!("cannot limit the load generator's CPU: {why}"));
            return report;
        }
    };
    report.cgroup = limit.described.clone();
    if let Err(e) = run_with(seed, verbose, &limit, &mut report) {
        report.broken.push(format!("{e:#}"));
    }
    report
}

fn run_with(seed: u64, verbose: bool, limit: &CpuLimit, report: &mut LoadReport) -> Result<()> {
    let setup = Setup {
        n_hosts: LOAD_HOSTS,
        ..Setup::default()
    };
    let mut bench = Bench::start(seed, &setup)?;
    let artifacts = write_load_artifacts(&bench.fleet)?;
    for round in 0..ROLLOUTS * 2 {
        let loaded = round >= ROLLOUTS;
        let version = bench.create_release(false, 256 * 1024)?;
        let id = bench.start_rollout(&version, false)?;
        let mut worker = if loaded {
            Some(Worker::start(&bench.fleet, &artifacts, round, limit)?)
        } else {
            None
        };
        let end = bench.wait_rollout_end(&id, bench.rollout_deadline());
        let calls = match worker.take() {
            Some(worker) => worker.finish()?,
            None => (Vec::new(), 0),
        };
        let end = end?;
        if end["state"] != "succeeded" {
            report.broken.push(format!(
                "rollout {id} ended {}: {}",
                end["state"], end["message"]
            ));
            continue;
        }
        bench.current_version = version;
        let gaps = wave_gaps(&bench.fleet, &end)?;
        if verbose {
            eprintln!(
                "load: rollout {} {}: gaps {:?} ms; {} calls in {} bursts, slowest {} ms",
                round + 1,
                if loaded { "under load" } else { "alone" },
                gaps.iter().map(|g| g.round() as i64).collect::<Vec<_>>(),
                calls.0.len(),
                calls.1,
                calls.0.iter().map(|c| c.millis).max().unwrap_or(0)
            );
        }
        if loaded {
            report.loaded_gaps.extend(gaps);
            report.bursts += calls.1;
            report.calls.extend(calls.0);
        } else {
            report.unloaded_gaps.extend(gaps);
        }
    }
    let late: Vec<&Call> = report
        .calls
        .iter()
        .filter(|c| !c.answered() || c.millis > CALL_DEADLINE.as_millis() as u64)
        .collect();
    if !late.is_empty() {
        report.broken.push(format!(
            "{} of {} calls failed or took over {CALL_DEADLINE:?}, e.g. {} after {} ms: {}",
            late.len(),
            report.calls.len(),
            late[0].kind,
            late[0].millis,
            late[0].error.as_deref().unwrap_or("answered late")
        ));
    }
    if report.calls.is_empty() {
        report
            .broken
            .push("the load generator made no call".to_string());
    }
    if report.ratio() > TARGET_RATIO {
        report.broken.push(format!(
            "the controller's delay between waves, p99: {:.0} ms under load against {:.0} ms alone ({:.2}x, target {TARGET_RATIO}x)",
            percentile(&report.loaded_gaps, 99.0),
            percentile(&report.unloaded_gaps, 99.0),
            report.ratio()
        ));
    }
    Ok(())
}

/// Small artifacts of the web app for the generator's `CreateRelease` calls, one per app.
fn write_load_artifacts(fleet: &Fleet) -> Result<Vec<PathBuf>> {
    let manifest = crate::web_manifest("5s");
    (0..CREATE_CALLS)
        .map(|idx| {
            let marker = format!("load {idx}");
            let artifact = fleet.web_artifact(&manifest, &[("marker.txt", marker.as_bytes())]);
            let kept = fleet.dir().join(format!("load-{idx}.tar.gz"));
            std::fs::copy(&artifact, &kept).context("keep a load artifact")?;
            Ok(kept)
        })
        .collect()
}

/// The generator: this binary with `--load-worker`, in the CPU-limited cgroup.
struct Worker {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
}

impl Worker {
    fn start(fleet: &Fleet, artifacts: &[PathBuf], round: usize, limit: &CpuLimit) -> Result<Self> {
        let exe = std::env::current_exe().context("this binary's path")?;
        let spec = json!({
            "url": fleet.controller_url(),
            "config_dir": fleet.config_dir(),
            "artifacts": artifacts,
            "round": round,
        });
        let mut child = Command::new(exe)
            .arg("--load-worker")
            .arg(spec.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start the load generator")?;
        let mut stdin = child.stdin.take().context("the generator's stdin")?;
        // In the cgroup before it does anything: it waits for "go".
        if let Err(e) = limit.add(child.id()) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{e}");
        }
        writeln!(stdin, "go").context("start the generator")?;
        Ok(Worker {
            child,
            stdin: Some(stdin),
        })
    }

    /// Tells the generator to stop after its burst; its calls and bursts.
    fn finish(mut self) -> Result<(Vec<Call>, u32)> {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = writeln!(stdin, "stop");
        }
        let stdout = self.child.stdout.take().context("the generator's stdout")?;
        // Bounded: the generator stops after the burst under way, whose calls time out.
        let deadline = Instant::now() + CALL_DEADLINE * 6;
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut std::io::BufReader::new(stdout), &mut text);
            text
        });
        while !reader.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if !reader.is_finished() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        let text = reader.join().unwrap_or_default();
        let result: Value = serde_json::from_str(text.trim())
            .with_context(|| format!("the generator's result: {text:?}"))?;
        let calls = result["calls"]
            .as_array()
            .map(|calls| {
                calls
                    .iter()
                    .map(|c| Call {
                        kind: c["kind"].as_str().unwrap_or("").to_string(),
                        millis: c["ms"].as_u64().unwrap_or(0),
                        error: c["error"].as_str().map(str::to_string),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok((calls, result["bursts"].as_u64().unwrap_or(0) as u32))
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The generator's side (`fleet-faults --load-worker SPEC`): waits for "go" on stdin, then
/// fires bursts until "stop" (or stdin closes), and prints every call as JSON.
pub fn worker_main(spec: &str) -> Result<()> {
    let spec: Value = serde_json::from_str(spec).context("the worker's spec")?;
    let url = spec["url"].as_str().context("url")?.to_string();
    let config_dir = PathBuf::from(spec["config_dir"].as_str().context("config_dir")?);
    let round = spec["round"].as_u64().unwrap_or(0);
    let artifacts: Vec<PathBuf> = spec["artifacts"]
        .as_array()
        .context("artifacts")?
        .iter()
        .filter_map(|a| a.as_str().map(PathBuf::from))
        .collect();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopping = stop.clone();
    std::thread::spawn(move || {
        let mut line = String::new();
        // Any line, or the end of stdin, stops the bursts.
        let _ = std::io::stdin().lock().read_line(&mut line);
        stopping.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (calls, bursts) = runtime.block_on(async move {
        let tls = client_tls(&config_dir)?;
        let mut calls = Vec::new();
        let mut bursts = 0u32;
        while bursts < MAX_BURSTS && !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let mut tasks = Vec::new();
            for idx in 0..STATUS_CALLS + HISTORY_CALLS + CREATE_CALLS {
                let (url, tls) = (url.clone(), tls.clone());
                let create = idx
                    .checked_sub(STATUS_CALLS + HISTORY_CALLS)
                    .map(|app_idx| (app_idx, artifacts[app_idx % artifacts.len()].clone()));
                let kind = if create.is_some() {
                    "release create"
                } else if idx < STATUS_CALLS {
                    "status"
                } else {
                    "history"
                };
                let version = format!("{round}.{bursts}.0");
                tasks.push(tokio::spawn(async move {
                    let started = Instant::now();
                    let result = tokio::time::timeout(
                        CALL_DEADLINE * 3,
                        one_call(&url, tls, kind, create, &version),
                    )
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer in {:?}", CALL_DEADLINE * 3)));
                    json!({
                        "kind": kind,
                        "ms": started.elapsed().as_millis() as u64,
                        "error": result.err(),
                    })
                }));
            }
            for task in tasks {
                calls.push(
                    task.await
                        .unwrap_or_else(|e| json!({"kind": "?", "ms": 0, "error": e.to_string()})),
                );
            }
            bursts += 1;
        }
        Ok::<_, anyhow::Error>((calls, bursts))
    })?;
    println!("{}", json!({"calls": calls, "bursts": bursts}));
    Ok(())
}

fn client_tls(config_dir: &Path) -> Result<tonic::transport::ClientTlsConfig> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let read = |name: &str| {
        std::fs::read_to_string(config_dir.join(name))
            .with_context(|| format!("read {}", config_dir.join(name).display()))
    };
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")?))
        .domain_name(fleet_pki::CONTROLLER_TLS_NAME)
        .identity(Identity::from_pem(read("client.pem")?, read("client.key")?)))
}

/// One call on a connection of its own.
async fn one_call(
    url: &str,
    tls: tonic::transport::ClientTlsConfig,
    kind: &str,
    create: Option<(usize, PathBuf)>,
    version: &str,
) -> Result<(), String> {
    use fleet_proto::pb;
    let channel = tonic::transport::Channel::from_shared(url.to_string())
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut client = pb::fleet_service_client::FleetServiceClient::new(channel);
    let status = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
    match (kind, create) {
        ("status", _) => {
            client
                .status(pb::StatusRequest { app: "web".into() })
                .await
                .map_err(status)?;
        }
        ("history", _) => {
            client
                .history(pb::HistoryRequest {
                    app: "web".into(),
                    limit: 50,
                })
                .await
                .map_err(status)?;
        }
        (_, Some((app_idx, artifact))) => {
            let bytes = tokio::fs::read(&artifact)
                .await
                .map_err(|e| format!("read {}: {e}", artifact.display()))?;
            let mut messages = vec![pb::CreateReleaseRequest {
                body: Some(pb::create_release_request::Body::Header(
                    pb::ReleaseHeader {
                        app: format!("load-{app_idx}"),
                        version: version.to_string(),
                        ..Default::default()
                    },
                )),
            }];
            for chunk in bytes.chunks(64 * 1024) {
                messages.push(pb::CreateReleaseRequest {
                    body: Some(pb::create_release_request::Body::Chunk(
                        chunk.to_vec().into(),
                    )),
                });
            }
            client
                .create_release(tokio_stream::iter(messages))
                .await
                .map_err(status)?;
        }
        _ => return Err(format!("no call {kind}")),
    }
    Ok(())
}

/// The controller's delay between the waves of a finished rollout (ms): for each wave after
/// the first, from the time the host of the wave before reported its instance running (its
/// agent's clock, in `status`: the agent reports running once the smoke checks passed and
/// `--min-healthy` went by) to the time the controller logged giving the wave its release.
fn wave_gaps(fleet: &Fleet, rollout: &Value) -> Result<Vec<f64>> {
    let id = rollout["id"].as_str().context("the rollout's id")?;
    let version = rollout["version"]
        .as_str()
        .context("the rollout's version")?;
    let log = fleet.controller_log();
    let status = fleet.ctl(&["status", "web"]);
    if status.code != 0 {
        bail!("status web exited {}: {}", status.code, status.stderr);
    }
    let waves = rollout["waves"].as_array().context("the rollout's waves")?;
    let mut gaps = Vec::new();
    for idx in 1..waves.len() {
        let before = waves[idx - 1]["hosts"][0]["host"]
            .as_str()
            .context("a host")?;
        let host = waves[idx]["hosts"][0]["host"].as_str().context("a host")?;
        let actual = Fleet::actual_of(&status.json, before, "web")
            .with_context(|| format!("status shows nothing of web on {before}"))?;
        if actual["version"] != version || actual["state"] != "running" {
            bail!("{before} no longer runs {version} as the rollout left it: {actual}");
        }
        let reported = actual["since_unix_ms"]
            .as_i64()
            .with_context(|| format!("no since_unix_ms in {actual}"))?;
        let needle = format!(": deploying web@{version} to {host} rollout={id}");
        let given = log
            .lines()
            .find(|line| line.ends_with(&needle))
            .and_then(|line| log_time_unix_ms(line.split_whitespace().next()?))
            .with_context(|| format!("the controller's log has no line ending {needle:?}"))?;
        gaps.push((given - reported) as f64);
    }
    Ok(gaps)
}

/// `2026-12-01T06:28:16.654181Z` (the controller log's timestamps, UTC) as Unix ms.
fn log_time_unix_ms(text: &str) -> Option<i64> {
    let (date, time) = text.strip_suffix('Z')?.split_once('T')?;
    let mut ymd = date.split('-').map(|p| p.parse::<i64>().ok());
    let (year, month, day) = (ymd.next()??, ymd.next()??, ymd.next()??);
    let (hms, fraction) = time.split_once('.').unwrap_or((time, "0"));
    let mut parts = hms.split(':').map(|p| p.parse::<i64>().ok());
    let (hour, minute, second) = (parts.next()??, parts.next()??, parts.next()??);
    let millis: i64 = format!("{fraction:0<3}")[..3].parse().ok()?;
    // Days from civil (Howard Hinnant's algorithm).
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year - era * 400;
    let doy = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000 + millis)
}

/// The load run's figures as markdown, with the machine and the date.
pub fn table(report: &LoadReport, command: &str, build: &str) -> String {
    let mut text = format!(
        "Run on {} ({}), {build} build, with `{command}`; the machine was shared with other \
         engineers' builds and tests meanwhile.\n\n",
        super::report::today(),
        super::report::machine()
    );
    if let Some(why) = &report.skipped {
        text.push_str(&format!("Skipped: {why}\n"));
        return text;
    }
    let (n_status, slow_status) = report.slowest("status");
    let (n_history, slow_history) = report.slowest("history");
    let (n_create, slow_create) = report.slowest("release create");
    let failed = report.calls.iter().filter(|c| !c.answered()).count();
    let refused = report.calls.iter().filter(|c| c.refused()).count();
    text.push_str(&format!(
        "| figure | value |\n| --- | --- |\n\
         | load generator | {} bursts of {STATUS_CALLS} status + {HISTORY_CALLS} history + {CREATE_CALLS} release create at once, each on its own connection, in {} |\n\
         | calls answered | {} of {} ({failed} failed; {refused} uploads refused at once with \"try again\", the controller's limit of uploads under way) |\n\
         | slowest call | status {slow_status} ms ({n_status} calls), history {slow_history} ms ({n_history}), release create {slow_create} ms ({n_create}); limit {} ms |\n\
         | delay between waves, alone | p50 {:.0} ms, p99 {:.0} ms ({} waves) |\n\
         | delay between waves, under load | p50 {:.0} ms, p99 {:.0} ms ({} waves) |\n\
         | p99 under load / alone | {:.2}x (target at most {TARGET_RATIO}x) |\n",
        report.bursts,
        report.cgroup,
        report.calls.len() - failed,
        report.calls.len(),
        CALL_DEADLINE.as_millis(),
        percentile(&report.unloaded_gaps, 50.0),
        percentile(&report.unloaded_gaps, 99.0),
        report.unloaded_gaps.len(),
        percentile(&report.loaded_gaps, 50.0),
        percentile(&report.loaded_gaps, 99.0),
        report.loaded_gaps.len(),
        report.ratio(),
    ));
    if !report.broken.is_empty() {
        text.push_str("\nWhat broke:\n\n");
        for line in &report.broken {
            text.push_str(&format!("- {}\n", line.replace('|', "/")));
        }
    }
    text
}

/// One paragraph for the terminal.
pub fn summary(report: &LoadReport) -> String {
    if let Some(why) = &report.skipped {
        return format!("load: skipped: {why}");
    }
    format!(
        "load: {} calls in {} bursts ({}), slowest {} ms; delay between waves p99 {:.0} ms alone, {:.0} ms under load ({:.2}x, target {TARGET_RATIO}x){}",
        report.calls.len(),
        report.bursts,
        report.cgroup,
        report.calls.iter().map(|c| c.millis).max().unwrap_or(0),
        percentile(&report.unloaded_gaps, 99.0),
        percentile(&report.loaded_gaps, 99.0),
        report.ratio(),
        if report.broken.is_empty() {
            "; held".to_string()
        } else {
            format!("; BROKE: {}", report.broken.join("; "))
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_times_read_as_unix_ms() {
        for (text, expect) in [
            ("1970-01-01T00:00:00.000000Z", Some(0)),
            ("1970-01-02T00:00:01.5Z", Some(86_401_500)),
            ("2026-12-01T06:28:16.654181Z", Some(1_796_106_496_654)),
            ("2000-02-29T12:00:00Z", Some(951_825_600_000)),
            ("not a time", None),
        ] {
            assert_eq!(log_time_unix_ms(text), expect, "{text}");
        }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        for (values, pct, expect) in [
            (vec![], 99.0, 0.0),
            (vec![5.0], 99.0, 5.0),
            (vec![3.0, 1.0, 2.0], 50.0, 2.0),
            ((1..=100).map(f64::from).collect::<Vec<_>>(), 99.0, 99.0),
            ((1..=10).map(f64::from).collect::<Vec<_>>(), 99.0, 10.0),
        ] {
            assert_eq!(percentile(&values, pct), expect, "{values:?} p{pct}");
        }
    }
}
