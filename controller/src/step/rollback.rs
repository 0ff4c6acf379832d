//! Rolling a halted rollout back, within its unavailability budget, as waves go forward: which
//! hosts it changed, which release each goes back to, in which batches, and when each is back
//! (or failed, was lost, or ran out of time, and the rollback goes on without it).
//!
//! | rule | decided by |
//! | --- | --- |
//! | a host the rollout changed is one whose desired release is still the rollout's; one a later change took over, or that never took the release, has nothing to undo | [`next_rollback_step`] |
//! | the hosts already down (failed, starting, lost) go back first, all at once: they cost nothing more | [`next_rollback_step`] |
//! | then at most the rollout's budget (`max_unavailable`) of serving hosts at a time, in wave order; a rollout made before budgets (budget 0) sends them all at once | [`next_rollback_step`] |
//! | the next batch goes only when every host of the one before is settled | [`next_rollback_step`] |
//! | a host is settled when it runs its previous release again for this rollout (or, having none, stopped the app): `rolled_back` | [`note_rollback_progress`] |
//! | … or when its previous release failed, or it was lost (it goes back when it returns): the rollback goes on without it, which must not wedge it | [`note_rollback_progress`] |
//! | … or when its batch's deadline (the wave's) passed | [`rollback_deadline_passed`] |
//! | a host is handed back its release and marked sent in one write with the record; one a later change took over under the host lock is left alone | [`send_back`] |
//! | a controller restarted with a halted rollout that rolls back goes on with the rollback, not the waves | [`is_rolling_back`] |

use super::Observed;
use crate::model::{
    Desired, HostRecord, HostResult, RollbackMark, RolloutRecord, RolloutState, WaveState,
};
use fleet_proto::instance_state::InstanceState;
use std::collections::BTreeMap;

/// A batch of hosts to hand their previous release back to, in one write with the record.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RollbackBatch {
    /// Their names, in wave order.
    pub hosts: Vec<String>,
    /// What each goes back to: the desired release it had before, as it was given (by a
    /// deployment or not), handed out again under this rollout; or `None`: it ran no release
    /// of the app before, which is taken away.
    pub restore: BTreeMap<String, Option<Desired>>,
    /// The progress line that says what goes now and why.
    pub line: String,
}

/// What a rollback does next.
#[derive(Debug, Clone, PartialEq)]
pub enum RollbackStep {
    /// The rollout changed no host: there is nothing to put back.
    NothingToUndo,
    /// Hand these hosts their previous release ([`send_back`]).
    Send(RollbackBatch),
    /// Hosts handed back their release are not settled yet: wait for them.
    Wait,
    /// Every host the rollout changed is settled: the rollback ends.
    Done,
}

/// The release `record` hands back to the host of `entry` (`None`: it ran none).
fn restore_of(record: &RolloutRecord, entry: &crate::model::WaveHost) -> Option<Desired> {
    entry.previous_version.clone().map(|version| Desired {
        version,
        rollout_id: record.id.clone(),
        generation: record.seq,
        smoke_timeout_ms: 0,
        run_release_hook: false,
        min_healthy_ms: None,
        deployment: entry.previous_deployment.clone(),
    })
}

