//! The Prometheus files in `contrib/` load in Prometheus' own checker: `promtool check rules`
//! on the alert rules and `promtool check config` on the example configuration that scrapes
//! the controller. (That they name only metrics the controller exposes is a unit test of
//! `fleet_controller::http::metrics`.) And a real Prometheus server, on loopback, scrapes a
//! real controller with those rules loaded, as a new user would set it up. Skips where
//! Prometheus is not installed; scripts/test.sh installs Debian's `prometheus` package.

use fleet_tests::fleet::Fleet;
use fleet_tests::process::{self, ChildGuard};
use fleet_tests::{http, wait_until};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.exists())
}

fn promtool() -> Option<PathBuf> {
    on_path("promtool")
}

#[test]
fn promtool_accepts_the_alert_rules_and_the_scrape_config() {
    let Some(promtool) = promtool() else {
        eprintln!("skipped: no promtool (apt-get install prometheus)");
        return;
    };
    let contrib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/prometheus");
    for args in [
        ["check", "rules", "fleet-alerts.yml"],
        ["check", "config", "prometheus.yml"],
    ] {
        let mut command = Command::new(&promtool);
        command.args(args).current_dir(&contrib);
        let out = process::run_with_deadline(command, Duration::from_secs(60));
        assert_eq!(
            out.code, 0,
            "promtool {args:?}:\n{}\n{}",
            out.stdout, out.stderr
        );
        assert!(out.stdout.contains("SUCCESS"), "{}", out.stdout);
    }
}

#[test]
fn a_real_prometheus_scrapes_the_controller_with_the_alert_rules_loaded() {
    let Some(prometheus) = on_path("prometheus") else {
        eprintln!("skipped: no prometheus (apt-get install prometheus)");
        return;
    };
    let fleet = Fleet::start(2);
    let dir = fleet.dir().join("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    let rules =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/prometheus/fleet-alerts.yml");
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: fleet-controller\n    static_configs:\n      - targets: [\"{}\"]\n",
            rules.display(),
            fleet.http_addr()
        ),
    )
    .unwrap();
    // A free loopback port for Prometheus' own API.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut command = Command::new(prometheus);
    command
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .current_dir(&dir);
    let _prometheus = ChildGuard::spawn("prometheus", command, &dir.join("prometheus.log"));
    let query = |q: &str| -> String {
        http::get("127.0.0.1", port, q)
            .map(|(_, body)| body)
            .unwrap_or_default()
    };
    wait_until(
        Duration::from_secs(60),
        "Prometheus to scrape fleet_agents_connected = 2",
        || {
            query("/api/v1/query?query=fleet_agents_connected").contains("\"value\":[")
                && query("/api/v1/query?query=fleet_agents_connected").contains("\"2\"]")
        },
    );
    let targets = query("/api/v1/targets");
    assert!(targets.contains("\"health\":\"up\""), "{targets}");
    let rules = query("/api/v1/rules");
    for alert in [
        "FleetRolloutFailed",
        "FleetHostLost",
        "FleetInstanceCrashLooping",
    ] {
        assert!(rules.contains(alert), "{alert} not loaded: {rules}");
    }
    assert!(
        !rules.contains("\"health\":\"err"),
        "a rule fails to evaluate: {rules}"
    );
}
