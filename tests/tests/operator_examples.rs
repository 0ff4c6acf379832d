//! The Prometheus files in `contrib/` load in Prometheus' own checker: `promtool check rules`
//! on the alert rules and `promtool check config` on the example configuration that scrapes
//! the controller. (That they name only metrics the controller exposes is a unit test of
//! `fleet_controller::http::metrics`.) Skips where no promtool is installed; scripts/test.sh
//! installs Debian's `prometheus` package, which has it.

use fleet_tests::process;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn promtool() -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join("promtool"))
        .find(|p| p.exists())
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