/// The next step of the rollback of `record`, from its hosts' marks and, for the hosts it has
/// not reached yet, their facts now (see the table in the module's doc). Reads each host's
/// `desired`, whether it is lost, and its instance.
pub fn next_rollback_step(record: &RolloutRecord, observed: &Observed) -> RollbackStep {
    let mut reached = false;
    let mut in_flight = false;
    // Not reached yet, each with whether it is down now.
    let mut pending: Vec<(&crate::model::WaveHost, bool)> = Vec::new();
    for entry in record.waves.iter().flat_map(|w| &w.hosts) {
        match entry.rollback {
            Some(RollbackMark::NotBack | RollbackMark::Lost) => reached = true,
            Some(RollbackMark::Sent) => {
                reached = true;
                in_flight |= entry.result != HostResult::RolledBack;
            }
            None => {
                let facts = observed.host(&entry.host);
                let changed = facts
                    .desired
                    .as_ref()
                    .is_some_and(|d| d.rollout_id == record.id);
                if changed {
                    let serving = facts.lost_for_secs.is_none()
                        && facts
                            .instance
                            .as_ref()
                            .is_some_and(|i| i.state == InstanceState::Running);
                    pending.push((entry, !serving));
                }
            }
        }
    }
    if in_flight {
        return RollbackStep::Wait;
    }
    if pending.is_empty() {
        return if reached {
            RollbackStep::Done
        } else {
            RollbackStep::NothingToUndo
        };
    }
    let down: Vec<_> = pending.iter().filter(|(_, down)| *down).collect();
    let (chosen, why): (Vec<&crate::model::WaveHost>, String) = if !down.is_empty() {
        (
            down.iter().map(|(e, _)| *e).collect(),
            "down already, first".to_string(),
        )
    } else {
        let budget = record.max_unavailable as usize;
        let n = if budget == 0 {
            pending.len()
        } else {
            budget.min(pending.len())
        };
        let left = pending.len() - n;
        (
            pending.iter().take(n).map(|(e, _)| *e).collect(),
            if budget == 0 {
                "all at once: the rollout has no budget".to_string()
            } else {
                format!("--max-unavailable {budget}, {left} more after them")
            },
        )
    };
    let mut batch = RollbackBatch::default();
    for entry in chosen {
        batch.hosts.push(entry.host.clone());
        batch
            .restore
            .insert(entry.host.clone(), restore_of(record, entry));
    }
    batch.line = format!(
        "rolling back {} to the releases they ran before ({why})",
        batch.hosts.join(", ")
    );
    RollbackStep::Send(batch)
}

/// Hands `host` (one of a [`RollbackBatch`]) the release it goes back to, under the host lock,
/// and marks it sent in `record`, which is written with it. A host whose desired release is no
/// longer this rollout's (a later change took it over) is left alone and marked not back.
pub fn send_back(record: &mut RolloutRecord, host: &mut HostRecord, restore: Option<&Desired>) {
    let app = record.app.clone();
    let rollout_id = record.id.clone();
    let Some(entry) = record
        .waves
        .iter_mut()
        .flat_map(|w| &mut w.hosts)
        .find(|e| e.host == host.name)
    else {
        return;
    };
    let still_ours = host
        .desired
        .get(&app)
        .is_some_and(|d| d.rollout_id == rollout_id);
    if !still_ours {
        entry.rollback = Some(RollbackMark::NotBack);
        entry.message = format!(
            "{} (not rolled back: a later change took it over)",
            entry.message
        );
        return;
    }
    match restore {
        // Back to what it ran, as it was given (by a deployment or not).
        Some(desired) => {
            host.desired.insert(app, desired.clone());
        }
        None => {
            host.desired.remove(&app);
        }
    }
    entry.rollback = Some(RollbackMark::Sent);
}

/// What one look at the hosts going back found.
#[derive(Debug, Clone, PartialEq)]
pub struct RollbackProgress {
    /// A line for each host now settled.
    pub lines: Vec<String>,
    /// Every host handed back its release is settled: nothing more to wait for.
    pub all_back: bool,
}

