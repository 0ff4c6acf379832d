//! Conversions between domain records and the generated wire types, in one place.

use crate::fleet_state::{Assignment, FleetState, InstanceStatus};
use crate::model::{ConvergenceRecord, EventRecord, HostRecord, ReleaseRecord, RolloutRecord};
use fleet_proto::instance_state::InstanceState;
use fleet_proto::pb;

pub fn release(r: &ReleaseRecord) -> pb::Release {
    pb::Release {
        app: r.app.clone(),
        version: r.version.clone(),
        artifact_digest: r.artifact_digest.clone(),
        artifact_size: r.artifact_size,
        env: r.env.clone().into_iter().collect(),
        secrets: r.secrets.masked().into_iter().collect(),
        created_unix_ms: r.created_unix_ms,
        created_by: r.created_by.clone(),
    }
}

pub fn instance(i: &InstanceStatus) -> pb::InstanceReport {
    let mut report = pb::InstanceReport {
        app: i.app.clone(),
        version: i.version.clone(),
        message: i.message.clone(),
        since_unix_ms: i.since_unix_ms,
        restarts: i.restarts,
        rollout_id: i.rollout_id.clone(),
        ..Default::default()
    };
    i.state.write_to(&mut report);
    report
}

/// Checks and converts an instance report from an agent.
pub fn instance_from(r: pb::InstanceReport) -> Result<InstanceStatus, String> {
    fleet_proto::names::check_app(&r.app).map_err(|e| e.to_string())?;
    fleet_proto::names::check_version(&r.version).map_err(|e| e.to_string())?;
    let state = InstanceState::from_report(&r).ok_or_else(|| {
        format!(
            "instance state {} ({}) is unknown",
            r.state,
            fleet_proto::names::quoted(&r.legacy_state)
        )
    })?;
    let mut message = r.message;
    if message.len() > 4096 {
        let mut cut = 4096;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    Ok(InstanceStatus {
        app: r.app,
        version: r.version,
        state,
        message,
        since_unix_ms: r.since_unix_ms,
        restarts: r.restarts,
        rollout_id: r.rollout_id.chars().take(64).collect(),
    })
}

pub fn assignment(a: &Assignment) -> pb::Assignment {
    pb::Assignment {
        app: a.app.clone(),
        version: a.version.clone(),
        artifact_digest: a.artifact_digest.clone(),
        artifact_size: a.artifact_size,
        env: a.env.clone().into_iter().collect(),
        secrets: a.secrets.0.clone().into_iter().collect(),
        rollout_id: a.rollout_id.clone(),
        generation: a.generation,
        smoke_timeout_ms: a.smoke_timeout_ms,
        run_release_hook: a.run_release_hook,
        min_healthy_ms: a.min_healthy_ms,
        unpacked_size: a.unpacked_size,
    }
}

/// A host as `hosts` and `status` show it: desired releases joined with live reports.
/// The most hosts a status lists; a larger fleet gets its summary (and `hosts` pages).
pub const STATUS_LISTS_HOSTS_UP_TO: usize = 100;

/// Hosts counted by state and by what they run of each app. Pure.
pub fn summary(hosts: &[pb::Host]) -> pb::StatusSummary {
    use std::collections::BTreeMap;
    let mut by_state: BTreeMap<String, u32> = BTreeMap::new();
    let mut apps: BTreeMap<(String, String, String, String), u32> = BTreeMap::new();
    let mut connected = 0;
    for host in hosts {
        *by_state.entry(host.state.clone()).or_default() += 1;
        connected += u32::from(host.connected);
        for app in &host.apps {
            let (version, state) = match &app.actual {
                Some(actual) => (
                    actual.version.clone(),
                    InstanceState::from_report(actual)
                        .map(|s| s.as_str().to_string())
                        .unwrap_or_default(),
                ),
                None => Default::default(),
            };
            *apps
                .entry((app.app.clone(), app.desired_version.clone(), version, state))
                .or_default() += 1;
        }
    }
    pb::StatusSummary {
        hosts: hosts.len() as u32,
        connected,
        by_state: by_state.into_iter().collect(),
        apps: apps
            .into_iter()
            .map(
                |((app, desired_version, version, state), hosts)| pb::StatusCount {
                    app,
                    desired_version,
                    version,
                    state,
                    hosts,
                },
            )
            .collect(),
    }
}

/// One page of `hosts` (in name order): at most `limit` (0: no limit) of those named after
/// `after` (empty: from the first), and the `after` of the next page (empty: this is the
/// last). Pure.
pub fn page<'a>(hosts: &'a [HostRecord], limit: u32, after: &str) -> (&'a [HostRecord], String) {
    let start = if after.is_empty() {
        0
    } else {
        hosts.partition_point(|h| h.name.as_str() <= after)
    };
    let rest = &hosts[start..];
    if limit == 0 || rest.len() <= limit as usize {
        return (rest, String::new());
    }
    let page = &rest[..limit as usize];
    (
        page,
        page.last().map(|h| h.name.clone()).unwrap_or_default(),
    )
}

