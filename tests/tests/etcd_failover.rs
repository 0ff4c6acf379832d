//! User story: three controllers share one fleet in a three-member etcd cluster; one leads.
//! `fleetctl controllers` (through any of them) names the leader; a follower sends a rollout to
//! the leader and serves reads itself. The leader is SIGKILLed in the middle of a rollout: within
//! the lease plus 3 s another leads, the agents follow it, and the rollout moves on from where it
//! was and completes, no host updated twice (each host's app keeps the pid it got when it
//! moved to the new release). A leader cut from etcd (its link through a proxy cut) stops
//! acting as leader before its lease could end, and another takes over.

use fleet_tests::etcd::Etcd;
use fleet_tests::etcd_fleet::{
    free_addr, leader_via, pids_serving, slow_manifest, start_controller,
};
use fleet_tests::fleet::Fleet;
use fleet_tests::proxy::Proxy;
use fleet_tests::{wait_for, wait_until};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The leader's lease (`fleet_controller::leader::DEFAULT_LEASE`).
const LEASE: Duration = Duration::from_secs(5);

#[test]
fn the_leader_killed_mid_rollout_is_replaced_and_the_rollout_moves_on() {
    let Some(etcd) = Etcd::cluster(3) else {
        return;
    };
    let url = etcd.urls().join(",");
    let mut fleet = Fleet::start_with_init_args(0, &["--etcd", &url, "--etcd-prefix", "/failover"]);
    let config = fleet.config_dir().join("controller.toml");
    let (a2, a3) = (free_addr(), free_addr());
    let mut c2 = start_controller(&fleet, &config, "c2", &a2);
    let mut c3 = start_controller(&fleet, &config, "c3", &a3);
    let c1 = fleet.controller_url();
    let (u2, u3) = (format!("https://{a2}"), format!("https://{a3}"));
    let list = format!("{c1},{u2},{u3}");

    // The first controller leads (it was up first); every one lists all three.
    for via in [&c1, &u2, &u3] {
        wait_until(
            Duration::from_secs(30),
            "three controllers listed, the first one leading",
            || leader_via(&fleet, via) == Some((Some(c1.clone()), 3)),
        );
    }
    // A follower serves reads of the store and sends writes to the leader; fleetctl sends an
    // upload (sent once) straight to the leader the follower names.
    fleet.set_agent_controller_url(&list);
    for name in ["h1", "h2", "h3", "h4"] {
        fleet.start_agent(name);
    }
    let manifest = slow_manifest("2s");
    for version in ["1.0.0", "2.0.0"] {
        let artifact = fleet.web_artifact(&manifest, &[]);
        fleet
            .ctl_via(
                &u2,
                &[
                    "release",
                    "create",
                    "web",
                    version,
                    &artifact.display().to_string(),
                ],
            )
            .expect_code(0);
    }
    let releases = fleet.ctl_via(&u3, &["releases", "web"]).expect_code(0);
    assert!(
        releases.json.to_string().contains("2.0.0"),
        "{:#}",
        releases.json
    );
    wait_until(Duration::from_secs(30), "four hosts ready", || {
        let out = fleet.ctl_via(&list, &["hosts"]);
        out.code == 0
            && out.json["hosts"].as_array().is_some_and(|hosts| {
                hosts.len() == 4 && hosts.iter().all(|h| h["connected"] == Value::Bool(true))
            })
    });
    fleet
        .ctl_via(&u3, &["rollout", "web", "1.0.0", "--batch", "100%"])
        .expect_code(0);
    fleet.wait_all_serve("1.0.0", Duration::from_secs(30));

    // A rollout of four waves, two seconds each at least; the leader dies in the second.
    let started = fleet
        .ctl_via(
            &list,
            &[
                "rollout", "web", "2.0.0", "--canary", "1", "--batch", "1", "--detach",
            ],
        )
        .expect_code(0)
        .json;
    let id = started["id"].as_str().expect("a rollout id").to_string();
    let mut first_pids = BTreeMap::new();
    wait_until(
        Duration::from_secs(30),
        "the canary to move to 2.0.0",
        || {
            first_pids.extend(pids_serving(&fleet, "2.0.0"));
            !first_pids.is_empty()
        },
    );
    fleet.kill_controller();
    let killed = Instant::now();

    // Another leads within the lease plus 3 s.
    let new_leader = wait_for(Duration::from_secs(30), "a new leader", || {
        for (pid_source, pid) in pids_serving(&fleet, "2.0.0") {
            first_pids.entry(pid_source).or_insert(pid);
        }
        match leader_via(&fleet, &format!("{u2},{u3}")) {
            Some((Some(leader), _)) if leader != c1 => Some(leader),
            _ => None,
        }
    });
    let failover = killed.elapsed();
    eprintln!("new leader {new_leader} {failover:?} after the SIGKILL (during the canary's wave)");
    assert!(
        failover <= LEASE + Duration::from_secs(3),
        "failover took {failover:?}"
    );

    // The rollout moves on from where it was and completes; no host updated twice.
    let done = wait_for(Duration::from_secs(60), "the rollout to end", || {
        for (host, pid) in pids_serving(&fleet, "2.0.0") {
            first_pids.entry(host).or_insert(pid);
        }
        let out = fleet.ctl_via(&format!("{u2},{u3}"), &["rollout", "status", &id]);
        (out.code == 0 && out.json["state"] != "running" && out.json["state"] != "paused")
            .then_some(out.json)
    });
    assert_eq!(done["state"], "succeeded", "{done:#}");
    let last_pids = pids_serving(&fleet, "2.0.0");
    assert_eq!(last_pids.len(), 4, "every host serves 2.0.0: {last_pids:?}");
    for (host, pid) in &last_pids {
        assert_eq!(
            first_pids.get(host),
            Some(pid),
            "{host} was restarted after it first served 2.0.0: updated twice"
        );
    }
    c2.kill_now();
    c3.kill_now();
    drop(fleet);
    drop(etcd);
}

