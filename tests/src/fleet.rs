//! A whole local fleet for one test: a temp directory, `fleetctl init` (which makes the fleet CA
//! and an admin credential), one `fleet-controller` speaking mutual TLS, agents that join with a
//! one-time token (`fleetctl join-token create`) and advertise addresses of the fleet's own
//! loopback range, and `fleetctl` run with `--output json`. Processes can be killed (SIGKILL), paused (SIGSTOP) and restarted with the
//! same directories. Dropping the fleet kills every process it started, by pid, then every
//! process still running inside its directory (app instances); when the test is panicking it
//! first prints the tail of every log, and keeps the directory when `FLEET_TEST_KEEP=1`.

use crate::bins::Bins;
use crate::net::AddressRange;
use crate::process::{self, ChildGuard};
use crate::{http, wait_for, wait_until, WEB_PORT};
use nix::sys::signal::Signal;
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// How long a `fleetctl` call may take before the test fails.
pub const CTL_DEADLINE: Duration = Duration::from_secs(45);
/// How long the controller may take to write its address file.
const CONTROLLER_START_DEADLINE: Duration = Duration::from_secs(30);
/// How long hosts may take to connect and show as ready.
const HOSTS_READY_DEADLINE: Duration = Duration::from_secs(30);
/// Lines of each log shown when a test fails.
const LOG_TAIL_LINES: usize = 60;

/// One agent: a host of the fleet.
#[derive(Debug)]
pub struct Agent {
    pub name: String,
    pub advertise: String,
    pub data_dir: PathBuf,
    process: Option<ChildGuard>,
    /// Whether the agent was started once (and so joined the fleet).
    process_started: bool,
    /// The labels the agent claims (`--labels`) at its next start, if any.
    labels: Option<String>,
    /// Environment variables the agent gets at its next start (beside the test's own).
    env: Vec<(String, String)>,
    /// Another fleet-agent binary to run (an older build), instead of the workspace's.
    binary: Option<PathBuf>,
    /// The URL this agent dials when not the controller's listen address: fixed when the agent
    /// is added, so each agent can have its own (a fault proxy of its own) across restarts.
    controller_url: Option<String>,
    /// A command the agent runs under (`ip netns exec NS`), at this and every restart.
    exec_prefix: Vec<String>,
}

/// What one `fleetctl` call did.
#[derive(Debug)]
pub struct CtlOutput {
    pub args: Vec<String>,
    pub code: i32,
    /// stdout parsed as one JSON document, or `Null` when it is not one.
    pub json: Value,
    pub stdout: String,
    pub stderr: String,
}

impl CtlOutput {
    /// Panics, showing everything fleetctl said, unless it exited with `code`.
    #[track_caller]
    pub fn expect_code(self, code: i32) -> CtlOutput {
        assert_eq!(
            self.code, code,
            "fleetctl {:?} exited {} (expected {code})\nstdout:\n{}\nstderr:\n{}",
            self.args, self.code, self.stdout, self.stderr
        );
        self
    }

    /// stdout as one JSON document per line (what `events --output json` prints).
    pub fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("line {line:?} of {:?} is not JSON: {e}", self.args))
            })
            .collect()
    }
}

static ARTIFACT_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A local fleet; see the module doc.
pub struct Fleet {
    pub bins: Bins,
    pub range: AddressRange,
    controller: Option<ChildGuard>,
    controller_addr: String,
    /// The URL agents dial, when not the controller's listen address (`https://IP:PORT`).
    agent_controller_url: Option<String>,
    /// What the controller runs under (`ip netns exec NAME`), when it runs in a network
    /// namespace ([`Fleet::start_with_controller_in`]).
    controller_prefix: Vec<String>,
    agents: Vec<Agent>,
    /// Declared last so it is removed only after every process is gone.
    dir: tempfile::TempDir,
}

impl Fleet {
    /// A controller and `n_hosts` agents named `h1`, `h2`, …, all connected and ready.
    pub fn start(n_hosts: usize) -> Fleet {
        Fleet::start_with_controller_config(n_hosts, "")
    }

    /// Like [`Fleet::start`], with `extra` lines appended to controller.toml (for example
    /// short heartbeat and lost-host timeouts).
    pub fn start_with_controller_config(n_hosts: usize, extra: &str) -> Fleet {
        Fleet::start_with(n_hosts, extra, &[])
    }

