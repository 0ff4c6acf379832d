//! `fleet-bench bootstrap-ansible`: `fleetctl bootstrap` of 10 hosts over a real sshd on
//! loopback, against an Ansible playbook that does the same job on 10 other hosts of the same
//! sshd: it copies the same agent binary, its config and the CA, starts the agent detached, and
//! waits until the agent says it is connected (what bootstrap waits for: the host registered).
//! Interleaved pairs (the order alternating), medians; target: fleet at least 5x faster.
//!
//! Fair to Ansible on purpose: facts are not gathered, SSH pipelining is on, forks = 10 (all
//! hosts at once), each host keeps its own multiplexed SSH connection (ControlPersist) for the
//! whole play, and the join tokens are made before its clock starts (bootstrap makes them
//! inside its time). Ansible comes from PyPI (`ansible-core`) into a virtualenv under the
//! target directory, made by this benchmark the first time (`python3 -m venv`, `pip install`).
//! The per-host CPU breakdown of `fleet-bench bootstrap` is shown for both sides.

use crate::{format_ms, median, timed_bootstrap, CpuSplit, Row, LONG_CTL_DEADLINE};
use anyhow::{bail, Context, Result};
use fleet_tests::bins;
use fleet_tests::fleet::Fleet;
use fleet_tests::process;
use fleet_tests::sshd::{kill_remote_agent, RemoteAgents, SshClient, Sshd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const BENCH: &str = "bootstrap-ansible";
const HOSTS: usize = 10;
const PAIRS: usize = 3;
const TARGET_SPEEDUP: f64 = 5.0;
/// The Ansible release line installed from PyPI.
const ANSIBLE_REQUIREMENT: &str = "ansible-core>=2.16,<2.19";
/// How long making the virtualenv and installing Ansible may take.
const INSTALL_DEADLINE: Duration = Duration::from_secs(900);

/// The play: what `fleetctl bootstrap` does for a host without systemd, in Ansible's modules.
const PLAYBOOK: &str = r#"# The same job as `fleetctl bootstrap` on a host without systemd: the agent binary, its
# config and the CA copied, the agent started detached, and the play waits until it joined.
- hosts: fleet
  gather_facts: false
  tasks:
    - name: the agent's directories
      ansible.builtin.file:
        path: "{{ remote_dir }}/{{ item }}"
        state: directory
        mode: "0711"
      loop: [".", "bin", "data"]
    - name: the agent binary
      ansible.builtin.copy:
        src: "{{ agent_binary }}"
        dest: "{{ remote_dir }}/bin/fleet-agent"
        mode: "0755"
    - name: the fleet CA
      ansible.builtin.copy:
        src: "{{ ca_pem }}"
        dest: "{{ remote_dir }}/ca.pem"
        mode: "0644"
    - name: the agent's config, with its join token
      ansible.builtin.copy:
        src: "{{ agent_toml }}"
        dest: "{{ remote_dir }}/agent.toml"
        mode: "0600"
    - name: start the agent detached
      ansible.builtin.shell: >
        setsid {{ remote_dir }}/bin/fleet-agent --config {{ remote_dir }}/agent.toml
        >> {{ remote_dir }}/fleet-agent.log 2>&1 < /dev/null &
        echo $! > {{ remote_dir }}/fleet-agent.pid
    - name: wait until it joined the fleet
      ansible.builtin.wait_for:
        path: "{{ remote_dir }}/fleet-agent.log"
        search_regex: "connected to the controller"
        timeout: 120
"#;

/// Ansible in a virtualenv under the target directory.
struct Ansible {
    playbook_bin: PathBuf,
}

impl Ansible {
    /// The virtualenv's ansible-playbook, made (venv, pip install) when missing.
    fn ensure() -> Result<Ansible> {
        let target = bins::bin_dir()
            .parent()
            .context("the target directory")?
            .to_path_buf();
        let venv = target.join("ansible-venv");
        let playbook_bin = venv.join("bin/ansible-playbook");
        if works(&playbook_bin) {
            return Ok(Ansible { playbook_bin });
        }
        eprintln!(
            "fleet-bench: installing {ANSIBLE_REQUIREMENT} from PyPI into {} (once)",
            venv.display()
        );
        let python = ["/usr/bin/python3", "python3"]
            .into_iter()
            .find(|python| {
                let mut probe = Command::new(python);
                probe.args(["-c", "import venv"]);
                process::run_with_deadline(probe, Duration::from_secs(30)).code == 0
            })
            .context("no python3 with the venv module: install python3-venv")?;
        let mut make = Command::new(python);
        make.args(["-m", "venv"]).arg(&venv);
        let made = process::run_with_deadline(make, INSTALL_DEADLINE);
        if made.code != 0 {
            bail!("python3 -m venv {} failed: {}", venv.display(), made.stderr);
        }
        let mut install = Command::new(venv.join("bin/pip"));
        install.args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            ANSIBLE_REQUIREMENT,
        ]);
        let installed = process::run_with_deadline(install, INSTALL_DEADLINE);
        if installed.code != 0 || !works(&playbook_bin) {
            bail!(
                "pip install {ANSIBLE_REQUIREMENT} failed (exit {}): {}",
                installed.code,
                installed.stderr
            );
        }
        Ok(Ansible { playbook_bin })
    }
}

