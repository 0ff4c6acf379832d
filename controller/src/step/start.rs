//! Starting a wave: how it fits the unavailability budget (whole, shrunk, or waiting), which of
//! its hosts take the release, are skipped (drained, removed, lost with `--skip-lost`) or fail
//! before anything changes (lost), which one runs the release hook, and what each host ran
//! before, read where its new desired release is written.

use super::{is_canary, wave_label, Observed};
use crate::budget;
use crate::model::{
    DeploymentRecord, Desired, HostRecord, HostResult, RolloutRecord, Wave, WaveHost, WaveState,
};
use std::collections::BTreeSet;

/// The budget wave fitting runs with: the rollout's, when the operator asked for one
/// (`--max-unavailable`); `None` otherwise, and for rollouts made before budgets.
pub fn explicit_budget(record: &RolloutRecord) -> Option<usize> {
    let budget = record.max_unavailable as usize;
    (budget > 0 && record.policy.max_unavailable.is_some()).then_some(budget)
}

/// The selected hosts outside wave `idx` whose unavailability spends the budget: those of
/// the other waves, and those left out at the start (drained).
pub fn outside_wave(record: &RolloutRecord, idx: usize) -> BTreeSet<String> {
    let mut hosts: BTreeSet<String> = record
        .waves
        .iter()
        .enumerate()
        .filter(|(w, _)| *w != idx)
        .flat_map(|(_, wave)| wave.hosts.iter().map(|h| h.host.clone()))
        .collect();
    for entry in &record.unavailable_at_start {
        if let Some((host, _)) = entry.split_once(": ") {
            hosts.insert(host.to_string());
        }
    }
    for host in &record.waves[idx].hosts {
        hosts.remove(&host.host);
    }
    hosts
}

/// What the budget lets wave `idx` do now.
#[derive(Debug, Clone, PartialEq)]
pub enum FitWave {
    /// Start it as it is.
    Go,
    /// It was shrunk to what the budget leaves (the rest is the next wave, in the record):
    /// say so with this line, then start it.
    Shrunk(String),
    /// Nothing may go down now: wait for hosts to come back (or the deadline).
    Wait,
}

/// Fits wave `idx` to the explicit budget ([`explicit_budget`]) with `down` (`host: why`) the
/// selected hosts outside it that are unavailable now ([`budget::fit`]); a wave that does not
/// fit whole is split, its first hosts staying, the rest becoming a new wave after it.
pub fn fit_wave(record: &mut RolloutRecord, idx: usize, down: &[String]) -> FitWave {
    let Some(budget) = explicit_budget(record) else {
        return FitWave::Go;
    };
    let wave_len = record.waves[idx].hosts.len();
    match budget::fit(budget, down.len(), wave_len, is_canary(record, idx)) {
        budget::WaveFit::Whole => FitWave::Go,
        budget::WaveFit::Wait => FitWave::Wait,
        budget::WaveFit::Shrink(room) => {
            let rest = record.waves[idx].hosts.split_off(room);
            record.waves.insert(
                idx + 1,
                Wave {
                    hosts: rest,
                    state: WaveState::Pending,
                },
            );
            FitWave::Shrunk(format!(
                "{} shrinks to {room} host(s): --max-unavailable {budget} with {} already down ({})",
                wave_label(record, idx),
                down.len(),
                down.join(", ")
            ))
        }
    }
}

/// The budget stayed spent by `down` until wave `idx`'s deadline: none of its hosts starts,
/// each fails saying what to do, and the wave is settled like any other (the rollout halts).
pub fn wave_budget_spent(record: &mut RolloutRecord, idx: usize, down: &[String]) {
    let why = format!(
        "not started: --max-unavailable {} is spent by {}; bring those hosts back, or roll out again with a larger budget",
        record.max_unavailable,
        down.join(", ")
    );
    for entry in &mut record.waves[idx].hosts {
        entry.result = HostResult::Failed;
        entry.message = why.clone();
    }
    record.waves[idx].state = WaveState::Running;
}

/// What starting a wave asks of the executor.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct WaveStart {
    /// The hosts to give the release ([`give_release`], in one write with the record), in
    /// wave order.
    pub deploy: Vec<String>,
    /// The one that runs the release hook before it starts, if any.
    pub hook_host: Option<String>,
    /// `host: why` for each host left out, for the progress line.
    pub skipped: Vec<String>,
    /// A host failed before anything changed (it is lost): nothing is deployed, only the
    /// record is saved, and the wave is settled as failed.
    pub halted: bool,
}

