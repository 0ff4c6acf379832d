//! The README's walk from an empty VM to three hosts and a first rollout, run as written, so
//! the two cannot drift. The marked blocks (`<!-- walk:step-N -->`) are read from README.md and
//! their placeholders filled in: `controller.example.com` is `localhost`, port 7700 a free
//! port, `/var/lib/fleet` and `/home/alice` the test's directories, and `web-1..3` three "hosts"
//! behind the test's real sshd, each with a remote dir and a loopback address of its own. What a
//! test cannot run is mapped to what it can: the builds and copies to the binaries cargo built,
//! `systemctl enable --now fleet-controller` to the controller started as a child,
//! `ssh-keyscan` to the sshd's host key, and the three `ssh://root@web-N` of `bootstrap` to a
//! targets file. Every `fleetctl` line runs as written and must exit 0; the rollout must leave
//! `web 1.0.0` answering on every host, as the walk says. Needs sshd (skips without it).

use fleet_tests::bins::Bins;
use fleet_tests::net::AddressRange;
use fleet_tests::process::{self, ChildGuard};
use fleet_tests::sshd::{RemoteAgents, SshClient, Sshd};
use fleet_tests::{http, wait_until, WEB_PORT};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const STEPS: usize = 8;
const CTL_DEADLINE: Duration = Duration::from_secs(300);

/// The commands of each marked step of the README's walk, `\` continuations joined.
fn walk_steps(readme: &str) -> Vec<Vec<String>> {
    let mut steps = Vec::new();
    for n in 1..=STEPS {
        let marker = format!("<!-- walk:step-{n} -->");
        let at = readme
            .find(&marker)
            .unwrap_or_else(|| panic!("README.md has no {marker}: the walk test runs it"));
        let rest = &readme[at + marker.len()..];
        let open = rest
            .find("```sh\n")
            .expect("a ```sh block after the marker")
            + 6;
        let close = rest[open..].find("```").expect("the block's end") + open;
        let mut lines = Vec::new();
        let mut pending = String::new();
        for line in rest[open..close].lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(head) = line.strip_suffix('\\') {
                pending.push_str(head);
                pending.push(' ');
            } else {
                pending.push_str(line);
                lines.push(std::mem::take(&mut pending));
            }
        }
        steps.push(lines);
    }
    steps
}

struct Walk {
    bins: Bins,
    dir: PathBuf,
    home: PathBuf,
    port: u16,
    range: AddressRange,
    sshd: Sshd,
    remote_parent: PathBuf,
    controller: Option<ChildGuard>,
    _agents: RemoteAgents,
}

impl Walk {
    /// The line with the placeholders filled in.
    fn fill(&self, line: &str) -> String {
        line.replace(
            "https://controller.example.com:7700",
            &format!("https://localhost:{}", self.port),
        )
        .replace("0.0.0.0:7700", &format!("127.0.0.1:{}", self.port))
        .replace(
            "/var/lib/fleet",
            &self.dir.join("var-lib-fleet").display().to_string(),
        )
        .replace("/home/alice", &self.home.display().to_string())
        .replace("~/", &format!("{}/", self.home.display()))
    }

    fn fleetctl(&self, args: &[String]) -> process::Finished {
        let mut command = Command::new(&self.bins.fleetctl);
        command
            .args(args)
            .current_dir(&self.dir)
            .env("HOME", &self.home)
            .env_remove("FLEET_CONFIG_DIR")
            .env_remove("FLEET_CONTROLLER")
            .env_remove("SSH_AUTH_SOCK");
        process::run_with_deadline(command, CTL_DEADLINE)
    }