    /// Like [`Fleet::start`], with `init_args` added to `fleetctl init` (for example `--url`).
    pub fn start_with_init_args(n_hosts: usize, init_args: &[&str]) -> Fleet {
        Fleet::start_with(n_hosts, "", init_args)
    }

    fn start_with(n_hosts: usize, extra: &str, more_init_args: &[&str]) -> Fleet {
        Fleet::start_prepared(n_hosts, extra, more_init_args, |_| {})
    }

    /// Like [`Fleet::start`], with the controller inside network namespace `netns`, listening
    /// on the namespace's end of its link: every byte between the controller and the agents
    /// (which stay on loopback addresses of this host) crosses that link, which a benchmark
    /// may cap ([`crate::netns::Netns::cap_egress`]). Its HTTP listener is on the namespace's
    /// own loopback, out of the tests' reach.
    pub fn start_with_controller_in(n_hosts: usize, netns: &crate::netns::Netns) -> Fleet {
        Fleet::start_fleet(
            n_hosts,
            "",
            &[],
            |_| {},
            &netns.inside_addr().to_string(),
            netns.exec_prefix(),
        )
    }

    /// Like [`Fleet::start_with_controller_config`], calling `prepare` with the controller's
    /// data directory (empty, not yet used) before the controller first starts: to mount a
    /// small filesystem there, say.
    pub fn start_with_controller_data(
        n_hosts: usize,
        extra: &str,
        prepare: impl FnOnce(&Path),
    ) -> Fleet {
        Fleet::start_prepared(n_hosts, extra, &[], prepare)
    }

    fn start_prepared(
        n_hosts: usize,
        extra: &str,
        more_init_args: &[&str],
        prepare: impl FnOnce(&Path),
    ) -> Fleet {
        Fleet::start_fleet(
            n_hosts,
            extra,
            more_init_args,
            prepare,
            "127.0.0.1",
            Vec::new(),
        )
    }

    fn start_fleet(
        n_hosts: usize,
        extra: &str,
        more_init_args: &[&str],
        prepare: impl FnOnce(&Path),
        listen_ip: &str,
        controller_prefix: Vec<String>,
    ) -> Fleet {
        let bins = Bins::locate();
        let dir = tempfile::Builder::new()
            .prefix("fleet-e2e-")
            .tempdir()
            .expect("a temp directory");
        // Apps run as users of their own (under a root agent): they must be able to pass
        // through to the agents' data directories, as they do under /var/lib.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))
            .expect("chmod the temp directory");
        let range = AddressRange::allocate(n_hosts, WEB_PORT);
        std::fs::create_dir_all(dir.path().join("logs")).expect("logs dir");
        std::fs::create_dir_all(dir.path().join("artifacts")).expect("artifacts dir");
        let mut fleet = Fleet {
            bins,
            range,
            controller: None,
            controller_addr: String::new(),
            agent_controller_url: None,
            controller_prefix,
            agents: Vec::new(),
            dir,
        };
        let config_dir = fleet.config_dir();
        let listen = format!("{listen_ip}:0");
        let init_args: Vec<String> = [
            "init",
            "--dir",
            &config_dir.display().to_string(),
            "--listen",
            &listen,
            "--http-listen",
            "127.0.0.1:0",
        ]
        .iter()
        .chain(more_init_args)
        .map(|arg| arg.to_string())
        .collect();
        let init = fleet.run_fleetctl(&init_args, None, CTL_DEADLINE);
        init.expect_code(0);
        if !extra.is_empty() {
            let path = config_dir.join("controller.toml");
            let text = std::fs::read_to_string(&path).expect("controller.toml");
            std::fs::write(&path, format!("{text}\n{extra}\n")).expect("extend controller.toml");
        }
        let data_dir = fleet.controller_data_dir();
        std::fs::create_dir_all(&data_dir).expect("the controller's data dir");
        prepare(&data_dir);
        fleet.start_controller();
        for idx in 0..n_hosts {
            fleet.start_agent(&format!("h{}", idx + 1));
        }
        fleet.wait_hosts_ready(n_hosts);
        fleet
    }

    /// Keeps the test's directory (logs, data dirs) when the fleet is dropped.
    pub fn keep_dir(&mut self) {
        self.dir.disable_cleanup(true);
    }

