//! `fleetctl demo [--hosts N] [--keep]`: a whole fleet on this machine for a first look. It
//! makes a fleet with `fleetctl init` (CA, certificates), starts a controller and N agents, each
//! joining with its own one-time join token, (hosts `demo-1..demo-N` advertising 127.0.0.2,
//! 127.0.0.3, ...) as child processes in a temporary directory, releases the example web app
//! twice, rolls out 1.0.0 and then 1.1.0 canary-first, then shows the safety net: a third
//! release (1.2.0) whose smoke check fails halts at the canary, which goes back to 1.1.0. It
//! asks every host what it serves, prints `status web`, and stops everything again: SIGTERM to
//! every child by pid, SIGKILL after a deadline, temporary directory removed, also on error and
//! on Ctrl-C. Every step calls the same functions as the fleetctl verbs.
//!
//! With `--keep` a demo that went well leaves its fleet running, writes the pids it started to
//! `DIR/demo.pids` and prints what to try next; `fleetctl demo --stop DIR` stops exactly those
//! pids (each only while its command line still names DIR) and removes DIR.

use crate::client::{self, CliError, EXIT_OK};
use crate::commands::{self, Context, RolloutOptions};
use crate::init;
use crate::output::OutputFormat;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How the example app is run and checked; it travels inside the demo's artifacts.
const WEB_MANIFEST: &str = fleet_example_web::MANIFEST;
/// The port the example app listens on, on each host's own loopback address.
const WEB_PORT: u16 = 8080;
/// How long the controller may take to write its address file.
const CONTROLLER_START_DEADLINE: Duration = Duration::from_secs(15);
/// How long the agents may take to connect.
const AGENTS_CONNECT_DEADLINE: Duration = Duration::from_secs(20);
/// How long the children get to stop after SIGTERM before they are killed.
const STOP_DEADLINE: Duration = Duration::from_secs(15);
/// How often a condition is checked while waiting for it.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Exit code after Ctrl-C (128 + SIGINT), as shells report it.
const EXIT_INTERRUPTED: u8 = 130;
/// Where `--keep` writes the pids the demo started, one `PID NAME` a line; `--stop` reads it.
const PIDS_FILE: &str = "demo.pids";
/// The demo's third release: its smoke check fails, so its rollout halts at the canary.
const BROKEN_VERSION: &str = "1.2.0";
/// The cap on the broken release's smoke check (the manifest's own is 10s).
const BROKEN_SMOKE_TIMEOUT: Duration = Duration::from_secs(3);

/// The three binaries the demo runs, found next to fleetctl.
struct Binaries {
    controller: PathBuf,
    agent: PathBuf,
    web: PathBuf,
}

impl Binaries {
    fn find() -> Result<Binaries, CliError> {
        let exe = std::env::current_exe().map_err(|e| {
            CliError::Failed(format!("cannot find where fleetctl itself lives: {e}"))
        })?;
        let dir = exe.parent().unwrap_or(Path::new(".")).to_path_buf();
        let find = |name: &str| -> Result<PathBuf, CliError> {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(client::usage(format!(
                    "cannot find {name} next to fleetctl in {}: build every binary with `cargo build --release` and run target/release/fleetctl demo",
                    dir.display()
                )))
            }
        };
        Ok(Binaries {
            controller: find("fleet-controller")?,
            agent: find("fleet-agent")?,
            web: find("fleet-example-web")?,
        })
    }
}

/// A child process of the demo and the log file its output goes to.
struct DemoChild {
    name: String,
    child: Child,
    log: PathBuf,
}

/// The demo's temporary directory and child processes. Dropping it stops the children and
/// removes the directory, so every way out of the demo cleans up.
struct LocalFleet {
    dir: Option<tempfile::TempDir>,
    children: Vec<DemoChild>,
}