fn works(program: &Path) -> bool {
    if !program.is_file() {
        return false;
    }
    let mut command = Command::new(program);
    command.arg("--version");
    process::run_with_deadline(command, Duration::from_secs(120)).code == 0
}

/// One side's measured round: wall time, where the CPU went, and how many SSH logins it made.
struct Round {
    wall: Duration,
    cpu: CpuSplit,
    logins: usize,
}

/// Everything the rounds share: the fleet, the sshd, the client key, Ansible's files.
struct Bench<'a> {
    fleet: &'a Fleet,
    sshd: &'a Sshd,
    client: &'a SshClient,
    ansible: &'a Ansible,
    dir: PathBuf,
    agents: RemoteAgents,
    next_idx: usize,
}

impl Bench<'_> {
    /// `n` fresh host names, each with a remote dir of its own and an address of its own
    /// within the round (the agents of a round are stopped before the next one, and no app
    /// runs, so rounds reuse the addresses).
    fn fresh_hosts(&mut self, n: usize, label: &str) -> Vec<(String, PathBuf, String)> {
        (0..n)
            .map(|idx_in_round| {
                let idx = self.next_idx;
                self.next_idx += 1;
                let name = format!("{label}{idx}");
                let remote = self.fleet.dir().join("remote").join(&name);
                self.agents.remote_dirs.push(remote.clone());
                (name, remote, self.fleet.range.host_addr(idx_in_round))
            })
            .collect()
    }

    /// How many logins the sshd accepted so far (its log's `Accepted publickey` lines).
    fn logins(&self) -> usize {
        std::fs::read_to_string(self.fleet.dir().join("sshd/sshd.log"))
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains("Accepted publickey"))
            .count()
    }

    /// `fleetctl bootstrap` of `n` fresh hosts in one command.
    fn fleetctl_round(&mut self, n: usize, label: &str) -> Result<Round> {
        let hosts = self.fresh_hosts(n, label);
        let url = self.sshd.url();
        let lines: String = hosts
            .iter()
            .map(|(name, remote, addr)| {
                format!(
                    "{url} name={name} advertise={addr} remote_dir={}\n",
                    remote.display()
                )
            })
            .collect();
        let file = self.dir.join(format!("targets-{label}.txt"));
        std::fs::write(&file, lines)?;
        let logins_before = self.logins();
        let before = CpuSplit::read(self.fleet, self.sshd.pid(), &[]);
        let wall = timed_bootstrap(self.fleet, self.client, &file)?;
        let dirs: Vec<PathBuf> = hosts.iter().map(|(_, dir, _)| dir.clone()).collect();
        let cpu = CpuSplit::read(self.fleet, self.sshd.pid(), &dirs).minus(&before);
        let logins = self.logins() - logins_before;
        self.check_registered(&hosts)?;
        dirs.iter().for_each(|dir| kill_remote_agent(dir));
        Ok(Round { wall, cpu, logins })
    }

    /// The playbook over `n` fresh hosts; the join tokens are made before the clock starts.
    fn ansible_round(&mut self, n: usize, label: &str) -> Result<Round> {
        let hosts = self.fresh_hosts(n, label);
        let round_dir = self.dir.join(label);
        std::fs::create_dir_all(round_dir.join("configs"))?;
        std::fs::create_dir_all(round_dir.join("cp"))?;
        let agent_binary = self.fleet.bins.agent.display().to_string();
        let ca_pem = self.fleet.config_dir().join("ca.pem");
        let mut inventory = String::from("[fleet]\n");
        for (name, remote, addr) in &hosts {
            let token = self.fleet.ctl_ok(&["join-token", "create"])["token"]
                .as_str()
                .context("join-token create printed no token")?
                .to_string();
            let config = format!(
                "controller = {:?}\nname = {name:?}\nadvertise = {addr:?}\ndata_dir = {:?}\nca = {:?}\njoin_token = {token:?}\n\n[labels]\n",
                self.fleet.controller_url(),
                remote.join("data").display().to_string(),
                remote.join("ca.pem").display().to_string(),
            );
            let config_path = round_dir.join("configs").join(format!("{name}.toml"));
            std::fs::write(&config_path, config)?;
            // Each host its own multiplexed connection, as ten real hosts would have.
            inventory.push_str(&format!(
                "{name} ansible_host=127.0.0.1 ansible_port={port} ansible_user={user} \
                 remote_dir={remote} agent_toml={config} \
                 ansible_ssh_common_args='-o ControlMaster=auto -o ControlPersist=60s -o ControlPath={cp}'\n",
                port = self.sshd.port(),
                user = self.sshd.user(),
                remote = remote.display(),
                config = config_path.display(),
                cp = round_dir.join("cp").join(name).display(),
            ));
        }
        inventory.push_str(&format!(
            "\n[fleet:vars]\nagent_binary={agent_binary}\nca_pem={}\nansible_ssh_private_key_file={}\n",
            ca_pem.display(),
            self.client.identity.display()
        ));
        std::fs::write(round_dir.join("inventory.ini"), inventory)?;
        std::fs::write(round_dir.join("playbook.yml"), PLAYBOOK)?;
        std::fs::write(
            round_dir.join("ansible.cfg"),
            format!(
                "[defaults]\nforks = {HOSTS}\nhost_key_checking = True\ninterpreter_python = /usr/bin/python3\n\
                 remote_tmp = {tmp}/remote\nlocal_tmp = {tmp}/local\nretry_files_enabled = False\n\n\
                 [ssh_connection]\npipelining = True\nssh_args = -o UserKnownHostsFile={known} -o IdentitiesOnly=yes\n",
                tmp = round_dir.join("tmp").display(),
                known = self.client.known_hosts.display(),
            ),
        )?;
        let mut command = Command::new(&self.ansible.playbook_bin);
        command
            .arg("-i")
            .arg(round_dir.join("inventory.ini"))
            .arg(round_dir.join("playbook.yml"))
            .current_dir(&round_dir)
            .env("ANSIBLE_CONFIG", round_dir.join("ansible.cfg"))
            .env("HOME", &round_dir)
            .env_remove("SSH_AUTH_SOCK");
        let logins_before = self.logins();
        let before = CpuSplit::read(self.fleet, self.sshd.pid(), &[]);
        let start = Instant::now();
        let finished = process::run_with_deadline(command, LONG_CTL_DEADLINE);
        let wall = start.elapsed();
        if finished.code != 0 {
            bail!(
                "ansible-playbook exited {}:\n{}\n{}",
                finished.code,
                finished.stdout,
                finished.stderr
            );
        }
        let dirs: Vec<PathBuf> = hosts.iter().map(|(_, dir, _)| dir.clone()).collect();
        let cpu = CpuSplit::read(self.fleet, self.sshd.pid(), &dirs).minus(&before);
        let logins = self.logins() - logins_before;
        self.check_registered(&hosts)?;
        dirs.iter().for_each(|dir| kill_remote_agent(dir));
        // The play's SSH control masters (ControlPersist) are told to exit now.
        for (name, _, _) in &hosts {
            let mut exit = Command::new("ssh");
            exit.args(["-O", "exit", "-o"])
                .arg(format!(
                    "ControlPath={}",
                    round_dir.join("cp").join(name).display()
                ))
                .arg("127.0.0.1");
            let _ = process::run_with_deadline(exit, Duration::from_secs(10));
        }
        Ok(Round { wall, cpu, logins })
    }

    /// Every host of a round is registered and connected (checked after the clock stopped).
    fn check_registered(&self, hosts: &[(String, PathBuf, String)]) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let listed = self.fleet.ctl_ok(&["hosts"]);
            let connected: Vec<&str> = listed["hosts"]
                .as_array()
                .map(|hosts| {
                    hosts
                        .iter()
                        .filter(|h| h["connected"] == true)
                        .filter_map(|h| h["name"].as_str())
                        .collect()
                })
                .unwrap_or_default();
            let missing: Vec<&str> = hosts
                .iter()
                .map(|(name, _, _)| name.as_str())
                .filter(|name| !connected.contains(name))
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("hosts not registered and connected after the round: {missing:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Runs the benchmark: a warm-up of each side, then [`PAIRS`] interleaved pairs of 10 hosts.
pub fn run() -> Result<Vec<Row>> {
    let ansible = Ansible::ensure()?;
    let fleet = Fleet::start(0);
    let client = SshClient::new(&fleet.dir().join("ssh-client"));
    let Some(sshd) = Sshd::start(&fleet.dir().join("sshd"), &client.public_line) else {
        bail!("the bootstrap-ansible benchmark needs /usr/sbin/sshd: install openssh-server");
    };
    std::fs::write(&client.known_hosts, sshd.known_hosts_line() + "\n")?;
    let dir = fleet.dir().join("bootstrap-ansible");
    std::fs::create_dir_all(&dir)?;
    let mut bench = Bench {
        fleet: &fleet,
        sshd: &sshd,
        client: &client,
        ansible: &ansible,
        dir,
        agents: RemoteAgents {
            remote_dirs: Vec::new(),
        },
        next_idx: 0,
    };
    // Warm-ups: the binaries in the page cache, Ansible's modules compiled.
    bench.fleetctl_round(1, "warm-f")?;
    bench.ansible_round(1, "warm-a")?;
    let mut fleet_rounds = Vec::new();
    let mut ansible_rounds = Vec::new();
    for pair in 0..PAIRS {
        let fleet_label = format!("f{pair}-");
        let ansible_label = format!("a{pair}-");
        if pair % 2 == 0 {
            fleet_rounds.push(bench.fleetctl_round(HOSTS, &fleet_label)?);
            ansible_rounds.push(bench.ansible_round(HOSTS, &ansible_label)?);
        } else {
            ansible_rounds.push(bench.ansible_round(HOSTS, &ansible_label)?);
            fleet_rounds.push(bench.fleetctl_round(HOSTS, &fleet_label)?);
        }
        eprintln!(
            "fleet-bench: pair {}: fleetctl bootstrap {}, ansible-playbook {}",
            pair + 1,
            format_ms(fleet_rounds[pair].wall),
            format_ms(ansible_rounds[pair].wall)
        );
    }
    drop(bench);
    drop(sshd);

    let fleet_median = median(fleet_rounds.iter().map(|r| r.wall).collect());
    let ansible_median = median(ansible_rounds.iter().map(|r| r.wall).collect());
    let speedup = ansible_median.as_secs_f64() / fleet_median.as_secs_f64();
    let mut rows = Vec::new();
    for (side, rounds) in [
        ("fleetctl bootstrap", &fleet_rounds),
        ("ansible-playbook", &ansible_rounds),
    ] {
        let n_host_rounds = (rounds.len() * HOSTS) as u32;
        let sum = |pick: fn(&CpuSplit) -> Duration| -> Duration {
            rounds.iter().map(|r| pick(&r.cpu)).sum::<Duration>() / n_host_rounds
        };
        let logins: usize = rounds.iter().map(|r| r.logins).sum();
        rows.push(Row::info(
            BENCH,
            format!("{side}: SSH logins per host"),
            format!("{:.1}", logins as f64 / f64::from(n_host_rounds)),
        ));
        for (what, per_host) in [
            (
                "sshd peer (sessions, shell, tar or python)",
                sum(|c| c.sshd),
            ),
            ("the new agent (start, join, register)", sum(|c| c.agents)),
            (
                "the tool (fleetctl, or ansible-playbook and its ssh clients)",
                sum(|c| c.fleetctl),
            ),
            ("controller", sum(|c| c.controller)),
        ] {
            rows.push(Row::info(
                BENCH,
                format!("{side}: CPU per host: {what}"),
                format_ms(per_host),
            ));
        }
    }
    let all = |rounds: &[Round]| {
        rounds
            .iter()
            .map(|r| format!("{:.2}", r.wall.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(" ")
    };
    rows.extend([
        Row::info(
            BENCH,
            format!("{HOSTS} hosts, fleetctl bootstrap, each pair (s)"),
            all(&fleet_rounds),
        ),
        Row::info(
            BENCH,
            format!("{HOSTS} hosts, ansible-playbook, each pair (s)"),
            all(&ansible_rounds),
        ),
        Row::info(
            BENCH,
            format!("{HOSTS} hosts, fleetctl bootstrap, median of {PAIRS}"),
            format_ms(fleet_median),
        ),
        Row::info(
            BENCH,
            format!("{HOSTS} hosts, ansible-playbook, median of {PAIRS}"),
            format_ms(ansible_median),
        ),
        Row {
            bench: BENCH,
            measurement: "ansible-playbook / fleetctl bootstrap (medians)".to_string(),
            value: format!("{speedup:.1}x"),
            target: format!(">= {TARGET_SPEEDUP:.0}x"),
            ok: Some(speedup >= TARGET_SPEEDUP),
        },
    ]);
    Ok(rows)
}
