//! User story: an operator reads an app's log without SSH. `fleetctl logs web` shows what the
//! example app printed on every host, `--host h2 --lines 5` five lines of h2, and `--follow` a
//! line the app prints after the call started; an instance adopted by a restarted agent keeps
//! logging; the log file is the agent's alone (0600) and
//! stays bounded when the app writes more than the bound; a deployer may read logs, an agent's
//! certificate may not. A broken release's rollout and `history` show the smoke check's answer
//! and the app's last log lines on the failed host.

use fleet_tests::fleet::Fleet;
use fleet_tests::{http, wait_for, wait_until, web_manifest};
use std::io::BufRead;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

/// The agent's rotation bound (agent/src/app_log.rs `MAX_LOG_BYTES`).
const MAX_LOG_BYTES: u64 = 1 << 20;

#[test]
fn logs_show_every_host_follow_new_lines_and_are_the_agents_alone() {
    let mut fleet = Fleet::start(2);
    fleet.create_web_releases(&["1.0.0"]);
    fleet.ctl_ok(&["rollout", "web", "1.0.0", "--batch", "2"]);
    fleet.wait_all_serve("1.0.0", Duration::from_secs(15));

    // Every host's start line, each line with its host.
    let all = fleet.ctl(&["logs", "web"]).expect_code(0).json_lines();
    for host in ["h1", "h2"] {
        assert!(
            all.iter().any(|l| l["host"] == host
                && l["line"]
                    .as_str()
                    .unwrap()
                    .contains(&format!("web 1.0.0 on {host} listening"))),
            "{host}'s start line in {all:#?}"
        );
    }
    // Enough lines on h2 (each request is one).
    for _ in 0..6 {
        let _ = http::get_ok(&fleet.agent("h2").advertise, "/");
    }
    let five = fleet
        .ctl(&["logs", "web", "--host", "h2", "--lines", "5"])
        .expect_code(0)
        .json_lines();
    assert_eq!(five.len(), 5, "{five:#?}");
    assert!(five.iter().all(|l| l["host"] == "h2"), "{five:#?}");

    // --follow sees a request made after it started.
    let mut command = std::process::Command::new(&fleet.bins.fleetctl);
    command
        .args(["--config-dir", &fleet.config_dir().display().to_string()])
        .args(["--controller", &fleet.controller_url()])
        .args(["logs", "web", "--host", "h1", "--lines", "1", "--follow"])
        .env_remove("FLEET_CONFIG_DIR")
        .env_remove("FLEET_CONTROLLER")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let mut follow = command.spawn().expect("start fleetctl logs --follow");
    let stdout = follow.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let first = lines_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the last line comes first");
    assert!(!first.is_empty());
    let marker = "/marker-seen-by-follow";
    let _ = http::get_ok(&fleet.agent("h1").advertise, marker);
    let seen = wait_for(
        Duration::from_secs(20),
        "the follow to show the request",
        || {
            lines_rx
                .recv_timeout(Duration::from_millis(200))
                .ok()
                .filter(|line| line.contains(marker))
        },
    );
    assert!(seen.contains("404"), "{seen}");
    let _ = follow.kill();
    let _ = follow.wait();

    // An instance adopted after the agent's restart keeps logging (it holds its own descriptor
    // of the file), and the restarted agent serves its lines.
    let pid = fleet.web_pid("h1").expect("a pid");
    fleet.restart_agent("h1");
    fleet.wait_hosts_ready(2);
    assert_eq!(fleet.web_pid("h1"), Some(pid), "adopted, not restarted");
    let marker = "/marker-after-agent-restart";
    let _ = http::get_ok(&fleet.agent("h1").advertise, marker);
    let after = fleet
        .ctl(&["logs", "web", "--host", "h1", "--lines", "20"])
        .expect_code(0)
        .json_lines();
    assert!(
        after
            .iter()
            .any(|l| l["line"].as_str().unwrap().contains(marker)),
        "{after:#?}"
    );

    // The agent's alone.
    let log = fleet.agent("h1").data_dir.join("logs/web.log");
    let meta = std::fs::metadata(&log).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600, "{}", log.display());
    let agent_uid = std::fs::metadata(&fleet.agent("h1").data_dir)
        .unwrap()
        .uid();
    assert_eq!(
        meta.uid(),
        agent_uid,
        "owned by the agent's user, not the app's"
    );

    // Bad input says what exists.
    let out = fleet.ctl(&["logs", "nope"]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("fleetctl status"), "{}", out.stderr);
    let out = fleet.ctl(&["logs", "web", "--host", "h9"]);
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains("fleetctl hosts") && out.stderr.contains("h1, h2"),
        "{}",
        out.stderr
    );
    let out = fleet.ctl(&["logs", "web", "--lines", "10001"]);
    assert_eq!(out.code, 2, "{}", out.stderr);

    // A deployer may; an agent's certificate may not.
    let ci = fleet.dir().join("ci");
    fleet.ctl_ok(&[
        "credentials",
        "create",
        "ci",
        "--role",
        "deployer",
        "--out",
        &ci.display().to_string(),
    ]);
    let out = fleet.ctl_in(
        &ci,
        &[
            "--controller",
            &fleet.controller_url(),
            "logs",
            "web",
            "--lines",
            "3",
        ],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.json_lines().len(), 6, "3 lines of each host");
    let stolen = config_dir_from_agent(&fleet, "h1");
    let out = fleet.ctl_in(
        &stolen,
        &["--controller", &fleet.controller_url(), "logs", "web"],
    );
    assert_ne!(out.code, 0, "an agent certificate must not read logs");
    assert!(out.stdout.is_empty(), "{}", out.stdout);
}

