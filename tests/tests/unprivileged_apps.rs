//! User story: the agents run as root (as the shipped unit does), and the apps they run do not.
//! With no `user` in its manifest, web runs as a uid of its own from the reserved range, the
//! same on every start; with `user = "nobody"` it runs as nobody; a `user` the hosts do not
//! have fails at the canary with a message that says what to do, and every host stays on the
//! release it ran.

use fleet_agent::app_user::{RESERVED_COUNT, RESERVED_FIRST};
use fleet_tests::fleet::Fleet;
use fleet_tests::web_manifest;
use std::time::Duration;

/// The real uid of process `pid`.
fn uid_of(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().next())
        .and_then(|uid| uid.parse().ok())
        .expect("a Uid line")
}

fn with_user(user: &str) -> String {
    web_manifest("10s").replace(
        "stop_timeout = \"5s\"\n",
        &format!("stop_timeout = \"5s\"\nuser = \"{user}\"\n"),
    )
}

#[test]
fn apps_run_as_users_of_their_own_never_as_root() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: the agents run apps as other users only when they run as root");
        return;
    }
    let fleet = Fleet::start(2);
    fleet.create_web_releases(&["1.0.0"]);
    fleet
        .ctl(&["rollout", "web", "1.0.0", "--batch", "100%"])
        .expect_code(0);
    fleet.wait_all_serve("1.0.0", Duration::from_secs(10));
    let reserved = RESERVED_FIRST..RESERVED_FIRST + RESERVED_COUNT;
    let mut uids = Vec::new();
    for host in ["h1", "h2"] {
        let uid = uid_of(fleet.web_pid(host).expect("web's pid"));
        assert!(reserved.contains(&uid), "{host}: web runs as uid {uid}");
        uids.push(uid);
    }

    // A named user.
    fleet
        .create_web_release("1.1.0", &with_user("nobody"), &[])
        .expect_code(0);
    fleet
        .ctl(&["rollout", "web", "1.1.0", "--batch", "100%"])
        .expect_code(0);
    fleet.wait_all_serve("1.1.0", Duration::from_secs(10));
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("the nobody user")
        .uid
        .as_raw();
    for host in ["h1", "h2"] {
        assert_eq!(uid_of(fleet.web_pid(host).unwrap()), nobody, "{host}");
    }

    // A user the hosts do not have: refused at the canary, everyone back on 1.1.0.
    fleet
        .create_web_release("1.2.0", &with_user("no-such-fleet-user"), &[])
        .expect_code(0);
    let out = fleet
        .ctl(&["rollout", "web", "1.2.0", "--canary", "1"])
        .expect_code(1);
    let message = out.json["waves"][0]["hosts"][0]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        message.contains("no such user") && message.contains("useradd"),
        "{message}"
    );
    fleet.wait_all_serve("1.1.0", Duration::from_secs(10));

    // Back to the app's own user: the same uid as before on each host.
    fleet
        .ctl(&["rollout", "web", "1.0.0", "--batch", "100%"])
        .expect_code(0);
    fleet.wait_all_serve("1.0.0", Duration::from_secs(10));
    for (host, uid) in ["h1", "h2"].into_iter().zip(uids) {
        assert_eq!(uid_of(fleet.web_pid(host).unwrap()), uid, "{host}");
    }
}
