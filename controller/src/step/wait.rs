//! Waiting on a wave: how a host of it stands, from the facts observed about it; whether a
//! host that passed went down since; what one look at the wave changes in the record; and what
//! the wave's deadline does to the hosts still on their way.

use super::{HostFacts, Observed};
use crate::fleet_state::InstanceStatus;
use crate::model::{HostResult, RolloutRecord};
use fleet_proto::instance_state::InstanceState;

/// How one host stands in the wave being waited on.
#[derive(Debug, Clone, PartialEq)]
pub enum HostOutcome {
    Waiting,
    Passed,
    Failed(String),
    /// Drained or removed during its wave: left out, as at planning.
    Skipped(String),
}

/// How a host of the wave of rollout `rollout_id` (release `version`) stands: passed once its
/// instance of this rollout runs (the agent says running only after the smoke checks passed
/// and `min_healthy` went by), failed when it failed or its host went lost, skipped when the
/// host was drained or removed meanwhile, and otherwise still waited for.
pub fn host_outcome(facts: &HostFacts, rollout_id: &str, version: &str) -> HostOutcome {
    let instance = facts
        .instance
        .as_ref()
        .filter(|i| i.rollout_id == rollout_id && i.version == version);
    match instance {
        Some(i) if i.state == InstanceState::Running => return HostOutcome::Passed,
        Some(i) if i.state == InstanceState::Failed => {
            return HostOutcome::Failed(i.message.clone())
        }
        _ => {}
    }
    if !facts.registered {
        return HostOutcome::Skipped("host was removed during the wave".to_string());
    }
    if facts.drained {
        return HostOutcome::Skipped("host was drained during the wave".to_string());
    }
    if let Some(secs) = facts.lost_for_secs {
        return HostOutcome::Failed(format!(
            "host went lost during the wave (nothing heard from it for {secs}s)"
        ));
    }
    HostOutcome::Waiting
}

/// Why a host that passed in this rollout no longer counts as passed: its instance of this
/// rollout crashed, failed, or was restarted after a crash (an instance passes only while it
/// stays up, until the rollout ends). `None` while it stays up, and for an instance of another
/// rollout or version (a later change is not this rollout's to judge).
pub fn went_down_after_passing(
    instance: Option<&InstanceStatus>,
    rollout_id: &str,
    version: &str,
) -> Option<String> {
    let instance = instance.filter(|i| i.rollout_id == rollout_id && i.version == version)?;
    match instance.state {
        InstanceState::Crashed | InstanceState::Failed => Some(format!(
            "its instance went down after it passed: {}",
            instance.message
        )),
        _ if instance.restarts > 0 => Some(format!(
            "its instance was restarted {} time(s) after it passed (it crashed)",
            instance.restarts
        )),
        _ => None,
    }
}

/// What one look at a wave found.
#[derive(Debug, Clone, PartialEq)]
pub struct WaveProgress {
    /// A line for each host whose result changed, for the operator (the record changed: save
    /// it before they go out).
    pub lines: Vec<String>,
    /// Nothing more to wait for: every host of the wave passed, failed or was skipped, or a
    /// host of this wave or an earlier one failed.
    pub done: bool,
}

/// One look at wave `idx`: each host still deploying gets the outcome its facts give
/// ([`host_outcome`]), and each host of this wave or an earlier one that passed fails if its
/// instance went down since ([`went_down_after_passing`]). Reads the full facts of the wave's
/// deploying hosts and only the instance of the hosts that passed.
pub fn observe_wave(record: &mut RolloutRecord, idx: usize, observed: &Observed) -> WaveProgress {
    let (rollout_id, version) = (record.id.clone(), record.version.clone());
    let mut waiting = 0;
    let mut lines = Vec::new();
    for entry in &mut record.waves[idx].hosts {
        if entry.result != HostResult::Deploying {
            continue;
        }
        let (result, message, line) =
            match host_outcome(observed.host(&entry.host), &rollout_id, &version) {
                HostOutcome::Waiting => {
                    waiting += 1;
                    continue;
                }
                HostOutcome::Passed => (
                    HostResult::Passed,
                    "smoke checks passed".to_string(),
                    format!("{} passed smoke checks", entry.host),
                ),
                HostOutcome::Failed(why) => {
                    let line = format!("{} failed: {why}", entry.host);
                    (HostResult::Failed, why, line)
                }
                HostOutcome::Skipped(why) => {
                    let line = format!("{} skipped: {why}", entry.host);
                    (HostResult::Skipped, why, line)
                }
            };
        entry.result = result;
        entry.message = message;
        lines.push(line);
    }
    // A host that passed earlier must still be up.
    for entry in record.waves[..=idx].iter_mut().flat_map(|w| &mut w.hosts) {
        if entry.result != HostResult::Passed {
            continue;
        }
        let instance = observed.host(&entry.host).instance.as_ref();
        if let Some(why) = went_down_after_passing(instance, &rollout_id, &version) {
            lines.push(format!("{} failed: {why}", entry.host));
            entry.result = HostResult::Failed;
            entry.message = why;
        }
    }
    let any_failed = record.waves[..=idx]
        .iter()
        .flat_map(|w| &w.hosts)
        .any(|h| h.result == HostResult::Failed);
    WaveProgress {
        lines,
        done: waiting == 0 || any_failed,
    }
}

