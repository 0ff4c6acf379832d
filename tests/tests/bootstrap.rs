//! User story: on-call staff bring fresh hosts into the fleet with `fleetctl bootstrap
//! ssh://…`, against a real OpenSSH sshd the test starts on loopback. The agent really runs on
//! the "host" (detached: no systemd here), registers, takes a rollout and serves the app;
//! bootstrapping again upgrades it in place. Host keys are checked against known_hosts: an
//! unknown key is refused unless `--accept-new-host-key` (then recorded), a changed key is
//! always refused and the message names the presented key's fingerprint and the known_hosts
//! line. Without `--identity`, the login goes through a real ssh-agent (`SSH_AUTH_SOCK`). Every
//! agent the test started is killed by the pid in its remote pid file.

use fleet_tests::fleet::{CtlOutput, Fleet};
use fleet_tests::sshd::{self, RemoteAgents, SshAgent, SshClient, Sshd};
use fleet_tests::{http, process, wait_until, web_manifest};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A bootstrap uploads the (debug, large) agent binary and waits for registration.
const BOOTSTRAP_DEADLINE: Duration = Duration::from_secs(180);

struct Setup {
    // Field order is drop order: agents first, then sshd, then the fleet (and its temp dir).
    agents: RemoteAgents,
    sshd: Sshd,
    client: SshClient,
    fleet: Fleet,
}

/// A controller with no hosts, an sshd and a client key; None (skip) without sshd.
fn setup() -> Option<Setup> {
    let fleet = Fleet::start(0);
    let client = SshClient::new(&fleet.dir().join("ssh-client"));
    let sshd = Sshd::start(&fleet.dir().join("sshd"), &client.public_line)?;
    Some(Setup {
        agents: RemoteAgents {
            remote_dirs: Vec::new(),
        },
        sshd,
        client,
        fleet,
    })
}

impl Setup {
    fn remote_dir(&mut self, name: &str) -> PathBuf {
        let dir = fleet_tests::fleet::remote_parent(self.fleet.dir()).join(name);
        self.agents.remote_dirs.push(dir.clone());
        dir
    }

    /// `fleetctl bootstrap` with the test's key and known_hosts, plus `extra`.
    fn bootstrap(&self, extra: &[&str]) -> CtlOutput {
        self.over_ssh("bootstrap", extra)
    }

    /// `fleetctl VERB` (bootstrap, upgrade-agents) with the test's key and known_hosts.
    fn over_ssh(&self, verb: &str, extra: &[&str]) -> CtlOutput {
        let identity = self.client.identity.display().to_string();
        let known_hosts = self.client.known_hosts.display().to_string();
        let mut args = vec![verb, "--identity", &identity, "--known-hosts", &known_hosts];
        args.extend_from_slice(extra);
        let out = self.fleet.ctl_with_deadline(&args, BOOTSTRAP_DEADLINE);
        if out.code != 0 {
            eprintln!("sshd log:\n{}", self.sshd.log_tail());
        }
        out
    }
}

fn host<'a>(hosts: &'a Value, name: &str) -> Option<&'a Value> {
    hosts["hosts"]
        .as_array()?
        .iter()
        .find(|h| h["name"] == name)
}

fn detached_pid(result: &Value) -> u64 {
    result["install"]["mode"]["detached"]["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no detached pid in {result:#}"))
}

