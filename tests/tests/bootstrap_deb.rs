//! User story: an operator whose hosts run Debian installs the agent from its package,
//! `fleetctl bootstrap ssh://… --agent-deb fleet-agent_*.deb`, so that dpkg knows what is on
//! the host. The "host" is a real OpenSSH sshd started inside a disposable root (new mount and
//! pid namespaces, overlays over /usr, /etc and /var: see `fleet_tests::disposable_root`), so
//! the real `dpkg -i` runs and writes only into the test's dir; this machine's dpkg database is
//! checked to be untouched. The package is built by the test from the debug agent with the same
//! packaging/ files as `scripts/package.sh` (`fleet_tests::agent_deb`; cargo-deb is not
//! needed). Bad input (a file that is no .deb, the .deb of another package) is refused before
//! any SSH login. Every process of the root dies with it when the test kills its `unshare` by
//! pid.

use fleet_tests::agent_deb;
use fleet_tests::disposable_root::DisposableRoot;
use fleet_tests::fleet::Fleet;
use fleet_tests::process;
use fleet_tests::sshd::{SshClient, Sshd};
use fleet_tests::{http, wait_until, web_manifest};
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// A bootstrap uploads the (debug, large) package and waits for registration.
const BOOTSTRAP_DEADLINE: Duration = Duration::from_secs(180);

struct Setup {
    // Field order is drop order: sshd (and with it the root and everything in it), then the
    // fleet and its temp dir.
    sshd: Sshd,
    client: SshClient,
    fleet: Fleet,
}

impl Setup {
    /// `fleetctl bootstrap` with the test's key and known_hosts, plus `extra`.
    fn bootstrap(&self, extra: &[&str]) -> fleet_tests::fleet::CtlOutput {
        let identity = self.client.identity.display().to_string();
        let known_hosts = self.client.known_hosts.display().to_string();
        let mut args = vec![
            "bootstrap",
            "--identity",
            &identity,
            "--known-hosts",
            &known_hosts,
        ];
        args.extend_from_slice(extra);
        let out = self.fleet.ctl_with_deadline(&args, BOOTSTRAP_DEADLINE);
        if out.code != 0 {
            eprintln!("sshd log:\n{}", self.sshd.log_tail());
        }
        out
    }
}

/// What this machine's own dpkg says of fleet-agent (it must be the same after the test).
fn dpkg_status_here() -> String {
    let mut command = Command::new("dpkg");
    command.args(["-s", "fleet-agent"]);
    let out = process::run_with_deadline(command, Duration::from_secs(60));
    format!("{} {}", out.code, out.stdout)
}

fn has_dpkg() -> bool {
    Path::new("/usr/bin/dpkg").is_file()
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

fn host<'a>(hosts: &'a Value, name: &str) -> Option<&'a Value> {
    hosts["hosts"]
        .as_array()?
        .iter()
        .find(|h| h["name"] == name)
}

