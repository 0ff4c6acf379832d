//! The soak (`fleet-faults --soak DUR`): one fleet of [`SOAK_HOSTS`] hosts whose controller
//! issues host certificates for [`CERTIFICATE_TTL`] (agents renew them over their session every
//! ~80 s, so renewals happen under the faults), rollouts back to back for DUR (every
//! [`ROLLBACK_EVERY`]th a release that fails on [`super::bench::FAILING_HOST`] and rolls back,
//! every other one followed by `fleetctl rollback`), and a random fault of [`SOAK_FAULTS`] every
//! 2–6 s whatever the rollout is doing. After each rollout the invariants of a try are checked
//! (ended within its deadline with a reason, every host on one release and serving it, one
//! instance per host, no acknowledged rollout lost from history, the budget); the figures are
//! the rollouts done, the faults injected, the invariants held or broken, and the controller's
//! and agents' resident memory and open files at the start and the end.

use super::bench::{Bench, Setup};
use super::invariants::{self, Usage};
use super::rng::Rng;
use super::{catch, Fault, CONVERGE_DEADLINE};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Hosts of the soak's fleet.
pub const SOAK_HOSTS: usize = 10;
/// The host certificates' lifetime during the soak.
pub const CERTIFICATE_TTL: &str = "2m";
/// The faults the soak draws from: every one that needs no special fleet.
pub const SOAK_FAULTS: [Fault; 6] = [
    Fault::ControllerKill,
    Fault::AgentKill,
    Fault::AgentStop,
    Fault::LinkCut,
    Fault::ArtifactCut,
    Fault::ByteFlip,
];
/// Every this many rollouts, one of a release that fails on h3 (it rolls back).
const ROLLBACK_EVERY: u32 = 4;
/// How a broken budget starts in the report, so it is counted apart.
const BUDGET_BROKEN: &str = "budget";

/// What the soak did.
#[derive(Debug, Clone, Default)]
pub struct SoakReport {
    pub seed: u64,
    pub asked: Duration,
    pub took: Duration,
    /// Rollouts started (rollbacks included), and how they ended.
    pub rollouts: u32,
    pub ends: BTreeMap<String, u32>,
    /// `fleetctl rollback` calls among them.
    pub rollbacks: u32,
    /// Faults injected, by name.
    pub faults: BTreeMap<&'static str, u32>,
    /// Rollouts after which every invariant held, and what broke after the others.
    pub held: u32,
    pub broken: Vec<String>,
    /// Usage by role (`controller`, `h1`, …) after the warm-up and at the end.
    pub start_usage: BTreeMap<String, Usage>,
    pub end_usage: BTreeMap<String, Usage>,
    /// `host.certificate_renewed` events during the soak.
    pub renewals: usize,
    /// Why the soak could not run at all.
    pub failed_to_start: Option<String>,
}

impl SoakReport {
    pub fn faults_injected(&self) -> u32 {
        self.faults.values().sum()
    }

    /// Rollouts after which only the budget broke.
    pub fn budget_only(&self) -> usize {
        self.broken
            .iter()
            .filter(|b| {
                b.split_once(": ")
                    .is_some_and(|(_, what)| what.split("; ").all(|w| w.starts_with(BUDGET_BROKEN)))
            })
            .count()
    }
}

/// Runs the soak for `duration`.
pub fn run(duration: Duration, seed: u64, verbose: bool) -> SoakReport {
    let mut report = SoakReport {
        seed,
        asked: duration,
        ..SoakReport::default()
    };
    let setup = Setup {
        n_hosts: SOAK_HOSTS,
        controller_extra: format!("host_certificate_ttl = \"{CERTIFICATE_TTL}\""),
        ..Setup::default()
    };
    let started = Instant::now();
    let mut bench = match catch(|| Bench::start(seed, &setup)) {
        Ok(bench) => bench,
        Err(why) => {
            report.failed_to_start = Some(why);
            return report;
        }
    };
    report.start_usage = invariants::usage_now(&bench.fleet);
    let renewals_before = renewals(&bench);
    let mut rng = Rng::new(seed);
    let soak_started = Instant::now();
    let mut next_fault = Instant::now() + rng.millis(2_000, 6_000);
    let mut idx = 0u32;
    while soak_started.elapsed() < duration {
        idx += 1;
        let outcome = catch(|| {
            Ok(one_rollout(
                &mut bench,
                idx,
                &mut rng,
                &mut next_fault,
                &mut report,
                soak_started + duration,
            ))
        });
        let broken = match outcome {
            Ok(broken) => broken,
            Err(why) => vec![why],
        };
        if verbose {
            eprintln!(
                "soak {:>5.0}s rollout {idx}: {}; faults so far {}",
                soak_started.elapsed().as_secs_f64(),
                if broken.is_empty() {
                    "held".to_string()
                } else {
                    format!("BROKE: {}", broken.join("; "))
                },
                report.faults_injected()
            );
        }
        if broken.is_empty() {
            report.held += 1;
        } else {
            report
                .broken
                .push(format!("rollout {idx}: {}", broken.join("; ")));
        }
    }
    report.end_usage = invariants::usage_now(&bench.fleet);
    report.renewals = renewals(&bench).saturating_sub(renewals_before);
    report.took = started.elapsed();
    report
}