/// One look at the hosts handed back their release and not settled yet: one that runs its
/// previous release again for this rollout (or, having none, has stopped the app) is rolled
/// back; one whose previous release failed, or that is lost (it gets its previous release when
/// it returns), is not back, and the rollback goes on without it. Reads whether each host is
/// lost, and its instance.
pub fn note_rollback_progress(record: &mut RolloutRecord, observed: &Observed) -> RollbackProgress {
    let app = record.app.clone();
    let rollout_id = record.id.clone();
    let mut lines = Vec::new();
    let mut all_back = true;
    for entry in record.waves.iter_mut().flat_map(|w| &mut w.hosts) {
        if entry.rollback != Some(RollbackMark::Sent) || entry.result == HostResult::RolledBack {
            continue;
        }
        let facts = observed.host(&entry.host);
        let previous = entry.previous_version.as_deref().unwrap_or("nothing");
        if facts.lost_for_secs.is_some() {
            entry.message = format!(
                "{} (lost: goes back to {previous} when it returns)",
                entry.message
            );
            entry.rollback = Some(RollbackMark::Lost);
            lines.push(format!(
                "{} is lost: it goes back when it returns",
                entry.host
            ));
            continue;
        }
        let instance = facts.instance.as_ref();
        let ours =
            |version: &str| instance.filter(|i| i.version == version && i.rollout_id == rollout_id);
        let back = match &entry.previous_version {
            Some(version) => {
                ours(version.as_str()).is_some_and(|i| i.state == InstanceState::Running)
            }
            None => instance
                .is_none_or(|i| matches!(i.state, InstanceState::Stopped | InstanceState::Failed)),
        };
        if back {
            entry.result = HostResult::RolledBack;
            entry.message = match &entry.previous_version {
                Some(v) => format!("{} (rolled back to {v})", entry.message),
                None => format!(
                    "{} (rolled back: {app} stopped, it ran no earlier release)",
                    entry.message
                ),
            };
            lines.push(format!("{} is back on {previous}", entry.host));
            continue;
        }
        let failed = entry
            .previous_version
            .as_deref()
            .and_then(ours)
            .filter(|i| i.state == InstanceState::Failed);
        if let Some(failed) = failed {
            entry.message = format!(
                "{} (not rolled back: {previous} failed too: {})",
                entry.message, failed.message
            );
            entry.rollback = Some(RollbackMark::NotBack);
            lines.push(format!(
                "{} did not come back: {previous} failed there too ({}); the rollback goes on",
                entry.host, failed.message
            ));
            continue;
        }
        all_back = false;
    }
    RollbackProgress { lines, all_back }
}

/// The deadline of the batch under way passed: its hosts not settled yet are not back, and the
/// rollback goes on without them; returns them.
pub fn rollback_deadline_passed(record: &mut RolloutRecord) -> Vec<String> {
    let mut late = Vec::new();
    for entry in record.waves.iter_mut().flat_map(|w| &mut w.hosts) {
        if entry.rollback == Some(RollbackMark::Sent) && entry.result != HostResult::RolledBack {
            entry.rollback = Some(RollbackMark::NotBack);
            entry.message = format!(
                "{} (not back on {} before the deadline)",
                entry.message,
                entry.previous_version.as_deref().unwrap_or("nothing")
            );
            late.push(entry.host.clone());
        }
    }
    late
}

/// What the end of a rollback adds to the record's message: the hosts it went on without,
/// other than lost ones (those go back when they return), if any.
pub fn rollback_end_note(record: &RolloutRecord) -> Option<String> {
    let not_back: Vec<&str> = record
        .waves
        .iter()
        .flat_map(|w| &w.hosts)
        .filter(|e| e.rollback == Some(RollbackMark::NotBack))
        .map(|e| e.host.as_str())
        .collect();
    (!not_back.is_empty()).then(|| {
        format!(
            "; rollback did not finish on {}: check `fleetctl status {}`",
            not_back.join(", "),
            record.app
        )
    })
}

