//! User story: the controller is upgraded before the agents. An agent of the previous release
//! (the commit in `compat/previous-agent.rev`, built by `scripts/build-previous-agent.sh`, which
//! `scripts/test.sh` runs) joins the new controller beside a current one, takes rollouts and a
//! rollback, is drained and undrained like any host, and shows in `hosts` without the fields it
//! does not send; a log request (newer than it) neither breaks its session nor gets lines from
//! it. The rule: the controller accepts agents one version behind it.

use fleet_tests::fleet::Fleet;
use std::path::Path;
use std::time::Duration;

#[test]
fn an_agent_one_release_behind_works_with_this_controller() {
    let binary = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/previous-agent/fleet-agent");
    if !binary.is_file() {
        eprintln!(
            "skipped: no {} (run scripts/build-previous-agent.sh, as scripts/test.sh does)",
            binary.display()
        );
        return;
    }
    let mut fleet = Fleet::start(1);
    fleet.start_agent_from("old", &binary);
    fleet.wait_hosts_ready(2);
    fleet.create_web_releases(&["1.0.0", "1.1.0"]);
    for version in ["1.0.0", "1.1.0"] {
        fleet
            .ctl(&["rollout", "web", version, "--batch", "100%"])
            .expect_code(0);
        fleet.wait_all_serve(version, Duration::from_secs(15));
    }
    let rollback = fleet.ctl(&["rollback", "web"]).expect_code(0).json;
    assert_eq!(rollback["version"], "1.0.0", "{rollback:#}");
    fleet.wait_all_serve("1.0.0", Duration::from_secs(15));

    // Drained, it stops its app; undrained, it converges back.
    fleet.ctl(&["drain", "old"]).expect_code(0);
    fleet_tests::wait_until(Duration::from_secs(15), "old to stop web", || {
        fleet.web_get("old", "/").is_none()
    });
    fleet.ctl(&["undrain", "old"]).expect_code(0);
    fleet.wait_all_serve("1.0.0", Duration::from_secs(15));

    // It does not say its architecture (the field is newer than it); the current one does.
    let hosts = fleet.ctl_ok(&["hosts"]);
    let host = |name: &str| {
        hosts["hosts"]
            .as_array()
            .and_then(|all| all.iter().find(|h| h["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("{name} in {hosts:#}"))
    };
    assert_eq!(host("old")["agent_arch"], "", "{hosts:#}");
    assert_eq!(host("h1")["agent_arch"], std::env::consts::ARCH);

    // It does not know log requests: its session survives one, `logs` says why it has no
    // lines from it after a deadline, and the current host's lines still come.
    let logs = fleet.ctl(&["logs", "web", "--lines", "2"]);
    assert_eq!(logs.code, 1, "{}", logs.stderr);
    assert!(
        logs.stderr.contains("could not be read on old"),
        "{}",
        logs.stderr
    );
    let lines = logs.json_lines();
    assert!(
        lines.iter().any(|l| l["host"] == "old"
            && l["error"]
                .as_str()
                .unwrap()
                .contains("the agent of host old did not answer")),
        "{}",
        logs.stdout
    );
    assert!(lines.iter().any(|l| l["host"] == "h1"), "{}", logs.stdout);
    fleet.ctl(&["drain", "old"]).expect_code(0);
    fleet_tests::wait_until(Duration::from_secs(15), "old to stop web again", || {
        fleet.web_get("old", "/").is_none()
    });
}