/// Starts wave `idx` from the facts about its hosts (registered, drained, lost, and their
/// desired release of the app): a removed or drained host is skipped, a lost one is skipped
/// with `--skip-lost` and fails otherwise, and every other host takes the release. A lost host
/// that fails halts the wave before anything changes: no host of it takes the release (nor
/// runs the release hook) only to be rolled back at once. The release hook runs once per
/// rollout (not a rollback), on the first host of the first wave that takes the release.
pub fn start_wave(record: &mut RolloutRecord, idx: usize, observed: &Observed) -> WaveStart {
    let skip_lost = record.policy.skip_lost;
    let mut start = WaveStart::default();
    let wave = &mut record.waves[idx];
    for entry in &mut wave.hosts {
        let facts = observed.host(&entry.host);
        if !facts.registered {
            entry.result = HostResult::Skipped;
            entry.message = "host was removed".to_string();
            start.skipped.push(format!("{}: removed", entry.host));
            continue;
        }
        // What it runs now, for the record; a host that takes the release has it read again
        // where its new release is written (`give_release`).
        note_previous(entry, facts.desired.as_ref());
        if facts.drained {
            entry.result = HostResult::Skipped;
            entry.message = "host is drained".to_string();
            start.skipped.push(format!("{}: drained", entry.host));
        } else if let Some(silent) = facts.lost_for_secs {
            if skip_lost {
                entry.result = HostResult::Skipped;
                entry.message = format!("host is lost (silent for {silent}s)");
                start.skipped.push(format!("{}: lost", entry.host));
            } else {
                entry.result = HostResult::Failed;
                entry.message = format!(
                    "host is lost (nothing heard from it for {silent}s): bring it back, drain it, or roll out with --skip-lost"
                );
            }
        } else {
            entry.result = HostResult::Deploying;
            start.deploy.push(entry.host.clone());
        }
    }
    wave.state = WaveState::Running;
    if wave.hosts.iter().any(|h| h.result == HostResult::Failed) {
        for entry in &mut wave.hosts {
            if entry.result == HostResult::Deploying {
                entry.result = HostResult::Pending;
                entry.message = "not started: another host of the wave is lost".to_string();
            }
        }
        start.deploy.clear();
        start.halted = true;
        return start;
    }
    start.hook_host = (idx == 0 && !record.is_rollback)
        .then(|| start.deploy.first().cloned())
        .flatten();
    start
}

/// Gives `host` (as it stands under the host lock, in the write that changes it) the release
/// of wave `idx`, and records in the wave what it ran before, so a rollback restores what it
/// really ran and not what it ran when the wave was planned.
pub fn give_release(
    record: &mut RolloutRecord,
    idx: usize,
    host: &mut HostRecord,
    hook_host: Option<&str>,
) {
    let app = record.app.clone();
    if let Some(entry) = record.waves[idx]
        .hosts
        .iter_mut()
        .find(|h| h.host == host.name)
    {
        note_previous(entry, host.desired.get(&app));
    }
    let desired = Desired {
        version: record.version.clone(),
        rollout_id: record.id.clone(),
        generation: record.seq,
        smoke_timeout_ms: record.policy.smoke_timeout_ms,
        run_release_hook: hook_host == Some(host.name.as_str()),
        min_healthy_ms: record.policy.min_healthy_ms,
        deployment: Some(DeploymentRecord::key(&app, &record.policy.selector)),
    };
    host.desired.insert(app, desired);
}