/// Wave `idx`'s deadline passed: each host still deploying fails, saying whether its agent was
/// connected. Reads whether each deploying host is connected.
pub fn wave_deadline_passed(record: &mut RolloutRecord, idx: usize, observed: &Observed) {
    for entry in &mut record.waves[idx].hosts {
        if entry.result == HostResult::Deploying {
            entry.result = HostResult::Failed;
            entry.message = if observed.host(&entry.host).connected {
                "did not pass its smoke checks before the deadline".to_string()
            } else {
                "did not report before the deadline: host not connected".to_string()
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::step::fixtures::{instance, record, up};

    fn status(state: InstanceState, rollout: &str, restarts: u32) -> InstanceStatus {
        InstanceStatus {
            app: "web".into(),
            version: "2.0".into(),
            state,
            message: "exit status 1".into(),
            since_unix_ms: 0,
            restarts,
            rollout_id: rollout.into(),
        }
    }

    #[test]
    fn a_host_that_passed_fails_the_rollout_when_its_instance_goes_down() {
        use InstanceState::*;
        // (what the host reports now, whether the rollout must count it failed)
        let cases = [
            (None, false),
            (Some(status(Running, "r1", 0)), false),
            (Some(status(Crashed, "r1", 0)), true),
            (Some(status(Failed, "r1", 0)), true),
            // Restarted by the agent after a crash: running again, but it went down.
            (Some(status(Running, "r1", 1)), true),
            (Some(status(Starting, "r1", 1)), true),
            // Another rollout's or version's instance is not this rollout's business.
            (Some(status(Crashed, "r2", 3)), false),
            (
                Some(InstanceStatus {
                    version: "1.0".into(),
                    ..status(Crashed, "r1", 0)
                }),
                false,
            ),
            (Some(status(Stopping, "r1", 0)), false),
        ];
        for (instance, fails) in cases {
            assert_eq!(
                went_down_after_passing(instance.as_ref(), "r1", "2.0").is_some(),
                fails,
                "{instance:?}"
            );
        }
    }

    #[test]
    fn how_a_host_of_a_wave_stands() {
        use InstanceState::*;
        let facts = |instance: Option<InstanceStatus>| HostFacts {
            instance,
            registered: true,
            ..Default::default()
        };
        // (facts, outcome)
        let cases = [
            (facts(Some(status(Running, "r1", 0))), HostOutcome::Passed),
            (
                facts(Some(status(Failed, "r1", 0))),
                HostOutcome::Failed("exit status 1".into()),
            ),
            // Still on its way, or another rollout's instance: waited for.
            (facts(Some(status(Checking, "r1", 0))), HostOutcome::Waiting),
            (facts(Some(status(Running, "r0", 0))), HostOutcome::Waiting),
            (facts(None), HostOutcome::Waiting),
            (
                HostFacts::default(),
                HostOutcome::Skipped("host was removed during the wave".into()),
            ),
            (
                HostFacts {
                    drained: true,
                    ..facts(None)
                },
                HostOutcome::Skipped("host was drained during the wave".into()),
            ),
            (
                HostFacts {
                    lost_for_secs: Some(20),
                    ..facts(None)
                },
                HostOutcome::Failed(
                    "host went lost during the wave (nothing heard from it for 20s)".into(),
                ),
            ),
            // What the instance says wins over the host's other facts.
            (
                HostFacts {
                    drained: true,
                    ..facts(Some(status(Running, "r1", 0)))
                },
                HostOutcome::Passed,
            ),
        ];
        for (facts, expect) in cases {
            assert_eq!(host_outcome(&facts, "r1", "2.0"), expect, "{facts:?}");
        }
    }

    /// Each host's result in the record, wave after wave.
    fn results(record: &RolloutRecord) -> Vec<(String, HostResult)> {
        record
            .waves
            .iter()
            .flat_map(|w| &w.hosts)
            .map(|h| (h.host.clone(), h.result))
            .collect()
    }

    #[test]
    fn one_look_at_a_wave() {
        use HostResult::*;
        use InstanceState::{Checking, Crashed, Running};
        let on = |state: InstanceState| HostFacts {
            instance: Some(instance(state, "2.0", "r1")),
            ..up()
        };
        let restarted = HostFacts {
            instance: Some(InstanceStatus {
                restarts: 1,
                ..instance(Running, "2.0", "r1")
            }),
            ..up()
        };
        // (the canary wave, the wave looked at, facts) -> (results after, lines, done)
        type Row<'a> = (
            &'a [(&'a str, HostResult)],
            &'a [(&'a str, HostResult)],
            Vec<(&'a str, HostFacts)>,
            &'a [HostResult],
            &'a [&'a str],
            bool,
        );
        let rows: Vec<Row> =
            vec![
            // Passed once its instance of this rollout runs.
            (
                &[("c", Passed)],
                &[("a", Deploying)],
                vec![("c", on(Running)), ("a", on(Running))],
                &[Passed, Passed],
                &["a passed smoke checks"],
                true,
            ),
            // Still checking: waited for.
            (
                &[("c", Passed)],
                &[("a", Deploying)],
                vec![("c", on(Running)), ("a", on(Checking))],
                &[Passed, Deploying],
                &[],
                false,
            ),
            // A failure ends the wait, even with a host still on its way.
            (
                &[("c", Passed)],
                &[("a", Deploying), ("b", Deploying)],
                vec![("c", on(Running)), ("a", on(InstanceState::Failed)), ("b", on(Checking))],
                &[Passed, Failed, Deploying],
                &["a failed: exit status 1"],
                true,
            ),
            // Removed during the wave: skipped.
            (
                &[("c", Passed)],
                &[("a", Deploying)],
                vec![("c", on(Running))],
                &[Passed, Skipped],
                &["a skipped: host was removed during the wave"],
                true,
            ),
            // A canary that went down since it passed fails the wave being waited on.
            (
                &[("c", Passed)],
                &[("a", Deploying)],
                vec![("c", on(Crashed)), ("a", on(Checking))],
                &[Failed, Deploying],
                &["c failed: its instance went down after it passed: exit status 1"],
                true,
            ),
            // A host that passes already restarted fails in the same look.
            (
                &[("c", Passed)],
                &[("a", Deploying)],
                vec![("c", on(Running)), ("a", restarted)],
                &[Passed, Failed],
                &[
                    "a passed smoke checks",
                    "a failed: its instance was restarted 1 time(s) after it passed (it crashed)",
                ],
                true,
            ),
            // Hosts that never started (skipped, or held back by a lost host) are not waited
            // for.
            (
                &[("c", Passed)],
                &[("a", Skipped), ("b", Pending)],
                vec![("c", on(Running))],
                &[Passed, Skipped, Pending],
                &[],
                true,
            ),
        ];
        for (canary, wave, facts, expect, lines, done) in rows {
            let mut record = record(&[canary, wave]);
            let observed = Observed {
                hosts: facts
                    .into_iter()
                    .map(|(name, f)| (name.to_string(), f))
                    .collect(),
            };
            let progress = observe_wave(&mut record, 1, &observed);
            let got: Vec<HostResult> = results(&record).into_iter().map(|(_, r)| r).collect();
            assert_eq!(got, expect, "{wave:?}");
            assert_eq!(progress.lines, lines, "{wave:?}");
            assert_eq!(progress.done, done, "{wave:?}");
        }
    }

    #[test]
    fn the_deadline_fails_the_hosts_still_on_their_way() {
        use HostResult::*;
        // (result before, connected) -> (result after, message)
        for (before, connected, after, message) in [
            (
                Deploying,
                true,
                Failed,
                "did not pass its smoke checks before the deadline",
            ),
            (
                Deploying,
                false,
                Failed,
                "did not report before the deadline: host not connected",
            ),
            (Passed, true, Passed, ""),
            (Skipped, false, Skipped, ""),
        ] {
            let mut record = record(&[&[("a", before)]]);
            let facts = HostFacts { connected, ..up() };
            let observed = Observed {
                hosts: [("a".to_string(), facts)].into(),
            };
            wave_deadline_passed(&mut record, 0, &observed);
            let entry = &record.waves[0].hosts[0];
            assert_eq!((entry.result, entry.message.as_str()), (after, message));
        }
    }
}
