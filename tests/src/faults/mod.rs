//! The fault runner behind `fleet-faults` and the `faults` test: for each fault it starts a
//! fleet ([`bench::Bench`]: a controller, three agents each behind a [`crate::proxy::Proxy`],
//! the example web app), then repeats the fault K times, each try a rollout of a new release
//! (`--canary 1 --batch 1 --max-unavailable 1`) with the fault injected at a random moment of
//! one phase of it, the phases taken in turn ([`Phase`]). After each try it checks the
//! [`invariants`]. A try that broke something is reported with the run's seed and its index, which
//! replay it (`--seed S --only FAULT --try N`: every try draws from a stream of its own), and
//! the fleet is started afresh for the next try.
//!
//! Beside the tries: [`soak`] (`--soak DUR`: rollouts and rollbacks back to back on 10 hosts
//! with a random fault every few seconds) and [`load`] (`--load`: the controller under bursts
//! of client calls from a CPU-limited generator).
//!
//! Every wait is bounded; every process is killed by its pid when the bench is dropped, and the
//! tmpfs mounts and network namespaces it made are removed with it.

pub mod bench;
pub mod invariants;
pub mod load;
pub mod report;
pub mod rng;
pub mod soak;

use bench::{Bench, LOST_AFTER};
use rng::Rng;
use serde_json::Value;
use std::time::{Duration, Instant};

/// The faults, in the order they are run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// No fault: the same rollouts and checks, the control the faults are read against.
    Nothing,
    /// The controller SIGKILLed and started again 0–3 s later.
    ControllerKill,
    /// An agent SIGKILLed and started again 0–1 s later; its instance keeps running and is
    /// adopted.
    AgentKill,
    /// An agent SIGSTOPped until the controller marks its host lost, and a little longer, then
    /// SIGCONTed.
    AgentStop,
    /// The link between an agent and the controller cut at its proxy for 0.3–4 s.
    LinkCut,
    /// Every host's next 2–4 connections cut after 32 KiB – 1.5 MiB from the controller: the
    /// artifact transfer is cut again and again and must resume (2–4: fewer than the agent's
    /// 5 attempts without progress, as a cut before a whole 1 MiB slice arrived is none).
    ArtifactCut,
    /// One bit flipped in the bytes from the controller on every host's next 1–3 connections.
    ByteFlip,
    /// The controller's data directory (a tmpfs) filled up for 0.5–3 s: a release created
    /// meanwhile must fail with a clear error, and once space is freed the same call must
    /// work and the rollout under way must end as any other. Root only.
    ControllerDiskFull,
    /// An agent's link to the controller cut for 0.3–8 s inside the network namespace the
    /// agent runs in (a blackhole route to the controller: packets dropped, connections left
    /// hanging, not closed as at the proxy). Root only.
    NetnsLinkCut,
    /// The data directory (a tmpfs) of the host deploying filled while it unpacks a release
    /// of 24 MiB in 48 files, until the rollout ended: the host must fail saying so, the
    /// rollout must halt or roll back with the reason, the host's previous instance serve on,
    /// no part of the release stay; once space is freed the same release must roll out.
    /// Root only.
    HostDiskFull,
}

