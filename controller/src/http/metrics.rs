//! `/metrics`: the controller's Prometheus metrics, encoded by `prometheus-client`.
//!
//! Two kinds. What the controller knows at any moment (hosts by state, connected agents,
//! instances, restarts, rollouts in progress) is read from `FleetState` at each scrape by
//! [`Snapshot`], so it can never drift from what `fleetctl status` shows. What happened over
//! time (rollouts ended, their and their waves' durations, failed smoke checks, artifact bytes
//! sent) is counted as it happens: by the observer, from the event log and the rollouts'
//! progress, and by the artifact stream ([`note_artifact_bytes_sent`]).

use crate::fleet_state::FleetState;
use crate::http::InProgress;
use crate::model::HostState;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Label pairs, in order.
pub type Labels = Vec<(String, String)>;

/// The content type of the exposition `prometheus-client` writes (OpenMetrics text, which
/// Prometheus reads).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Every metric name the controller exposes (without the `_total`, `_bucket`, … suffixes the
/// exposition adds), for the check that dashboards and alert rules name metrics that exist.
pub const METRIC_NAMES: &[&str] = &[
    "fleet_hosts",
    "fleet_agents_connected",
    "fleet_instances",
    "fleet_instance_restarts_total",
    "fleet_rollout_in_progress",
    "fleet_rollouts_total",
    "fleet_rollout_duration_seconds",
    "fleet_wave_duration_seconds",
    "fleet_smoke_check_failures_total",
    "fleet_artifact_bytes_sent_total",
];

/// Artifact bytes the controller sent to agents since it started. A process-wide counter:
/// the artifact stream adds to it without knowing about metrics.
static ARTIFACT_BYTES_SENT: AtomicU64 = AtomicU64::new(0);

/// Counts `n` artifact bytes sent to an agent (`fleet_artifact_bytes_sent_total`).
pub fn note_artifact_bytes_sent(n: u64) {
    ARTIFACT_BYTES_SENT.fetch_add(n, Ordering::Relaxed);
}

fn duration_histogram() -> Histogram {
    // 1 s to about 4.5 h.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        1.0, 2.0, 15,
    ))
}

/// The registry and the metrics counted as things happen.
pub struct Metrics {
    registry: Registry,
    rollouts: Family<Labels, Counter>,
    rollout_duration: Family<Labels, Histogram, fn() -> Histogram>,
    wave_duration: Family<Labels, Histogram, fn() -> Histogram>,
    smoke_check_failures: Family<Labels, Counter>,
}

impl Metrics {
    pub fn new(fleet: Arc<FleetState>, in_progress: Arc<InProgress>) -> Metrics {
        let mut registry = Registry::default();
        let rollouts = Family::<Labels, Counter>::default();
        registry.register(
            "fleet_rollouts",
            "Rollouts (and rollbacks) that ended, by app and result (succeeded, failed, rolled_back, aborted)",
            rollouts.clone(),
        );
        let rollout_duration: Family<Labels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(duration_histogram);
        registry.register(
            "fleet_rollout_duration_seconds",
            "How long rollouts took from start to end, by app",
            rollout_duration.clone(),
        );
        let wave_duration: Family<Labels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(duration_histogram);
        registry.register(
            "fleet_wave_duration_seconds",
            "How long waves took from their start until they passed or failed, by app",
            wave_duration.clone(),
        );
        let smoke_check_failures = Family::<Labels, Counter>::default();
        registry.register(
            "fleet_smoke_check_failures",
            "Instances whose smoke checks failed, by app",
            smoke_check_failures.clone(),
        );
        registry.register_collector(Box::new(Snapshot { fleet, in_progress }));
        Metrics {
            registry,
            rollouts,
            rollout_duration,
            wave_duration,
            smoke_check_failures,
        }
    }

