//! The rollout engine's decisions as plain functions, Nomad's plan/apply split: the executor
//! (`rollout::Executor`) gathers facts about the hosts from `FleetState` into [`Observed`],
//! calls a step with the rollout record, and carries out what the step returns (store writes,
//! events, progress lines, waits). A step changes the record it is given (the rollout's state
//! is the record) and returns the actions; it does no I/O and reads no clock (the time comes in
//! as a value), so each rule is a row of a table test.
//!
//! - `start`: which hosts of a wave take the release, are skipped or fail before anything
//!   changes, which one runs the release hook, what each host ran before; and how a wave fits
//!   the unavailability budget.
//! - `wait`: how a host of a wave stands, whether a host that passed went down since, and the
//!   wave's deadline.
//! - `settle`: what a wave's end means (widen, pause after the canary, succeed, halt and roll
//!   back) and what a rollout that succeeded leaves.
//! - `rollback`: which hosts go back to which release, in which batches (those already down
//!   first, then at most the budget at a time), and when each is back or left behind.

mod rollback;
mod settle;
mod start;
mod wait;

pub use rollback::{
    is_rolling_back, next_rollback_step, note_rollback_progress, rollback_deadline_passed,
    rollback_end_note, send_back, RollbackBatch, RollbackProgress, RollbackStep,
};
pub use settle::{settle_wave, succeed, wave_verdict, WaveEnd, WaveVerdict};
pub use start::{
    explicit_budget, fit_wave, give_release, outside_wave, start_wave, wave_budget_spent, FitWave,
    WaveStart,
};
pub use wait::{
    host_outcome, observe_wave, wave_deadline_passed, went_down_after_passing, HostOutcome,
    WaveProgress,
};

use crate::fleet_state::InstanceStatus;
use crate::model::{Desired, RolloutRecord};
use std::collections::BTreeMap;

/// What the controller knows of one host of a rollout, as the executor gathered it.
#[derive(Debug, Clone, Default)]
pub struct HostFacts {
    /// Its instance of the app, as last reported (while connected).
    pub instance: Option<InstanceStatus>,
    /// Whether the host is still registered (not removed).
    pub registered: bool,
    pub drained: bool,
    /// How long nothing was heard from it, when it counts as lost.
    pub lost_for_secs: Option<i64>,
    /// Its desired release of the app now, if it has one.
    pub desired: Option<Desired>,
    /// Whether its agent holds a session now.
    pub connected: bool,
}

/// What a host nobody observed counts as: removed.
const UNREGISTERED: HostFacts = HostFacts {
    instance: None,
    registered: false,
    drained: false,
    lost_for_secs: None,
    desired: None,
    connected: false,
};

/// The facts a step decides from: the hosts it looks at, by name. Each step says which hosts
/// and which of their facts it reads; a host left out counts as removed.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub hosts: BTreeMap<String, HostFacts>,
}

impl Observed {
    /// The facts about `host`; those of a removed host when nobody observed it.
    pub fn host(&self, host: &str) -> &HostFacts {
        self.hosts.get(host).unwrap_or(&UNREGISTERED)
    }
}

/// Whether wave `idx` is the canary: the first wave of a rollout that asked for one (a
/// rollback has none).
pub fn is_canary(record: &RolloutRecord, idx: usize) -> bool {
    idx == 0 && record.policy.canary > 0 && !record.is_rollback
}

/// How wave `idx` is named in progress lines and messages: `canary (wave 1/3)`, `wave 2/3`.
pub fn wave_label(record: &RolloutRecord, idx: usize) -> String {
    let n = record.waves.len();
    if is_canary(record, idx) {
        format!("canary (wave 1/{n})")
    } else {
        format!("wave {}/{n}", idx + 1)
    }
}

/// Plain values to build the tables of the steps' tests from.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::HostFacts;
    use crate::fleet_state::InstanceStatus;
    use crate::model::{
        Batch, Desired, HostResult, RolloutPolicy, RolloutRecord, RolloutState, Wave, WaveHost,
        WaveState,
    };
    use fleet_proto::instance_state::InstanceState;

    /// Rollout `r1` of web@2.0 (seq 7) with one wave per entry of `waves`, each host
    /// `(name, result)`, canary 1, auto-rollback on.
    pub fn record(waves: &[&[(&str, HostResult)]]) -> RolloutRecord {
        RolloutRecord {
            id: "r1".into(),
            app: "web".into(),
            version: "2.0".into(),
            state: RolloutState::Running,
            started_by: "ci".into(),
            started_unix_ms: 0,
            finished_unix_ms: 0,
            waves: waves
                .iter()
                .map(|hosts| Wave {
                    hosts: hosts
                        .iter()
                        .map(|(host, result)| WaveHost {
                            host: host.to_string(),
                            previous_version: None,
                            previous_deployment: None,
                            rollback: None,
                            result: *result,
                            message: String::new(),
                        })
                        .collect(),
                    state: WaveState::Pending,
                })
                .collect(),
            current_wave: 0,
            message: String::new(),
            policy: RolloutPolicy {
                selector: [("env".to_string(), "prod".to_string())].into(),
                canary: 1,
                batch: Batch::Percent(25),
                pause_after_canary_ms: 0,
                smoke_timeout_ms: 0,
                auto_rollback: true,
                skip_lost: false,
                min_healthy_ms: None,
                max_unavailable: None,
            },
            is_rollback: false,
            seq: 7,
            hold_until_unix_ms: 0,
            max_unavailable: 0,
            unavailable_at_start: Vec::new(),
        }
    }

    /// An instance of web at `version` for rollout `rollout`.
    pub fn instance(state: InstanceState, version: &str, rollout: &str) -> InstanceStatus {
        InstanceStatus {
            app: "web".into(),
            version: version.into(),
            state,
            message: "exit status 1".into(),
            since_unix_ms: 0,
            restarts: 0,
            rollout_id: rollout.into(),
        }
    }

    /// A registered, connected host that is neither drained nor lost.
    pub fn up() -> HostFacts {
        HostFacts {
            registered: true,
            connected: true,
            ..HostFacts::default()
        }
    }

    /// web at `version`, given by deployment `deployment` (if any) through rollout `rollout`.
    pub fn desired(version: &str, rollout: &str, deployment: Option<&str>) -> Desired {
        Desired {
            version: version.into(),
            rollout_id: rollout.into(),
            generation: 3,
            smoke_timeout_ms: 0,
            run_release_hook: false,
            min_healthy_ms: None,
            deployment: deployment.map(str::to_string),
        }
    }
}