impl Fault {
    /// Every fault run by default, in order (`none`, the control, only when asked for).
    pub const ALL: [Fault; 9] = [
        Fault::ControllerKill,
        Fault::AgentKill,
        Fault::AgentStop,
        Fault::LinkCut,
        Fault::ArtifactCut,
        Fault::ByteFlip,
        Fault::ControllerDiskFull,
        Fault::NetnsLinkCut,
        Fault::HostDiskFull,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::Nothing => "none",
            Fault::ControllerKill => "controller-kill",
            Fault::AgentKill => "agent-kill",
            Fault::AgentStop => "agent-stop",
            Fault::LinkCut => "link-cut",
            Fault::ArtifactCut => "artifact-cut",
            Fault::ByteFlip => "byte-flip",
            Fault::ControllerDiskFull => "controller-disk-full",
            Fault::NetnsLinkCut => "netns-link-cut",
            Fault::HostDiskFull => "host-disk-full",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Fault::Nothing => "no fault: the control",
            Fault::ControllerKill => "controller SIGKILL, restarted 0-3 s later",
            Fault::AgentKill => "agent SIGKILL, restarted 0-1 s later (its app runs on, adopted)",
            Fault::AgentStop => "agent SIGSTOP past the lost-host grace (6 s), then SIGCONT",
            Fault::LinkCut => "agent-controller link cut at a TCP proxy for 0.3-4 s",
            Fault::ArtifactCut => "every host's next 2-4 connections cut after 32 KiB-1.5 MiB",
            Fault::ByteFlip => "one bit flipped from the controller on the next 1-3 connections",
            Fault::ControllerDiskFull => "the controller's data directory (tmpfs) full for 0.5-3 s",
            Fault::NetnsLinkCut => {
                "agent-controller link cut in the agent's network namespace for 0.3-8 s"
            }
            Fault::HostDiskFull => {
                "the deploying host's data directory (tmpfs) full mid-unpack until the rollout ends"
            }
        }
    }

    /// Whether the fault may fairly halt a rollout of a good release: it can make a host lost
    /// (a host silent past the grace halts a rollout by design). The others must not: a
    /// restarted controller or agent picks the rollout up, a cut transfer resumes (the runner
    /// cuts fewer times in a row than the agent's limit of attempts without progress), a
    /// corrupted record is refused by TLS and fetched again.
    pub fn may_halt(self) -> bool {
        matches!(
            self,
            Fault::AgentStop
                | Fault::LinkCut
                | Fault::ControllerDiskFull
                | Fault::NetnsLinkCut
                | Fault::HostDiskFull
        )
    }

    /// Why the fault cannot be tried here, if it cannot (it needs root).
    pub fn unavailable(self) -> Option<String> {
        match self {
            Fault::ControllerDiskFull | Fault::HostDiskFull => (!crate::tmpfs::Tmpfs::can_mount())
                .then(|| "needs root to mount a tmpfs".to_string()),
            Fault::NetnsLinkCut => crate::netns::unavailable(),
            _ => None,
        }
    }

    /// The fleet the fault is tried on.
    pub fn setup(self) -> bench::Setup {
        bench::Setup {
            controller_disk: self == Fault::ControllerDiskFull,
            host_disks: self == Fault::HostDiskFull,
            netns: self == Fault::NetnsLinkCut,
            ..bench::Setup::default()
        }
    }

    /// The phase of try `try_idx`: the phases in turn; a full host disk comes during an
    /// unpack, the canary's or a later wave's.
    fn phase_of_try(self, try_idx: u32) -> Phase {
        match self {
            Fault::HostDiskFull if try_idx.is_multiple_of(2) => Phase::Canary,
            Fault::HostDiskFull => Phase::LaterWave,
            _ => Phase::of_try(try_idx),
        }
    }

    pub fn from_name(name: &str) -> Option<Fault> {
        std::iter::once(Fault::Nothing)
            .chain(Fault::ALL)
            .find(|f| f.name() == name)
    }

    fn index(self) -> usize {
        Fault::ALL
            .iter()
            .position(|f| *f == self)
            .map_or(0, |idx| idx + 1)
    }
}

/// The phase of a rollout a fault is injected in; try N takes phase N mod 5.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Right after the rollout was acknowledged: planning, the canary's assignment.
    Start,
    /// While the canary host deploys (fetch, unpack, start, checks).
    Canary,
    /// During the canary pause (`--pause-after-canary`).
    CanaryPause,
    /// While a later wave deploys.
    LaterWave,
    /// While a failed rollout rolls back (the release fails on [`bench::FAILING_HOST`]).
    Rollback,
}