/// Records `desired`, a host's desired release of the app before this rollout changes it, as
/// what it goes back to on a rollback (with the deployment that gave it).
fn note_previous(entry: &mut WaveHost, desired: Option<&Desired>) {
    entry.previous_version = desired.map(|d| d.version.clone());
    entry.previous_deployment = desired.and_then(|d| d.deployment.clone());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Batch;
    use crate::step::fixtures::{desired, record, up};
    use crate::step::HostFacts;
    use HostResult::*;

    fn observed(facts: Vec<(&str, HostFacts)>) -> Observed {
        Observed {
            hosts: facts
                .into_iter()
                .map(|(name, f)| (name.to_string(), f))
                .collect(),
        }
    }

    #[test]
    fn which_hosts_of_a_wave_take_the_release() {
        let lost = HostFacts {
            lost_for_secs: Some(40),
            ..up()
        };
        let drained = HostFacts {
            drained: true,
            ..up()
        };
        // (skip lost, facts of hosts a and b; a host left out is removed) ->
        // (results, messages, deploy, skipped, halted)
        type Row<'a> = (
            bool,
            Vec<(&'a str, HostFacts)>,
            [HostResult; 2],
            [&'a str; 2],
            &'a [&'a str],
            &'a [&'a str],
            bool,
        );
        let rows: Vec<Row> = vec![
            (
                false,
                vec![("a", up()), ("b", up())],
                [Deploying, Deploying],
                ["", ""],
                &["a", "b"],
                &[],
                false,
            ),
            (
                false,
                vec![("a", up())],
                [Deploying, Skipped],
                ["", "host was removed"],
                &["a"],
                &["b: removed"],
                false,
            ),
            (
                false,
                vec![("a", drained.clone()), ("b", up())],
                [Skipped, Deploying],
                ["host is drained", ""],
                &["b"],
                &["a: drained"],
                false,
            ),
            (
                true,
                vec![("a", up()), ("b", lost.clone())],
                [Deploying, Skipped],
                ["", "host is lost (silent for 40s)"],
                &["a"],
                &["b: lost"],
                false,
            ),
            // Without --skip-lost a lost host fails and holds the whole wave back.
            (
                false,
                vec![("a", up()), ("b", lost.clone())],
                [Pending, Failed],
                [
                    "not started: another host of the wave is lost",
                    "host is lost (nothing heard from it for 40s): bring it back, drain it, or roll out with --skip-lost",
                ],
                &[],
                &[],
                true,
            ),
            // Drained wins over lost: a drained host is left out, never failed.
            (
                false,
                vec![("a", HostFacts { drained: true, ..lost }), ("b", up())],
                [Skipped, Deploying],
                ["host is drained", ""],
                &["b"],
                &["a: drained"],
                false,
            ),
        ];
        for (skip_lost, facts, results, messages, deploy, skipped, halted) in rows {
            let mut record = record(&[&[("c", Passed)], &[("a", Pending), ("b", Pending)]]);
            record.policy.skip_lost = skip_lost;
            let start = start_wave(&mut record, 1, &observed(facts.clone()));
            let wave = &record.waves[1];
            assert_eq!(wave.state, WaveState::Running, "{facts:?}");
            assert_eq!(
                [wave.hosts[0].result, wave.hosts[1].result],
                results,
                "{facts:?}"
            );
            assert_eq!(
                [
                    wave.hosts[0].message.as_str(),
                    wave.hosts[1].message.as_str()
                ],
                messages,
                "{facts:?}"
            );
            assert_eq!(start.deploy, deploy, "{facts:?}");
            assert_eq!(start.skipped, skipped, "{facts:?}");
            assert_eq!(start.halted, halted, "{facts:?}");
            assert_eq!(start.hook_host, None, "not the first wave: {facts:?}");
        }
    }

    #[test]
    fn the_release_hook_runs_on_the_first_host_of_the_first_wave() {
        // (wave, is a rollback, facts of a and b) -> hook host
        for (idx, is_rollback, a, expect) in [
            (0, false, up(), Some("a")),
            // The first host left out: the next one runs it.
            (
                0,
                false,
                HostFacts {
                    drained: true,
                    ..up()
                },
                Some("b"),
            ),
            (0, true, up(), None),
            (1, false, up(), None),
        ] {
            let mut record = record(&[&[("a", Pending), ("b", Pending)], &[("a", Pending)]]);
            record.is_rollback = is_rollback;
            let start = start_wave(&mut record, idx, &observed(vec![("a", a), ("b", up())]));
            assert_eq!(start.hook_host.as_deref(), expect, "{idx} {is_rollback}");
        }
    }

    #[test]
    fn a_wave_records_what_each_host_ran_before() {
        // (the host's desired release of web when the wave is planned, and in the write that
        // changes it) -> what a rollback restores
        let was = |version: &str, deployment: Option<&str>| desired(version, "r0", deployment);
        type Row = (Option<Desired>, Option<Desired>, Option<&'static str>);
        let rows: Vec<Row> = vec![
            (None, None, None),
            (Some(was("1.0", Some("web|env=prod"))), None, None),
            (Some(was("1.0", None)), Some(was("1.0", None)), Some("1.0")),
            // A convergence between the look and the write: what the write saw wins.
            (
                Some(was("1.0", Some("web|env=prod"))),
                Some(was("1.1", Some("web|env=prod"))),
                Some("1.1"),
            ),
        ];
        for (planned, written, expect) in rows {
            let facts = HostFacts {
                desired: planned.clone(),
                ..up()
            };
            let mut record = record(&[&[("a", Pending)]]);
            let start = start_wave(&mut record, 0, &observed(vec![("a", facts)]));
            assert_eq!(start.deploy, ["a"]);
            assert_eq!(
                record.waves[0].hosts[0].previous_version,
                planned.as_ref().map(|d| d.version.clone())
            );
            let mut host = HostRecord {
                name: "a".into(),
                labels: Default::default(),
                advertise_addr: String::new(),
                registered_unix_ms: 0,
                last_seen_unix_ms: 0,
                desired: written
                    .clone()
                    .map(|d| ("web".to_string(), d))
                    .into_iter()
                    .collect(),
                drain: None,
                agent: Default::default(),
            };
            give_release(&mut record, 0, &mut host, start.hook_host.as_deref());
            let entry = &record.waves[0].hosts[0];
            assert_eq!(entry.previous_version.as_deref(), expect, "{written:?}");
            assert_eq!(
                entry.previous_deployment,
                written.and_then(|d| d.deployment),
            );
            let now = &host.desired["web"];
            assert_eq!(
                (
                    now.version.as_str(),
                    now.rollout_id.as_str(),
                    now.generation
                ),
                ("2.0", "r1", 7)
            );
            assert!(
                now.run_release_hook,
                "the canary's first host runs the hook"
            );
            assert_eq!(
                now.deployment.as_deref(),
                Some(DeploymentRecord::key("web", &record.policy.selector).as_str())
            );
        }
    }

    #[test]
    fn a_wave_fits_the_budget_or_waits() {
        // (budget asked, budget, wave, hosts down outside it) -> (fit, wave sizes after)
        type Row<'a> = (Option<Batch>, u32, usize, usize, FitWave, &'a [usize]);
        let rows: Vec<Row> = vec![
            // No budget asked for (or a rollout from before budgets): the wave goes whole.
            (None, 2, 1, 5, FitWave::Go, &[1, 3]),
            (Some(Batch::Hosts(2)), 0, 1, 5, FitWave::Go, &[1, 3]),
            (Some(Batch::Hosts(3)), 3, 1, 0, FitWave::Go, &[1, 3]),
            (
                Some(Batch::Hosts(2)),
                2,
                1,
                1,
                FitWave::Shrunk(
                    "wave 2/3 shrinks to 1 host(s): --max-unavailable 2 with 1 already down (x: lost)"
                        .into(),
                ),
                &[1, 1, 2],
            ),
            (Some(Batch::Hosts(2)), 2, 1, 2, FitWave::Wait, &[1, 3]),
            // The canary is never split: it waits.
            (Some(Batch::Hosts(2)), 2, 0, 2, FitWave::Wait, &[1, 3]),
        ];
        for (asked, budget, idx, n_down, expect, sizes) in rows {
            let mut record = record(&[
                &[("c", Passed)],
                &[("a", Pending), ("b", Pending), ("d", Pending)],
            ]);
            record.policy.max_unavailable = asked;
            record.max_unavailable = budget;
            let down: Vec<String> = (0..n_down)
                .map(|i| {
                    if i == 0 {
                        "x: lost".into()
                    } else {
                        format!("y{i}: drained")
                    }
                })
                .collect();
            assert_eq!(
                fit_wave(&mut record, idx, &down),
                expect,
                "{asked:?} {budget}"
            );
            let got: Vec<usize> = record.waves.iter().map(|w| w.hosts.len()).collect();
            assert_eq!(got, sizes, "{asked:?} {budget}");
        }
    }

    #[test]
    fn the_budget_counts_the_selected_hosts_outside_the_wave() {
        let mut record = record(&[&[("c", Passed)], &[("a", Pending), ("b", Pending)]]);
        record.unavailable_at_start = vec!["z: drained".into(), "a: lost".into()];
        let outside: Vec<String> = outside_wave(&record, 1).into_iter().collect();
        assert_eq!(outside, ["c", "z"]);
        let outside: Vec<String> = outside_wave(&record, 0).into_iter().collect();
        assert_eq!(outside, ["a", "b", "z"]);
    }

    #[test]
    fn a_wave_whose_budget_stayed_spent_fails_every_host() {
        let mut record = record(&[&[("a", Pending), ("b", Pending)]]);
        record.max_unavailable = 1;
        wave_budget_spent(&mut record, 0, &["x: lost".to_string()]);
        assert_eq!(record.waves[0].state, WaveState::Running);
        for entry in &record.waves[0].hosts {
            assert_eq!(entry.result, Failed);
            assert_eq!(
                entry.message,
                "not started: --max-unavailable 1 is spent by x: lost; bring those hosts back, or roll out again with a larger budget"
            );
        }
    }
}
