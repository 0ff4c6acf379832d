//! The rollout engine's decisions as plain functions: how a host of a wave stands, given the
//! facts the controller observed about it; whether a host that passed went down since; and what
//! a wave's end means for the rollout (widen, pause after the canary, succeed, or halt and roll
//! back). The executor in `rollout` gathers the facts and carries the verdicts out; these only
//! decide, and are tested with tables.

use crate::fleet_state::InstanceStatus;
use crate::model::{HostResult, RolloutRecord};
use fleet_proto::instance_state::InstanceState;
use std::time::Duration;

/// What the controller knows of one host of a wave.
#[derive(Debug, Clone, Default)]
pub struct HostFacts {
    /// Its instance of the app, as last reported (while connected).
    pub instance: Option<InstanceStatus>,
    /// Whether the host is still registered (not removed).
    pub registered: bool,
    pub drained: bool,
    /// How long nothing was heard from it, when it counts as lost.
    pub lost_for_secs: Option<i64>,
}

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

/// What the end of wave `idx` means for the rollout.
#[derive(Debug, Clone, PartialEq)]
pub enum WaveVerdict {
    /// Go on to the next wave.
    Widen,
    /// The canary passed: wait this long (`--pause-after-canary`), then widen.
    PauseThenWiden(Duration),
    /// That was the last wave and every host passed.
    Succeed,
    /// A host of this wave or an earlier one failed: halt, and roll back when asked to.
    Halt { roll_back: bool },
}

/// The verdict on wave `idx`, from the results its hosts and the earlier waves' hosts have
/// now (a host that passed earlier and went down since counts as failed).
pub fn wave_verdict(record: &RolloutRecord, idx: usize) -> WaveVerdict {
    let passed = record.waves[..=idx]
        .iter()
        .flat_map(|w| &w.hosts)
        .all(|h| matches!(h.result, HostResult::Passed | HostResult::Skipped));
    if !passed {
        return WaveVerdict::Halt {
            roll_back: record.policy.auto_rollback,
        };
    }
    let last = idx + 1 >= record.waves.len();
    if last {
        return WaveVerdict::Succeed;
    }
    if idx == 0 && record.policy.canary > 0 && record.policy.pause_after_canary_ms > 0 {
        return WaveVerdict::PauseThenWiden(Duration::from_millis(
            record.policy.pause_after_canary_ms,
        ));
    }
    WaveVerdict::Widen
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Batch, RolloutPolicy, RolloutState, Wave, WaveHost, WaveState};

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

    fn record(
        results: &[&[HostResult]],
        canary: u32,
        pause_ms: u64,
        rollback: bool,
    ) -> RolloutRecord {
        RolloutRecord {
            id: "r1".into(),
            app: "web".into(),
            version: "2.0".into(),
            state: RolloutState::Running,
            started_by: "ci".into(),
            started_unix_ms: 0,
            finished_unix_ms: 0,
            waves: results
                .iter()
                .map(|hosts| Wave {
                    hosts: hosts
                        .iter()
                        .enumerate()
                        .map(|(i, result)| WaveHost {
                            host: format!("h{i}"),
                            previous_version: None,
                            previous_deployment: None,
                            result: *result,
                            message: String::new(),
                        })
                        .collect(),
                    state: WaveState::Running,
                })
                .collect(),
            current_wave: 0,
            message: String::new(),
            policy: RolloutPolicy {
                selector: Default::default(),
                canary,
                batch: Batch::Percent(25),
                pause_after_canary_ms: pause_ms,
                smoke_timeout_ms: 0,
                auto_rollback: rollback,
                skip_lost: false,
                min_healthy_ms: None,
                max_unavailable: None,
            },
            is_rollback: false,
            seq: 1,
            hold_until_unix_ms: 0,
            max_unavailable: 0,
            unavailable_at_start: Vec::new(),
        }
    }

    #[test]
    fn what_the_end_of_a_wave_means() {
        use HostResult::*;
        let ok: &[HostResult] = &[Passed];
        let two_ok: &[HostResult] = &[Passed, Skipped];
        let bad: &[HostResult] = &[Passed, Failed];
        // (waves' results, wave that ended, canary, pause, auto-rollback) -> verdict
        type Case<'a> = (Vec<&'a [HostResult]>, usize, u32, u64, bool, WaveVerdict);
        let cases: Vec<Case> = vec![
            (vec![ok, two_ok], 0, 1, 0, true, WaveVerdict::Widen),
            (
                vec![ok, two_ok],
                0,
                1,
                5_000,
                true,
                WaveVerdict::PauseThenWiden(Duration::from_secs(5)),
            ),
            // No canary wave: nothing to pause after.
            (vec![two_ok, two_ok], 0, 0, 5_000, true, WaveVerdict::Widen),
            (vec![ok, two_ok], 1, 1, 5_000, true, WaveVerdict::Succeed),
            (vec![ok], 0, 1, 5_000, true, WaveVerdict::Succeed),
            (
                vec![ok, bad],
                1,
                1,
                0,
                true,
                WaveVerdict::Halt { roll_back: true },
            ),
            (
                vec![ok, bad],
                1,
                1,
                0,
                false,
                WaveVerdict::Halt { roll_back: false },
            ),
            // A host of an earlier wave that went down since fails this one too.
            (
                vec![bad, two_ok],
                1,
                1,
                0,
                true,
                WaveVerdict::Halt { roll_back: true },
            ),
        ];
        for (waves, idx, canary, pause, rollback, expect) in cases {
            let record = record(&waves, canary, pause, rollback);
            assert_eq!(wave_verdict(&record, idx), expect, "{waves:?} wave {idx}");
        }
    }
}
