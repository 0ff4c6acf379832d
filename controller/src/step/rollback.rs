//! Rolling a halted rollout back: which hosts it changed, which release each goes back to,
//! and when each is back (or lost, and goes back when it returns).

use super::Observed;
use crate::model::{Desired, HostResult, RolloutRecord};
use fleet_proto::instance_state::InstanceState;
use std::collections::BTreeMap;

/// What rolling back asks of the executor.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RollbackPlan {
    /// Each host the rollout changed, as (wave, host) indexes into the record, in wave order.
    pub touched: Vec<(usize, usize)>,
    /// Their names, in the same order.
    pub hosts: Vec<String>,
    /// What each goes back to: the desired release it had before, as it was given (by a
    /// deployment or not), handed out again under this rollout; or `None`: it ran no release
    /// of the app before, which is taken away.
    pub restore: BTreeMap<String, Option<Desired>>,
}

/// Plans the rollback of `record` from each of its hosts' desired release of the app now: the
/// hosts it changed are those whose desired release is still its own (a host that failed
/// before it was changed, lost say, has nothing to undo; one a later change took over is not
/// this rollout's any more). Reads each host's `desired`.
pub fn plan_rollback(record: &RolloutRecord, observed: &Observed) -> RollbackPlan {
    let mut plan = RollbackPlan::default();
    for (w_idx, wave) in record.waves.iter().enumerate() {
        for (h_idx, entry) in wave.hosts.iter().enumerate() {
            let changed = observed
                .host(&entry.host)
                .desired
                .as_ref()
                .is_some_and(|d| d.rollout_id == record.id);
            if !changed {
                continue;
            }
            plan.touched.push((w_idx, h_idx));
            plan.hosts.push(entry.host.clone());
            let back = entry.previous_version.clone().map(|version| Desired {
                version,
                rollout_id: record.id.clone(),
                generation: record.seq,
                smoke_timeout_ms: 0,
                run_release_hook: false,
                min_healthy_ms: None,
                deployment: entry.previous_deployment.clone(),
            });
            plan.restore.insert(entry.host.clone(), back);
        }
    }
    plan
}

/// What one look at the hosts going back found.
#[derive(Debug, Clone, PartialEq)]
pub struct RollbackProgress {
    /// A line for each host now back, or found lost.
    pub lines: Vec<String>,
    /// Every host is back or lost: nothing more to wait for.
    pub all_back: bool,
}

