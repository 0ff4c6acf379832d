//! A real OpenSSH `sshd` for the SSH bootstrap tests: started by the test on a loopback port,
//! with its own ed25519 host key and an authorized_keys holding a client key the test made
//! (keys are made with russh's `ssh-key` types, no `ssh-keygen`). It runs as
//! `/usr/sbin/sshd -D -e -f CONFIG` in the foreground and is killed by pid when dropped.
//!
//! [`Sshd::start`] returns None (after printing why) when there is no sshd on this machine, so
//! a test can skip; `scripts/test.sh` installs openssh-server, so in CI it is always there.
//!
//! [`Sshd::start_in_disposable_root`] runs the same sshd inside a
//! [`DisposableRoot`]: what its sessions write to /usr, /etc and /var (dpkg -i) stays in the
//! test's dir.
//!
//! [`SshAgent`] is a real OpenSSH `ssh-agent` on a socket in the test's dir, for logging in
//! through `SSH_AUTH_SOCK`; keys go into it through russh's agent client (no `ssh-add`).

use crate::disposable_root::DisposableRoot;
use crate::process::{self, ChildGuard, Finished};
use crate::wait_until;
use russh::keys::ssh_key::private::{Ed25519Keypair, PrivateKey};
use russh::keys::ssh_key::{HashAlg, LineEnding};
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Where Debian installs ssh-agent (openssh-client, which openssh-server depends on).
pub const SSH_AGENT_PATH: &str = "/usr/bin/ssh-agent";

/// Where Debian and most distributions install sshd.
pub const SSHD_PATH: &str = "/usr/sbin/sshd";
/// How long sshd may take to accept connections.
const SSHD_START_DEADLINE: Duration = Duration::from_secs(20);
/// How many ports are tried when sshd cannot bind the one picked.
const START_ATTEMPTS: usize = 5;

/// A running sshd and the keys around it.
pub struct Sshd {
    dir: PathBuf,
    port: u16,
    user: String,
    host_key: PrivateKey,
    child: Option<ChildGuard>,
    /// The root sshd runs in, when it runs in one (then `child` is its `unshare`).
    root: Option<DisposableRoot>,
}

/// 32 random bytes from the kernel, the seed of an ed25519 key.
fn random_seed() -> [u8; 32] {
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .expect("read /dev/urandom");
    seed
}

/// A fresh ed25519 key.
pub fn new_ed25519_key() -> PrivateKey {
    PrivateKey::from(Ed25519Keypair::from_seed(&random_seed()))
}

/// Writes a private key in OpenSSH format, mode 0600.
pub fn write_private_key(key: &PrivateKey, path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let text = key
        .to_openssh(LineEnding::LF)
        .expect("encode a private key");
    std::fs::write(path, text.as_bytes()).expect("write a private key");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod 0600");
}

/// `ssh-ed25519 AAAA…` of a key.
pub fn public_line(key: &PrivateKey) -> String {
    key.public_key().to_openssh().expect("encode a public key")
}

/// `SHA256:…` of a key, as fleetctl and OpenSSH print it.
pub fn fingerprint(key: &PrivateKey) -> String {
    key.public_key().fingerprint(HashAlg::Sha256).to_string()
}

/// The name of the user this test runs as (the user sshd lets in).
pub fn current_user() -> String {
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self")
        .expect("stat /proc/self")
        .uid();
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.len() > 2 && fields[2] == uid.to_string()).then(|| fields[0].to_string())
        })
        .or_else(|| std::env::var("USER").ok())
        .expect("the name of the current user")
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

impl Sshd {
    /// Starts sshd with its files in `dir` (created), authorizing `client_public_line`.
    /// None when this machine has no sshd.
    pub fn start(dir: &Path, client_public_line: &str) -> Option<Sshd> {
        Sshd::start_with(dir, client_public_line, None)
    }

    /// Like [`Sshd::start`], with sshd (and so everything its sessions start) inside a
    /// disposable root made in `dir/root`. None (after printing why) when this machine has no
    /// sshd or cannot make namespaces.
    pub fn start_in_disposable_root(dir: &Path, client_public_line: &str) -> Option<Sshd> {
        let root = DisposableRoot::new(&dir.join("root"))?;
        Sshd::start_with(dir, client_public_line, Some(root))
    }

    /// Like [`Sshd::start_in_disposable_root`] in a root the caller made (and prepared, e.g.
    /// with [`DisposableRoot::hide`]).
    pub fn start_in_root(
        dir: &Path,
        client_public_line: &str,
        root: DisposableRoot,
    ) -> Option<Sshd> {
        Sshd::start_with(dir, client_public_line, Some(root))
    }