    /// The test's temp directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A directory every app may write to (1777): apps run as users of their own, so a test
    /// whose app or hook reports back through a file has it write here.
    pub fn outbox(&self) -> PathBuf {
        let dir = self.dir.path().join("outbox");
        std::fs::create_dir_all(&dir).expect("the outbox");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777))
            .expect("chmod the outbox");
        dir
    }

    /// Where `fleetctl init` wrote controller.toml and client.toml.
    pub fn config_dir(&self) -> PathBuf {
        self.dir.path().join("config")
    }

    /// The controller's data directory (`data_dir = "data"` in controller.toml, as `fleetctl
    /// init` writes it, is relative to the config dir).
    pub fn controller_data_dir(&self) -> PathBuf {
        self.config_dir().join("data")
    }

    /// `https://IP:PORT` of the controller (it speaks only mutual TLS).
    pub fn controller_url(&self) -> String {
        format!("https://{}", self.controller_addr)
    }

    /// `IP:PORT` of the controller's HTTP listener (metrics, health, status page), as it wrote
    /// it to controller.http.addr.
    pub fn http_addr(&self) -> String {
        let file = self.config_dir().join("controller.http.addr");
        wait_for(
            CONTROLLER_START_DEADLINE,
            "the controller to write controller.http.addr",
            || {
                let text = std::fs::read_to_string(&file).ok()?;
                let text = text.trim();
                text.parse::<std::net::SocketAddr>()
                    .ok()
                    .map(|_| text.to_string())
            },
        )
    }

    pub fn controller_pid(&self) -> u32 {
        self.controller
            .as_ref()
            .expect("the controller is running")
            .pid()
    }

    fn start_controller(&mut self) {
        let config_dir = self.config_dir();
        let addr_file = config_dir.join("controller.addr");
        let _ = std::fs::remove_file(&addr_file);
        let mut command = command_under(&self.controller_prefix, &self.bins.controller);
        command
            .arg("--config")
            .arg(config_dir.join("controller.toml"))
            .current_dir(self.dir.path());
        let log = self.dir.path().join("logs/controller.log");
        let mut guard = ChildGuard::spawn("fleet-controller", command, &log);
        let addr = wait_for(
            CONTROLLER_START_DEADLINE,
            "the controller to write controller.addr",
            || {
                if guard.has_exited() {
                    panic!(
                        "fleet-controller exited at start; its log:\n{}",
                        process::tail(&log, LOG_TAIL_LINES)
                    );
                }
                let text = std::fs::read_to_string(&addr_file).ok()?;
                let text = text.trim();
                text.parse::<std::net::SocketAddr>()
                    .ok()
                    .map(|_| text.to_string())
            },
        );
        if !self.controller_addr.is_empty() {
            assert_eq!(
                addr, self.controller_addr,
                "the restarted controller must listen where the agents expect it"
            );
        }
        self.controller_addr = addr;
        self.controller = Some(guard);
    }

    /// SIGKILLs the controller.
    pub fn kill_controller(&mut self) {
        if let Some(mut guard) = self.controller.take() {
            guard.kill_now();
        }
    }

    /// Asks the controller to stop (SIGTERM) and waits at most `deadline` for it to exit; its
    /// exit status, or `None` when it was still running (it is SIGKILLed then).
    pub fn stop_controller(&mut self, deadline: Duration) -> Option<std::process::ExitStatus> {
        let mut guard = self.controller.take()?;
        guard.signal(nix::sys::signal::Signal::SIGTERM);
        let status = guard.wait_exit(deadline);
        guard.kill_now();
        status
    }

    /// The controller's log so far.
    pub fn controller_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("logs/controller.log")).unwrap_or_default()
    }

    /// Starts the controller again with the same config and data dir, on the same address: the
    /// `listen` line of controller.toml is pinned to the address it bound first.
    pub fn restart_controller(&mut self) {
        self.kill_controller();
        let path = self.config_dir().join("controller.toml");
        let text = std::fs::read_to_string(&path).expect("controller.toml");
        let pinned: Vec<String> = text
            .lines()
            .map(|line| {
                if line.trim_start().starts_with("listen") {
                    format!("listen = \"{}\"", self.controller_addr)
                } else {
                    line.to_string()
                }
            })
            .collect();
        std::fs::write(&path, pinned.join("\n") + "\n").expect("rewrite controller.toml");
        self.start_controller();
    }

    /// SIGKILLs the controller and starts it again with the same config and data dir on
    /// `listen` (`IP:PORT`, another address than before): the controller of a fleet that
    /// moved, for clients and agents that know it under several URLs.
    pub fn move_controller(&mut self, listen: &str) {
        self.kill_controller();
        let path = self.config_dir().join("controller.toml");
        let text = std::fs::read_to_string(&path).expect("controller.toml");
        let moved: Vec<String> = text
            .lines()
            .map(|line| {
                if line.trim_start().starts_with("listen") {
                    format!("listen = \"{listen}\"")
                } else {
                    line.to_string()
                }
            })
            .collect();
        std::fs::write(&path, moved.join("\n") + "\n").expect("rewrite controller.toml");
        self.controller_addr.clear();
        self.start_controller();
    }

    /// Starts a new agent called `name` on the next address of the fleet's range; it joins with
    /// a fresh one-time token.
    pub fn start_agent(&mut self, name: &str) {
        self.add_agent(name);
        self.spawn_agent(name, None);
    }

    /// Starts a new agent called `name` from another fleet-agent `binary` (an older build); it
    /// joins with a fresh one-time token.
    pub fn start_agent_from(&mut self, name: &str, binary: &Path) {
        self.add_agent(name);
        self.agent_mut(name).binary = Some(binary.to_path_buf());
        self.spawn_agent(name, None);
    }

    /// Starts a new agent called `name` that joins with `token` (which may be refused: see
    /// [`Fleet::agent_has_exited`]).
    pub fn start_agent_with_token(&mut self, name: &str, token: &str) {
        self.add_agent(name);
        self.spawn_agent(name, Some(token.to_string()));
    }

    /// Starts a new agent called `name` that joins with `token` and claims `labels`.
    pub fn start_agent_claiming(&mut self, name: &str, token: &str, labels: &str) {
        self.add_agent(name);
        self.agent_mut(name).labels = Some(labels.to_string());
        self.spawn_agent(name, Some(token.to_string()));
    }

    /// Makes agent `name` claim `labels` from its next (re)start on.
    pub fn set_claimed_labels(&mut self, name: &str, labels: &str) {
        self.agent_mut(name).labels = Some(labels.to_string());
    }

    /// Sets an environment variable for agent `name`'s next start (see [`Fleet::restart_agent`]).
    pub fn set_agent_env(&mut self, name: &str, key: &str, value: &str) {
        self.agent_mut(name)
            .env
            .push((key.to_string(), value.to_string()));
    }

    /// Waits at most `deadline` for agent `name` to exit on its own (nothing is sent to it);
    /// its exit status, or `None` when it still runs (or was not running).
    pub fn wait_agent_exit(
        &mut self,
        name: &str,
        deadline: Duration,
    ) -> Option<std::process::ExitStatus> {
        self.agent_mut(name).process.as_mut()?.wait_exit(deadline)
    }

    /// Whether agent `name`'s process has exited (a refused join ends the agent).
    pub fn agent_has_exited(&mut self, name: &str) -> bool {
        self.agent_mut(name)
            .process
            .as_mut()
            .is_none_or(|guard| guard.has_exited())
    }

    fn add_agent(&mut self, name: &str) {
        assert!(
            self.agents.iter().all(|a| a.name != name),
            "agent {name} exists; use restart_agent"
        );
        let advertise = self.range.host_addr(self.agents.len());
        let data_dir = self.dir.path().join("hosts").join(name);
        std::fs::create_dir_all(&data_dir).expect("agent data dir");
        self.agents.push(Agent {
            name: name.to_string(),
            advertise,
            data_dir,
            process: None,
            process_started: false,
            labels: None,
            env: Vec::new(),
            binary: None,
            controller_url: self.agent_controller_url.clone(),
            exec_prefix: Vec::new(),
        });
    }

    /// Makes agents started from now on dial `url` instead of the controller's listen address.
    pub fn set_agent_controller_url(&mut self, url: &str) {
        self.agent_controller_url = Some(url.to_string());
    }

    /// Starts a new agent called `name` that dials `url` (a fault proxy in front of the
    /// controller, say) instead of the controller's listen address, at this and every restart.
    /// The agent still verifies the controller's certificate under its TLS name, so any
    /// loopback address that forwards to the controller works.
    pub fn start_agent_via(&mut self, name: &str, url: &str) {
        let before = self.agent_controller_url.replace(url.to_string());
        self.add_agent(name);
        self.agent_controller_url = before;
        self.spawn_agent(name, None);
    }

    /// Starts a new agent called `name` that dials `url`, advertises `advertise` (instead of
    /// the next loopback address of the range) and runs under `exec_prefix` (`ip netns exec
    /// NS`: inside a network namespace), at this and every restart; `prepare` gets its data
    /// directory (created, empty) before the agent first starts: to mount a small filesystem
    /// there, say.
    pub fn start_agent_custom(
        &mut self,
        name: &str,
        url: &str,
        advertise: Option<&str>,
        exec_prefix: &[String],
        prepare: impl FnOnce(&Path),
    ) {
        let before = self.agent_controller_url.replace(url.to_string());
        self.add_agent(name);
        self.agent_controller_url = before;
        let agent = self.agent_mut(name);
        if let Some(advertise) = advertise {
            agent.advertise = advertise.to_string();
        }
        agent.exec_prefix = exec_prefix.to_vec();
        let data_dir = agent.data_dir.clone();
        prepare(&data_dir);
        self.spawn_agent(name, None);
    }

    fn spawn_agent(&mut self, name: &str, token: Option<String>) {
        let url = self
            .agent(name)
            .controller_url
            .clone()
            .or_else(|| self.agent_controller_url.clone())
            .unwrap_or_else(|| self.controller_url());
        let log = self.dir.path().join(format!("logs/agent-{name}.log"));
        let bin = self
            .agent(name)
            .binary
            .clone()
            .unwrap_or_else(|| self.bins.agent.clone());
        let ca = self.config_dir().join("ca.pem");
        // Only the first start joins with a one-time token; a restart keeps its certificate.
        let join_token = if token.is_some() || self.agent(name).process_started {
            token
        } else {
            let out = self.ctl(&["join-token", "create"]).expect_code(0);
            let token = out.json["token"].as_str().map(str::to_string);
            Some(token.unwrap_or_else(|| panic!("join-token create printed no token: {out:?}")))
        };
        let agent = self.agent_mut(name);
        agent.process_started = true;
        let mut command = command_under(&agent.exec_prefix, &bin);
        command
            .arg("--controller")
            .arg(&url)
            .arg("--ca")
            .arg(&ca)
            .arg("--name")
            .arg(&agent.name)
            .arg("--advertise")
            .arg(&agent.advertise)
            .arg("--data-dir")
            .arg(&agent.data_dir);
        if let Some(token) = join_token {
            command.arg("--join-token").arg(token);
        }
        if let Some(labels) = &agent.labels {
            command.arg("--labels").arg(labels);
        }
        command.envs(agent.env.iter().map(|(k, v)| (k, v)));
        agent.process = Some(ChildGuard::spawn(
            &format!("fleet-agent {name}"),
            command,
            &log,
        ));
    }

    fn agent_mut(&mut self, name: &str) -> &mut Agent {
        self.agents
            .iter_mut()
            .find(|a| a.name == name)
            .unwrap_or_else(|| panic!("no agent {name}"))
    }

    pub fn agent(&self, name: &str) -> &Agent {
        self.agents
            .iter()
            .find(|a| a.name == name)
            .unwrap_or_else(|| panic!("no agent {name}"))
    }

    pub fn agents(&self) -> &[Agent] {
        &self.agents
    }

    /// The names of every host, in start order.
    pub fn host_names(&self) -> Vec<String> {
        self.agents.iter().map(|a| a.name.clone()).collect()
    }

    pub fn agent_pid(&self, name: &str) -> u32 {
        self.agent(name)
            .process
            .as_ref()
            .unwrap_or_else(|| panic!("agent {name} is not running"))
            .pid()
    }

    /// SIGKILLs one agent.
    pub fn kill_agent(&mut self, name: &str) {
        if let Some(mut guard) = self.agent_mut(name).process.take() {
            guard.kill_now();
        }
    }

    /// Asks agent `name` to stop (SIGTERM, as `systemctl stop` does) and waits at most
    /// `deadline` for it to exit; its exit status, or `None` when it was still running (it is
    /// SIGKILLed then).
    pub fn stop_agent(
        &mut self,
        name: &str,
        deadline: Duration,
    ) -> Option<std::process::ExitStatus> {
        let mut guard = self.agent_mut(name).process.take()?;
        guard.signal(Signal::SIGTERM);
        let status = guard.wait_exit(deadline);
        guard.kill_now();
        status
    }

    /// Starts a killed agent again with the same name, address and data dir.
    pub fn restart_agent(&mut self, name: &str) {
        self.kill_agent(name);
        self.spawn_agent(name, None);
    }

    /// SIGSTOPs (`pause = true`) or SIGCONTs one agent.
    pub fn pause_agent(&self, name: &str, pause: bool) {
        let signal = if pause {
            Signal::SIGSTOP
        } else {
            Signal::SIGCONT
        };
        process::signal_pid(self.agent_pid(name), signal);
    }

    /// Waits until `hosts` lists at least `n` hosts, every one connected and ready.
    pub fn wait_hosts_ready(&self, n: usize) {
        let mut last = Value::Null;
        let what = format!("{n} hosts connected and ready");
        wait_until(HOSTS_READY_DEADLINE, &what, || {
            let out = self.ctl(&["hosts"]);
            if out.code != 0 {
                return false;
            }
            last = out.json;
            let hosts = last["hosts"].as_array().cloned().unwrap_or_default();
            hosts.len() >= n
                && hosts
                    .iter()
                    .all(|h| h["connected"] == Value::Bool(true) && h["state"] == "ready")
        });
    }

    /// Runs `fleetctl --config-dir D --controller URL --output json ARGS...`.
    pub fn ctl(&self, args: &[&str]) -> CtlOutput {
        self.ctl_with_deadline(args, CTL_DEADLINE)
    }

    /// Like [`Fleet::ctl`] with a deadline of the caller's choosing (for long benchmarks).
    pub fn ctl_with_deadline(&self, args: &[&str], deadline: Duration) -> CtlOutput {
        self.run_fleetctl(&self.full_args(args), None, deadline)
    }

    /// Runs `fleetctl --config-dir DIR --output json ARGS...`: the controller comes from
    /// `DIR/client.toml`, as for an operator or a CI job.
    pub fn ctl_in(&self, config_dir: &Path, args: &[&str]) -> CtlOutput {
        let full: Vec<String> = [
            "--config-dir",
            &config_dir.display().to_string(),
            "--output",
            "json",
        ]
        .iter()
        .chain(args)
        .map(|arg| arg.to_string())
        .collect();
        self.run_fleetctl(&full, None, CTL_DEADLINE)
    }

    /// Runs `fleetctl --config-dir D --controller CONTROLLERS --output json ARGS...`:
    /// `controllers` is a URL or several (`URL1,URL2`), instead of the controller's address.
    pub fn ctl_via(&self, controllers: &str, args: &[&str]) -> CtlOutput {
        let full: Vec<String> = [
            "--config-dir",
            &self.config_dir().display().to_string(),
            "--controller",
            controllers,
            "--output",
            "json",
        ]
        .iter()
        .chain(args)
        .map(|arg| arg.to_string())
        .collect();
        self.run_fleetctl(&full, None, CTL_DEADLINE)
    }

    /// Like [`Fleet::ctl_with_deadline`], with `SSH_AUTH_SOCK` set to `socket` (fleetctl
    /// otherwise runs without it, whatever the test's own environment holds).
    pub fn ctl_with_ssh_agent(
        &self,
        args: &[&str],
        socket: &Path,
        deadline: Duration,
    ) -> CtlOutput {
        self.run_fleetctl(&self.full_args(args), Some(socket), deadline)
    }

    /// `args` after the flags every call gets: config dir, controller, JSON output.
    fn full_args(&self, args: &[&str]) -> Vec<String> {
        let mut full = vec![
            "--config-dir".to_string(),
            self.config_dir().display().to_string(),
        ];
        if !self.controller_addr.is_empty() {
            full.extend(["--controller".to_string(), self.controller_url()]);
        }
        full.extend(["--output".to_string(), "json".to_string()]);
        full.extend(args.iter().map(|a| a.to_string()));
        full
    }

    /// Like [`Fleet::ctl`] but panics unless fleetctl exits 0; returns its JSON.
    #[track_caller]
    pub fn ctl_ok(&self, args: &[&str]) -> Value {
        self.ctl(args).expect_code(0).json
    }

    fn run_fleetctl(
        &self,
        args: &[String],
        ssh_auth_sock: Option<&Path>,
        deadline: Duration,
    ) -> CtlOutput {
        let mut command = Command::new(&self.bins.fleetctl);
        command
            .args(args)
            .current_dir(self.dir.path())
            // Keep the user's own fleet config (and ssh-agent) out of the test.
            .env("HOME", self.dir.path())
            .env_remove("FLEET_CONFIG_DIR")
            .env_remove("FLEET_CONTROLLER")
            .env_remove("SSH_AUTH_SOCK");
        if let Some(socket) = ssh_auth_sock {
            command.env("SSH_AUTH_SOCK", socket);
        }
        let finished = process::run_with_deadline(command, deadline);
        let json = serde_json::from_str(&finished.stdout).unwrap_or(Value::Null);
        CtlOutput {
            args: args.iter().map(|a| a.to_string()).collect(),
            code: finished.code,
            json,
            stdout: finished.stdout,
            stderr: finished.stderr,
        }
    }

    /// Runs `fleet-controller ARGS` (a subcommand, like `migrate`) in the test dir, within
    /// `deadline`.
    pub fn controller_command(&self, args: &[&str], deadline: Duration) -> process::Finished {
        let mut command = Command::new(&self.bins.controller);
        command.args(args).current_dir(self.dir.path());
        process::run_with_deadline(command, deadline)
    }

    /// Writes an artifact file made of `entries` into the test dir and returns its path.
    pub fn write_artifact(&self, entries: &[(&str, &[u8], u32)]) -> PathBuf {
        let bytes = fleet_proto::artifact::build_artifact(entries).expect("build an artifact");
        self.write_raw_artifact(&bytes)
    }

    /// Writes arbitrary bytes as an "artifact" file (for refusals) and returns its path.
    pub fn write_raw_artifact(&self, bytes: &[u8]) -> PathBuf {
        let n = ARTIFACT_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = self
            .dir
            .path()
            .join(format!("artifacts/artifact-{n}.tar.gz"));
        std::fs::write(&path, bytes).expect("write the artifact");
        path
    }

    /// The example web app's artifact: `bin/web` (the fleet-example-web binary), `fleet.toml`
    /// = `manifest`, and `extra` files (to make other bytes for the same app).
    pub fn web_artifact(&self, manifest: &str, extra: &[(&str, &[u8])]) -> PathBuf {
        let web = std::fs::read(&self.bins.web).expect("read the fleet-example-web binary");
        let mut entries: Vec<(&str, &[u8], u32)> = vec![
            ("fleet.toml", manifest.as_bytes(), 0o644),
            ("bin/web", &web, 0o755),
        ];
        entries.extend(extra.iter().map(|(path, bytes)| (*path, *bytes, 0o644)));
        self.write_artifact(&entries)
    }

    /// `fleetctl release create web VERSION <artifact> [--env K=V]...` with the web artifact.
    pub fn create_web_release(&self, version: &str, manifest: &str, env: &[&str]) -> CtlOutput {
        let artifact = self.web_artifact(manifest, &[]);
        self.create_release("web", version, &artifact, env)
    }

    /// Creates a web release of each version with the usual test manifest
    /// ([`crate::web_manifest`] with a 10 s smoke timeout) and no extra env.
    #[track_caller]
    pub fn create_web_releases(&self, versions: &[&str]) {
        let manifest = crate::web_manifest("10s");
        for version in versions {
            self.create_web_release(version, &manifest, &[])
                .expect_code(0);
        }
    }

    /// `fleetctl release create APP VERSION ARTIFACT [--env K=V]...`.
    pub fn create_release(
        &self,
        app: &str,
        version: &str,
        artifact: &Path,
        env: &[&str],
    ) -> CtlOutput {
        let artifact = artifact.display().to_string();
        let mut args = vec!["release", "create", app, version, artifact.as_str()];
        for pair in env {
            args.extend(["--env", pair]);
        }
        self.ctl(&args)
    }

    /// What host `name`'s web instance answers on `path` (the body of a 200), if anything.
    pub fn web_get(&self, name: &str, path: &str) -> Option<String> {
        http::get_ok(&self.agent(name).advertise, path)
    }

    /// The pid of host `name`'s web instance, from its `/pid`.
    pub fn web_pid(&self, name: &str) -> Option<u32> {
        self.web_get(name, "/pid")?.trim().parse().ok()
    }

    /// Waits until every host's web instance answers `web VERSION on HOST`.
    pub fn wait_all_serve(&self, version: &str, deadline: Duration) {
        self.wait_all_serve_except(version, &[], deadline)
    }

    /// Like [`Fleet::wait_all_serve`], leaving out the hosts named in `except`.
    pub fn wait_all_serve_except(&self, version: &str, except: &[&str], deadline: Duration) {
        for agent in self
            .agents
            .iter()
            .filter(|a| !except.contains(&a.name.as_str()))
        {
            let expect = format!("web {version} on {}\n", agent.name);
            let what = format!("host {} to serve {expect:?}", agent.name);
            wait_until(deadline, &what, || {
                http::get_ok(&agent.advertise, "/").as_deref() == Some(expect.as_str())
            });
        }
    }

    /// `status APP` as JSON.
    pub fn status(&self, app: &str) -> Value {
        self.ctl_ok(&["status", app])
    }

    /// The `actual` instance report of `app` on `host` in a `StatusResponse`/`ListHostsResponse`.
    pub fn actual_of<'a>(status: &'a Value, host: &str, app: &str) -> Option<&'a Value> {
        let host = status["hosts"]
            .as_array()?
            .iter()
            .find(|h| h["name"] == host)?;
        let app = host["apps"].as_array()?.iter().find(|a| a["app"] == app)?;
        let actual = &app["actual"];
        (!actual.is_null()).then_some(actual)
    }

    /// Polls `rollout status ID` until the rollout reaches one of the end states; returns it.
    pub fn wait_rollout_ends(&self, id: &str, deadline: Duration) -> Value {
        let what = format!("rollout {id} to end");
        wait_for(deadline, &what, || {
            let out = self.ctl(&["rollout", "status", id]);
            let state = out.json["state"].as_str().unwrap_or("");
            is_end_state(state).then_some(out.json)
        })
    }

    fn print_logs(&self) {
        let mut logs: Vec<PathBuf> = std::fs::read_dir(self.dir.path().join("logs"))
            .map(|entries| entries.filter_map(|e| Some(e.ok()?.path())).collect())
            .unwrap_or_default();
        logs.sort();
        for log in logs {
            eprintln!(
                "----- {} (last {LOG_TAIL_LINES} lines)\n{}",
                log.display(),
                process::tail(&log, LOG_TAIL_LINES)
            );
        }
    }
}