    /// Runs one line of the walk (filled in), or what it maps to.
    fn run(&mut self, step: usize, line: &str) {
        let words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
        let program = words[0].as_str();
        match program {
            // The binaries are the ones cargo built for this test; nothing to copy.
            "cargo" | "scp" | "install" | "chown" => {}
            "systemctl" => {
                if words.iter().any(|w| w == "--now") {
                    self.start_controller();
                }
            }
            "ssh-keyscan" => {
                let known_hosts = self.home.join(".ssh/known_hosts");
                let mut text = std::fs::read_to_string(&known_hosts).unwrap_or_default();
                text.push_str(&self.sshd.known_hosts_line());
                text.push('\n');
                std::fs::write(&known_hosts, text).unwrap();
            }
            "fleetctl" => {
                let mut args: Vec<String> = words[1..].to_vec();
                if args.first().map(String::as_str) == Some("bootstrap") {
                    args = self.bootstrap_args(args);
                }
                // The metrics and status page listener on a free port, not the default 7701
                // that other tests (or a real controller) may hold.
                if args.first().map(String::as_str) == Some("init")
                    && !args.iter().any(|a| a == "--http-listen")
                {
                    args.extend(["--http-listen".to_string(), "127.0.0.1:0".to_string()]);
                }
                let out = self.fleetctl(&args);
                assert_eq!(
                    out.code, 0,
                    "step {step}: `{line}` exited {}\nstdout:\n{}\nstderr:\n{}",
                    out.code, out.stdout, out.stderr
                );
            }
            "curl" => {
                let url = &words[1];
                let host = url
                    .strip_prefix("http://")
                    .and_then(|rest| rest.split(':').next())
                    .expect("curl http://HOST:PORT/");
                let idx: usize = host
                    .strip_prefix("web-")
                    .and_then(|n| n.parse().ok())
                    .expect("a web-N host");
                let addr = self.range.host_addr(idx - 1);
                assert!(url.contains(&format!(":{WEB_PORT}/")), "{url}");
                let expect = format!("web 1.0.0 on {host}\n");
                wait_until(Duration::from_secs(20), &expect, || {
                    http::get_ok(&addr, "/").as_deref() == Some(expect.as_str())
                });
            }
            // Shell lines of the artifact's build (mkdir, cp, tar): as written, in the test's
            // directory, with the example app cargo built and the repository's fleet.toml.
            _ => {
                let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
                let line = line
                    .replace(
                        "target/release/fleet-example-web",
                        &self.bins.web.display().to_string(),
                    )
                    .replace(
                        "ansible-free-examples/",
                        &format!("{}/ansible-free-examples/", repo.display()),
                    );
                let status = Command::new("sh")
                    .args(["-c", &line])
                    .current_dir(&self.dir)
                    .status()
                    .expect("sh");
                assert!(status.success(), "step {step}: `{line}` failed: {status}");
            }
        }
    }

    /// `bootstrap ssh://root@web-1 ... FLAGS` as a targets file of the test's three "hosts":
    /// the same sshd, each its own remote dir and address.
    fn bootstrap_args(&mut self, args: Vec<String>) -> Vec<String> {
        let mut lines = String::new();
        let mut rest = Vec::new();
        for arg in args {
            match arg.strip_prefix("ssh://root@web-") {
                Some(n) => {
                    let idx: usize = n.parse().expect("web-N");
                    let remote = self.remote_parent.join(format!("web-{idx}"));
                    self._agents.remote_dirs.push(remote.clone());
                    lines.push_str(&format!(
                        "{} name=web-{idx} advertise={} remote_dir={}\n",
                        self.sshd.url(),
                        self.range.host_addr(idx - 1),
                        remote.display()
                    ));
                }
                None => rest.push(arg),
            }
        }
        let targets = self.dir.join("walk-targets.txt");
        std::fs::write(&targets, lines).unwrap();
        rest.extend(["--targets".to_string(), targets.display().to_string()]);
        rest
    }

    fn start_controller(&mut self) {
        let config = self.dir.join("var-lib-fleet/controller.toml");
        let mut command = Command::new(&self.bins.controller);
        command.arg("--config").arg(&config);
        self.controller = Some(ChildGuard::spawn(
            "fleet-controller",
            command,
            &self.dir.join("controller.log"),
        ));
        let addr = format!("127.0.0.1:{}", self.port);
        wait_until(Duration::from_secs(20), "the controller to listen", || {
            std::net::TcpStream::connect(&addr).is_ok()
        });
    }
}

#[test]
fn the_readme_walk_runs_as_written() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .expect("README.md");
    let steps = walk_steps(&readme);
    let bins = Bins::locate();
    let dir = tempfile::Builder::new()
        .prefix("fleet-walk-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let home = dir.path().join("home/alice");
    let client = SshClient::new(&home.join(".ssh"));
    let Some(sshd) = Sshd::start(&dir.path().join("sshd"), &client.public_line) else {
        eprintln!("skipped: no sshd on this machine (scripts/test.sh installs openssh-server)");
        return;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut walk = Walk {
        bins,
        dir: dir.path().to_path_buf(),
        home,
        port,
        range: AddressRange::allocate(3, WEB_PORT),
        remote_parent: fleet_tests::fleet::remote_parent(dir.path()),
        sshd,
        controller: None,
        _agents: RemoteAgents {
            remote_dirs: Vec::new(),
        },
    };
    for (idx, lines) in steps.iter().enumerate() {
        for line in lines {
            let filled = walk.fill(line);
            walk.run(idx + 1, &filled);
        }
    }
    for idx in 0..3 {
        let expect = format!("web 1.0.0 on web-{}\n", idx + 1);
        let addr = walk.range.host_addr(idx);
        wait_until(Duration::from_secs(20), &expect, || {
            http::get_ok(&addr, "/").as_deref() == Some(expect.as_str())
        });
    }
    drop(walk._agents);
    if let Some(mut controller) = walk.controller.take() {
        controller.kill_now();
    }
    process::kill_everything_inside(dir.path());
}