    fn start_with(
        dir: &Path,
        client_public_line: &str,
        root: Option<DisposableRoot>,
    ) -> Option<Sshd> {
        if !Path::new(SSHD_PATH).is_file() {
            // In CI a missing sshd is a broken setup, not a reason to pass without testing.
            assert!(
                std::env::var_os("CI").is_none(),
                "{SSHD_PATH} is missing under CI: scripts/test.sh installs openssh-server"
            );
            eprintln!(
                "skipping: {SSHD_PATH} is missing (install openssh-server; scripts/test.sh does)"
            );
            return None;
        }
        std::fs::create_dir_all(dir).expect("sshd dir");
        // The privilege separation directory sshd insists on.
        let _ = std::fs::create_dir_all("/run/sshd");
        // SHLVL=1 makes the login shell skip ~/.bashrc (bash sources it for SSH commands only
        // at shell level 1): the "host" is this machine's own account, whose rc files (a
        // developer's pyenv init, say) are no part of a fresh host and cost 300 ms a command.
        std::fs::write(
            dir.join("authorized_keys"),
            format!("environment=\"SHLVL=1\" {client_public_line}\n"),
        )
        .expect("write authorized_keys");
        let mut sshd = Sshd {
            dir: dir.to_path_buf(),
            port: 0,
            user: current_user(),
            host_key: new_ed25519_key(),
            child: None,
            root,
        };
        sshd.spawn();
        Some(sshd)
    }

    /// The pid of the listening sshd (its sessions are its children).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(ChildGuard::pid)
    }

    fn spawn(&mut self) {
        let host_key_path = self.dir.join("ssh_host_ed25519_key");
        write_private_key(&self.host_key, &host_key_path);
        for attempt in 1..=START_ATTEMPTS {
            let port = free_port();
            let config = self.dir.join("sshd_config");
            let dir = self.dir.display();
            std::fs::write(
                &config,
                format!(
                    "Port {port}\n\
                     ListenAddress 127.0.0.1\n\
                     HostKey {dir}/ssh_host_ed25519_key\n\
                     AuthorizedKeysFile {dir}/authorized_keys\n\
                     PidFile {dir}/sshd.pid\n\
                     PermitRootLogin prohibit-password\n\
                     StrictModes no\n\
                     UsePAM no\n\
                     PubkeyAuthentication yes\n\
                     PasswordAuthentication no\n\
                     KbdInteractiveAuthentication no\n\
                     PermitUserEnvironment SHLVL\n\
                     MaxStartups 200\n\
                     MaxSessions 100\n\
                     LogLevel VERBOSE\n"
                ),
            )
            .expect("write sshd_config");
            let command = self.command(&config);
            let log = self.dir.join("sshd.log");
            let mut child = ChildGuard::spawn("sshd", command, &log);
            let mut exited = false;
            wait_until(SSHD_START_DEADLINE, "sshd to accept connections", || {
                if child.has_exited() {
                    exited = true;
                    return true;
                }
                ssh_banner(port)
            });
            if !exited {
                self.port = port;
                self.child = Some(child);
                return;
            }
            eprintln!(
                "sshd exited at start (attempt {attempt}); its log:\n{}",
                process::tail(&log, 20)
            );
        }
        panic!("sshd did not start in {START_ATTEMPTS} attempts");
    }

    /// `sshd -D -e -f CONFIG`, inside the disposable root when there is one.
    fn command(&self, config: &Path) -> Command {
        let args = [
            "-D".as_ref(),
            "-e".as_ref(),
            "-f".as_ref(),
            config.as_os_str(),
        ];
        match &self.root {
            Some(root) => root.command(Path::new(SSHD_PATH), &args),
            None => {
                let mut command = Command::new(SSHD_PATH);
                command.args(args);
                command
            }
        }
    }

    /// The disposable root sshd runs in, if it runs in one.
    pub fn root(&self) -> Option<&DisposableRoot> {
        self.root.as_ref()
    }

    /// Runs `args` inside sshd's disposable root (what a session on the "host" would see).
    pub fn run_in_root(&self, args: &[&str]) -> Finished {
        assert!(self.root.is_some(), "this sshd runs in no disposable root");
        let pid = self.pid().expect("sshd runs");
        DisposableRoot::run_inside(pid, args)
    }

    /// Restarts sshd on the same port with a NEW host key (a reinstalled host, or an attacker).
    pub fn restart_with_new_host_key(&mut self) {
        self.kill();
        self.host_key = new_ed25519_key();
        let old_port = self.port;
        let host_key_path = self.dir.join("ssh_host_ed25519_key");
        write_private_key(&self.host_key, &host_key_path);
        let config = self.dir.join("sshd_config");
        let command = self.command(&config);
        let log = self.dir.join("sshd.log");
        let mut child = ChildGuard::spawn("sshd", command, &log);
        wait_until(
            SSHD_START_DEADLINE,
            "sshd to accept connections again",
            || {
                assert!(
                    !child.has_exited(),
                    "sshd exited at restart; its log:\n{}",
                    process::tail(&log, 20)
                );
                ssh_banner(old_port)
            },
        );
        self.child = Some(child);
    }

    /// SIGKILLs sshd.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill_now();
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    /// `ssh://USER@127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("ssh://{}@127.0.0.1:{}", self.user, self.port)
    }

    /// The known_hosts line that trusts this sshd's host key.
    pub fn known_hosts_line(&self) -> String {
        format!("[127.0.0.1]:{} {}", self.port, public_line(&self.host_key))
    }

    /// `SHA256:…` of the current host key.
    pub fn host_key_fingerprint(&self) -> String {
        fingerprint(&self.host_key)
    }

    /// The end of sshd's log, for failure messages.
    pub fn log_tail(&self) -> String {
        process::tail(&self.dir.join("sshd.log"), 40)
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether something on 127.0.0.1:port answers with an SSH banner.
fn ssh_banner(port: u16) -> bool {
    use std::net::TcpStream;
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf).is_ok() && &buf == b"SSH-"
}