#[test]
fn a_host_with_dpkg_gets_the_agent_from_its_deb_takes_a_rollout_and_upgrades_in_place() {
    if !has_dpkg() {
        assert!(
            std::env::var_os("CI").is_none(),
            "dpkg is missing under CI (Debian)"
        );
        eprintln!("skipping: no dpkg on this machine to be the host's dpkg");
        return;
    }
    let fleet = Fleet::start(0);
    let client = SshClient::new(&fleet.dir().join("ssh-client"));
    let Some(sshd) = Sshd::start_in_disposable_root(&fleet.dir().join("sshd"), &client.public_line)
    else {
        return;
    };
    let setup = Setup {
        sshd,
        client,
        fleet,
    };
    let root = setup.sshd.root().expect("a disposable root").clone();
    let dpkg_here_before = dpkg_status_here();

    let agent = std::fs::read(&setup.fleet.bins.agent).expect("read the debug agent");
    let started = std::time::Instant::now();
    let deb_v1 = agent_deb::build(setup.fleet.dir(), "fleet-agent", "0.1.0-1", &agent);
    eprintln!(
        "built {} ({} MB) in {:.1}s",
        deb_v1.display(),
        std::fs::metadata(&deb_v1).unwrap().len() >> 20,
        started.elapsed().as_secs_f64()
    );
    let deb_v1_text = deb_v1.display().to_string();
    let url = setup.sshd.url();
    let advertise = setup.fleet.range.host_addr(0);
    let args = |deb: &str| {
        vec![
            url.clone(),
            "--name".into(),
            "deb1".into(),
            "--advertise".into(),
            advertise.clone(),
            "--labels".into(),
            "role=web".into(),
            "--agent-deb".into(),
            deb.to_string(),
            "--accept-new-host-key".into(),
        ]
    };
    // A package for another architecture: refused on the host before dpkg sees it.
    let here = agent_deb::debian_architecture();
    let other_arch = if here == "arm64" { "amd64" } else { "arm64" };
    let foreign = agent_deb::build_custom(
        &setup.fleet.dir().join("foreign"),
        "fleet-agent",
        "0.1.0-1",
        b"#!/bin/sh\n",
        None,
        other_arch,
    );
    let foreign_args = args(&foreign.display().to_string());
    let foreign_args: Vec<&str> = foreign_args.iter().map(String::as_str).collect();
    let refused = setup.bootstrap(&foreign_args).expect_code(1);
    let error = refused.json["results"][0]["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    eprintln!("{error}");
    assert!(
        error.contains(&format!(
            "the package is {other_arch} but the host's dpkg is {here}"
        )),
        "{error}"
    );
    assert_ne!(
        setup.sshd.run_in_root(&["dpkg", "-s", "fleet-agent"]).code,
        0,
        "nothing was installed"
    );

    // A package dpkg cannot configure (a dependency the host lacks): the error shows dpkg's
    // own words and what to do.
    let unmet = agent_deb::build_custom(
        &setup.fleet.dir().join("unmet"),
        "fleet-agent",
        "0.0.9-1",
        b"#!/bin/sh\n",
        Some("fleet-no-such-package"),
        agent_deb::debian_architecture(),
    );
    let unmet_args = args(&unmet.display().to_string());
    let unmet_args: Vec<&str> = unmet_args.iter().map(String::as_str).collect();
    let failed = setup.bootstrap(&unmet_args).expect_code(1);
    let error = failed.json["results"][0]["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    eprintln!("{error}");
    assert!(
        error.contains("dpkg -i of the agent package failed"),
        "{error}"
    );
    assert!(
        error.contains("fleet-no-such-package"),
        "dpkg's words: {error}"
    );
    assert!(error.contains("apt-get -f install"), "what to do: {error}");

    let started = std::time::Instant::now();
    let first_args = args(&deb_v1_text);
    let first_args: Vec<&str> = first_args.iter().map(String::as_str).collect();
    let first = setup.bootstrap(&first_args).expect_code(0);
    eprintln!(
        "bootstrap from the .deb took {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let result = &first.json["results"][0];
    assert_eq!(result["ok"], true, "{result:#}");
    let arch = agent_deb::debian_architecture();
    assert_eq!(
        result["install"]["package"],
        format!("fleet-agent 0.1.0-1 ({arch})").as_str(),
        "{result:#}"
    );
    assert_eq!(result["install"]["remote_dir"], "/var/lib/fleet-agent");
    assert_eq!(result["install"]["upgraded"], false, "{result:#}");

    // dpkg in the root says it is installed; the files are where the package's unit reads them.
    let status = setup.sshd.run_in_root(&["dpkg", "-s", "fleet-agent"]);
    assert_eq!(status.code, 0, "dpkg -s: {}", status.stderr);
    assert!(
        status.stdout.contains("Status: install ok installed"),
        "{}",
        status.stdout
    );
    assert!(
        status.stdout.contains("Version: 0.1.0-1"),
        "{}",
        status.stdout
    );
    use std::os::unix::fs::PermissionsExt;
    let config_path = root.written(Path::new("/var/lib/fleet-agent/agent.toml"));
    let config = std::fs::read_to_string(&config_path).expect("agent.toml in the root");
    assert!(config.contains("name = \"deb1\""), "{config}");
    assert_eq!(
        std::fs::metadata(&config_path)
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::read(root.written(Path::new("/usr/bin/fleet-agent"))).unwrap(),
        agent,
        "dpkg put the packaged agent in /usr/bin"
    );

    // Registered, and it takes a rollout of the example app and serves it.
    let hosts = setup.fleet.ctl_ok(&["hosts"]);
    let deb1 = host(&hosts, "deb1").expect("deb1 is listed");
    assert_eq!(deb1["connected"], true, "{deb1:#}");
    setup.fleet.wait_hosts_ready(1);
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
    wait_serves(&advertise, "1.0.0", "deb1");
    let app_pid = http::get_ok(&advertise, "/pid").expect("the app's pid");

    // A newer package: dpkg -i upgrades in place, the agent is restarted and adopts the app,
    // which never stopped.
    let mut newer = agent.clone();
    newer.extend_from_slice(b"\nfleet-agent, a newer build\n");
    let deb_v2 = agent_deb::build(setup.fleet.dir(), "fleet-agent", "0.1.0-2", &newer);
    let second_args = args(&deb_v2.display().to_string());
    let second_args: Vec<&str> = second_args.iter().map(String::as_str).collect();
    let second = setup.bootstrap(&second_args).expect_code(0);
    let result = &second.json["results"][0];
    assert_eq!(result["install"]["upgraded"], true, "{result:#}");
    assert_eq!(
        result["install"]["package"],
        format!("fleet-agent 0.1.0-2 ({arch})").as_str()
    );
    let status = setup.sshd.run_in_root(&["dpkg", "-s", "fleet-agent"]);
    assert!(
        status.stdout.contains("Version: 0.1.0-2"),
        "{}",
        status.stdout
    );
    assert_eq!(
        std::fs::read(root.written(Path::new("/usr/bin/fleet-agent"))).unwrap(),
        newer
    );
    setup.fleet.wait_hosts_ready(1);
    wait_serves(&advertise, "1.0.0", "deb1");
    assert_eq!(
        http::get_ok(&advertise, "/pid"),
        Some(app_pid),
        "the upgrade did not restart the app"
    );
    let hosts = setup.fleet.ctl_ok(&["hosts"]);
    assert_eq!(hosts["hosts"].as_array().unwrap().len(), 1, "{hosts:#}");

    // This machine's own dpkg never heard of it.
    assert_eq!(dpkg_status_here(), dpkg_here_before);
    assert!(!Path::new("/var/lib/fleet-agent/agent.toml").exists());
}

#[test]
fn a_host_without_dpkg_is_told_to_bootstrap_without_agent_deb() {
    let fleet = Fleet::start(0);
    let client = SshClient::new(&fleet.dir().join("ssh-client"));
    let sshd_dir = fleet.dir().join("sshd");
    let Some(root) = DisposableRoot::new(&sshd_dir.join("root")) else {
        return;
    };
    // A host without dpkg: the root does not see /usr/bin/dpkg.
    root.hide(Path::new("/usr/bin/dpkg"));
    let Some(sshd) = Sshd::start_in_root(&sshd_dir, &client.public_line, root) else {
        return;
    };
    let setup = Setup {
        sshd,
        client,
        fleet,
    };
    assert_ne!(
        setup
            .sshd
            .run_in_root(&["sh", "-c", "command -v dpkg"])
            .code,
        0,
        "dpkg is hidden in the root"
    );
    let deb = agent_deb::build(setup.fleet.dir(), "fleet-agent", "0.1.0-1", b"#!/bin/sh\n");
    let url = setup.sshd.url();
    let out = setup
        .bootstrap(&[
            &url,
            "--name",
            "nodpkg1",
            "--advertise",
            &setup.fleet.range.host_addr(0),
            "--agent-deb",
            &deb.display().to_string(),
            "--accept-new-host-key",
        ])
        .expect_code(1);
    let error = out.json["results"][0]["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    eprintln!("{error}");
    assert_eq!(
        error,
        "nodpkg1 has no dpkg; bootstrap without --agent-deb installs the binary"
    );
    let hosts = setup.fleet.ctl_ok(&["hosts"]);
    assert!(host(&hosts, "nodpkg1").is_none(), "{hosts:#}");
}

#[test]
fn a_file_that_is_not_the_agent_deb_is_refused_before_any_login() {
    let fleet = Fleet::start(0);
    let client = SshClient::new(&fleet.dir().join("ssh-client"));
    let Some(sshd) = Sshd::start(&fleet.dir().join("sshd"), &client.public_line) else {
        return;
    };
    let setup = Setup {
        sshd,
        client,
        fleet,
    };
    let url = setup.sshd.url();
    let other_package = agent_deb::build(setup.fleet.dir(), "fleetctl", "0.1.0-1", b"#!/bin/sh\n");
    let missing = setup.fleet.dir().join("no-such.deb");
    let agent_path = setup.fleet.bins.agent.display().to_string();
    let other_text = other_package.display().to_string();
    let missing_text = missing.display().to_string();
    for (deb, expect) in [
        (agent_path.as_str(), "not a Debian package"),
        (
            other_text.as_str(),
            "the package is fleetctl, not fleet-agent",
        ),
        (missing_text.as_str(), "cannot read the agent package"),
    ] {
        let out = setup
            .bootstrap(&[
                &url,
                "--name",
                "bad1",
                "--advertise",
                "127.0.0.1",
                "--agent-deb",
                deb,
                "--accept-new-host-key",
            ])
            .expect_code(2);
        assert!(out.stderr.contains(expect), "{deb}: {}", out.stderr);
        assert!(out.stderr.contains(deb), "names the file: {}", out.stderr);
    }
    // --agent-deb decides where the agent lives: with --remote-dir it is refused too.
    let deb = agent_deb::build(setup.fleet.dir(), "fleet-agent", "0.1.0-1", b"#!/bin/sh\n");
    let out = setup
        .bootstrap(&[
            &url,
            "--agent-deb",
            &deb.display().to_string(),
            "--remote-dir",
            "/opt/x",
        ])
        .expect_code(2);
    assert!(out.stderr.contains("--remote-dir"), "{}", out.stderr);
    let log = std::fs::read_to_string(setup.fleet.dir().join("sshd/sshd.log")).unwrap();
    assert!(
        !log.contains("Accepted publickey"),
        "nobody may log in with bad input:\n{log}"
    );
}
