//! User story: a host is retired with `fleetctl remove`. Its agent hears the controller's
//! explicit revoked answer, stops its instance, disables its systemd unit, says why in its log
//! and exits with the status the unit does not restart; started again by hand it exits again
//! at once, never retrying in a loop. `remove --purge` also wipes the host's releases, secrets
//! and state. Any other refusal (here: the controller gone, then back with another CA) is
//! retried, and the host's apps keep running.

use fleet_agent::removal::EXIT_REVOKED;
use fleet_tests::fleet::Fleet;
use fleet_tests::process::pid_is_alive;
use fleet_tests::wait_until;
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

fn agent_log(fleet: &Fleet, name: &str) -> String {
    std::fs::read_to_string(fleet.dir().join(format!("logs/agent-{name}.log"))).unwrap_or_default()
}

#[test]
fn remove_ends_the_agent_and_purge_wipes_its_data() {
    let mut fleet = Fleet::start(2);
    fleet.create_web_releases(&["1.0.0"]);
    fleet
        .ctl(&["rollout", "web", "1.0.0", "--batch", "100%"])
        .expect_code(0);
    fleet.wait_all_serve("1.0.0", Duration::from_secs(15));

    // h1's agent runs "under systemd": a systemctl on its PATH records what it is asked.
    let fake_bin = fleet.dir().join("fake-bin");
    std::fs::create_dir_all(&fake_bin).unwrap();
    let systemctl_log = fleet.dir().join("systemctl.log");
    let script = fake_bin.join("systemctl");
    std::fs::write(
        &script,
        format!("#!/bin/sh\necho \"$@\" >> '{}'\n", systemctl_log.display()),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = format!(
        "{}:{}",
        fake_bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    fleet.set_agent_env("h1", "PATH", &path);
    fleet.set_agent_env("h1", "FLEET_AGENT_UNIT", "fleet-agent.service");
    fleet.restart_agent("h1");
    fleet.wait_hosts_ready(2);
    wait_until(Duration::from_secs(15), "h1 to serve again", || {
        fleet.web_get("h1", "/").is_some()
    });
    let h1_pid = fleet.web_pid("h1").expect("h1 serves its pid");
    let h1_agent = fleet.agent_pid("h1");

    fleet.ctl(&["remove", "h1"]).expect_code(0);
    let status = fleet
        .wait_agent_exit("h1", Duration::from_secs(30))
        .expect("h1's agent exits once its host is removed");
    assert_eq!(status.code(), Some(EXIT_REVOKED as i32), "{status:?}");
    assert!(!pid_is_alive(h1_agent));
    assert!(!pid_is_alive(h1_pid), "h1's instance is stopped");
    assert_eq!(fleet.web_get("h1", "/"), None, "h1 serves nothing");
    let log = agent_log(&fleet, "h1");
    assert!(
        log.contains("refused this host as revoked") && log.contains("exiting for good"),
        "h1's log says why:\n{log}"
    );
    assert_eq!(
        std::fs::read_to_string(&systemctl_log)
            .unwrap_or_default()
            .trim(),
        "disable fleet-agent.service"
    );
    // Not purged: its releases and state stay.
    let h1_data = fleet.agent("h1").data_dir.clone();
    assert!(h1_data.join("releases/web").is_dir());
    assert!(h1_data.join("state.json").is_file());

    // Started again by hand, it is refused as revoked at once and exits: no retry loop, and
    // nothing is started from the local cache.
    fleet.restart_agent("h1");
    let status = fleet
        .wait_agent_exit("h1", Duration::from_secs(20))
        .expect("a removed host's agent exits again at once");
    assert_eq!(status.code(), Some(EXIT_REVOKED as i32), "{status:?}");
    assert!(status.signal().is_none());
    assert_eq!(fleet.web_get("h1", "/"), None);
    let log = agent_log(&fleet, "h1");
    assert!(
        !log.contains("reconnecting"),
        "a revoked agent never retries:\n{log}"
    );

    // --purge: h2's agent also wipes its releases, secrets and state, keeping its identity.
    let h2_pid = fleet.web_pid("h2").expect("h2 serves its pid");
    let h2_data = fleet.agent("h2").data_dir.clone();
    assert!(h2_data.join("state.json").is_file());
    fleet.ctl(&["remove", "h2", "--purge"]).expect_code(0);
    let status = fleet
        .wait_agent_exit("h2", Duration::from_secs(30))
        .expect("h2's agent exits once its host is removed");
    assert_eq!(status.code(), Some(EXIT_REVOKED as i32), "{status:?}");
    assert!(!pid_is_alive(h2_pid), "h2's instance is stopped");
    for wiped in [
        "releases",
        "instances",
        "app-state",
        "hooks",
        "artifacts",
        "state.json",
    ] {
        assert!(!h2_data.join(wiped).exists(), "{wiped} is wiped by --purge");
    }
    assert!(h2_data.join("tls").is_dir(), "the (revoked) identity stays");
    assert!(agent_log(&fleet, "h2").contains("wiping its releases, secrets and state"));
}

#[test]
fn an_agent_refused_for_another_reason_keeps_retrying_and_its_apps() {
    let mut fleet = Fleet::start(1);
    // Every failed attempt is logged (at debug level).
    fleet.set_agent_env("h1", "RUST_LOG", "info,fleet_agent=debug");
    fleet.restart_agent("h1");
    fleet.wait_hosts_ready(1);
    fleet.create_web_releases(&["1.0.0"]);
    fleet
        .ctl(&["rollout", "web", "1.0.0", "--batch", "100%"])
        .expect_code(0);
    fleet.wait_all_serve("1.0.0", Duration::from_secs(15));
    let web_pid = fleet.web_pid("h1").expect("h1 serves its pid");
    let agent_pid = fleet.agent_pid("h1");

    // The controller comes back with another CA (a changed CA, a wrong backup): the agent's
    // handshake is refused, which is not the revoked answer.
    fleet.kill_controller();
    let other = fleet.dir().join("other-ca");
    let mut init = std::process::Command::new(&fleet.bins.fleetctl);
    init.args(["init", "--listen", "127.0.0.1:0", "--dir"])
        .arg(&other);
    let finished = fleet_tests::process::run_with_deadline(init, Duration::from_secs(30));
    assert_eq!(finished.code, 0, "{}", finished.stderr);
    for file in [
        "ca.pem",
        "ca.key",
        "controller.pem",
        "controller.key",
        "client.pem",
        "client.key",
    ] {
        std::fs::copy(other.join(file), fleet.config_dir().join(file)).unwrap();
    }
    fleet.restart_controller();
    let log_len = agent_log(&fleet, "h1").len();
    // It keeps trying (three refused attempts after the restart), and keeps its app.
    wait_until(
        Duration::from_secs(40),
        "h1's agent to try the controller with another CA three times",
        || {
            agent_log(&fleet, "h1")[log_len..]
                .matches("controller still unreachable")
                .count()
                >= 3
        },
    );
    assert!(pid_is_alive(agent_pid), "the agent keeps running");
    assert!(pid_is_alive(web_pid), "its app keeps running");
    assert_eq!(
        fleet.web_get("h1", "/").as_deref(),
        Some("web 1.0.0 on h1\n")
    );
    let log = agent_log(&fleet, "h1");
    assert!(!log.contains("exiting for good"), "{log}");
}
