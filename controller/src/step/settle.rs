//! What a wave's end means for the rollout: the verdict (widen, pause after the canary,
//! succeed, or halt and roll back), what it changes in the record, and what a rollout that
//! succeeded leaves (its message, the deployment it moves).

use super::wave_label;
use crate::model::{DeploymentRecord, HostResult, RolloutRecord, RolloutState, WaveState};
use std::time::Duration;

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

/// What settling a wave decided, for the executor to carry out.
#[derive(Debug, Clone, PartialEq)]
pub enum WaveEnd {
    /// The wave passed and the record moved past it (past the last wave: the rollout
    /// succeeds). With a pause, its end is in the record (`hold_until_unix_ms`), to be saved
    /// with the pass so a restart in between cannot skip it; then wait it out.
    Passed { pause: Option<Duration> },
    /// A host of this wave or an earlier one failed: the wave is failed and the record's message
    /// says so (`why` lists each failed host); the rollout halts, and rolls back when asked to.
    Halted { why: String, roll_back: bool },
}

/// Settles wave `idx` once waiting on it ended, at `now_unix_ms`: the hosts still deploying
/// are marked as not waited for, and the verdict ([`wave_verdict`]) is written into the
/// record.
pub fn settle_wave(record: &mut RolloutRecord, idx: usize, now_unix_ms: i64) -> WaveEnd {
    // Every host so far, earlier waves included: one that went down since it passed fails this
    // wave too.
    let verdict = wave_verdict(record, idx);
    for entry in &mut record.waves[idx].hosts {
        if entry.result == HostResult::Deploying {
            entry.message = "not waited for: another host of the wave failed".to_string();
        }
    }
    match verdict {
        WaveVerdict::Halt { roll_back } => {
            let why = record.waves[..=idx]
                .iter()
                .flat_map(|w| &w.hosts)
                .filter(|h| h.result == HostResult::Failed)
                // The first line: a failed check's report goes on with the app's last log
                // lines, which the host's own row keeps.
                .map(|h| format!("{}: {}", h.host, h.message.lines().next().unwrap_or("")))
                .collect::<Vec<_>>()
                .join("; ");
            record.waves[idx].state = WaveState::Failed;
            record.message = format!("{} failed: {why}", wave_label(record, idx));
            WaveEnd::Halted { why, roll_back }
        }
        WaveVerdict::Widen | WaveVerdict::Succeed | WaveVerdict::PauseThenWiden(_) => {
            record.waves[idx].state = WaveState::Passed;
            record.current_wave += 1;
            let pause = match verdict {
                WaveVerdict::PauseThenWiden(pause) => Some(pause),
                _ => None,
            };
            if let Some(pause) = pause {
                record.hold_until_unix_ms = now_unix_ms + pause.as_millis() as i64;
            }
            WaveEnd::Passed { pause }
        }
    }
}