    /// A rollout ended with `result` after `seconds`.
    pub fn rollout_ended(&self, app: &str, result: &str, seconds: f64) {
        self.rollouts
            .get_or_create(&vec![
                ("app".to_string(), app.to_string()),
                ("result".to_string(), result.to_string()),
            ])
            .inc();
        self.rollout_duration
            .get_or_create(&vec![("app".to_string(), app.to_string())])
            .observe(seconds.max(0.0));
    }

    /// A wave of `app` passed or failed after `seconds`.
    pub fn wave_ended(&self, app: &str, seconds: f64) {
        self.wave_duration
            .get_or_create(&vec![("app".to_string(), app.to_string())])
            .observe(seconds.max(0.0));
    }

    /// An instance of `app` failed its smoke checks.
    pub fn smoke_check_failed(&self, app: &str) {
        self.smoke_check_failures
            .get_or_create(&vec![("app".to_string(), app.to_string())])
            .inc();
    }

    /// The exposition text. Reads the store: call it on the blocking pool.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// The metrics read from `FleetState` at each scrape.
struct Snapshot {
    fleet: Arc<FleetState>,
    in_progress: Arc<InProgress>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Snapshot")
    }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (Labels, i64)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    for (labels, value) in values {
        ConstGauge::new(value).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let hosts = match self.fleet.host_records() {
            Ok(hosts) => hosts,
            Err(e) => {
                tracing::warn!("metrics: cannot read the hosts: {e}");
                Vec::new()
            }
        };
        let mut by_state: BTreeMap<&str, i64> = [
            HostState::Ready,
            HostState::Lost,
            HostState::Draining,
            HostState::Drained,
        ]
        .into_iter()
        .map(|s| (s.as_str(), 0))
        .collect();
        let mut connected = 0;
        let mut instances: BTreeMap<(String, String, String), i64> = BTreeMap::new();
        let mut restarts: BTreeMap<(String, String), u64> = BTreeMap::new();
        for host in &hosts {
            *by_state
                .entry(self.fleet.host_state(host).as_str())
                .or_default() += 1;
            if self.fleet.is_connected(&host.name) {
                connected += 1;
            }
            for (app, instance) in self.fleet.instances(&host.name) {
                *instances
                    .entry((
                        app.clone(),
                        instance.version.clone(),
                        instance.state.as_str().to_string(),
                    ))
                    .or_default() += 1;
                restarts.insert((app, host.name.clone()), u64::from(instance.restarts));
            }
        }
        gauge(
            &mut encoder,
            "fleet_hosts",
            "Registered hosts by state (ready, lost, draining, drained)",
            by_state
                .into_iter()
                .map(|(state, n)| (labels(&[("state", state)]), n)),
        )?;
        gauge(
            &mut encoder,
            "fleet_agents_connected",
            "Agents with a session open to this controller",
            [(Vec::new(), connected)],
        )?;
        gauge(
            &mut encoder,
            "fleet_instances",
            "App instances by app, release (version) and state, as their agents last reported",
            instances.into_iter().map(|((app, release, state), n)| {
                (
                    labels(&[("app", &app), ("release", &release), ("state", &state)]),
                    n,
                )
            }),
        )?;
        let mut apps: BTreeMap<String, i64> = match self.fleet.deployments(None) {
            Ok(deployments) => deployments.into_iter().map(|d| (d.app, 0)).collect(),
            Err(_) => BTreeMap::new(),
        };
        for (id, app) in self.in_progress.list() {
            // An end the observer missed (it lagged) is found here.
            match self.fleet.rollout(&id) {
                Ok(Some(rollout)) if rollout.state.is_final() => self.in_progress.remove(&id),
                Ok(None) => self.in_progress.remove(&id),
                _ => {
                    apps.insert(app, 1);
                }
            }
        }
        gauge(
            &mut encoder,
            "fleet_rollout_in_progress",
            "1 while a rollout of the app is under way (running or paused), else 0",
            apps.into_iter()
                .map(|(app, n)| (labels(&[("app", &app)]), n)),
        )?;
        {
            let mut metric = encoder.encode_descriptor(
                "fleet_instance_restarts",
                "Restarts of each app's current instance on each host after it crashed, as its agent reports them",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for ((app, host), n) in restarts {
                ConstCounter::new(n)
                    .encode(metric.encode_family(&labels(&[("app", &app), ("host", &host)]))?)?;
            }
        }
        let metric = encoder.encode_descriptor(
            "fleet_artifact_bytes_sent",
            "Artifact bytes this controller sent to agents since it started",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        ConstCounter::new(ARTIFACT_BYTES_SENT.load(Ordering::Relaxed)).encode(metric)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> (tempfile::TempDir, Metrics, Arc<InProgress>) {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let artifacts = crate::artifacts::ArtifactStore::open(
            dir.path(),
            crate::config::UploadLimits::default(),
        )
        .unwrap();
        let fleet = Arc::new(FleetState::new(
            store,
            artifacts,
            crate::fleet_state::tests::test_policy(),
        ));
        let in_progress = Arc::new(InProgress::default());
        // A rollout the store does not know (it ended while the observer lagged, say).
        in_progress.insert("r1", "web");
        (dir, Metrics::new(fleet, in_progress.clone()), in_progress)
    }

    /// The names in `# TYPE` lines of an exposition.
    fn exposed(text: &str) -> std::collections::BTreeSet<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect()
    }

    /// A name as a query writes it → the family it belongs to, if the controller exposes it.
    fn family_of(name: &str) -> Option<&'static str> {
        let bare = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        METRIC_NAMES
            .iter()
            .copied()
            .find(|m| *m == bare || *m == name)
    }

    #[test]
    fn every_metric_named_is_exposed_with_its_kind() {
        let (_dir, metrics, in_progress) = metrics();
        metrics.rollout_ended("web", "succeeded", 12.0);
        metrics.wave_ended("web", 3.0);
        metrics.smoke_check_failed("web");
        note_artifact_bytes_sent(10);
        let text = metrics.encode().unwrap();
        let types = exposed(&text);
        let expect: std::collections::BTreeSet<String> = METRIC_NAMES
            .iter()
            .map(|m| m.strip_suffix("_total").unwrap_or(m).to_string())
            .collect();
        assert_eq!(types, expect, "{text}");
        assert!(
            text.contains("fleet_rollouts_total{app=\"web\",result=\"succeeded\"} 1"),
            "{text}"
        );
        assert!(
            !text.contains("fleet_rollout_in_progress{app=\"web\"} 1"),
            "{text}"
        );
        assert!(
            in_progress.list().is_empty(),
            "a rollout the store does not have is dropped"
        );
        assert!(text.contains("fleet_hosts{state=\"lost\"} 0"), "{text}");
        assert!(
            text.contains("fleet_smoke_check_failures_total{app=\"web\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("fleet_wave_duration_seconds_count{app=\"web\"} 1"),
            "{text}"
        );
    }

    /// The alert rules and the dashboard in contrib/ name only metrics the controller exposes.
    #[test]
    fn contrib_rules_and_dashboard_name_metrics_that_exist() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib");
        let rules = std::fs::read_to_string(root.join("prometheus/fleet-alerts.yml")).unwrap();
        let dashboard: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(root.join("grafana/fleet-dashboard.json")).unwrap(),
        )
        .unwrap();
        let mut queries: Vec<String> = rules
            .lines()
            .filter_map(|l| l.trim().strip_prefix("expr:"))
            .map(str::to_string)
            .collect();
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                queries.push(target["expr"].as_str().unwrap().to_string());
            }
        }
        assert!(queries.len() >= 10, "{queries:?}");
        let mut named = std::collections::BTreeSet::new();
        for query in &queries {
            let words = query.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'));
            for word in words.filter(|w| w.starts_with("fleet_")) {
                assert!(
                    family_of(word).is_some(),
                    "{word} in `{query}` is no metric the controller exposes"
                );
                named.insert(family_of(word).unwrap());
            }
        }
        for metric in METRIC_NAMES {
            assert!(
                named.contains(metric),
                "the dashboard or the rules should show {metric}"
            );
        }
    }
}