pub fn host(fleet: &FleetState, h: &HostRecord, only_app: Option<&str>) -> pb::Host {
    let connected = fleet.is_connected(&h.name);
    let instances = fleet.instances(&h.name);
    let mut apps: Vec<String> = h.desired.keys().chain(instances.keys()).cloned().collect();
    apps.sort();
    apps.dedup();
    pb::Host {
        name: h.name.clone(),
        labels: h.labels.clone().into_iter().collect(),
        advertise_addr: h.advertise_addr.clone(),
        state: fleet.host_state(h).as_str().to_string(),
        connected,
        last_seen_unix_ms: fleet.last_seen(&h.name).unwrap_or(h.last_seen_unix_ms),
        agent_version: h.agent.version.clone(),
        agent_arch: h.agent.arch.clone(),
        // Filled in by `certificates::fill_certificate_expiry` where the trust is at hand.
        certificate_not_after_unix_ms: 0,
        apps: apps
            .into_iter()
            .filter(|app| only_app.is_none_or(|only| only == app))
            .map(|app| pb::HostApp {
                desired_version: h
                    .desired
                    .get(&app)
                    .map(|d| d.version.clone())
                    .unwrap_or_default(),
                actual: instances.get(&app).map(instance),
                app,
            })
            .collect(),
    }
}

pub fn convergence(c: &ConvergenceRecord) -> pb::Convergence {
    pb::Convergence {
        id: c.id.clone(),
        app: c.app.clone(),
        host: c.host.clone(),
        from_version: c.from_version.clone().unwrap_or_default(),
        to_version: c.to_version.clone().unwrap_or_default(),
        deployment: c.deployment.clone(),
        why: c.why.clone(),
        actor: c.actor.clone(),
        started_unix_ms: c.started_unix_ms,
        finished_unix_ms: c.finished_unix_ms,
        result: c.result.as_str().to_string(),
        message: c.message.clone(),
    }
}

pub fn rollout(r: &RolloutRecord) -> pb::Rollout {
    pb::Rollout {
        id: r.id.clone(),
        app: r.app.clone(),
        version: r.version.clone(),
        state: r.state.as_str().to_string(),
        started_by: r.started_by.clone(),
        started_unix_ms: r.started_unix_ms,
        finished_unix_ms: r.finished_unix_ms,
        waves: r
            .waves
            .iter()
            .map(|w| pb::Wave {
                state: w.state.as_str().to_string(),
                hosts: w
                    .hosts
                    .iter()
                    .map(|h| pb::WaveHost {
                        host: h.host.clone(),
                        previous_version: h.previous_version.clone().unwrap_or_default(),
                        result: h.result.as_str().to_string(),
                        message: h.message.clone(),
                    })
                    .collect(),
            })
            .collect(),
        current_wave: r.current_wave as u32,
        message: r.message.clone(),
        hold_until_unix_ms: r.hold_until_unix_ms,
        max_unavailable: r.max_unavailable,
        unavailable_at_start: r.unavailable_at_start.clone(),
        request: Some(pb::StartRolloutRequest {
            app: r.app.clone(),
            version: r.version.clone(),
            selector: r.policy.selector.clone().into_iter().collect(),
            canary: r.policy.canary,
            batch: r.policy.batch.to_text(),
            pause_after_canary_ms: r.policy.pause_after_canary_ms,
            smoke_timeout_ms: r.policy.smoke_timeout_ms,
            no_auto_rollback: !r.policy.auto_rollback,
            detach: false,
            dry_run: false,
            skip_lost: r.policy.skip_lost,
            min_healthy_ms: r.policy.min_healthy_ms,
            max_unavailable: r
                .policy
                .max_unavailable
                .map(|b| b.to_text())
                .unwrap_or_default(),
        }),
        is_rollback: r.is_rollback,
    }
}

pub fn event(e: &EventRecord) -> pb::Event {
    pb::Event {
        seq: e.seq,
        unix_ms: e.unix_ms,
        actor: e.actor.clone(),
        kind: e.kind.clone(),
        app: e.app.clone(),
        host: e.host.clone(),
        message: e.message.clone(),
    }
}

