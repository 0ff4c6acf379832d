//! User story: a host is sick; on-call staff replace it with a fresh one in one command,
//! `fleetctl replace OLD --with ssh://…`. The new host is bootstrapped over SSH (a real sshd
//! on loopback) with the old one's labels, takes every release the old one runs and passes its
//! smoke checks, and only then is the old host drained and removed: a watcher polling both
//! hosts' app all along never sees a moment with no healthy instance.

use fleet_tests::fleet::Fleet;
use fleet_tests::sshd::{RemoteAgents, SshClient, Sshd};
use fleet_tests::{http, web_manifest};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

const REPLACE_DEADLINE: Duration = Duration::from_secs(240);

#[test]
fn replace_brings_in_the_new_host_with_every_release_before_the_old_one_goes() {
    let fleet = Fleet::start(1);
    let client = SshClient::new(&fleet.dir().join("ssh-client"));
    let Some(sshd) = Sshd::start(&fleet.dir().join("sshd"), &client.public_line) else {
        return;
    };
    let remote = fleet_tests::fleet::remote_parent(fleet.dir()).join("n1");
    let _agents = RemoteAgents {
        remote_dirs: vec![remote.clone()],
    };
    std::fs::write(&client.known_hosts, sshd.known_hosts_line() + "\n").unwrap();

    fleet
        .create_web_release("1.0.0", &web_manifest("20s"), &[])
        .expect_code(0);
    fleet.ctl_ok(&["label", "h1", "env=prod"]);
    fleet
        .ctl(&["rollout", "web", "1.0.0", "--selector", "env=prod"])
        .expect_code(0);
    let old_addr = fleet.agent("h1").advertise.clone();
    let new_addr = fleet.range.host_addr(1);
    fleet.wait_all_serve("1.0.0", Duration::from_secs(20));

    // The watcher: counts polls where neither host served the app.
    let stop = Arc::new(AtomicBool::new(false));
    let gaps = Arc::new(AtomicU32::new(0));
    let polls = Arc::new(AtomicU32::new(0));
    let watcher = {
        let (stop, gaps, polls) = (stop.clone(), gaps.clone(), polls.clone());
        let (old_addr, new_addr) = (old_addr.clone(), new_addr.clone());
        std::thread::spawn(move || {
            // Bounded by the stop flag, which the test sets, and by a count.
            for _ in 0..20_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let healthy = [&old_addr, &new_addr]
                    .iter()
                    .any(|addr| http::get_ok(addr, "/healthz").is_some());
                polls.fetch_add(1, Ordering::Relaxed);
                if !healthy {
                    gaps.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let identity = client.identity.display().to_string();
    let known_hosts = client.known_hosts.display().to_string();
    let remote_text = remote.display().to_string();
    let url = sshd.url();
    let out = fleet.ctl_with_deadline(
        &[
            "replace",
            "h1",
            "--with",
            &url,
            "--name",
            "n1",
            "--advertise",
            &new_addr,
            "--identity",
            &identity,
            "--known-hosts",
            &known_hosts,
            "--remote-dir",
            &remote_text,
        ],
        REPLACE_DEADLINE,
    );
    stop.store(true, Ordering::Relaxed);
    watcher.join().expect("the watcher thread");
    if out.code != 0 {
        eprintln!("sshd log:\n{}", sshd.log_tail());
    }
    let out = out.expect_code(0);

    // The report: bootstrapped, converged (running 1.0.0), the old host removed.
    assert_eq!(out.json["bootstrap"]["ok"], true, "{:#}", out.json);
    let converged = &out.json["converged"];
    assert_eq!(converged["name"], "n1", "{converged:#}");
    let web = converged["apps"]
        .as_array()
        .and_then(|apps| apps.iter().find(|a| a["app"] == "web"))
        .expect("web on the new host");
    assert_eq!(web["actual"]["state"], "running", "{web:#}");
    assert_eq!(web["actual"]["version"], "1.0.0", "{web:#}");

    assert_eq!(
        http::get_ok(&new_addr, "/").as_deref(),
        Some("web 1.0.0 on n1\n")
    );
    let hosts = fleet.ctl_ok(&["hosts"]);
    let names: Vec<&str> = hosts["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|h| h["name"].as_str())
        .collect();
    assert_eq!(names, vec!["n1"], "{hosts:#}");
    // The new host took the old one's labels: it is in the same deployment.
    assert_eq!(
        hosts["hosts"][0]["labels"],
        serde_json::json!({"env": "prod"}),
        "{hosts:#}"
    );
    assert!(
        polls.load(Ordering::Relaxed) > 0,
        "the watcher must have polled"
    );
    assert_eq!(
        gaps.load(Ordering::Relaxed),
        0,
        "at no moment may the app have had no healthy instance"
    );
}

#[test]
fn replace_refuses_an_unknown_old_host_and_touches_nothing() {
    let fleet = Fleet::start(1);
    let client = SshClient::new(&fleet.dir().join("ssh-client"));
    let identity = client.identity.display().to_string();
    let out = fleet.ctl(&[
        "replace",
        "ghost",
        "--with",
        "ssh://root@127.0.0.1:1",
        "--identity",
        &identity,
    ]);
    let out = out.expect_code(2);
    assert!(out.stderr.contains("no host ghost"), "{}", out.stderr);
    let hosts = fleet.ctl_ok(&["hosts"]);
    assert_eq!(hosts["hosts"].as_array().unwrap().len(), 1);
}