impl Phase {
    pub const ALL: [Phase; 5] = [
        Phase::Start,
        Phase::Canary,
        Phase::CanaryPause,
        Phase::LaterWave,
        Phase::Rollback,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Start => "start",
            Phase::Canary => "canary",
            Phase::CanaryPause => "canary-pause",
            Phase::LaterWave => "later-wave",
            Phase::Rollback => "rollback",
        }
    }

    fn of_try(try_idx: u32) -> Phase {
        Phase::ALL[try_idx as usize % Phase::ALL.len()]
    }

    /// Whether rollout `status` is in this phase now.
    fn reached(self, status: &Value) -> bool {
        let running = status["state"] == "running" || status["state"] == "paused";
        let wave = status["current_wave"].as_u64().unwrap_or(0);
        match self {
            Phase::Start => true,
            Phase::Canary => {
                running && wave == 0 && status["waves"][0]["hosts"][0]["result"] == "deploying"
            }
            Phase::CanaryPause => status["hold_until_unix_ms"].as_i64().unwrap_or(0) > 0,
            Phase::LaterWave => {
                running && wave >= 1 && status["hold_until_unix_ms"].as_i64().unwrap_or(0) == 0
            }
            Phase::Rollback => {
                status["is_rollback"] == true
                    || status["waves"]
                        .as_array()
                        .is_some_and(|waves| waves.iter().any(|w| w["state"] == "failed"))
            }
        }
    }
}

/// What the runner is asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// Tries per fault.
    pub repeat: u32,
    pub seed: u64,
    pub faults: Vec<Fault>,
    /// Only this try of each fault (to replay one).
    pub only_try: Option<u32>,
    /// Print a line per try on stderr.
    pub verbose: bool,
    /// Faults tried at once, each on a fleet of its own (1: one after the other).
    pub jobs: usize,
}

/// How one try went.
#[derive(Debug, Clone)]
pub struct TryOutcome {
    pub try_idx: u32,
    pub phase: Phase,
    /// How the rollout ended (`succeeded`, `rolled_back`, …), if it did.
    pub end: String,
    /// Whether the fault was injected in its phase (false: the rollout left it first, and
    /// the fault came after).
    pub in_phase: bool,
    /// What broke; empty when every invariant held.
    pub broken: Vec<String>,
    pub took: Duration,
    /// What the try left that is fine but worth saying (hosts left on two releases).
    pub note: String,
    /// Whether the fleet came out of the try working (only its resources, if anything, were
    /// off): then the next try goes on with it rather than with a fresh fleet.
    pub fleet_sound: bool,
    /// Open files and resident memory of each process after the try (`controller`, `h1`, …).
    pub usage: std::collections::BTreeMap<String, invariants::Usage>,
}

/// Every try of one fault.
#[derive(Debug, Clone)]
pub struct FaultReport {
    pub fault: Fault,
    pub seed: u64,
    pub tries: Vec<TryOutcome>,
    /// Why the fault was not tried at all.
    pub skipped: Option<String>,
}

impl FaultReport {
    pub fn held(&self) -> usize {
        self.tries.iter().filter(|t| t.broken.is_empty()).count()
    }
}

/// Runs every fault of `options`, `jobs` at a time; one report per fault, in their order.
pub fn run(options: &Options) -> Vec<FaultReport> {
    let jobs = options.jobs.clamp(1, options.faults.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let done = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| loop {
                let idx = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(fault) = options.faults.get(idx) else {
                    return;
                };
                let report = run_fault(*fault, options);
                done.lock().expect("reports").push((idx, report));
            });
        }
    });
    let mut done = done.into_inner().expect("reports");
    done.sort_by_key(|(idx, _)| *idx);
    done.into_iter().map(|(_, report)| report).collect()
}