/// Whether a rollout state is final.
pub fn is_end_state(state: &str) -> bool {
    matches!(state, "succeeded" | "failed" | "rolled_back" | "aborted")
}

/// `DIR/remote`, made searchable (0755) like the `/opt` a bootstrapped host's remote directory
/// sits in: the apps there run as users of their own and pass through it.
pub fn remote_parent(dir: &Path) -> PathBuf {
    let parent = dir.join("remote");
    std::fs::create_dir_all(&parent).expect("the remote parent dir");
    std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o755))
        .expect("chmod the remote parent dir");
    parent
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_logs();
            if std::env::var_os("FLEET_TEST_KEEP").is_some_and(|v| v == "1") {
                self.dir.disable_cleanup(true);
                eprintln!("kept the test directory {}", self.dir.path().display());
            }
        }
        for agent in &mut self.agents {
            if let Some(mut guard) = agent.process.take() {
                guard.kill_now();
            }
        }
        self.kill_controller();
        process::kill_everything_inside(self.dir.path());
    }
}

/// A command that runs `program` under `prefix` (`ip netns exec NAME`), or directly when the
/// prefix is empty.
fn command_under(prefix: &[String], program: &Path) -> Command {
    match prefix.split_first() {
        Some((first, rest)) => {
            let mut command = Command::new(first);
            command.args(rest).arg(program);
            command
        }
        None => Command::new(program),
    }
}
