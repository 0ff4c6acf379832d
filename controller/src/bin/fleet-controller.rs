//! `fleet-controller --config DIR/controller.toml`: parses flags, sets up logging, and runs
//! the controller until SIGTERM or SIGINT. `fleet-controller issue-admin` makes a break-glass
//! admin credential with the CA key (`fleet_controller::break_glass`).
#![forbid(unsafe_code)]

use clap::Parser;
use std::path::PathBuf;

/// The fleet controller: keeps releases, runs rollouts, and tells agents what to run.
#[derive(Parser)]
#[command(version)]
struct Flags {
    /// The controller.toml written by `fleetctl init`.
    #[arg(long, env = "FLEET_CONTROLLER_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Make a new admin credential with the CA key, when every admin credential is lost,
    /// expired or revoked (break glass; recorded as an event). Run it on the controller's host,
    /// e.g. `fleet-controller issue-admin --config /etc/fleet/controller.toml --out ./admin`
    IssueAdmin {
        /// The controller.toml that names the CA and its key.
        #[arg(long)]
        config: PathBuf,
        /// The directory to write client.key, client.pem, ca.pem and client.toml into.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The credential's name, shown by `fleetctl credentials list`.
        #[arg(long, default_value = "break-glass")]
        name: String,
    },
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
    if let Some(Command::IssueAdmin { config, out, name }) = &flags.command {
        return issue_admin(config, out, name);
    }
    let Some(config_path) = &flags.config else {
        eprintln!(
            "fleet-controller: pass --config with the controller.toml written by `fleetctl init`"
        );
        return std::process::ExitCode::from(2);
    };
    let config = match fleet_controller::config::ControllerConfig::load(config_path) {
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

fn issue_admin(
    config: &std::path::Path,
    out: &std::path::Path,
    name: &str,
) -> std::process::ExitCode {
    let config = match fleet_controller::config::ControllerConfig::load(config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("fleet-controller: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match fleet_controller::break_glass::issue_admin(&config, out, name) {
        Ok(issued) => {
            println!(
                "wrote admin credential `{}` (certificate {}) to {}: use it with fleetctl --config-dir {}",
                issued.name,
                issued.serial,
                issued.dir.display(),
                issued.dir.display()
            );
            if !issued.recorded {
                println!("the controller records it, with an event, at its first use");
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fleet-controller: {e}");
            std::process::ExitCode::from(2)
        }
    }
}