impl LocalFleet {
    fn new() -> Result<LocalFleet, CliError> {
        let dir = tempfile::Builder::new()
            .prefix("fleet-demo-")
            .tempdir()
            .map_err(|e| {
                CliError::Failed(format!(
                    "cannot create a temporary directory: {e}; set TMPDIR to a writable directory"
                ))
            })?;
        // The demo's apps run as users of their own when it runs as root: they pass through
        // this directory to their hosts' data directories.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o711),
        )
        .map_err(|e| CliError::Failed(format!("cannot open up the demo's directory: {e}")))?;
        std::fs::create_dir(dir.path().join("logs")).map_err(|e| {
            CliError::Failed(format!("cannot create the demo's log directory: {e}"))
        })?;
        // The hosts' data directories go below `hosts/`, which apps pass through too (the
        // agents make their own directories, with a umask that closes them to others).
        let hosts = dir.path().join("hosts");
        std::fs::create_dir(&hosts)
            .and_then(|()| {
                std::fs::set_permissions(
                    &hosts,
                    std::os::unix::fs::PermissionsExt::from_mode(0o711),
                )
            })
            .map_err(|e| {
                CliError::Failed(format!("cannot create the demo's hosts directory: {e}"))
            })?;
        Ok(LocalFleet {
            dir: Some(dir),
            children: Vec::new(),
        })
    }

    fn path(&self) -> &Path {
        self.dir
            .as_ref()
            .map(|dir| dir.path())
            .unwrap_or(Path::new("."))
    }

    /// Starts a child with stdout and stderr going to `logs/NAME.log`. The child gets its own
    /// process group, so Ctrl-C in the terminal reaches only fleetctl, which then stops the
    /// children in order.
    fn spawn(&mut self, name: &str, program: &Path, args: &[String]) -> Result<(), CliError> {
        use std::os::unix::process::CommandExt;
        let log = self.path().join("logs").join(format!("{name}.log"));
        let open_log = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .map_err(|e| CliError::Failed(format!("cannot create {}: {e}", log.display())))
        };
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(open_log()?)
            .stderr(open_log()?)
            .process_group(0)
            .spawn()
            .map_err(|e| CliError::Failed(format!("cannot start {}: {e}", program.display())))?;
        self.children.push(DemoChild {
            name: name.to_string(),
            child,
            log,
        });
        Ok(())
    }

    /// Fails with the end of its log when a child has already exited.
    fn check_children_alive(&mut self) -> Result<(), CliError> {
        for demo_child in &mut self.children {
            if let Ok(Some(exit)) = demo_child.child.try_wait() {
                return Err(CliError::Failed(format!(
                    "{} exited early ({exit}); the end of its log is above",
                    demo_child.name
                )));
            }
        }
        Ok(())
    }

    /// The end of every child's log, for an error message.
    fn log_tails(&self) -> String {
        self.children
            .iter()
            .map(|demo_child| {
                format!(
                    "--- {} ---\n{}",
                    demo_child.name,
                    log_tail(&demo_child.log, 10)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// SIGTERM to every running child by pid (agents first, the controller last), waits up to
    /// `STOP_DEADLINE`, SIGKILLs whatever is left, then removes the temporary directory.
    /// Idempotent.
    fn shutdown(&mut self) {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        let mut children = std::mem::take(&mut self.children);
        children.reverse();
        for demo_child in &mut children {
            if let Ok(None) = demo_child.child.try_wait() {
                let pid = Pid::from_raw(demo_child.child.id() as i32);
                let _ = kill(pid, Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + STOP_DEADLINE;
        loop {
            let mut running = 0;
            for demo_child in &mut children {
                if let Ok(None) = demo_child.child.try_wait() {
                    running += 1;
                }
            }
            if running == 0 || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        for demo_child in &mut children {
            if let Ok(None) = demo_child.child.try_wait() {
                eprintln!(
                    "warning: {} did not stop within {}s of SIGTERM; killing it",
                    demo_child.name,
                    STOP_DEADLINE.as_secs()
                );
                let _ = demo_child.child.kill();
                let _ = demo_child.child.wait();
            }
        }
        if let Some(dir) = self.dir.take() {
            let path = dir.path().to_path_buf();
            if let Err(e) = dir.close() {
                eprintln!(
                    "warning: cannot remove the demo directory {}: {e}",
                    path.display()
                );
            }
        }
    }
}

impl LocalFleet {
    /// `--keep`: writes `DIR/demo.pids` and lets go of the children and the directory, so
    /// neither is stopped or removed when the demo exits. Returns the pids.
    fn leave_running(&mut self) -> Result<Vec<u32>, CliError> {
        let pids: Vec<u32> = self
            .children
            .iter()
            .map(|demo_child| demo_child.child.id())
            .collect();
        let text: String = self
            .children
            .iter()
            .map(|demo_child| format!("{} {}\n", demo_child.child.id(), demo_child.name))
            .collect();
        let pids_file = self.path().join(PIDS_FILE);
        std::fs::write(&pids_file, text)
            .map_err(|e| CliError::Failed(format!("cannot write {}: {e}", pids_file.display())))?;
        self.children.clear();
        if let Some(dir) = self.dir.take() {
            let _ = dir.keep();
        }
        Ok(pids)
    }
}

impl Drop for LocalFleet {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The last `n_lines` lines of a log file.
fn log_tail(path: &Path, n_lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(n_lines);
            if lines.is_empty() {
                "(empty)".to_string()
            } else {
                lines[start..].join("\n")
            }
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Runs the demo with `n_hosts` agents and returns the exit code; with `keep`, a demo that
/// went well leaves its fleet running.
pub async fn run(n_hosts: u32, keep: bool) -> Result<u8, CliError> {
    let binaries = Binaries::find()?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| CliError::Failed(format!("cannot watch for SIGTERM: {e}")))?;
    let started = Instant::now();
    let mut fleet = LocalFleet::new()?;
    // `None` when Ctrl-C or SIGTERM interrupted the steps.
    let outcome = tokio::select! {
        outcome = run_steps(&mut fleet, &binaries, n_hosts) => Some(outcome),
        _ = tokio::signal::ctrl_c() => None,
        _ = terminate.recv() => None,
    };
    if keep && matches!(outcome, Some(Ok(()))) {
        let dir = fleet.path().to_path_buf();
        let pids = fleet.leave_running()?;
        print_keep_hints(&dir, &pids);
        return Ok(EXIT_OK);
    }
    let n_processes = fleet.children.len();
    println!(
        "\n==> stopping {n_processes} processes and removing {}",
        fleet.path().display()
    );
    let logs = match &outcome {
        Some(Err(_)) => fleet.log_tails(),
        _ => String::new(),
    };
    fleet.shutdown();
    match outcome {
        Some(Ok(())) => {
            println!(
                "demo done in {:.0}s. Next: `fleetctl demo --keep` to try the commands on a fleet that stays up, or the README's walk to a real fleet.",
                started.elapsed().as_secs_f64()
            );
            Ok(EXIT_OK)
        }
        None => {
            eprintln!("interrupted: the demo fleet is stopped and its files removed");
            Ok(EXIT_INTERRUPTED)
        }
        Some(Err(error)) => {
            if !logs.is_empty() {
                eprintln!("the end of each process's log:\n{logs}");
            }
            Err(error)
        }
    }
}

/// The demo's steps, from an empty directory to `status web`.
async fn run_steps(
    fleet: &mut LocalFleet,
    binaries: &Binaries,
    n_hosts: u32,
) -> Result<(), CliError> {
    let dir = fleet.path().to_path_buf();
    println!(
        "fleet demo: a controller and {n_hosts} hosts on this machine (files in {})",
        dir.display()
    );

    // The controller, configured exactly as `fleetctl init` would.
    let init_outcome = init::init_dir_with_http(&dir, "127.0.0.1:0", None, "127.0.0.1:0")?;
    fleet.spawn(
        "controller",
        &binaries.controller,
        &[
            "--config".to_string(),
            init_outcome.controller_config.display().to_string(),
        ],
    )?;
    let addr = wait_for_controller_addr(fleet, &dir.join("controller.addr")).await?;
    let url = format!("https://{addr}");
    println!("==> controller listening on {addr} (mutual TLS)");
    if let Ok(http_addr) = wait_for_controller_addr(fleet, &dir.join("controller.http.addr")).await
    {
        println!("==> status page and metrics on http://{http_addr}/ (open it in a browser)");
    }
    let ctx = Context {
        connection: client::connect(&url, &dir).await?,
        output: OutputFormat::Text,
    };

    // The hosts. Their apps pass through `hosts/` to their data directories (as through
    // /var/lib on a real host) when the agents run as root and the apps as users of their own.
    let hosts_dir = dir.join("hosts");
    std::fs::create_dir_all(&hosts_dir)
        .and_then(|()| {
            std::fs::set_permissions(
                &hosts_dir,
                std::os::unix::fs::PermissionsExt::from_mode(0o711),
            )
        })
        .map_err(|e| CliError::Failed(format!("cannot create {}: {e}", hosts_dir.display())))?;
    let mut host_addrs = Vec::new();
    for host_idx in 1..=n_hosts {
        let name = format!("demo-{host_idx}");
        let advertise = format!("127.0.0.{}", host_idx + 1);
        let data_dir = dir.join("hosts").join(&name);
        let token = crate::trust::create_join_token(&ctx, Duration::from_secs(600), &[])
            .await?
            .token;
        fleet.spawn(
            &name,
            &binaries.agent,
            &[
                "--controller".to_string(),
                url.clone(),
                "--name".to_string(),
                name.clone(),
                "--advertise".to_string(),
                advertise.clone(),
                "--data-dir".to_string(),
                data_dir.display().to_string(),
                "--labels".to_string(),
                "env=demo".to_string(),
                "--ca".to_string(),
                init_outcome.ca.display().to_string(),
                "--join-token".to_string(),
                token,
                // A local fleet: its apps go when the demo stops its agents.
                "--stop-apps-on-exit".to_string(),
            ],
        )?;
        host_addrs.push((name, advertise));
    }
    wait_for_hosts(fleet, &ctx, n_hosts as usize).await?;
    println!(
        "==> {n_hosts} hosts joined with one-time tokens and connected: {}",
        host_addrs
            .iter()
            .map(|(name, addr)| format!("{name} ({addr})"))
            .collect::<Vec<_>>()
            .join(", ")
    );

    // Two releases of the example web app.
    let web_binary = std::fs::read(&binaries.web)
        .map_err(|e| CliError::Failed(format!("cannot read {}: {e}", binaries.web.display())))?;
    for version in ["1.0.0", "1.1.0"] {
        let artifact = write_web_artifact(&dir, version, &web_binary)?;
        println!(
            "\n==> fleetctl release create web {version} {}",
            artifact.display()
        );
        commands::release_create(&ctx, "web", version, &artifact, &[], &[]).await?;
    }

    // Two rollouts: the first brings web up everywhere, the second upgrades it canary-first.
    for (version, canary, batch) in [("1.0.0", 1, "100%"), ("1.1.0", 1, "50%")] {
        println!("\n==> fleetctl rollout web {version} --canary {canary} --batch {batch}");
        let options = RolloutOptions {
            app: "web".to_string(),
            version: version.to_string(),
            selector: vec![("env".to_string(), "demo".to_string())],
            canary,
            batch: batch.to_string(),
            pause_after_canary: Duration::ZERO,
            smoke_timeout: Duration::ZERO,
            min_healthy: None,
            max_unavailable: None,
            auto_rollback: true,
            detach: false,
            skip_lost: false,
            dry_run: false,
        };
        let outcome = commands::rollout(&ctx, &options).await?;
        if outcome.exit_code != EXIT_OK {
            return Err(CliError::Failed(format!(
                "the rollout of web@{version} ended {}, not succeeded",
                outcome.rollout.state
            )));
        }
    }

    show_the_safety_net(&ctx, &dir, &web_binary).await?;

    // What every host serves now.
    println!("\n==> what each host serves (GET http://ADDR:{WEB_PORT}/)");
    for (name, addr) in &host_addrs {
        let answer = match http_get(addr, WEB_PORT, "/").await {
            Ok(body) => body.trim().to_string(),
            Err(e) => format!("no answer: {e}"),
        };
        println!("{name}  {addr}:{WEB_PORT}  {answer}");
    }

    println!("\n==> fleetctl status web");
    commands::status(&ctx, Some("web"), false).await?;
    Ok(())
}

/// The third release: the example app with `WEB_BROKEN=1`, so its `/healthz` answers 500. Its
/// rollout must halt at the canary and put the canary back on 1.1.0; the other hosts are never
/// touched. Anything else is a failed demo.
async fn show_the_safety_net(ctx: &Context, dir: &Path, web_binary: &[u8]) -> Result<(), CliError> {
    let artifact = write_web_artifact(dir, BROKEN_VERSION, web_binary)?;
    println!(
        "\n==> fleetctl release create web {BROKEN_VERSION} {} --env WEB_BROKEN=1   (its /healthz answers 500)",
        artifact.display()
    );
    let broken_env = [("WEB_BROKEN".to_string(), "1".to_string())];
    commands::release_create(ctx, "web", BROKEN_VERSION, &artifact, &broken_env, &[]).await?;
    println!(
        "\n==> fleetctl rollout web {BROKEN_VERSION} --canary 1 --batch 50% --smoke-timeout {}s",
        BROKEN_SMOKE_TIMEOUT.as_secs()
    );
    let options = RolloutOptions {
        app: "web".to_string(),
        version: BROKEN_VERSION.to_string(),
        selector: vec![("env".to_string(), "demo".to_string())],
        canary: 1,
        batch: "50%".to_string(),
        pause_after_canary: Duration::ZERO,
        smoke_timeout: BROKEN_SMOKE_TIMEOUT,
        min_healthy: None,
        max_unavailable: None,
        auto_rollback: true,
        detach: false,
        skip_lost: false,
        dry_run: false,
    };
    let outcome = commands::rollout(ctx, &options).await?;
    let rollout = &outcome.rollout;
    if rollout.state != "rolled_back" {
        return Err(CliError::Failed(format!(
            "the rollout of web@{BROKEN_VERSION}, whose smoke check fails, ended {}, not rolled_back",
            rollout.state
        )));
    }
    let canary: Vec<&str> = rollout
        .waves
        .first()
        .map(|wave| wave.hosts.iter().map(|host| host.host.as_str()).collect())
        .unwrap_or_default();
    println!(
        "\n==> the safety net: web@{BROKEN_VERSION} failed its smoke check on the canary ({}), so rollout {} \
         halted there, the canary went back to 1.1.0 and no other host was touched. \
         `fleetctl history web --config-dir {}` shows it, host by host (`fleetctl demo --keep` \
         leaves the fleet up to try it).",
        canary.join(", "),
        rollout.id,
        dir.display()
    );
    Ok(())
}

/// What `--keep` prints: the commands to try next, with the `--config-dir` they need, and how
/// to stop it all.
fn print_keep_hints(dir: &Path, pids: &[u32]) {
    let config = format!("--config-dir {}", dir.display());
    println!(
        "\n==> the demo fleet keeps running (files in {})",
        dir.display()
    );
    println!("try next:");
    for (command, what) in [
        ("status web", "what runs where"),
        ("history web", "the three rollouts, host by host"),
        ("hosts", "the hosts and what they run"),
        ("drain demo-1", "stop demo-1's app and keep releases off it"),
        ("undrain demo-1", "bring it back"),
        (
            "rollback web",
            "back to the release it ran before, canary first",
        ),
    ] {
        println!("  fleetctl {command} {config}    # {what}");
    }
    let pid_list: Vec<String> = pids.iter().map(u32::to_string).collect();
    println!(
        "stop it all: fleetctl demo --stop {}    (SIGTERM to the demo's pids {}, then removes the directory)",
        dir.display(),
        pid_list.join(" ")
    );
}

/// `fleetctl demo --stop DIR`: stops what a `--keep` demo left running in DIR and removes DIR.
/// Only the pids in `DIR/demo.pids` are signalled, and each only while its command line still
/// names DIR, so a pid the system gave to another process since is left alone.
pub fn stop(dir: &Path) -> Result<u8, CliError> {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let pids_file = dir.join(PIDS_FILE);
    let text = std::fs::read_to_string(&pids_file).map_err(|e| {
        client::usage(format!(
            "cannot read {}: {e}; pass the directory that `fleetctl demo --keep` printed",
            pids_file.display()
        ))
    })?;
    let needle = dir.display().to_string();
    let ours = |pid: u32| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(&needle))
    };
    // Agents first, the controller (the first line) last, as the demo itself stops them.
    let pids: Vec<u32> = text
        .lines()
        .filter_map(|line| line.split_whitespace().next()?.parse().ok())
        .rev()
        .collect();
    for pid in &pids {
        if ours(*pid) {
            let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGTERM);
        }
    }
    let deadline = Instant::now() + STOP_DEADLINE;
    while pids.iter().any(|pid| ours(*pid)) && Instant::now() < deadline {
        std::thread::sleep(POLL_INTERVAL);
    }
    for pid in &pids {
        if ours(*pid) {
            eprintln!(
                "warning: pid {pid} did not stop within {}s of SIGTERM; killing it",
                STOP_DEADLINE.as_secs()
            );
            let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
        }
    }
    std::fs::remove_dir_all(dir).map_err(|e| {
        CliError::Failed(format!(
            "the demo's processes are stopped but {} could not be removed: {e}",
            dir.display()
        ))
    })?;
    println!(
        "stopped {} processes and removed {}",
        pids.len(),
        dir.display()
    );
    Ok(EXIT_OK)
}

/// Waits (bounded) for the controller to write its bound address.
async fn wait_for_controller_addr(
    fleet: &mut LocalFleet,
    addr_file: &Path,
) -> Result<String, CliError> {
    let deadline = Instant::now() + CONTROLLER_START_DEADLINE;
    loop {
        if let Ok(text) = std::fs::read_to_string(addr_file) {
            let addr = text.trim();
            if !addr.is_empty() {
                return Ok(addr.to_string());
            }
        }
        fleet.check_children_alive()?;
        if Instant::now() >= deadline {
            return Err(CliError::Failed(format!(
                "the controller did not write {} within {}s",
                addr_file.display(),
                CONTROLLER_START_DEADLINE.as_secs()
            )));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Waits (bounded) until `n_hosts` hosts are connected.
async fn wait_for_hosts(
    fleet: &mut LocalFleet,
    ctx: &Context,
    n_hosts: usize,
) -> Result<(), CliError> {
    let deadline = Instant::now() + AGENTS_CONNECT_DEADLINE;
    loop {
        let hosts = commands::list_hosts(ctx).await?;
        let n_connected = hosts.hosts.iter().filter(|host| host.connected).count();
        if n_connected >= n_hosts {
            return Ok(());
        }
        fleet.check_children_alive()?;
        if Instant::now() >= deadline {
            return Err(CliError::Failed(format!(
                "only {n_connected} of {n_hosts} hosts connected within {}s",
                AGENTS_CONNECT_DEADLINE.as_secs()
            )));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Builds the example app's artifact for `version` and writes it to `DIR/web-VERSION.tar.gz`.
/// The artifact holds the web binary, `fleet.toml` and a VERSION file (so the two releases
/// have different digests, as two real builds would).
fn write_web_artifact(dir: &Path, version: &str, web_binary: &[u8]) -> Result<PathBuf, CliError> {
    let version_file = format!("{version}\n");
    let bytes = fleet_proto::artifact::build_artifact(&[
        ("bin/web", web_binary, 0o755),
        ("fleet.toml", WEB_MANIFEST.as_bytes(), 0o644),
        ("VERSION", version_file.as_bytes(), 0o644),
    ])
    .map_err(|e| CliError::Failed(format!("cannot build the demo artifact: {e}")))?;
    let path = dir.join(format!("web-{version}.tar.gz"));
    std::fs::write(&path, bytes)
        .map_err(|e| CliError::Failed(format!("cannot write {}: {e}", path.display())))?;
    Ok(path)
}

/// A bounded HTTP/1.1 GET to a loopback address; returns the body of a 200 answer.
async fn http_get(addr: &str, port: u16, path: &str) -> Result<String, String> {
    const TIMEOUT: Duration = Duration::from_secs(5);
    const MAX_RESPONSE_BYTES: u64 = 64 * 1024;
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect((addr, port))
            .await
            .map_err(|e| e.to_string())?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}:{port}\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut response = Vec::new();
        stream
            .take(MAX_RESPONSE_BYTES)
            .read_to_end(&mut response)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(response)
    };
    let response = tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer within {}s", TIMEOUT.as_secs()))??;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| "the answer is not HTTP".to_string())?;
    let status_line = head.lines().next().unwrap_or_default();
    if status_line.split_whitespace().nth(1) != Some("200") {
        return Err(format!("answered {status_line:?}"));
    }
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_manifest_parses() {
        fleet_proto::manifest::Manifest::parse(WEB_MANIFEST).unwrap();
    }

    #[test]
    fn demo_artifacts_are_valid_and_differ() {
        let dir = tempfile::tempdir().unwrap();
        let first = write_web_artifact(dir.path(), "1.0.0", b"#!/bin/sh\n").unwrap();
        let second = write_web_artifact(dir.path(), "1.1.0", b"#!/bin/sh\n").unwrap();
        for path in [&first, &second] {
            let file = std::fs::File::open(path).unwrap();
            fleet_proto::artifact::read_artifact(
                file,
                None,
                fleet_proto::artifact::Limits::default(),
            )
            .unwrap();
        }
        assert_ne!(
            fleet_proto::artifact::digest_of(&std::fs::read(&first).unwrap()),
            fleet_proto::artifact::digest_of(&std::fs::read(&second).unwrap())
        );
    }

    #[test]
    fn shutdown_stops_children_and_removes_the_directory() {
        let mut fleet = LocalFleet::new().unwrap();
        let dir = fleet.path().to_path_buf();
        fleet
            .spawn("sleeper", Path::new("sleep"), &["30".to_string()])
            .unwrap();
        let started = Instant::now();
        fleet.shutdown();
        assert!(started.elapsed() < STOP_DEADLINE);
        assert!(fleet.children.is_empty());
        assert!(!dir.exists());
        fleet.shutdown();
    }
}
