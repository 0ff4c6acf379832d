//! `fleet-controller --config DIR/controller.toml`: parses flags, sets up logging, and runs
//! the controller until SIGTERM or SIGINT.
#![forbid(unsafe_code)]

use clap::Parser;
use std::path::PathBuf;

/// The fleet controller: keeps releases, runs rollouts, and tells agents what to run.
#[derive(Parser)]
#[command(version)]
struct Flags {
    /// The controller.toml written by `fleetctl init`.
    #[arg(long, env = "FLEET_CONTROLLER_CONFIG")]
    config: PathBuf,
}

fn main() -> std::process::ExitCode {
    // Every file the controller makes (the store, artifacts, uploads) is private to its user,
    // whatever umask it was started with.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let flags = Flags::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = match fleet_controller::config::ControllerConfig::load(&flags.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("fleet-controller: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(fleet_controller::server::run(
        config,
        fleet_controller::shutdown_signal(),
    )) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleet-controller: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