/// `host.certificate_renewed` events so far.
fn renewals(bench: &Bench) -> usize {
    let out = bench.fleet.ctl(&["events", "--limit", "100000"]);
    let out = if out.code == 0 {
        out
    } else {
        bench.fleet.ctl(&["events"])
    };
    out.stdout.matches("host.certificate_renewed").count()
}

/// One rollout (or rollback) with faults every 2–6 s while it runs; what broke.
fn one_rollout(
    bench: &mut Bench,
    idx: u32,
    rng: &mut Rng,
    next_fault: &mut Instant,
    report: &mut SoakReport,
    soak_ends: Instant,
) -> Vec<String> {
    let mut broken = Vec::new();
    let previous = bench.current_version.clone();
    let rollback =
        idx.is_multiple_of(2) && !idx.is_multiple_of(ROLLBACK_EVERY) && !previous.is_empty();
    let bad = idx.is_multiple_of(ROLLBACK_EVERY);
    let sampler = invariants::health_sampler(bench);
    let (id, version) = if rollback {
        let out = bench.fleet.ctl(&["rollback", "web", "--detach"]);
        if out.code != 0 {
            return vec![format!("rollback web exited {}: {}", out.code, out.stderr)];
        }
        let Some(id) = out.json["id"].as_str().map(str::to_string) else {
            return vec![format!("rollback web printed no id: {}", out.stdout)];
        };
        report.rollbacks += 1;
        bench.acknowledged.push(id.clone());
        let version = out.json["version"].as_str().unwrap_or("").to_string();
        (id, version)
    } else {
        let extra = rng.between(64 * 1024, 1024 * 1024) as usize;
        let version = match bench.create_release(bad, extra) {
            Ok(version) => version,
            Err(e) => return vec![format!("{e:#}")],
        };
        // A start the controller refuses because faults just took hosts down (the budget is
        // spent before it starts) is tried again once they are back, as an operator would.
        let until = Instant::now() + CONVERGE_DEADLINE;
        loop {
            match bench.start_rollout(&version, false) {
                Ok(id) => break (id, version),
                Err(e) if Instant::now() < until && format!("{e:#}").contains("is spent") => {
                    std::thread::sleep(Duration::from_secs(2));
                }
                Err(e) => return vec![format!("{e:#}")],
            }
        }
    };
    report.rollouts += 1;
    let until = Instant::now() + bench.rollout_deadline();
    let mut end = Value::Null;
    // Bounded by the rollout's deadline.
    while Instant::now() < until {
        if Instant::now() >= *next_fault && Instant::now() < soak_ends {
            let fault = *rng.pick(&SOAK_FAULTS);
            let target = rng.pick(&bench.host_names()).clone();
            if let Err(e) = super::inject(bench, fault, &target, &id, rng) {
                broken.push(format!("injecting {}: {e}", fault.name()));
            }
            *report.faults.entry(fault.name()).or_default() += 1;
            *next_fault = Instant::now() + rng.millis(2_000, 6_000);
        }
        if let Some(status) = bench.rollout_status(&id) {
            if crate::fleet::is_end_state(status["state"].as_str().unwrap_or("")) {
                end = status;
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    for proxy in &bench.proxies {
        proxy.clear_rules();
        proxy.restore();
    }
    let state = end["state"].as_str().unwrap_or("").to_string();
    if state.is_empty() {
        broken.push(format!(
            "rollout {id} did not end within {:?}",
            bench.rollout_deadline()
        ));
        return broken;
    }
    *report.ends.entry(state.clone()).or_default() += 1;
    if state != "succeeded" && end["message"].as_str().unwrap_or("").is_empty() {
        broken.push(format!("rollout {id} ended {state} with no reason"));
    }
    if bad && state == "succeeded" {
        broken.push(format!("rollout {id} of a failing release succeeded"));
    }
    let seen = sampler.finish();
    let (most_down, which) = (seen.most_down, seen.which);
    // The faults themselves take no app down, so the budget is the rollout's (1).
    if most_down > 1 {
        broken.push(format!(
            "{BUDGET_BROKEN}: {most_down} hosts down at once ({which}), budget 1{}",
            if rollback || bad {
                " (a rollback: RELIABILITY.md, known failure 3)"
            } else {
                ""
            }
        ));
    }
    if matches!(state.as_str(), "failed" | "aborted") {
        if let Err(e) = invariants::converged_as_desired(
            &bench.fleet,
            &[previous.as_str(), version.as_str()],
            CONVERGE_DEADLINE,
        ) {
            broken.push(format!(
                "after {state} hosts did not serve what status says: {e}"
            ));
        }
        // Whatever each host was left on, the next rollout starts from what they serve.
        bench.current_version = String::new();
    } else {
        let expected = if state == "succeeded" {
            version.clone()
        } else {
            previous.clone()
        };
        let converged = if expected.is_empty() {
            // Rolled back to where an earlier halt left each host: what status says.
            invariants::converged_as_desired(&bench.fleet, &[], CONVERGE_DEADLINE).map(|_| ())
        } else {
            invariants::converged(&bench.fleet, &expected, CONVERGE_DEADLINE)
        };
        match converged {
            Ok(()) => bench.current_version = expected,
            Err(e) => broken.push(format!(
                "after {state} hosts did not all serve {expected}: {e}"
            )),
        }
    }
    if let Err(e) = invariants::processes(&bench.fleet, Duration::from_secs(20)) {
        broken.push(e);
    }
    if let Err(e) = invariants::history(&bench.fleet, &bench.acknowledged) {
        broken.push(e);
    }
    broken
}

/// The soak's figures as markdown, with the machine and the date.
pub fn table(report: &SoakReport, command: &str, build: &str) -> String {
    let mut text = format!(
        "Run on {} ({}), {build} build, with `{command}`; the machine was shared with other \
         engineers' builds and tests meanwhile.\n\n",
        super::report::today(),
        super::report::machine()
    );
    if let Some(why) = &report.failed_to_start {
        text.push_str(&format!("The soak did not start: {why}\n"));
        return text;
    }
    text.push_str(&format!(
        "| figure | value |\n| --- | --- |\n\
         | ran | {:.0} min ({:.0} min asked), {} hosts, host certificates valid {CERTIFICATE_TTL} |\n\
         | rollouts done | {} ({} of them `fleetctl rollback`); ended: {} |\n\
         | faults injected | {} ({}) |\n\
         | invariants held | after {} of {} rollouts ({} broke only the budget) |\n\
         | certificates renewed | {} |\n",
        report.took.as_secs_f64() / 60.0,
        report.asked.as_secs_f64() / 60.0,
        report.start_usage.len().saturating_sub(1),
        report.rollouts,
        report.rollbacks,
        report
            .ends
            .iter()
            .map(|(end, n)| format!("{n} {end}"))
            .collect::<Vec<_>>()
            .join(", "),
        report.faults_injected(),
        report
            .faults
            .iter()
            .map(|(f, n)| format!("{f} {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        report.held,
        report.rollouts,
        report.budget_only(),
        report.renewals,
    ));
    text.push_str(&usage_rows(report));
    if !report.broken.is_empty() {
        text.push_str("\nWhat broke:\n\n");
        for line in &report.broken {
            text.push_str(&format!("- {}\n", line.replace('|', "/")));
        }
    }
    text
}

/// The usage rows: the controller, and the agents' range (start and end).
fn usage_rows(report: &SoakReport) -> String {
    let row = |name: &str, pick: &dyn Fn(&str) -> bool| {
        let of = |usage: &BTreeMap<String, Usage>| {
            let picked: Vec<&Usage> = usage
                .iter()
                .filter(|(role, _)| pick(role))
                .map(|(_, u)| u)
                .collect();
            let (rss_lo, rss_hi) = min_max(picked.iter().map(|u| u.rss_kib));
            let (fd_lo, fd_hi) = min_max(picked.iter().map(|u| u.fds as u64));
            let range = |lo: u64, hi: u64, unit: &str| {
                if lo == hi {
                    format!("{lo}{unit}")
                } else {
                    format!("{lo}–{hi}{unit}")
                }
            };
            format!(
                "{} resident, {} open files",
                range(rss_lo / 1024, hi_mib(rss_hi), " MiB"),
                range(fd_lo, fd_hi, "")
            )
        };
        format!(
            "| {name} at start / end | {} / {} |\n",
            of(&report.start_usage),
            of(&report.end_usage)
        )
    };
    format!(
        "{}{}",
        row("controller", &|role| role == "controller"),
        row("agents", &|role| role != "controller")
    )
}

fn hi_mib(kib: u64) -> u64 {
    kib / 1024
}

fn min_max(values: impl Iterator<Item = u64>) -> (u64, u64) {
    values.fold((u64::MAX, 0), |(lo, hi), v| (lo.min(v), hi.max(v)))
}

/// One paragraph for the terminal.
pub fn summary(report: &SoakReport) -> String {
    if let Some(why) = &report.failed_to_start {
        return format!("soak: did not start: {why}");
    }
    let usage = |usage: &BTreeMap<String, Usage>| {
        usage
            .iter()
            .map(|(role, u)| format!("{role} {}KiB/{}fd", u.rss_kib, u.fds))
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!(
        "soak: {:.1} min, {} rollouts ({} rollbacks), {} faults, invariants held after {} of {} rollouts, {} certificate renewals\n  start: {}\n  end:   {}{}",
        report.took.as_secs_f64() / 60.0,
        report.rollouts,
        report.rollbacks,
        report.faults_injected(),
        report.held,
        report.rollouts,
        report.renewals,
        usage(&report.start_usage),
        usage(&report.end_usage),
        report
            .broken
            .iter()
            .map(|b| format!("\n  {b}"))
            .collect::<String>()
    )
}