/// A test's SSH client side: a client key (authorized in the sshd) and a known_hosts path.
pub struct SshClient {
    pub identity: PathBuf,
    pub known_hosts: PathBuf,
    pub public_line: String,
}

impl SshClient {
    /// Makes a client key in `dir` (created); the known_hosts file is `dir/known_hosts`, not
    /// yet written.
    pub fn new(dir: &Path) -> SshClient {
        std::fs::create_dir_all(dir).expect("client dir");
        let key = new_ed25519_key();
        let identity = dir.join("id_ed25519");
        write_private_key(&key, &identity);
        SshClient {
            identity,
            known_hosts: dir.join("known_hosts"),
            public_line: public_line(&key),
        }
    }
}

/// The pid in a detached agent's pid file under `remote_dir`, if any.
pub fn agent_pid(remote_dir: &Path) -> Option<u32> {
    std::fs::read_to_string(remote_dir.join("fleet-agent.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Kills the detached agent of `remote_dir` by the pid in its pid file, and every process still
/// running inside the remote dir (the app instances it started).
pub fn kill_remote_agent(remote_dir: &Path) {
    if let Some(pid) = agent_pid(remote_dir) {
        if process::pid_is_alive(pid) {
            process::signal_pid(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
    process::kill_everything_inside(remote_dir);
}

/// Kills the agents of every remote dir when dropped: the test's guard for what bootstrap
/// started through sshd (those processes are not children of the test).
pub struct RemoteAgents {
    pub remote_dirs: Vec<PathBuf>,
}

impl Drop for RemoteAgents {
    fn drop(&mut self) {
        for dir in &self.remote_dirs {
            kill_remote_agent(dir);
        }
    }
}

/// A running `ssh-agent -D -a SOCKET`, killed by pid when dropped.
pub struct SshAgent {
    pub socket: PathBuf,
    _child: ChildGuard,
}

impl SshAgent {
    /// Starts ssh-agent with its socket in `dir` (created). None (skip) when this machine has
    /// no ssh-agent; under CI a missing one fails the test.
    pub fn start(dir: &Path) -> Option<SshAgent> {
        if !Path::new(SSH_AGENT_PATH).is_file() {
            assert!(
                std::env::var_os("CI").is_none(),
                "{SSH_AGENT_PATH} is missing under CI: scripts/test.sh installs openssh-server (and with it openssh-client)"
            );
            eprintln!("skipping: {SSH_AGENT_PATH} is missing (install openssh-client)");
            return None;
        }
        std::fs::create_dir_all(dir).expect("ssh-agent dir");
        let socket = dir.join("agent.sock");
        let mut command = Command::new(SSH_AGENT_PATH);
        command.arg("-D").arg("-a").arg(&socket);
        let child = ChildGuard::spawn("ssh-agent", command, &dir.join("ssh-agent.log"));
        wait_until(SSHD_START_DEADLINE, "ssh-agent to listen", || {
            socket.exists()
        });
        Some(SshAgent {
            socket,
            _child: child,
        })
    }

    /// Loads the OpenSSH private key file `identity` into the agent.
    pub fn add(&self, identity: &Path) {
        let text = std::fs::read_to_string(identity).expect("read the private key");
        let key = PrivateKey::from_openssh(&text).expect("parse the private key");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        runtime.block_on(async {
            let mut client = russh::keys::agent::client::AgentClient::connect_uds(&self.socket)
                .await
                .expect("connect to ssh-agent");
            client
                .add_identity(&key, &[])
                .await
                .expect("add the key to ssh-agent");
        });
    }
}