/// One look at the hosts a rollback waits on (`touched`, from [`plan_rollback`]): a host runs
/// its previous release again for this rollout (or, having none, has stopped the app) is
/// rolled back; a lost one cannot confirm, gets its previous release when it returns, and joins
/// `lost_hosts`. Reads whether each host is lost, and its instance.
pub fn note_rollback_progress(
    record: &mut RolloutRecord,
    touched: &[(usize, usize)],
    lost_hosts: &mut Vec<String>,
    observed: &Observed,
) -> RollbackProgress {
    let app = record.app.clone();
    let rollout_id = record.id.clone();
    let mut lines = Vec::new();
    let mut all_back = true;
    for &(w, h) in touched {
        let entry = &mut record.waves[w].hosts[h];
        if entry.result == HostResult::RolledBack || lost_hosts.contains(&entry.host) {
            continue;
        }
        let facts = observed.host(&entry.host);
        if facts.lost_for_secs.is_some() {
            entry.message = format!(
                "{} (lost: goes back to {} when it returns)",
                entry.message,
                entry.previous_version.as_deref().unwrap_or("nothing")
            );
            lines.push(format!(
                "{} is lost: it goes back when it returns",
                entry.host
            ));
            lost_hosts.push(entry.host.clone());
            continue;
        }
        let instance = facts.instance.as_ref();
        let back = match &entry.previous_version {
            Some(version) => instance.is_some_and(|i| {
                &i.version == version
                    && i.rollout_id == rollout_id
                    && i.state == InstanceState::Running
            }),
            None => instance
                .is_none_or(|i| matches!(i.state, InstanceState::Stopped | InstanceState::Failed)),
        };
        if !back {
            all_back = false;
            continue;
        }
        entry.result = HostResult::RolledBack;
        entry.message = match &entry.previous_version {
            Some(v) => format!("{} (rolled back to {v})", entry.message),
            None => format!(
                "{} (rolled back: {app} stopped, it ran no earlier release)",
                entry.message
            ),
        };
        lines.push(format!(
            "{} is back on {}",
            entry.host,
            entry.previous_version.as_deref().unwrap_or("nothing")
        ));
    }
    RollbackProgress { lines, all_back }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::step::fixtures::{desired, instance, record, up};
    use crate::step::HostFacts;
    use HostResult::*;

    #[test]
    fn a_rollback_puts_back_what_the_rollout_changed() {
        let mut record = record(&[
            &[("a", Passed)],
            &[("b", Failed), ("c", Failed), ("d", Pending), ("e", Passed)],
        ]);
        record.waves[0].hosts[0].previous_version = Some("1.0".into());
        record.waves[0].hosts[0].previous_deployment = Some("web|env=prod".into());
        record.waves[1].hosts[0].previous_version = None;
        // a: changed, ran 1.0 by a deployment; b: changed, ran nothing; c: lost before it was
        // changed (still on what it ran); d: never started; e: a later rollout took it over.
        let on = |rollout: &str| HostFacts {
            desired: Some(desired("2.0", rollout, None)),
            ..up()
        };
        let observed = Observed {
            hosts: [
                ("a", on("r1")),
                ("b", on("r1")),
                ("c", on("r0")),
                ("d", up()),
                ("e", on("r2")),
            ]
            .into_iter()
            .map(|(n, f)| (n.to_string(), f))
            .collect(),
        };
        let plan = plan_rollback(&record, &observed);
        assert_eq!(plan.touched, [(0, 0), (1, 0)]);
        assert_eq!(plan.hosts, ["a", "b"]);
        let a = plan.restore["a"].as_ref().expect("a goes back to 1.0");
        assert_eq!(
            (a.version.as_str(), a.rollout_id.as_str(), a.generation),
            ("1.0", "r1", 7)
        );
        assert_eq!(a.deployment.as_deref(), Some("web|env=prod"));
        assert!(!a.run_release_hook);
        assert_eq!(
            plan.restore["b"], None,
            "b ran no web before: it is taken away"
        );
        // Nothing changed: nothing to put back.
        let plan = plan_rollback(&record, &Observed::default());
        assert!(plan.touched.is_empty() && plan.restore.is_empty());
    }

    #[test]
    fn when_a_host_is_back() {
        use InstanceState::{Checking, Running, Stopped};
        let lost = HostFacts {
            lost_for_secs: Some(30),
            ..up()
        };
        let running = |state: InstanceState, version: &str, rollout: &str| HostFacts {
            instance: Some(instance(state, version, rollout)),
            ..up()
        };
        // (what it ran before, facts now) -> (result, line, settled)
        type Row<'a> = (
            Option<&'a str>,
            HostFacts,
            HostResult,
            Option<&'a str>,
            bool,
        );
        let rows: Vec<Row> = vec![
            (
                Some("1.0"),
                running(Running, "1.0", "r1"),
                RolledBack,
                Some("a is back on 1.0"),
                true,
            ),
            // Still on the new release, or on its way back.
            (
                Some("1.0"),
                running(Running, "2.0", "r1"),
                Failed,
                None,
                false,
            ),
            (
                Some("1.0"),
                running(Checking, "1.0", "r1"),
                Failed,
                None,
                false,
            ),
            // An instance of 1.0 from before this rollout is not the way back.
            (
                Some("1.0"),
                running(Running, "1.0", "r0"),
                Failed,
                None,
                false,
            ),
            // It ran nothing before: back once the app stopped or is gone.
            (None, up(), RolledBack, Some("a is back on nothing"), true),
            (
                None,
                running(Stopped, "2.0", "r1"),
                RolledBack,
                Some("a is back on nothing"),
                true,
            ),
            (None, running(Running, "2.0", "r1"), Failed, None, false),
            // Lost: it cannot confirm; it goes back when it returns.
            (
                Some("1.0"),
                lost,
                Failed,
                Some("a is lost: it goes back when it returns"),
                true,
            ),
        ];
        for (previous, facts, result, line, settled) in rows {
            let mut record = record(&[&[("a", Failed)]]);
            record.waves[0].hosts[0].previous_version = previous.map(str::to_string);
            record.waves[0].hosts[0].message = "exit status 1".into();
            let observed = Observed {
                hosts: [("a".to_string(), facts.clone())].into(),
            };
            let mut lost_hosts = Vec::new();
            let progress =
                note_rollback_progress(&mut record, &[(0, 0)], &mut lost_hosts, &observed);
            assert_eq!(record.waves[0].hosts[0].result, result, "{facts:?}");
            assert_eq!(
                progress.lines,
                line.into_iter().collect::<Vec<_>>(),
                "{facts:?}"
            );
            assert_eq!(progress.all_back, settled, "{facts:?}");
            assert_eq!(lost_hosts.len(), usize::from(facts.lost_for_secs.is_some()));
            // A host once settled is not looked at again.
            let again = note_rollback_progress(&mut record, &[(0, 0)], &mut lost_hosts, &observed);
            if settled {
                assert!(again.lines.is_empty() && again.all_back, "{facts:?}");
            }
        }
        // What the record says of a host back, or lost.
        let mut record = record(&[&[("a", Failed), ("b", Failed)]]);
        for entry in &mut record.waves[0].hosts {
            entry.previous_version = Some("1.0".into());
            entry.message = "exit status 1".into();
        }
        let observed = Observed {
            hosts: [
                ("a".to_string(), running(Running, "1.0", "r1")),
                (
                    "b".to_string(),
                    HostFacts {
                        lost_for_secs: Some(1),
                        ..up()
                    },
                ),
            ]
            .into(),
        };
        note_rollback_progress(&mut record, &[(0, 0), (0, 1)], &mut Vec::new(), &observed);
        assert_eq!(
            record.waves[0].hosts[0].message,
            "exit status 1 (rolled back to 1.0)"
        );
        assert_eq!(
            record.waves[0].hosts[1].message,
            "exit status 1 (lost: goes back to 1.0 when it returns)"
        );
    }
}
