//! One unavailability budget for a rollout (`--max-unavailable N|P%`): at no moment are more of
//! the selected hosts without a healthy instance of the app than that, counting drained, lost
//! and failed hosts and hosts on their way to a release. Plain functions; the executor asks
//! them before each wave and shrinks the wave to what the budget leaves.

use crate::fleet_state::InstanceStatus;
use crate::model::{Batch, HostRecord};
use fleet_proto::instance_state::InstanceState;

/// Why a host that should serve `app` has no healthy instance of it right now, or `None` when
/// it has one or was never given the app (a host of a first rollout is not down: it never
/// served).
pub fn unavailable(
    host: &HostRecord,
    app: &str,
    instance: Option<&InstanceStatus>,
    lost: bool,
) -> Option<String> {
    if host.drain.is_some() {
        return Some("drained".to_string());
    }
    if !host.desired.contains_key(app) {
        return None;
    }
    if lost {
        return Some("lost".to_string());
    }
    match instance {
        None => Some("runs no instance of the app".to_string()),
        Some(i) if i.state == InstanceState::Running => None,
        Some(i) => Some(format!("{} {}", i.version, i.state)),
    }
}

/// The budget a rollout runs with: what was asked (`N` hosts, or `P%` of the `n_selected`
/// hosts, rounded up), or by default the batch size plus the hosts already unavailable when
/// it starts, so a default rollout behaves as it always did.
pub fn effective(
    requested: Option<Batch>,
    n_selected: usize,
    batch_hosts: usize,
    down_at_start: usize,
) -> usize {
    match requested {
        Some(Batch::Hosts(n)) => n as usize,
        Some(Batch::Percent(p)) => (n_selected * p as usize).div_ceil(100).max(1),
        None => batch_hosts + down_at_start,
    }
}

/// The budget of a deployment whose last rollout ran with `max_unavailable` (0 or `None` for
/// a rollout from before budgets, or one that is gone): the same, or 1.
pub fn default_budget(max_unavailable: Option<u32>) -> usize {
    max_unavailable.unwrap_or(0).max(1) as usize
}

/// How many more hosts may be taken down now, with `down` hosts already unavailable.
pub fn room(budget: usize, down: usize) -> usize {
    budget.saturating_sub(down)
}

/// What the budget lets a wave of `wave_len` hosts do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaveFit {
    /// Go, all of it.
    Whole,
    /// Go with the first this many hosts; the rest become the next wave.
    Shrink(usize),
    /// Nothing may go down now: wait for hosts to come back.
    Wait,
}

/// The wave's fit, with `down` selected hosts outside it unavailable. The canary is never
/// split (the pause after it, and its hook, belong to the whole of it): it waits instead.
pub fn fit(budget: usize, down: usize, wave_len: usize, is_canary: bool) -> WaveFit {
    let room = room(budget, down);
    if room >= wave_len {
        WaveFit::Whole
    } else if room == 0 || is_canary {
        WaveFit::Wait
    } else {
        WaveFit::Shrink(room)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_what_was_asked_or_the_batch_plus_what_is_down() {
        // (asked, selected, batch, down at start) -> budget
        for (asked, selected, batch, down, expect) in [
            (Some(Batch::Hosts(2)), 10, 3, 1, 2),
            (Some(Batch::Percent(25)), 10, 3, 1, 3),
            (Some(Batch::Percent(1)), 10, 3, 0, 1),
            (None, 10, 3, 1, 4),
            (None, 20, 5, 0, 5),
        ] {
            assert_eq!(effective(asked, selected, batch, down), expect, "{asked:?}");
        }
        for (budget, down, expect) in [(2, 1, 1), (2, 2, 0), (2, 5, 0), (4, 0, 4)] {
            assert_eq!(room(budget, down), expect);
        }
        // (budget, down outside the wave, wave size, is the canary) -> fit
        for (budget, down, len, canary, expect) in [
            (2, 0, 2, false, WaveFit::Whole),
            (2, 1, 2, false, WaveFit::Shrink(1)),
            (2, 2, 2, false, WaveFit::Wait),
            (2, 1, 2, true, WaveFit::Wait),
            (2, 1, 1, true, WaveFit::Whole),
            (5, 0, 3, true, WaveFit::Whole),
        ] {
            assert_eq!(
                fit(budget, down, len, canary),
                expect,
                "{budget} {down} {len} {canary}"
            );
        }
    }

    #[test]
    fn a_host_is_unavailable_unless_it_runs_the_app_healthy() {
        let host = |drained: bool| HostRecord {
            name: "h1".into(),
            labels: Default::default(),
            advertise_addr: "127.0.0.2".into(),
            registered_unix_ms: 0,
            last_seen_unix_ms: 0,
            desired: [(
                "web".to_string(),
                crate::model::Desired {
                    version: "1.0".into(),
                    rollout_id: "r1".into(),
                    generation: 1,
                    smoke_timeout_ms: 0,
                    run_release_hook: false,
                    min_healthy_ms: None,
                    deployment: None,
                },
            )]
            .into(),
            drain: drained.then(|| crate::model::DrainRecord {
                requested_by: "ann".into(),
                requested_unix_ms: 0,
                drained_unix_ms: None,
            }),
            agent: Default::default(),
        };
        let instance = |state| InstanceStatus {
            app: "web".into(),
            version: "1.0".into(),
            state,
            message: String::new(),
            since_unix_ms: 0,
            restarts: 0,
            rollout_id: String::new(),
        };
        let running = instance(InstanceState::Running);
        let starting = instance(InstanceState::Starting);
        assert_eq!(
            unavailable(&host(false), "web", Some(&running), false),
            None
        );
        assert_eq!(
            unavailable(&host(true), "web", Some(&running), false).as_deref(),
            Some("drained")
        );
        assert_eq!(
            unavailable(&host(false), "web", Some(&running), true).as_deref(),
            Some("lost")
        );
        assert_eq!(
            unavailable(&host(false), "web", Some(&starting), false).as_deref(),
            Some("1.0 starting")
        );
        assert!(unavailable(&host(false), "web", None, false).is_some());
        // A host never given the app (a first rollout's) is not down: it never served.
        assert_eq!(unavailable(&host(false), "api", None, false), None);
    }
}