fn run_fault(fault: Fault, options: &Options) -> FaultReport {
    let mut report = FaultReport {
        fault,
        seed: options.seed,
        tries: Vec::new(),
        skipped: None,
    };
    let tries: Vec<u32> = match options.only_try {
        Some(idx) => vec![idx],
        None => (0..options.repeat).collect(),
    };
    if let Some(why) = fault.unavailable() {
        report.skipped = Some(why);
        return report;
    }
    let mut bench: Option<Bench> = None;
    for try_idx in tries {
        let seed = Rng::try_seed(options.seed, fault.index(), try_idx);
        let phase = fault.phase_of_try(try_idx);
        let started = Instant::now();
        if bench.is_none() {
            match catch(|| Bench::start(seed, &fault.setup())) {
                Ok(fresh) => bench = Some(fresh),
                Err(why) => {
                    report.tries.push(TryOutcome {
                        try_idx,
                        phase,
                        end: String::new(),
                        in_phase: false,
                        broken: vec![format!("the fleet did not start: {why}")],
                        took: started.elapsed(),
                        note: String::new(),
                        fleet_sound: false,
                        usage: Default::default(),
                    });
                    continue;
                }
            }
        }
        let current = bench.as_mut().expect("a bench");
        let outcome =
            catch(|| Ok(one_try(current, fault, phase, seed))).unwrap_or_else(|why| TryOutcome {
                try_idx,
                phase,
                end: String::new(),
                in_phase: false,
                broken: vec![why],
                took: Duration::ZERO,
                note: String::new(),
                fleet_sound: false,
                usage: Default::default(),
            });
        let outcome = TryOutcome {
            try_idx,
            took: started.elapsed(),
            ..outcome
        };
        if options.verbose {
            eprintln!(
                "{} try {try_idx} ({}{}): {} in {:.1}s;{}{}",
                fault.name(),
                phase.name(),
                if outcome.in_phase {
                    ""
                } else {
                    ", phase missed"
                },
                if outcome.end.is_empty() {
                    "no end"
                } else {
                    &outcome.end
                },
                outcome.took.as_secs_f64(),
                outcome
                    .usage
                    .iter()
                    .map(|(role, u)| format!(" {role} {}fd/{}KiB", u.fds, u.rss_kib))
                    .collect::<String>(),
                if outcome.broken.is_empty() {
                    if outcome.note.is_empty() {
                        String::new()
                    } else {
                        format!("; {}", outcome.note)
                    }
                } else {
                    format!("; BROKE: {}", outcome.broken.join("; "))
                }
            );
        }
        if !outcome.fleet_sound {
            // Whatever state the fleet is in, the next try starts from a fresh one.
            if let Some(mut broken_bench) = bench.take() {
                if std::env::var_os("FLEET_FAULTS_KEEP").is_some_and(|v| v == "1") {
                    broken_bench.fleet.keep_dir();
                    eprintln!("kept {}", broken_bench.fleet.dir().display());
                }
            }
        }
        report.tries.push(outcome);
    }
    report
}

/// Runs `f`, turning a panic of the harness (a deadline passed) into an error.
fn catch<T>(f: impl FnOnce() -> anyhow::Result<T>) -> Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(format!("{e:#}")),
        Err(panic) => Err(panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic".to_string())),
    }
}

/// How long hosts get to converge once the rollout ended (a host back from lost reconnects,
/// and the converger moves it under the budget).
const CONVERGE_DEADLINE: Duration = Duration::from_secs(45);
/// How long the phase may take to come.
const PHASE_DEADLINE: Duration = Duration::from_secs(40);

