//! User story: a fleet known under several controller URLs. fleetctl and an agent given a
//! list whose first URL is down use the next one (hosts, a rollout, the agent's session within
//! seconds); an agent whose controller is SIGKILLed and comes back at the second URL of its
//! list follows it there within seconds, its app running all along (same pid). A list with an
//! entry that is not an https URL is refused naming it; one whose entries are none of them a
//! fleet controller (a closed port, a plain TCP listener, an agent's peer port) fails naming
//! each with its reason.

use fleet_tests::fleet::Fleet;
use fleet_tests::wait_until;
use serde_json::Value;
use std::time::{Duration, Instant};

/// A loopback `IP:PORT` nothing listens on (bound, then freed).
fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("its address").to_string()
}

/// Whether `hosts` shows `name` with a session up.
fn connected(fleet: &Fleet, name: &str) -> bool {
    let out = fleet.ctl(&["hosts"]);
    out.code == 0
        && out.json["hosts"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|h| h["name"] == name && h["connected"] == Value::Bool(true))
}

#[test]
fn a_list_whose_first_controller_is_down_works() {
    let mut fleet = Fleet::start(0);
    fleet.create_web_releases(&["1.0.0"]);
    let list = format!("https://{},{}", free_addr(), fleet.controller_url());

    let started = Instant::now();
    fleet.start_agent_via("h1", &list);
    wait_until(Duration::from_secs(30), "h1 connected", || {
        connected(&fleet, "h1")
    });
    let took = started.elapsed();
    eprintln!("the agent joined and its session was up {took:?} after it started");
    assert!(took < Duration::from_secs(10), "took {took:?}");

    let hosts = fleet.ctl_via(&list, &["hosts"]).expect_code(0);
    assert_eq!(hosts.json["hosts"][0]["name"], "h1", "{:#}", hosts.json);
    fleet
        .ctl_via(&list, &["rollout", "web", "1.0.0", "--batch", "100%"])
        .expect_code(0);
    fleet.wait_all_serve("1.0.0", Duration::from_secs(20));

    // Bad input: an entry that is not https, named, before anything is dialled (exit 2).
    let bad = fleet
        .ctl_via(
            &format!("{},http://127.0.0.1:7700", fleet.controller_url()),
            &["hosts"],
        )
        .expect_code(2);
    assert!(
        bad.stderr.contains("\"http://127.0.0.1:7700\"") && bad.stderr.contains("not https"),
        "{}",
        bad.stderr
    );

    // None of them a controller: a closed port, a plain TCP listener that never speaks TLS,
    // and h1's peer port (a TLS server of this fleet's CA, but not the controller): each
    // named with its reason (exit 3).
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("a plain TCP listener");
    let closed = format!("https://{}", free_addr());
    let silent_url = format!("https://{}", silent.local_addr().unwrap());
    let peer_url = format!("https://{}:7702", fleet.agent("h1").advertise);
    let none = fleet
        .ctl_via(&format!("{closed},{silent_url},{peer_url}"), &["hosts"])
        .expect_code(3);
    for url in [&closed, &silent_url, &peer_url] {
        assert!(none.stderr.contains(url.as_str()), "{url}: {}", none.stderr);
    }
    assert!(none.stderr.contains("no answer within"), "{}", none.stderr);
    drop(silent);
}