pub fn deployment(r: &crate::converge::DeploymentReport) -> pb::Deployment {
    let d = &r.deployment;
    pb::Deployment {
        app: d.app.clone(),
        selector: d.selector.clone().into_iter().collect(),
        version: d.version.clone(),
        rollout_id: d.rollout_id.clone(),
        updated_unix_ms: d.updated_unix_ms,
        updated_by: d.updated_by.clone(),
        hosts_matching: r.hosts_matching,
        hosts_on_release: r.hosts_on_release,
        hosts_healthy: r.hosts_healthy,
        drift: r
            .drift
            .iter()
            .map(|(host, why)| pb::Drift {
                host: host.clone(),
                why: why.clone(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str) -> HostRecord {
        HostRecord {
            name: name.into(),
            labels: Default::default(),
            advertise_addr: "127.0.0.2".into(),
            registered_unix_ms: 0,
            last_seen_unix_ms: 0,
            desired: Default::default(),
            drain: None,
            agent: Default::default(),
        }
    }

    #[test]
    fn hosts_come_in_pages() {
        let hosts: Vec<HostRecord> = ["a", "b", "c", "d", "e"].map(record).into();
        let names = |page: &[HostRecord]| {
            page.iter()
                .map(|h| h.name.clone())
                .collect::<Vec<_>>()
                .join(",")
        };
        // (limit, after) -> (names on the page, next after)
        let table: &[(u32, &str, &str, &str)] = &[
            (0, "", "a,b,c,d,e", ""),
            (2, "", "a,b", "b"),
            (2, "b", "c,d", "d"),
            (2, "d", "e", ""),
            (5, "", "a,b,c,d,e", ""),
            (3, "bb", "c,d,e", ""),
            (2, "z", "", ""),
        ];
        for &(limit, after, expected, next) in table {
            let (page, next_after) = page(&hosts, limit, after);
            assert_eq!(
                (names(page).as_str(), next_after.as_str()),
                (expected, next),
                "limit {limit}, after {after:?}"
            );
        }
    }

    #[test]
    fn a_summary_counts_hosts_by_state_and_by_what_they_run() {
        let host = |name: &str,
                    state: &str,
                    connected: bool,
                    actual: Option<(&str, pb::InstanceState)>| pb::Host {
            name: name.into(),
            state: state.into(),
            connected,
            apps: vec![pb::HostApp {
                app: "web".into(),
                desired_version: "2".into(),
                actual: actual.map(|(version, state)| {
                    let mut r = pb::InstanceReport {
                        app: "web".into(),
                        version: version.into(),
                        ..Default::default()
                    };
                    r.set_state(state);
                    r
                }),
            }],
            ..Default::default()
        };
        let summary = summary(&[
            host("a", "ready", true, Some(("2", pb::InstanceState::Running))),
            host("b", "ready", true, Some(("2", pb::InstanceState::Running))),
            host("c", "ready", true, Some(("1", pb::InstanceState::Failed))),
            host("d", "lost", false, None),
        ]);
        assert_eq!((summary.hosts, summary.connected), (4, 3));
        assert_eq!(summary.by_state["ready"], 3);
        assert_eq!(summary.by_state["lost"], 1);
        let counts: Vec<(String, String, String, u32)> = summary
            .apps
            .iter()
            .map(|c| {
                (
                    c.desired_version.clone(),
                    c.version.clone(),
                    c.state.clone(),
                    c.hosts,
                )
            })
            .collect();
        assert_eq!(
            counts,
            vec![
                ("2".into(), "".into(), "".into(), 1),
                ("2".into(), "1".into(), "failed".into(), 1),
                ("2".into(), "2".into(), "running".into(), 2),
            ]
        );
    }

    fn report(state: Option<pb::InstanceState>, legacy: &str) -> pb::InstanceReport {
        let mut report = pb::InstanceReport {
            app: "web".into(),
            version: "1.0.0".into(),
            legacy_state: legacy.into(),
            ..Default::default()
        };
        if let Some(state) = state {
            report.set_state(state);
        }
        report
    }

    #[test]
    fn reads_the_state_enum_and_the_text_of_agents_one_version_behind() {
        let newer = instance_from(report(Some(pb::InstanceState::Running), "")).unwrap();
        assert_eq!(newer.state, InstanceState::Running);
        let older = instance_from(report(None, "crashed")).unwrap();
        assert_eq!(older.state, InstanceState::Crashed);
        assert!(instance_from(report(None, "exploded")).is_err());
        assert!(instance_from(report(None, "")).is_err());
        // What the controller sends back names the state both ways.
        let wire = instance(&older);
        assert_eq!(wire.state(), pb::InstanceState::Crashed);
        assert_eq!(wire.legacy_state, "crashed");
    }
}