fn one_try(bench: &mut Bench, fault: Fault, phase: Phase, seed: u64) -> TryOutcome {
    let mut rng = Rng::new(seed);
    let mut broken = Vec::new();
    let previous = bench.current_version.clone();
    let bad = phase == Phase::Rollback;
    let mut outcome = TryOutcome {
        try_idx: 0,
        phase,
        end: String::new(),
        in_phase: false,
        broken: Vec::new(),
        took: Duration::ZERO,
        note: String::new(),
        fleet_sound: false,
        usage: Default::default(),
    };
    let extra = rng.between(64 * 1024, 1024 * 1024) as usize;
    let made = if fault == Fault::HostDiskFull {
        bench.create_release_of(bad, bench::BIG_RELEASE_BYTES, bench::BIG_RELEASE_FILE_BYTES)
    } else {
        bench.create_release(bad, extra)
    };
    let version = match made {
        Ok(version) => version,
        Err(e) => {
            outcome.broken.push(format!("{e:#}"));
            return outcome;
        }
    };
    let sampler = invariants::health_sampler(bench);
    let id = match bench.start_rollout(&version, phase == Phase::CanaryPause) {
        Ok(id) => id,
        Err(e) => {
            outcome.broken.push(format!("{e:#}"));
            return outcome;
        }
    };
    let rollout_started = Instant::now();

    // Wait for the phase, then a random moment inside it.
    let phase_until = Instant::now() + PHASE_DEADLINE;
    let mut seen = Value::Null;
    while Instant::now() < phase_until {
        if let Some(status) = bench.rollout_status(&id) {
            if phase.reached(&status) {
                outcome.in_phase = true;
                seen = status;
                break;
            }
            if crate::fleet::is_end_state(status["state"].as_str().unwrap_or("")) {
                seen = status;
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let delay = match phase {
        // The disk fills at the moment the unpack is seen, not at random.
        _ if fault == Fault::HostDiskFull => Duration::ZERO,
        Phase::Start => rng.millis(0, 300),
        Phase::Rollback => rng.millis(0, 500),
        _ => rng.millis(0, 1_500),
    };
    std::thread::sleep(delay);
    let target = pick_target(bench, phase, &seen, &mut rng);
    if let Err(e) = inject(bench, fault, &target, &id, &mut rng) {
        broken.push(format!("injecting {}: {e}", fault.name()));
    }

    // The rollout ends within its deadline, with a reason when it halted.
    let deadline = bench
        .rollout_deadline()
        .saturating_sub(rollout_started.elapsed())
        .max(Duration::from_secs(5));
    let end = match bench.wait_rollout_end(&id, deadline) {
        Ok(end) => end,
        Err(e) => {
            broken.push(format!("{e:#}"));
            Value::Null
        }
    };
    for proxy in &bench.proxies {
        proxy.clear_rules();
        proxy.restore();
    }
    for netns in &mut bench.netns {
        if let Err(e) = netns.restore() {
            broken.push(format!("restoring {}: {e}", netns.name));
        }
    }
    outcome.end = end["state"].as_str().unwrap_or("").to_string();
    if matches!(outcome.end.as_str(), "failed" | "rolled_back" | "aborted")
        && end["message"].as_str().unwrap_or("").is_empty()
    {
        broken.push(format!("rollout {id} ended {} with no reason", outcome.end));
    }
    if !bad && !fault.may_halt() && !outcome.end.is_empty() && outcome.end != "succeeded" {
        broken.push(format!(
            "rollout {id} ended {}: {}",
            outcome.end,
            end["message"].as_str().unwrap_or("")
        ));
    }
    if bad && outcome.end == "succeeded" {
        broken.push(format!(
            "rollout {id} of a release that fails on {} succeeded",
            bench::FAILING_HOST
        ));
    }

    // Budget: never more hosts down at once than --max-unavailable 1 (these faults take no
    // app down themselves).
    let seen = sampler.finish();
    let (most_down, which) = (seen.most_down, seen.which);
    if most_down > 1 {
        broken.push(format!(
            "{most_down} hosts down at once ({which}), budget 1"
        ));
    }

    // Every host ends on one release and serves it.
    let expected = if outcome.end == "succeeded" {
        version.clone()
    } else {
        previous.clone()
    };
    let mut mixed = false;
    if matches!(outcome.end.as_str(), "failed" | "aborted") {
        // Halted without rolling back (the store failed, say): each host keeps what the
        // controller last gave it, the old release or the new one, and serves that.
        mixed = true;
        match invariants::converged_as_desired(
            &bench.fleet,
            &[previous.as_str(), version.as_str()],
            CONVERGE_DEADLINE,
        ) {
            Ok(left) => {
                outcome.note = format!("halted without rolling back, hosts left on: {left}")
            }
            Err(e) => broken.push(format!(
                "after {} hosts did not serve what status says: {e}",
                outcome.end
            )),
        }
    } else if !outcome.end.is_empty() {
        match invariants::converged(&bench.fleet, &expected, CONVERGE_DEADLINE) {
            Ok(()) => bench.current_version = expected,
            Err(e) => broken.push(format!(
                "after {} hosts did not all serve {expected}: {e}",
                outcome.end
            )),
        }
    }
    if let Err(e) = invariants::processes(&bench.fleet, Duration::from_secs(20)) {
        broken.push(e);
    }
    if let Err(e) = invariants::history(&bench.fleet, &bench.acknowledged) {
        broken.push(e);
    }
    if fault == Fault::HostDiskFull {
        match host_disk_full_aftermath(bench, &target, &version, &end) {
            Ok(note) => outcome.note = note,
            Err(e) => broken.push(e),
        }
    }
    // A process over its memory or files is reported; the fleet itself still works, so the
    // next try goes on with it (and the growth, if it is one, shows in the figures).
    outcome.fleet_sound = broken.is_empty() && !mixed;
    if let Err(e) = invariants::resources(&bench.fleet, &bench.baseline) {
        broken.push(e);
    }
    outcome.usage = invariants::usage_now(&bench.fleet);
    outcome.broken = broken;
    outcome
}

/// The host a fault hits: the canary while it deploys, the host of the wave under way later,
/// any host otherwise.
fn pick_target(bench: &Bench, phase: Phase, status: &Value, rng: &mut Rng) -> String {
    let wave = match phase {
        Phase::Start | Phase::Canary => Some(0),
        Phase::LaterWave => status["current_wave"].as_u64(),
        _ => None,
    };
    wave.and_then(|w| status["waves"][w as usize]["hosts"][0]["host"].as_str())
        .map(str::to_string)
        .unwrap_or_else(|| rng.pick(&bench.host_names()).clone())
}

fn inject(
    bench: &mut Bench,
    fault: Fault,
    target: &str,
    rollout_id: &str,
    rng: &mut Rng,
) -> Result<(), String> {
    match fault {
        Fault::NetnsLinkCut => {
            let idx = host_index(target);
            bench.netns[idx].cut()?;
            std::thread::sleep(rng.millis(300, 8_000));
            bench.netns[idx].restore()?;
        }
        Fault::HostDiskFull => {
            let idx = host_index(target);
            let releases = bench
                .fleet
                .agent(target)
                .data_dir
                .join("releases")
                .join("web");
            let until = Instant::now() + UNPACK_DEADLINE;
            let mut unpacking = false;
            // Bounded by the deadline; 2 ms apart, so an unpack of a moment is not missed.
            while Instant::now() < until && !unpacking {
                unpacking = unpack_dirs(&releases) > 0;
                if !unpacking {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            if !unpacking {
                return Err(format!(
                    "{target} was never seen unpacking within {UNPACK_DEADLINE:?}"
                ));
            }
            let disk = &bench.host_disks[idx];
            disk.fill();
            // Full until the rollout ended, so the host cannot simply try again meanwhile.
            let _ = bench.wait_rollout_end(rollout_id, bench.rollout_deadline());
            bench.host_disks[idx].free();
        }
        Fault::Nothing => {}
        Fault::ControllerKill => {
            bench.fleet.kill_controller();
            std::thread::sleep(rng.millis(0, 3_000));
            bench.fleet.restart_controller();
        }
        Fault::AgentKill => {
            bench.fleet.kill_agent(target);
            std::thread::sleep(rng.millis(0, 1_000));
            bench.fleet.restart_agent(target);
        }
        Fault::AgentStop => {
            bench.fleet.pause_agent(target, true);
            let until = Instant::now() + LOST_AFTER * 10;
            let mut lost = false;
            while Instant::now() < until && !lost {
                std::thread::sleep(Duration::from_millis(200));
                lost = host_state(bench, target).as_deref() == Some("lost");
            }
            std::thread::sleep(rng.millis(0, 1_000));
            bench.fleet.pause_agent(target, false);
            if !lost {
                return Err(format!(
                    "{target} was never marked lost within {:?}",
                    LOST_AFTER * 10
                ));
            }
        }
        Fault::LinkCut => {
            let proxy = bench.proxy_of(target);
            proxy.cut();
            std::thread::sleep(rng.millis(300, 4_000));
            proxy.restore();
        }
        Fault::ArtifactCut => {
            for proxy in &bench.proxies {
                let times = rng.between(2, 4) as u32;
                proxy.cut_after_bytes(times, 32 * 1024, 1536 * 1024);
                // The rules apply to new connections: end the ones open now.
                proxy.cut();
                proxy.restore();
            }
        }
        Fault::ControllerDiskFull => {
            let disk = bench
                .controller_disk
                .as_ref()
                .ok_or("the controller's data directory is no tmpfs")?;
            disk.fill();
            let probe = format!("0.{}.0", rng.between(1, 1_000_000));
            let refused = bench.create_probe_release(&probe);
            std::thread::sleep(rng.millis(500, 3_000));
            let disk = bench
                .controller_disk
                .as_ref()
                .ok_or("the controller's data directory is no tmpfs")?;
            disk.free();
            let said = format!("{}{}", refused.stdout, refused.stderr).to_lowercase();
            if refused.code == 0 {
                return Err(format!("release create {probe} succeeded on a full disk"));
            }
            if !["space", "disk", "full"].iter().any(|w| said.contains(w)) {
                return Err(format!(
                    "release create on a full disk failed without saying why: {}",
                    refused.stderr.trim()
                ));
            }
            let again = bench.create_probe_release(&probe);
            if again.code != 0 {
                return Err(format!(
                    "release create {probe} still fails once space is free: {}",
                    again.stderr.trim()
                ));
            }
        }
        Fault::ByteFlip => {
            for proxy in &bench.proxies {
                let times = rng.between(1, 3) as u32;
                proxy.flip_bytes(times, 0, 512 * 1024);
                proxy.cut();
                proxy.restore();
            }
        }
    }
    Ok(())
}

/// How long a full-disk try waits for the host to start unpacking.
const UNPACK_DEADLINE: Duration = Duration::from_secs(60);

/// `hN` -> `N - 1`.
fn host_index(name: &str) -> usize {
    name.trim_start_matches('h')
        .parse::<usize>()
        .expect("hosts are named hN")
        - 1
}

/// The unpack directories (`.unpack-*`) in an app's releases directory.
fn unpack_dirs(releases: &std::path::Path) -> usize {
    std::fs::read_dir(releases).map_or(0, |entries| {
        entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".unpack-"))
            .count()
    })
}

/// After a host's disk was full mid-unpack: the rollout did not succeed and its record says
/// why (no space), nothing of the release stays on the host (no unpack directory, no release
/// directory), and once space is freed the same release rolls out. A note for the report.
fn host_disk_full_aftermath(
    bench: &mut Bench,
    target: &str,
    version: &str,
    end: &Value,
) -> Result<String, String> {
    let releases = bench
        .fleet
        .agent(target)
        .data_dir
        .join("releases")
        .join("web");
    let mut note = String::new();
    if end["state"] == "succeeded" {
        // The unpack ended between the moment it was seen and the disk filling up.
        note = "the unpack ended before the disk was full".to_string();
    } else {
        let said = end.to_string().to_lowercase();
        if !said.contains("no space") && !said.contains("space left") {
            return Err(format!(
                "the rollout's record does not say {target}'s disk was full: {}; {}",
                end["message"], end["waves"]
            ));
        }
        if unpack_dirs(&releases) > 0 {
            return Err(format!("{target} kept an unpack directory"));
        }
        let prefix = format!("{version}-");
        let kept = std::fs::read_dir(&releases).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        });
        if kept {
            return Err(format!("{target} kept a release directory of {version}"));
        }
    }
    // Space is free again: the same release rolls out.
    let id = bench
        .start_rollout(version, false)
        .map_err(|e| format!("once space was freed: {e:#}"))?;
    let again = bench
        .wait_rollout_end(&id, bench.rollout_deadline())
        .map_err(|e| format!("once space was freed: {e:#}"))?;
    if again["state"] != "succeeded" {
        return Err(format!(
            "once space was freed, rollout {id} of {version} ended {}: {}",
            again["state"], again["message"]
        ));
    }
    invariants::converged(&bench.fleet, version, CONVERGE_DEADLINE)
        .map_err(|e| format!("once space was freed, hosts did not all serve {version}: {e}"))?;
    bench.current_version = version.to_string();
    if note.is_empty() {
        note = format!("{target} failed for lack of space; {version} rolled out once it was freed");
    }
    Ok(note)
}

/// Host `name`'s state in `hosts` (`ready`, `lost`, …), if the controller answers.
fn host_state(bench: &Bench, name: &str) -> Option<String> {
    let out = bench.fleet.ctl(&["hosts"]);
    (out.code == 0).then_some(())?;
    out.json["hosts"]
        .as_array()?
        .iter()
        .find(|h| h["name"] == name)?["state"]
        .as_str()
        .map(str::to_string)
}