/// A config dir made of a host's own TLS files, as if someone took them for fleetctl.
fn config_dir_from_agent(fleet: &Fleet, host: &str) -> PathBuf {
    let tls = fleet.agent(host).data_dir.join("tls");
    let dir = fleet.dir().join(format!("stolen-{host}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(tls.join("agent.pem"), dir.join("client.pem")).unwrap();
    std::fs::copy(tls.join("agent.key"), dir.join("client.key")).unwrap();
    std::fs::copy(tls.join("ca.pem"), dir.join("ca.pem")).unwrap();
    dir
}

#[test]
fn a_failed_smoke_check_shows_its_answer_and_the_apps_last_lines() {
    let fleet = Fleet::start(2);
    let manifest = web_manifest("10s");
    fleet
        .create_web_release("1.0.0", &manifest, &[])
        .expect_code(0);
    fleet
        .create_web_release("1.1.0", &manifest, &["WEB_BROKEN=1"])
        .expect_code(0);
    fleet.ctl_ok(&["rollout", "web", "1.0.0", "--batch", "2"]);
    let out = fleet
        .ctl(&["rollout", "web", "1.1.0", "--smoke-timeout", "3s"])
        .expect_code(1);
    let canary = &out.json["waves"][0]["hosts"][0];
    let message = canary["message"].as_str().unwrap_or_default().to_string();
    for expected in [
        "answered 500",
        "broken: WEB_BROKEN=1",
        "last log lines",
        "GET /healthz 500",
    ] {
        assert!(
            message.contains(expected),
            "{expected:?} in the canary's message: {message}"
        );
    }
    let history = fleet.ctl_ok(&["history", "web"]).to_string();
    assert!(
        history.contains("GET /healthz 500") && history.contains("broken: WEB_BROKEN=1"),
        "history shows the answer and the log lines: {history}"
    );
}

#[test]
fn a_log_stays_bounded_when_the_app_writes_more() {
    let fleet = Fleet::start(1);
    let manifest = r#"[process]
command = ["/bin/sh", "-c", "i=0; while [ $i -lt 3000 ]; do printf '%01000d\n' $i; i=$((i+1)); done; echo done-writing; exec sleep 600"]
stop_timeout = "2s"
"#;
    let artifact = fleet.write_artifact(&[("fleet.toml", manifest.as_bytes(), 0o644)]);
    fleet
        .create_release("chatty", "1.0", &artifact, &[])
        .expect_code(0);
    fleet.ctl_ok(&["rollout", "chatty", "1.0"]);
    let log = fleet.agent("h1").data_dir.join("logs/chatty.log");
    let rotated = fleet.agent("h1").data_dir.join("logs/chatty.log.1");
    // About 3 MB written: rotated at least twice, and then no bigger than the bound.
    wait_until(
        Duration::from_secs(30),
        "the log to be rotated and bounded",
        || {
            let size = |path: &PathBuf| std::fs::metadata(path).map(|m| m.len()).ok();
            matches!((size(&log), size(&rotated)), (Some(now), Some(old))
            if now <= MAX_LOG_BYTES && old <= MAX_LOG_BYTES
                && [&log, &rotated].iter().any(|path| {
                    std::fs::read_to_string(path).is_ok_and(|t| t.contains("done-writing"))
                }))
        },
    );
    for path in [&log, &rotated] {
        assert_eq!(
            std::fs::metadata(path).unwrap().mode() & 0o777,
            0o600,
            "{}",
            path.display()
        );
    }
    let last = fleet
        .ctl(&["logs", "chatty", "--lines", "2"])
        .expect_code(0)
        .json_lines();
    assert_eq!(last.len(), 2, "{last:#?}");
    assert_eq!(last[1]["line"], "done-writing");
    assert_eq!(last[1]["host"], "h1");
}