#[test]
fn without_identity_the_login_goes_through_ssh_agent() {
    let Some(mut setup) = setup() else { return };
    let Some(agent) = SshAgent::start(&setup.fleet.dir().join("ssh-agent")) else {
        return;
    };
    std::fs::write(
        &setup.client.known_hosts,
        setup.sshd.known_hosts_line() + "\n",
    )
    .unwrap();
    let remote = setup.remote_dir("s1");
    let remote_text = remote.display().to_string();
    let url = setup.sshd.url();
    let advertise = setup.fleet.range.host_addr(0);
    let known_hosts = setup.client.known_hosts.display().to_string();
    let args = [
        "bootstrap",
        url.as_str(),
        "--name",
        "s1",
        "--advertise",
        &advertise,
        "--remote-dir",
        &remote_text,
        "--known-hosts",
        &known_hosts,
    ];

    // An empty agent: refused before anything is sent, with what to do.
    let refused = setup
        .fleet
        .ctl_with_ssh_agent(&args, &agent.socket, BOOTSTRAP_DEADLINE)
        .expect_code(1);
    let error = refused.json["results"][0]["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        error.contains("ssh-agent holds no keys") && error.contains("--identity"),
        "{error}"
    );
    assert!(!remote.exists(), "nothing may be installed without a login");

    // With the test's key in the agent: logged in, installed, registered.
    agent.add(&setup.client.identity);
    let out = setup
        .fleet
        .ctl_with_ssh_agent(&args, &agent.socket, BOOTSTRAP_DEADLINE);
    if out.code != 0 {
        eprintln!("sshd log:\n{}", setup.sshd.log_tail());
    }
    let out = out.expect_code(0);
    assert_eq!(out.json["results"][0]["ok"], true, "{:#}", out.json);
    let hosts = setup.fleet.ctl_ok(&["hosts"]);
    assert_eq!(host(&hosts, "s1").unwrap()["connected"], true);
}

#[test]
fn an_unknown_host_key_is_refused_unless_accepted_and_then_recorded() {
    let Some(mut setup) = setup() else { return };
    let remote = setup.remote_dir("k1");
    let remote_text = remote.display().to_string();
    let url = setup.sshd.url();
    let advertise = setup.fleet.range.host_addr(0);
    let common = [
        url.as_str(),
        "--name",
        "k1",
        "--advertise",
        &advertise,
        "--remote-dir",
        &remote_text,
    ];

    // Unknown key, no flag: refused before logging in; nothing recorded, nothing installed.
    let refused = setup.bootstrap(&common).expect_code(1);
    let result = &refused.json["results"][0];
    assert_eq!(result["ok"], false, "{:#}", refused.json);
    let error = result["error"].as_str().unwrap_or_default();
    assert!(error.contains("unknown"), "{error}");
    assert!(
        error.contains(&setup.sshd.host_key_fingerprint()),
        "the refusal names the presented key: {error}"
    );
    assert!(error.contains("--accept-new-host-key"), "{error}");
    assert!(!setup.client.known_hosts.exists());
    assert!(
        !remote.exists(),
        "nothing may be installed on a refused host"
    );

    // With the flag: accepted and recorded, and the host registers.
    let mut args = common.to_vec();
    args.push("--accept-new-host-key");
    let accepted = setup.bootstrap(&args).expect_code(0);
    let result = &accepted.json["results"][0];
    assert_eq!(result["host_key_recorded"], true, "{result:#}");
    assert_eq!(
        result["host_key_fingerprint"].as_str(),
        Some(setup.sshd.host_key_fingerprint().as_str())
    );
    let known = std::fs::read_to_string(&setup.client.known_hosts).unwrap();
    assert_eq!(known.trim(), setup.sshd.known_hosts_line().trim());
    let hosts = setup.fleet.ctl_ok(&["hosts"]);
    assert_eq!(host(&hosts, "k1").unwrap()["connected"], true);

    // Known now: no flag needed, nothing new recorded.
    let again = setup.bootstrap(&common).expect_code(0);
    assert_eq!(again.json["results"][0]["host_key_recorded"], false);
    assert_eq!(
        std::fs::read_to_string(&setup.client.known_hosts).unwrap(),
        known
    );
}

