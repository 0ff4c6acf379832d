//! User story: an agent is SIGKILLed and started again with the same data directory; it
//! reconnects and its host serves the release it was assigned, untouched hosts stay untouched.
//! First the agent alone dies (its instance may live on); then the agent and its instance die
//! together, as in a host crash, and the restarted agent brings the release up from origin
//! state.

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

#[test]
fn a_killed_agent_comes_back_and_serves_its_release() {
    let mut fleet = Fleet::start(2);
    fleet
        .create_web_release("1.0.0", &web_manifest("10s"), &[])
        .expect_code(0);
    fleet.ctl(&["rollout", "web", "1.0.0"]).expect_code(0);
    fleet.wait_all_serve("1.0.0", Duration::from_secs(10));
    let h2_pid = fleet.web_pid("h2").unwrap();

    // The agent alone dies; the controller sees its stream end.
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
    fleet.restart_agent("h1");
    fleet.wait_hosts_ready(2);
    wait_h1_running(
        &fleet,
        "h1 to run and serve 1.0.0 after its agent restarted",
    );

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
    fleet.wait_hosts_ready(2);
    wait_h1_running(&fleet, "h1 to bring 1.0.0 up again after the crash");
    assert_ne!(fleet.web_pid("h1").unwrap(), instance_pid);
    assert_eq!(fleet.web_get("h1", "/origin").as_deref(), Some("fresh\n"));

    assert_eq!(fleet.web_pid("h2").unwrap(), h2_pid, "h2 was never touched");
}