/// Whether `record`, under way, has halted and is rolling back: a wave failed and it rolls
/// back on failure. A controller restarted then goes on with the rollback, not the waves.
pub fn is_rolling_back(record: &RolloutRecord) -> bool {
    !record.state.is_final()
        && record.state != RolloutState::Paused
        && record.policy.auto_rollback
        && record.waves.iter().any(|w| w.state == WaveState::Failed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::step::fixtures::{desired, instance, record, up};
    use crate::step::HostFacts;
    use HostResult::*;

    /// A host the rollout changed (its desired release is r1's), serving or down.
    fn changed(state: Option<InstanceState>) -> HostFacts {
        HostFacts {
            desired: Some(desired("2.0", "r1", None)),
            instance: state.map(|s| instance(s, "2.0", "r1")),
            ..up()
        }
    }

    fn observed(hosts: &[(&str, HostFacts)]) -> Observed {
        Observed {
            hosts: hosts
                .iter()
                .map(|(n, f)| (n.to_string(), f.clone()))
                .collect(),
        }
    }

    fn sent(step: &RollbackStep) -> Vec<String> {
        match step {
            RollbackStep::Send(batch) => batch.hosts.clone(),
            other => panic!("expected a batch, got {other:?}"),
        }
    }

    #[test]
    fn what_a_rollback_does_next() {
        use InstanceState::{Checking, Failed as InstFailed, Running};
        let serving = || changed(Some(Running));
        let failed = || changed(Some(InstFailed));
        let lost = || HostFacts {
            lost_for_secs: Some(30),
            ..changed(Some(Running))
        };
        let waves: &[&[(&str, HostResult)]] = &[
            &[("a", Passed)],
            &[("b", Passed)],
            &[("c", Failed), ("d", Deploying)],
        ];
        // (budget, marks already recorded, facts) -> what goes next
        type Row<'a> = (
            u32,
            Vec<(&'a str, RollbackMark, HostResult)>,
            Vec<(&'a str, HostFacts)>,
            Result<Vec<&'a str>, RollbackStep>,
        );
        let rows: Vec<Row> = vec![
            // Nothing changed (never given, or a later rollout took them): nothing to undo.
            (
                1,
                vec![],
                vec![
                    ("a", up()),
                    (
                        "b",
                        HostFacts {
                            desired: Some(desired("2.0", "r2", None)),
                            ..up()
                        },
                    ),
                ],
                Err(RollbackStep::NothingToUndo),
            ),
            // The hosts already down go first, all of them, whatever the budget.
            (
                1,
                vec![],
                vec![
                    ("a", serving()),
                    ("b", serving()),
                    ("c", failed()),
                    ("d", changed(Some(Checking))),
                ],
                Ok(vec!["c", "d"]),
            ),
            // A lost host is down: it goes in the first batch (and back when it returns).
            (
                1,
                vec![],
                vec![("a", serving()), ("c", lost())],
                Ok(vec!["c"]),
            ),
            // A host with no instance at all is down.
            (
                1,
                vec![],
                vec![("a", serving()), ("c", changed(None))],
                Ok(vec!["c"]),
            ),
            // Then at most the budget of serving hosts, in wave order.
            (
                1,
                vec![("c", RollbackMark::Sent, RolledBack)],
                vec![("a", serving()), ("b", serving())],
                Ok(vec!["a"]),
            ),
            (
                2,
                vec![("c", RollbackMark::Sent, RolledBack)],
                vec![("a", serving()), ("b", serving())],
                Ok(vec!["a", "b"]),
            ),
            // A rollout made before budgets (0) sends them all at once.
            (
                0,
                vec![],
                vec![("a", serving()), ("b", serving())],
                Ok(vec!["a", "b"]),
            ),
            // A batch not settled yet: wait, even with room in the budget.
            (
                2,
                vec![("c", RollbackMark::Sent, Failed)],
                vec![("a", serving()), ("b", serving())],
                Err(RollbackStep::Wait),
            ),
            // Settled without coming back (failed, late, taken over, or lost): the next batch goes.
            (
                1,
                vec![
                    ("c", RollbackMark::NotBack, Failed),
                    ("d", RollbackMark::Lost, Failed),
                ],
                vec![("a", serving()), ("b", serving())],
                Ok(vec!["a"]),
            ),
            // Every host reached and settled: done.
            (
                1,
                vec![
                    ("a", RollbackMark::Sent, RolledBack),
                    ("b", RollbackMark::Sent, RolledBack),
                    ("c", RollbackMark::NotBack, Failed),
                ],
                vec![],
                Err(RollbackStep::Done),
            ),
        ];
        for (budget, marks, facts, expect) in rows {
            let mut record = record(waves);
            record.max_unavailable = budget;
            for (host, mark, result) in &marks {
                let entry = record
                    .waves
                    .iter_mut()
                    .flat_map(|w| &mut w.hosts)
                    .find(|e| e.host == *host)
                    .unwrap();
                entry.rollback = Some(*mark);
                entry.result = *result;
            }
            let step = next_rollback_step(&record, &observed(&facts));
            match expect {
                Ok(hosts) => assert_eq!(sent(&step), hosts, "{budget} {marks:?} {facts:?}"),
                Err(other) => assert_eq!(step, other, "{budget} {marks:?} {facts:?}"),
            }
        }
    }

    #[test]
    fn a_batch_says_what_each_host_goes_back_to() {
        let mut record = record(&[&[("a", Passed)], &[("b", Failed)]]);
        record.max_unavailable = 1;
        record.waves[0].hosts[0].previous_version = Some("1.0".into());
        record.waves[0].hosts[0].previous_deployment = Some("web|env=prod".into());
        record.waves[1].hosts[0].previous_version = None;
        let facts = observed(&[
            ("a", changed(Some(InstanceState::Running))),
            ("b", changed(Some(InstanceState::Failed))),
        ]);
        let step = next_rollback_step(&record, &facts);
        let RollbackStep::Send(batch) = step else {
            panic!("{step:?}")
        };
        assert_eq!(batch.hosts, ["b"], "the failed host first");
        assert_eq!(
            batch.restore["b"], None,
            "b ran no web before: it is taken away"
        );
        assert!(batch.line.contains("down already"), "{}", batch.line);
        // b is back: a goes, to 1.0 as its deployment gave it, under this rollout.
        record.waves[1].hosts[0].rollback = Some(RollbackMark::Sent);
        record.waves[1].hosts[0].result = RolledBack;
        let RollbackStep::Send(batch) = next_rollback_step(&record, &facts) else {
            panic!()
        };
        let a = batch.restore["a"].as_ref().expect("a goes back to 1.0");
        assert_eq!(
            (a.version.as_str(), a.rollout_id.as_str(), a.generation),
            ("1.0", "r1", 7)
        );
        assert_eq!(a.deployment.as_deref(), Some("web|env=prod"));
        assert!(!a.run_release_hook);
        assert!(batch.line.contains("--max-unavailable 1"), "{}", batch.line);
    }

    #[test]
    fn sending_back_is_recorded_with_the_desired_state() {
        let host = |rollout: &str| HostRecord {
            name: "a".into(),
            labels: Default::default(),
            advertise_addr: String::new(),
            registered_unix_ms: 0,
            last_seen_unix_ms: 0,
            desired: [("web".to_string(), desired("2.0", rollout, None))].into(),
            drain: None,
            agent: Default::default(),
        };
        let back = desired("1.0", "r1", Some("web|env=prod"));
        // (host's desired now is this rollout's, what it goes back to) -> (desired after, mark)
        for (ours, restore, expect_version, expect_mark) in [
            (true, Some(&back), Some("1.0"), RollbackMark::Sent),
            (true, None, None, RollbackMark::Sent),
            // A later change took it over under the host lock: left alone.
            (false, Some(&back), Some("2.0"), RollbackMark::NotBack),
        ] {
            let mut record = record(&[&[("a", Passed)]]);
            let mut host = host(if ours { "r1" } else { "r2" });
            send_back(&mut record, &mut host, restore);
            assert_eq!(
                host.desired.get("web").map(|d| d.version.as_str()),
                expect_version
            );
            assert_eq!(record.waves[0].hosts[0].rollback, Some(expect_mark));
        }
    }

    #[test]
    fn when_a_host_is_settled() {
        use InstanceState::{Checking, Failed as InstFailed, Running, Stopped};
        let lost = HostFacts {
            lost_for_secs: Some(30),
            ..up()
        };
        let running = |state: InstanceState, version: &str, rollout: &str| HostFacts {
            instance: Some(instance(state, version, rollout)),
            ..up()
        };
        // (what it ran before, facts now) -> (result, mark, line, settled)
        type Row<'a> = (
            Option<&'a str>,
            HostFacts,
            HostResult,
            RollbackMark,
            Option<&'a str>,
            bool,
        );
        let rows: Vec<Row> = vec![
            (
                Some("1.0"),
                running(Running, "1.0", "r1"),
                RolledBack,
                RollbackMark::Sent,
                Some("a is back on 1.0"),
                true,
            ),
            // Still on the new release, or on its way back.
            (Some("1.0"), running(Running, "2.0", "r1"), Failed, RollbackMark::Sent, None, false),
            (Some("1.0"), running(Checking, "1.0", "r1"), Failed, RollbackMark::Sent, None, false),
            // An instance of 1.0 from before this rollout is not the way back.
            (Some("1.0"), running(Running, "1.0", "r0"), Failed, RollbackMark::Sent, None, false),
            // The way back failed: not back, and the rollback goes on.
            (
                Some("1.0"),
                running(InstFailed, "1.0", "r1"),
                Failed,
                RollbackMark::NotBack,
                Some("a did not come back: 1.0 failed there too (exit status 1); the rollback goes on"),
                true,
            ),
            // It ran nothing before: back once the app stopped or is gone.
            (None, up(), RolledBack, RollbackMark::Sent, Some("a is back on nothing"), true),
            (
                None,
                running(Stopped, "2.0", "r1"),
                RolledBack,
                RollbackMark::Sent,
                Some("a is back on nothing"),
                true,
            ),
            (None, running(Running, "2.0", "r1"), Failed, RollbackMark::Sent, None, false),
            // Lost: it cannot confirm; it goes back when it returns.
            (
                Some("1.0"),
                lost,
                Failed,
                RollbackMark::Lost,
                Some("a is lost: it goes back when it returns"),
                true,
            ),
        ];
        for (previous, facts, result, mark, line, settled) in rows {
            let mut record = record(&[&[("a", Failed)]]);
            let entry = &mut record.waves[0].hosts[0];
            entry.previous_version = previous.map(str::to_string);
            entry.message = "exit status 1".into();
            entry.rollback = Some(RollbackMark::Sent);
            let observed = Observed {
                hosts: [("a".to_string(), facts.clone())].into(),
            };
            let progress = note_rollback_progress(&mut record, &observed);
            assert_eq!(record.waves[0].hosts[0].result, result, "{facts:?}");
            assert_eq!(record.waves[0].hosts[0].rollback, Some(mark), "{facts:?}");
            assert_eq!(
                progress.lines,
                line.into_iter().collect::<Vec<_>>(),
                "{facts:?}"
            );
            assert_eq!(progress.all_back, settled, "{facts:?}");
            // A host once settled is not looked at again.
            let again = note_rollback_progress(&mut record, &observed);
            if settled {
                assert!(again.lines.is_empty() && again.all_back, "{facts:?}");
            }
        }
        // A host not sent back yet is not waited on.
        let mut record = record(&[&[("a", Passed)]]);
        let progress = note_rollback_progress(&mut record, &Observed::default());
        assert!(progress.all_back && progress.lines.is_empty());
    }

    #[test]
    fn a_batch_past_its_deadline_is_left_behind_and_said() {
        let mut record = record(&[&[("a", Failed), ("b", Passed), ("c", Passed)]]);
        for entry in &mut record.waves[0].hosts {
            entry.previous_version = Some("1.0".into());
            entry.message = "exit status 1".into();
        }
        record.waves[0].hosts[0].rollback = Some(RollbackMark::Sent);
        record.waves[0].hosts[0].result = RolledBack;
        record.waves[0].hosts[1].rollback = Some(RollbackMark::Sent);
        assert_eq!(rollback_deadline_passed(&mut record), ["b"]);
        assert_eq!(
            record.waves[0].hosts[1].rollback,
            Some(RollbackMark::NotBack)
        );
        assert_eq!(
            record.waves[0].hosts[1].message,
            "exit status 1 (not back on 1.0 before the deadline)"
        );
        assert_eq!(
            rollback_end_note(&record).as_deref(),
            Some("; rollback did not finish on b: check `fleetctl status web`")
        );
        // Lost hosts go back when they return: not named as unfinished.
        record.waves[0].hosts[1].rollback = Some(RollbackMark::Lost);
        assert_eq!(rollback_end_note(&record), None);
    }

    #[test]
    fn a_restarted_controller_goes_on_with_a_rollback() {
        // (a wave failed, auto-rollback, state) -> rolling back
        for (failed, auto, state, expect) in [
            (true, true, RolloutState::Running, true),
            (false, true, RolloutState::Running, false),
            (true, false, RolloutState::Running, false),
            (true, true, RolloutState::RolledBack, false),
            (true, true, RolloutState::Paused, false),
        ] {
            let mut record = record(&[&[("a", Failed)]]);
            if failed {
                record.waves[0].state = WaveState::Failed;
            }
            record.policy.auto_rollback = auto;
            record.state = state;
            assert_eq!(
                is_rolling_back(&record),
                expect,
                "{failed} {auto} {state:?}"
            );
        }
    }
}