#[test]
fn an_agent_follows_its_controller_to_the_second_url() {
    let mut fleet = Fleet::start(0);
    fleet.create_web_releases(&["1.0.0", "1.1.0"]);
    let second = free_addr();
    let list = format!("{},https://{second}", fleet.controller_url());
    fleet.start_agent_via("h1", &list);
    fleet.wait_hosts_ready(1);
    fleet
        .ctl(&["rollout", "web", "1.0.0", "--batch", "100%"])
        .expect_code(0);
    fleet.wait_all_serve("1.0.0", Duration::from_secs(20));
    let pid = fleet.web_pid("h1").expect("h1's app answers /pid");

    // The controller dies (SIGKILL) and comes back at the second URL of the agent's list.
    let moved = Instant::now();
    fleet.move_controller(&second);
    assert_eq!(fleet.controller_url(), format!("https://{second}"));
    let restarted = moved.elapsed();
    wait_until(Duration::from_secs(30), "h1 connected again", || {
        connected(&fleet, "h1")
    });
    let took = moved.elapsed();
    eprintln!(
        "h1's session was up at the second URL {took:?} after the SIGKILL (the controller took {restarted:?} to listen again)"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert_eq!(
        fleet.web_pid("h1"),
        Some(pid),
        "the app kept running while the agent moved"
    );
    let log = std::fs::read_to_string(fleet.dir().join("logs/agent-h1.log")).unwrap_or_default();
    assert!(
        log.contains(&format!("controller=https://{second}")),
        "the agent's log names the second controller:\n{log}"
    );

    // And the session works there: a rollout through it.
    fleet
        .ctl(&["rollout", "web", "1.1.0", "--batch", "100%"])
        .expect_code(0);
    fleet.wait_all_serve("1.1.0", Duration::from_secs(20));
}

/// A rollout (and the event log) followed by fleetctl whose controller dies in the middle:
/// fleetctl says which controller it lost and how to watch again, and exits 3 (no verb
/// re-attaches to a rollout's progress).
#[test]
fn a_followed_rollout_whose_controller_dies_says_how_to_watch_it_again() {
    let mut fleet = Fleet::start(2);
    fleet.create_web_releases(&["1.0.0", "1.1.0"]);
    fleet
        .ctl(&["rollout", "web", "1.0.0", "--batch", "100%"])
        .expect_code(0);
    let url = fleet.controller_url();
    let log = fleet.dir().join("logs/fleetctl-rollout.log");
    let mut command = std::process::Command::new(fleet_tests::bins::Bins::locate().fleetctl);
    command
        .args(["--config-dir", &fleet.config_dir().display().to_string()])
        .args(["--controller", &url])
        .args([
            "rollout", "web", "1.1.0", "--canary", "1", "--batch", "100%",
        ])
        .args(["--pause-after-canary", "60s"])
        .current_dir(fleet.dir())
        .env("HOME", fleet.dir());
    let mut rollout = fleet_tests::process::ChildGuard::spawn("fleetctl rollout", command, &log);
    wait_until(
        Duration::from_secs(30),
        "the canary to pass and the pause to begin",
        || std::fs::read_to_string(&log).is_ok_and(|text| text.contains("canary passed: waiting")),
    );
    let events_log = fleet.dir().join("logs/fleetctl-events.log");
    let mut command = std::process::Command::new(fleet_tests::bins::Bins::locate().fleetctl);
    command
        .args(["--config-dir", &fleet.config_dir().display().to_string()])
        .args(["--controller", &url, "events", "--follow"])
        .current_dir(fleet.dir())
        .env("HOME", fleet.dir());
    let mut events =
        fleet_tests::process::ChildGuard::spawn("fleetctl events", command, &events_log);
    wait_until(Duration::from_secs(30), "events --follow to print", || {
        std::fs::read_to_string(&events_log).is_ok_and(|text| text.contains("1.1.0"))
    });
    fleet.kill_controller();
    let exit = events
        .wait_exit(Duration::from_secs(30))
        .expect("events --follow ends once its controller is gone");
    let said = std::fs::read_to_string(&events_log).unwrap_or_default();
    assert_eq!(exit.code(), Some(3), "{said}");
    assert!(
        said.contains(&format!(
            "lost the controller at {url} while following events"
        )) && said.contains("`fleetctl events --follow` follows again"),
        "{said}"
    );
    let exit = rollout
        .wait_exit(Duration::from_secs(30))
        .expect("fleetctl ends once its controller is gone");
    let said = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(exit.code(), Some(3), "{said}");
    assert!(
        said.contains(&format!("lost the controller at {url}"))
            && said.contains("fleetctl rollout status")
            && said.contains("fleetctl history web"),
        "{said}"
    );
}