#[test]
fn a_leader_cut_from_etcd_stops_leading_before_its_lease_ends() {
    let Some(etcd) = Etcd::single() else {
        return;
    };
    let member: std::net::SocketAddr = etcd.urls()[0]
        .trim_start_matches("http://")
        .parse()
        .expect("an etcd address");
    let proxy = Proxy::start(member, 1).expect("a proxy in front of etcd");
    let through_proxy = format!("http://{}", proxy.addr());
    // The first controller reaches etcd through the proxy only.
    let fleet =
        Fleet::start_with_init_args(0, &["--etcd", &through_proxy, "--etcd-prefix", "/cut"]);
    let c1 = fleet.controller_url();
    let direct = fleet.config_dir().join("controller-direct.toml");
    let text = std::fs::read_to_string(fleet.config_dir().join("controller.toml")).unwrap();
    std::fs::write(&direct, text.replace(&through_proxy, &etcd.urls()[0])).unwrap();
    let a2 = free_addr();
    let mut c2 = start_controller(&fleet, &direct, "c2", &a2);
    let u2 = format!("https://{a2}");
    wait_until(
        Duration::from_secs(30),
        "the first controller leading, the second listed",
        || leader_via(&fleet, &u2) == Some((Some(c1.clone()), 2)),
    );

    proxy.cut();
    let cut = Instant::now();
    let log = || fleet.controller_log();
    wait_until(
        Duration::from_secs(20),
        "the cut leader to step down",
        || log().contains("no longer leads the fleet"),
    );
    let stepped_down = cut.elapsed();
    eprintln!("the cut leader stepped down {stepped_down:?} after the cut");
    assert!(
        stepped_down < LEASE,
        "stepped down {stepped_down:?} after the cut"
    );
    wait_until(
        Duration::from_secs(30),
        "the second controller to lead",
        || matches!(leader_via(&fleet, &u2), Some((Some(leader), _)) if leader == u2),
    );
    eprintln!(
        "the second controller leads {:?} after the cut",
        cut.elapsed()
    );
    // The deposed one, which cannot reach etcd, serves nothing that needs the leader (or the
    // store) and says why.
    let refused = fleet.ctl_via(&c1, &["status"]);
    assert_ne!(refused.code, 0);
    assert!(
        refused.stderr.contains("not the leader") || refused.stderr.contains("etcd at"),
        "{}",
        refused.stderr
    );
    c2.kill_now();
    drop(fleet);
    drop(proxy);
    drop(etcd);
}
