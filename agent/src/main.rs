//! The `fleet-agent` binary: parses flags (or `--config FILE`), sets up tracing to stderr (no
//! timestamps of its own when stderr is the journal), and runs [`fleet_agent::run`] on a small
//! runtime until SIGTERM or SIGINT. Before anything allocates much, it bounds glibc's malloc
//! ([`bound_malloc`]: the one `unsafe` call).
#![deny(unsafe_code)]

use anyhow::Context as _;
use clap::Parser;
use fleet_agent::config::{Config, ConfigFile, ConfigFlags};
use std::path::PathBuf;

/// Runs the releases the controller assigns to this host.
#[derive(Debug, Parser)]
#[command(name = "fleet-agent", version)]
struct Args {
    /// A TOML file with the same keys as the flags (controller, name, advertise, data_dir,
    /// labels = {k = "v"}, ca, join_token); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The controller, like https://controller.example.com:7700 (what `fleetctl init --url`
    /// recorded; https only: the controller speaks only mutual TLS). Several controllers of
    /// one fleet: URL1,URL2,URL3, tried in turn; a follower's redirect to its leader is followed.
    #[arg(long)]
    controller: Option<String>,
    /// This host's name.
    #[arg(long)]
    name: Option<String>,
    /// The IP address instances bind and advertise (FLEET_ADDR).
    #[arg(long)]
    advertise: Option<String>,
    /// Where the agent keeps artifacts, releases, instances, logs and its state.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Labels as k=v,k2=v2.
    #[arg(long)]
    labels: Option<String>,
    /// The fleet CA (ca.pem from `fleetctl init`) the controller is verified against; needed
    /// to join, later kept in DATA/tls/ca.pem.
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// A one-time join token from `fleetctl join-token create`; only the first start needs it.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "FLEET_JOIN_TOKEN",
        hide_env_values = true
    )]
    join_token: Option<String>,
    /// Stop every app instance when the agent stops (for a local fleet). Without it, the
    /// instances keep running and the agent's next run (a restart, an upgrade) adopts them.
    #[arg(long)]
    stop_apps_on_exit: bool,
    /// The port to serve artifact chunks to peers on, on the advertise address (default
    /// 7702); 0 serves none, and every fetch comes from the controller.
    #[arg(long, env = "FLEET_PEER_PORT", value_name = "PORT")]
    peer_port: Option<u16>,
}

fn main() -> std::process::ExitCode {
    bound_malloc();
    // Every file the agent makes (state, logs, artifacts, releases) is private to its user,
    // whatever umask it was started with; the app instances it starts inherit this.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let args = Args::parse();
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        );
    if stderr_is_journal() {
        logs.without_time().with_ansi(false).init();
    } else {
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    let config = match load_config(args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("fleet-agent: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    match run(config) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e)
            if matches!(
                e.downcast_ref::<fleet_agent::AgentError>(),
                Some(fleet_agent::AgentError::Revoked { .. })
            ) =>
        {
            eprintln!("fleet-agent: {e:#}");
            std::process::ExitCode::from(fleet_agent::removal::EXIT_REVOKED)
        }
        Err(e) => {
            eprintln!("fleet-agent: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

/// Whether stderr is systemd's journal: `JOURNAL_STREAM` (set by systemd for a service whose
/// output goes to the journal) names the device and inode of that stream, and stderr is it.
/// The journal stamps every line itself, so the log lines then carry no time of their own.
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((device, inode)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let Ok(stat) = nix::sys::stat::fstat(std::io::stderr()) else {
        return false;
    };
    device.parse() == Ok(stat.st_dev) && inode.parse() == Ok(stat.st_ino)
}

fn load_config(args: Args) -> anyhow::Result<Config> {
    let file = match &args.config {
        Some(path) => ConfigFile::load(path)?,
        None => ConfigFile::default(),
    };
    let flags = ConfigFlags {
        controller: args.controller,
        name: args.name,
        advertise: args.advertise,
        data_dir: args.data_dir,
        labels: args.labels,
        ca: args.ca,
        join_token: args.join_token,
        stop_apps_on_exit: args.stop_apps_on_exit,
        peer_port: args.peer_port,
    };
    Ok(Config::build(file, flags)?)
}

/// Malloc arenas at most (glibc's default is 8 per core).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MALLOC_ARENA_MAX: i32 = 2;
/// Allocations from this size up are mapped on their own (glibc's largest threshold): every
/// buffer of a transfer comes from the heap and is reused there. With a threshold of 256 KiB,
/// each 1 MiB chunk received, encoded or read was mapped, faulted in page by page, zeroed and
/// unmapped: half the CPU of a fetch through peers, 2.7 CPU-seconds of 7.4 in the 10-host
/// fan-out (docs/benchmarks.md).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MALLOC_MMAP_THRESHOLD: i32 = 32 << 20;
/// Free memory at the top of a heap beyond this is returned at once; below it, it is kept for
/// the next buffer while a transfer runs, and returned when the transfer is over
/// (`fleet_agent::memory::give_back`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MALLOC_TRIM_THRESHOLD: i32 = 64 << 20;

/// Bounds glibc's malloc so that the agent's resident memory stays flat across rollouts:
/// every fetch and unpack runs on a blocking-pool thread, and under glibc's defaults each new
/// thread got an arena of its own that kept the large buffers it freed, so a long-lived agent
/// grew by some MiB with every rollout (RELIABILITY.md, "What broke", item 4). Two arenas, and
/// the heaps' free memory given back after every deploy and peer transfer
/// (`fleet_agent::memory`), keep it at its first rollout's size; large fixed thresholds keep
/// a transfer's buffers in the heap while it runs. A `MALLOC_ARENA_MAX`,
/// `MALLOC_MMAP_THRESHOLD_` or `MALLOC_TRIM_THRESHOLD_` in the environment wins.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn bound_malloc() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a tunable of the allocator; it is called first thing in
        // main, before any other thread exists.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENA_MAX) };
    }
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // SAFETY: as above.
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD) };
    }
    if std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_none() {
        // SAFETY: as above.
        unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD) };
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn bound_malloc() {}

fn run(config: Config) -> anyhow::Result<()> {
    // One thread is plenty for an agent and keeps its idle footprint small.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        fleet_agent::run(config, shutdown_signal()).await?;
        Ok(())
    })
}

/// Resolves on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::error!("cannot listen for SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