#[test]
fn a_changed_host_key_is_always_refused_with_its_fingerprint_and_the_known_hosts_line() {
    let Some(mut setup) = setup() else { return };
    let remote = setup.remote_dir("c1");
    let remote_text = remote.display().to_string();
    let url = setup.sshd.url();
    let advertise = setup.fleet.range.host_addr(0);
    // known_hosts records the key of the host as it was before.
    let comment = "# fleet test hosts\n";
    std::fs::write(
        &setup.client.known_hosts,
        format!("{comment}{}\n", setup.sshd.known_hosts_line()),
    )
    .unwrap();
    setup.sshd.restart_with_new_host_key();
    let before = std::fs::read_to_string(&setup.client.known_hosts).unwrap();

    for extra in [&[][..], &["--accept-new-host-key"][..]] {
        let mut args = vec![
            url.as_str(),
            "--name",
            "c1",
            "--advertise",
            &advertise,
            "--remote-dir",
            &remote_text,
        ];
        args.extend_from_slice(extra);
        let out = setup.bootstrap(&args).expect_code(1);
        let error = out.json["results"][0]["error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(error.contains("CHANGED"), "{error}");
        assert!(
            error.contains(&setup.sshd.host_key_fingerprint()),
            "the refusal names the presented key: {error}"
        );
        assert!(
            error.contains(&format!("{} line 2", setup.client.known_hosts.display())),
            "the refusal names the known_hosts line: {error}"
        );
        assert_eq!(
            std::fs::read_to_string(&setup.client.known_hosts).unwrap(),
            before,
            "a changed key is never recorded"
        );
        assert!(
            !remote.exists(),
            "nothing may be installed on a refused host"
        );
    }
}

/// Waits until the web app on `addr` answers `web VERSION on HOST`.
fn wait_serves(addr: &str, version: &str, host: &str) {
    let expect = format!("web {version} on {host}\n");
    wait_until(
        Duration::from_secs(30),
        &format!("{host} to serve {expect:?}"),
        || http::get_ok(addr, "/").as_deref() == Some(expect.as_str()),
    );
}

#[test]
fn a_bootstrapped_host_runs_its_agent_takes_a_rollout_and_upgrades_in_place() {
    let Some(mut setup) = setup() else { return };
    let remote = setup.remote_dir("b1");
    let remote_text = remote.display().to_string();
    let url = setup.sshd.url();
    let advertise = setup.fleet.range.host_addr(0);
    let args = [
        url.as_str(),
        "--name",
        "b1",
        "--advertise",
        &advertise,
        "--labels",
        "env=test,role=web",
        "--remote-dir",
        &remote_text,
        "--accept-new-host-key",
    ];
    let first = setup.bootstrap(&args).expect_code(0);
    let result = &first.json["results"][0];
    assert_eq!(result["ok"], true, "{result:#}");
    assert_eq!(result["install"]["upgraded"], false, "{result:#}");
    let pid = detached_pid(result);
    assert_eq!(sshd::agent_pid(&remote), Some(pid as u32));
    assert!(process::pid_is_alive(pid as u32));

    // What landed on the host: the binary, a private config, the data dir.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&remote.join("agent.toml")), 0o600);
    assert_eq!(mode(&remote.join("bin/fleet-agent")), 0o755);
    assert!(remote.join("data").is_dir());
    let config = std::fs::read_to_string(remote.join("agent.toml")).unwrap();
    assert!(config.contains("name = \"b1\""), "{config}");

    // Registered with its labels, and it takes a rollout and serves the app.
    let hosts = setup.fleet.ctl_ok(&["hosts"]);
    let b1 = host(&hosts, "b1").expect("b1 is listed");
    assert_eq!(b1["connected"], true);
    assert_eq!(b1["labels"]["role"], "web", "{b1:#}");
    assert_eq!(b1["advertise_addr"], advertise.as_str(), "{b1:#}");
    setup
        .fleet
        .create_web_release("1.0.0", &web_manifest("20s"), &[])
        .expect_code(0);
    let rollout = setup
        .fleet
        .ctl_with_deadline(
            &["rollout", "web", "1.0.0", "--selector", "role=web"],
            BOOTSTRAP_DEADLINE,
        )
        .expect_code(0)
        .json;
    assert_eq!(rollout["state"], "succeeded", "{rollout:#}");
    wait_serves(&advertise, "1.0.0", "b1");
    let app_pid = fleet_tests::http::get_ok(&advertise, "/pid").expect("the app's pid");

    // Bootstrap again: the old agent is stopped, the new one started with the same data dir
    // (so no new join is needed), and it adopts the app, which never stopped.
    let second = setup.bootstrap(&args).expect_code(0);
    let result = &second.json["results"][0];
    assert_eq!(result["install"]["upgraded"], true, "{result:#}");
    let new_pid = detached_pid(result);
    assert_ne!(new_pid, pid);
    wait_until(Duration::from_secs(20), "the old agent to be gone", || {
        !process::pid_is_alive(pid as u32)
    });
    assert!(process::pid_is_alive(new_pid as u32));
    wait_serves(&advertise, "1.0.0", "b1");
    assert_eq!(
        fleet_tests::http::get_ok(&advertise, "/pid"),
        Some(app_pid),
        "the upgrade did not restart the app"
    );
    let hosts = setup.fleet.ctl_ok(&["hosts"]);
    assert_eq!(hosts["hosts"].as_array().unwrap().len(), 1, "{hosts:#}");
}

#[test]
fn several_hosts_from_a_targets_file_are_bootstrapped_in_parallel() {
    let Some(mut setup) = setup() else { return };
    let url = setup.sshd.url();
    let mut lines = String::from("# two hosts on one sshd, each with its own remote dir\n");
    for idx in 0..2 {
        let name = format!("p{}", idx + 1);
        let remote = setup.remote_dir(&name);
        lines.push_str(&format!(
            "{url} name={name} advertise={} labels=env=test remote_dir={}\n",
            setup.fleet.range.host_addr(idx),
            remote.display()
        ));
    }
    let targets = setup.fleet.dir().join("targets.txt");
    std::fs::write(&targets, lines).unwrap();
    let targets_text = targets.display().to_string();
    let out = setup
        .bootstrap(&["--targets", &targets_text, "--accept-new-host-key"])
        .expect_code(0);
    let results = out.json["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for result in results {
        assert_eq!(result["ok"], true, "{result:#}");
    }
    // The host key was recorded once, although two connections met it at the same time.
    let known = std::fs::read_to_string(&setup.client.known_hosts).unwrap();
    assert_eq!(known.lines().count(), 1, "{known}");
    setup.fleet.wait_hosts_ready(2);

    // One bad target fails alone, and the exit code says so.
    let bad = setup
        .bootstrap(&[
            "ssh://nobody@127.0.0.1:1",
            "--name",
            "x1",
            "--advertise",
            "127.0.0.1",
            "--remote-dir",
            "/tmp/fleet-never",
        ])
        .expect_code(1);
    assert_eq!(bad.json["results"][0]["ok"], false);
}

/// User story: two hosts were bootstrapped from a targets file and run web. A new agent build
/// goes out with `upgrade-agents` over the same file: one host, then the other; each agent is
/// replaced and the apps never stop (same pids before and after).
#[test]
fn upgrade_agents_replaces_every_agent_wave_by_wave_and_no_app_restarts() {
    let Some(mut setup) = setup() else { return };
    let url = setup.sshd.url();
    let mut lines = String::new();
    let mut addrs = Vec::new();
    for idx in 0..2 {
        let name = format!("u{}", idx + 1);
        let remote = setup.remote_dir(&name);
        let addr = setup.fleet.range.host_addr(idx);
        lines.push_str(&format!(
            "{url} name={name} advertise={addr} labels=role=web remote_dir={}\n",
            remote.display()
        ));
        addrs.push((name, addr));
    }
    let targets = setup.fleet.dir().join("targets.txt");
    std::fs::write(&targets, lines).unwrap();
    let targets_text = targets.display().to_string();
    let first = setup
        .bootstrap(&["--targets", &targets_text, "--accept-new-host-key"])
        .expect_code(0);
    setup.fleet.wait_hosts_ready(2);
    setup
        .fleet
        .create_web_release("1.0.0", &web_manifest("20s"), &[])
        .expect_code(0);
    setup
        .fleet
        .ctl_with_deadline(
            &["rollout", "web", "1.0.0", "--batch", "100%"],
            BOOTSTRAP_DEADLINE,
        )
        .expect_code(0);
    let mut app_pids = Vec::new();
    for (name, addr) in &addrs {
        wait_serves(addr, "1.0.0", name);
        app_pids.push(http::get_ok(addr, "/pid").expect("the app's pid"));
    }
    let old_agents: Vec<u64> = first.json["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(detached_pid)
        .collect();

    // A new build: the same program with other bytes (an ELF runs with bytes appended).
    let mut build = std::fs::read(&setup.fleet.bins.agent).unwrap();
    build.extend_from_slice(b"\nfleet-agent, a newer build\n");
    let new_agent = setup.fleet.dir().join("fleet-agent-new");
    std::fs::write(&new_agent, &build).unwrap();
    let new_agent_text = new_agent.display().to_string();
    let out = setup
        .over_ssh(
            "upgrade-agents",
            &[
                "--targets",
                &targets_text,
                "--agent-binary",
                &new_agent_text,
                "--selector",
                "role=web",
            ],
        )
        .expect_code(0);
    let hosts = out.json["hosts"].as_array().expect("the upgraded hosts");
    assert_eq!(hosts.len(), 2, "{:#}", out.json);
    for (idx, host) in hosts.iter().enumerate() {
        assert_eq!(host["ok"], true, "{host:#}");
        assert_eq!(host["wave"], idx + 1, "one host per wave: {host:#}");
        assert_eq!(host["install"]["install"]["upgraded"], true, "{host:#}");
        assert!(host["message"]
            .as_str()
            .unwrap_or("")
            .contains("web kept running"));
        assert_ne!(
            detached_pid(&host["install"]),
            old_agents[idx],
            "a new agent"
        );
    }
    for ((name, addr), pid) in addrs.iter().zip(&app_pids) {
        assert_eq!(
            http::get_ok(addr, "/pid").as_ref(),
            Some(pid),
            "{name}'s app was not restarted"
        );
    }
    // The binary on each host is the new build.
    for dir in &setup.agents.remote_dirs {
        assert_eq!(std::fs::read(dir.join("bin/fleet-agent")).unwrap(), build);
    }

    // A host the fleet does not know is refused before anything is touched.
    let stranger = format!("{url} name=stranger advertise=127.0.0.1 remote_dir=/tmp/fleet-never\n");
    let strangers = setup.fleet.dir().join("strangers.txt");
    std::fs::write(&strangers, stranger).unwrap();
    let strangers_text = strangers.display().to_string();
    let refused = setup
        .over_ssh("upgrade-agents", &["--targets", &strangers_text])
        .expect_code(2);
    assert!(
        refused.stderr.contains("not in the fleet"),
        "{}",
        refused.stderr
    );
}

#[test]
fn an_agent_that_dies_at_start_fails_its_host_at_once_with_the_end_of_its_log() {
    let Some(mut setup) = setup() else { return };
    let remote = setup.remote_dir("d1");
    let remote_text = remote.display().to_string();
    // A stand-in "agent" that complains and exits, as one with a broken config would.
    let broken = setup.fleet.dir().join("broken-agent");
    std::fs::write(
        &broken,
        "#!/bin/sh\necho 'fleet-agent: config is not valid: broken on purpose' >&2\nexit 2\n",
    )
    .unwrap();
    let broken_text = broken.display().to_string();
    let url = setup.sshd.url();
    let advertise = setup.fleet.range.host_addr(0);
    let started = std::time::Instant::now();
    let out = setup
        .bootstrap(&[
            &url,
            "--name",
            "d1",
            "--advertise",
            &advertise,
            "--remote-dir",
            &remote_text,
            "--agent-binary",
            &broken_text,
            "--accept-new-host-key",
            "--deadline",
            "60s",
        ])
        .expect_code(1);
    let error = out.json["results"][0]["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(error.contains("stopped right after it started"), "{error}");
    assert!(error.contains("broken on purpose"), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "a dead agent is noticed long before the deadline"
    );
}
