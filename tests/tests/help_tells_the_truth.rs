//! What the help says is what the binaries do: `join-token create --ttl 7d` (the "at most 7
//! days" of its help) is accepted by a real controller and a second more is refused, the
//! agent's and fleetctl's controller examples are https on port 7700, `rollout abort` says the
//! hosts keep what they run (which is what the controller does), and `demo --output json` is
//! refused rather than ignored.

use fleet_tests::bins::Bins;
use fleet_tests::fleet::Fleet;
use fleet_tests::process;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Runs `program args...` (with no fleet configuration from the environment) and returns its
/// exit code, stdout and stderr.
fn run(program: &Path, args: &[&str]) -> (i32, String, String) {
    let home = tempfile::tempdir().unwrap();
    let mut command = Command::new(program);
    command
        .args(args)
        .env("HOME", home.path())
        .env_remove("FLEET_CONFIG_DIR")
        .env_remove("FLEET_CONTROLLER");
    let out = process::run_with_deadline(command, Duration::from_secs(30));
    (out.code, out.stdout, out.stderr)
}

#[test]
fn a_join_token_lives_at_most_exactly_7_days() {
    let fleet = Fleet::start(0);
    let out = fleet
        .ctl(&["join-token", "create", "--ttl", "7d"])
        .expect_code(0);
    let expires = out.json["expires_unix_ms"]
        .as_i64()
        .or_else(|| out.json["expires_unix_ms"].as_str()?.parse().ok())
        .unwrap_or_else(|| panic!("no expiry in {}", out.stdout));
    let week_ms = 7 * 24 * 3_600_000;
    let from_now = expires - fleet_proto::now_unix_ms();
    assert!(
        (week_ms - 60_000..=week_ms).contains(&from_now),
        "a 7d token expires in {from_now} ms"
    );

    let refused = fleet.ctl(&["join-token", "create", "--ttl", "7d1s"]);
    assert_eq!(refused.code, 2, "{}", refused.stderr);
    assert!(refused.stderr.contains("at most 7d"), "{}", refused.stderr);
}

#[test]
fn help_lines_say_what_the_binaries_do() {
    let bins = Bins::locate();
    let (code, agent_help, _) = run(&bins.agent, &["--help"]);
    assert_eq!(code, 0);
    assert!(agent_help.contains(":7700"), "{agent_help}");
    assert!(!agent_help.contains("7070"), "{agent_help}");

    let (_, fleetctl_help, _) = run(&bins.fleetctl, &["--help"]);
    assert!(fleetctl_help.contains("https://"), "{fleetctl_help}");
    assert!(!fleetctl_help.contains("http://"), "{fleetctl_help}");

    let (_, abort_help, _) = run(&bins.fleetctl, &["rollout", "abort", "--help"]);
    assert!(abort_help.contains("keep the release"), "{abort_help}");
    assert!(!abort_help.contains("no-auto-rollback"), "{abort_help}");

    let (_, ttl_help, _) = run(&bins.fleetctl, &["join-token", "create", "--help"]);
    assert!(ttl_help.contains("7d"), "{ttl_help}");

    let (code, _, stderr) = run(&bins.fleetctl, &["--output", "json", "demo"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("without --output json"), "{stderr}");
}
