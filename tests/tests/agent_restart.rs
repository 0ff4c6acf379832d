//! User story: apps outlive their agent. An agent is SIGKILLed, or stopped as `systemctl stop`
//! or an upgrade stops it, and started again with the same data directory: its instance kept
//! serving meanwhile, and the new agent adopts it (same pid, no restart counted) and still
//! notices when it dies. When the agent and its instance die together, as in a host crash, the
//! restarted agent brings the release up from origin state. Untouched hosts stay untouched.

use fleet_tests::fleet::Fleet;
use fleet_tests::process::{pid_is_alive, signal_pid};
use fleet_tests::{wait_until, web_manifest};
use nix::sys::signal::Signal;
use std::time::Duration;

fn wait_h1_running(fleet: &Fleet, what: &str) {
    wait_until(Duration::from_secs(20), what, || {
        let status = fleet.status("web");
        let connected = status["hosts"]
            .as_array()
            .and_then(|hosts| hosts.iter().find(|h| h["name"] == "h1"))
            .is_some_and(|h| h["connected"] == true);
        connected
            && Fleet::actual_of(&status, "h1", "web")
                .is_some_and(|a| a["state"] == "running" && a["version"] == "1.0.0")
            && fleet.web_get("h1", "/").as_deref() == Some("web 1.0.0 on h1\n")
    });
}

fn h1_restarts(fleet: &Fleet) -> u64 {
    Fleet::actual_of(&fleet.status("web"), "h1", "web")
        .and_then(|a| a["restarts"].as_u64())
        .unwrap_or(0)
}

#[test]
fn an_agent_that_restarts_adopts_its_running_instance() {
    let mut fleet = Fleet::start(2);
    fleet
        .create_web_release("1.0.0", &web_manifest("10s"), &[])
        .expect_code(0);
    fleet.ctl(&["rollout", "web", "1.0.0"]).expect_code(0);
    fleet.wait_all_serve("1.0.0", Duration::from_secs(10));
    let h2_pid = fleet.web_pid("h2").unwrap();
    let instance_pid = fleet.web_pid("h1").unwrap();

    // The agent alone dies (SIGKILL); the controller sees its stream end; the app serves on.
    fleet.kill_agent("h1");
    wait_until(
        Duration::from_secs(20),
        "the controller to see h1 disconnected",
        || {
            let hosts = fleet.ctl_ok(&["hosts"]);
            hosts["hosts"]
                .as_array()
                .and_then(|hosts| hosts.iter().find(|h| h["name"] == "h1"))
                .is_some_and(|h| h["connected"] == false || h["state"] == "lost")
        },
    );
    assert_eq!(
        fleet.web_pid("h1"),
        Some(instance_pid),
        "served without its agent"
    );
    fleet.restart_agent("h1");
    fleet.wait_hosts_ready(2);
    wait_h1_running(&fleet, "h1 to run 1.0.0 after its agent restarted");
    assert_eq!(
        fleet.web_pid("h1"),
        Some(instance_pid),
        "adopted, not restarted"
    );
    assert_eq!(h1_restarts(&fleet), 0);

    // A graceful stop of the agent (systemctl stop, an upgrade) leaves the app running too.
    let stopped = fleet.stop_agent("h1", Duration::from_secs(10));
    assert!(
        stopped.is_some_and(|s| s.success()),
        "the agent stops on SIGTERM: {stopped:?}"
    );
    assert_eq!(
        fleet.web_pid("h1"),
        Some(instance_pid),
        "served while the agent was stopped"
    );
    fleet.restart_agent("h1");
    fleet.wait_hosts_ready(2);
    wait_h1_running(
        &fleet,
        "h1 to run 1.0.0 after its agent was stopped and started",
    );
    assert_eq!(fleet.web_pid("h1"), Some(instance_pid), "adopted again");

    // The adopted instance (no longer the agent's child) dies: the agent notices and starts
    // a fresh one from origin, counted as a restart.
    signal_pid(instance_pid, Signal::SIGKILL);
    let restarted = fleet_tests::wait_for(
        Duration::from_secs(20),
        "the agent to restart the adopted instance that died",
        || fleet.web_pid("h1").filter(|pid| *pid != instance_pid),
    );
    assert!(pid_is_alive(restarted));
    wait_until(Duration::from_secs(10), "the restart to be counted", || {
        h1_restarts(&fleet) == 1
    });
    assert_eq!(fleet.web_get("h1", "/origin").as_deref(), Some("fresh\n"));
    assert_eq!(fleet.web_pid("h2").unwrap(), h2_pid, "h2 was never touched");
}

#[test]
fn after_a_host_crash_the_agent_starts_its_release_from_origin() {
    let mut fleet = Fleet::start(1);
    fleet
        .create_web_release("1.0.0", &web_manifest("10s"), &[])
        .expect_code(0);
    fleet.ctl(&["rollout", "web", "1.0.0"]).expect_code(0);
    fleet.wait_all_serve("1.0.0", Duration::from_secs(10));

    // The agent and its instance die together, as in a crash of the host.
    let instance_pid = fleet.web_pid("h1").unwrap();
    fleet.kill_agent("h1");
    signal_pid(instance_pid, Signal::SIGKILL);
    wait_until(
        Duration::from_secs(5),
        "the killed instance to be gone",
        || !pid_is_alive(instance_pid) && fleet.web_get("h1", "/pid").is_none(),
    );
    fleet.restart_agent("h1");
    fleet.wait_hosts_ready(1);
    wait_h1_running(&fleet, "h1 to bring 1.0.0 up again after the crash");
    assert_ne!(fleet.web_pid("h1").unwrap(), instance_pid);
    assert_eq!(fleet.web_get("h1", "/origin").as_deref(), Some("fresh\n"));
}