/// Ends a rollout whose every wave passed, at `now_unix_ms`, given the app's `deployments`;
/// returns the deployment its end writes, `(app, selector) -> release`. A rollout always leaves
/// one; a rollback moves its deployment back, but leaves none where the app has none for its
/// selector (its hosts ran the app before deployments existed): that would select every host.
pub fn succeed(
    record: &mut RolloutRecord,
    deployments: &[DeploymentRecord],
    now_unix_ms: i64,
) -> Option<DeploymentRecord> {
    record.state = RolloutState::Succeeded;
    record.message = format!(
        "{}@{} runs on {} hosts",
        record.app,
        record.version,
        record.waves.iter().map(|w| w.hosts.len()).sum::<usize>()
    );
    record.finished_unix_ms = now_unix_ms;
    let deployment = DeploymentRecord {
        app: record.app.clone(),
        selector: record.policy.selector.clone(),
        version: record.version.clone(),
        rollout_id: record.id.clone(),
        updated_unix_ms: now_unix_ms,
        updated_by: record.started_by.clone(),
        seq: record.seq,
    };
    let key = DeploymentRecord::key(&deployment.app, &deployment.selector);
    let moves_a_deployment = !record.is_rollback
        || deployments
            .iter()
            .any(|d| DeploymentRecord::key(&d.app, &d.selector) == key);
    moves_a_deployment.then_some(deployment)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::step::fixtures::record;

    /// A record whose waves have these results (hosts named `w<wave>h<host>`).
    fn with_results(
        waves: &[&[HostResult]],
        canary: u32,
        pause_ms: u64,
        rollback: bool,
    ) -> RolloutRecord {
        let names: Vec<Vec<(String, HostResult)>> = waves
            .iter()
            .enumerate()
            .map(|(w, hosts)| {
                hosts
                    .iter()
                    .enumerate()
                    .map(|(h, result)| (format!("w{w}h{h}"), *result))
                    .collect()
            })
            .collect();
        let borrowed: Vec<Vec<(&str, HostResult)>> = names
            .iter()
            .map(|w| w.iter().map(|(n, r)| (n.as_str(), *r)).collect())
            .collect();
        let slices: Vec<&[(&str, HostResult)]> = borrowed.iter().map(Vec::as_slice).collect();
        let mut record = record(&slices);
        record.policy.canary = canary;
        record.policy.pause_after_canary_ms = pause_ms;
        record.policy.auto_rollback = rollback;
        record
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
            let record = with_results(&waves, canary, pause, rollback);
            assert_eq!(wave_verdict(&record, idx), expect, "{waves:?} wave {idx}");
        }
    }

    #[test]
    fn what_settling_a_wave_writes() {
        use HostResult::*;
        let ok: &[HostResult] = &[Passed];
        // (waves' results, wave that ended, pause) -> (end, wave state, current wave, hold
        // until, message)
        type Row<'a> = (
            Vec<&'a [HostResult]>,
            usize,
            u64,
            WaveEnd,
            WaveState,
            usize,
            i64,
            &'a str,
        );
        let rows: Vec<Row> = vec![
            (
                vec![ok, ok],
                0,
                0,
                WaveEnd::Passed { pause: None },
                WaveState::Passed,
                1,
                0,
                "",
            ),
            // The pause's end is recorded with the pass, from the clock given.
            (
                vec![ok, ok],
                0,
                5_000,
                WaveEnd::Passed {
                    pause: Some(Duration::from_secs(5)),
                },
                WaveState::Passed,
                1,
                1_005_000,
                "",
            ),
            // The last wave passed: past the end.
            (
                vec![ok, ok],
                1,
                0,
                WaveEnd::Passed { pause: None },
                WaveState::Passed,
                2,
                0,
                "",
            ),
            // A failure names every failed host, earlier waves included; a host still
            // deploying is not waited for.
            (
                vec![&[Failed], &[Failed, Deploying]],
                1,
                0,
                WaveEnd::Halted {
                    why: "w0h0: down; w1h0: down".into(),
                    roll_back: true,
                },
                WaveState::Failed,
                1,
                0,
                "wave 2/2 failed: w0h0: down; w1h0: down",
            ),
            (
                vec![&[Failed, Skipped]],
                0,
                0,
                WaveEnd::Halted {
                    why: "w0h0: down".into(),
                    roll_back: true,
                },
                WaveState::Failed,
                0,
                0,
                "canary (wave 1/1) failed: w0h0: down",
            ),
        ];
        for (waves, idx, pause, end, state, current, hold, message) in rows {
            let mut record = with_results(&waves, 1, pause, true);
            record.current_wave = idx;
            for entry in record.waves.iter_mut().flat_map(|w| &mut w.hosts) {
                if entry.result == Failed {
                    entry.message = "down".into();
                }
            }
            assert_eq!(settle_wave(&mut record, idx, 1_000_000), end, "{waves:?}");
            assert_eq!(record.waves[idx].state, state, "{waves:?}");
            assert_eq!(record.current_wave, current, "{waves:?}");
            assert_eq!(record.hold_until_unix_ms, hold, "{waves:?}");
            assert_eq!(record.message, message, "{waves:?}");
            for entry in record.waves[idx]
                .hosts
                .iter()
                .filter(|h| h.result == Deploying)
            {
                assert_eq!(
                    entry.message,
                    "not waited for: another host of the wave failed"
                );
            }
        }
    }

    #[test]
    fn what_a_rollout_that_succeeded_leaves() {
        let deployment = |selector: &[(&str, &str)]| DeploymentRecord {
            app: "web".into(),
            selector: selector
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            version: "1.0".into(),
            rollout_id: "r0".into(),
            updated_unix_ms: 0,
            updated_by: "ci".into(),
            seq: 1,
        };
        // (is a rollback, the app's deployments) -> whether it writes a deployment
        for (is_rollback, deployments, writes) in [
            (false, vec![], true),
            (false, vec![deployment(&[("env", "prod")])], true),
            (true, vec![deployment(&[("env", "prod")])], true),
            // A rollback of an app with no deployment for its selector leaves none.
            (true, vec![], false),
            (true, vec![deployment(&[("env", "staging")])], false),
        ] {
            let mut record = record(&[&[("a", HostResult::Passed), ("b", HostResult::Skipped)]]);
            record.is_rollback = is_rollback;
            let left = succeed(&mut record, &deployments, 42);
            assert_eq!(left.is_some(), writes, "{is_rollback} {deployments:?}");
            assert_eq!(record.state, RolloutState::Succeeded);
            assert_eq!(record.message, "web@2.0 runs on 2 hosts");
            assert_eq!(record.finished_unix_ms, 42);
            if let Some(left) = left {
                assert_eq!(
                    (left.version.as_str(), left.rollout_id.as_str(), left.seq),
                    ("2.0", "r1", 7)
                );
                assert_eq!(left.selector, record.policy.selector);
                assert_eq!(left.updated_unix_ms, 42);
            }
        }
    }
}
