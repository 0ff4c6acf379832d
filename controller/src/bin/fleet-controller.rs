//! `fleet-controller --config DIR/controller.toml`: parses flags, sets up logging, and runs
//! the controller until SIGTERM or SIGINT. Three subcommands work beside it on the same host:
//! `backup` (a consistent copy of the running controller's store, CA and artifacts),
//! `restore` (an empty data directory filled from such a copy; see `fleet_controller::backup`)
//! `issue-admin` (a break-glass admin credential made with the CA key; see
//! `fleet_controller::break_glass`) and `migrate` (a one-node fleet's store copied into etcd;
//! see `fleet_controller::migrate`).
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// The fleet controller: keeps releases, runs rollouts, and tells agents what to run.
#[derive(Parser)]
#[command(
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Flags {
    /// The controller.toml written by `fleetctl init`.
    #[arg(long, env = "FLEET_CONTROLLER_CONFIG", required = true)]
    config: Option<PathBuf>,
    /// Serve metrics, /healthz, /readyz and the status page on this address instead of
    /// controller.toml's http_listen (port 0: any free port, written to controller.http.addr).
    #[arg(long, value_name = "ADDR:PORT")]
    http_listen: Option<String>,
    /// Listen on this address instead of controller.toml's listen (several controllers
    /// sharing one config directory and CA).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<String>,
    /// Keep this controller's own files (address files, artifact cache, uploads, its lock)
    /// in DIR instead of controller.toml's data_dir; one directory per controller.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// The URL other controllers of a fleet on etcd send clients and agents to when this one
    /// leads, instead of controller.toml's advertise (default: https:// and --listen).
    #[arg(long, value_name = "https://HOST:PORT")]
    advertise: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Copies the running controller's store (a consistent snapshot), CA, certificates and
    /// artifacts into one new file, 0600: it holds the CA key, keep it as secret as ca.key.
    ///
    /// Run it on the controller's host, as the user the controller runs as.
    ///
    /// Example: fleet-controller backup --config /etc/fleet/controller.toml --to /var/backups/fleet-2025-01-31.tar.gz
    Backup {
        /// The running controller's controller.toml.
        #[arg(long)]
        config: PathBuf,
        /// The backup file to write; it must not exist.
        #[arg(long)]
        to: PathBuf,
    },
    /// Fills an empty data directory from a backup; a controller started on it has every
    /// release, deployment, rollout, host and event of the backup, and its hosts reconnect.
    ///
    /// Example: fleet-controller restore --from fleet-2025-01-31.tar.gz --data-dir /var/lib/fleet/data
    Restore {
        /// A file written by `fleet-controller backup`.
        #[arg(long)]
        from: PathBuf,
        /// The data directory to fill: new or empty. Point controller.toml's data_dir at it.
        #[arg(long)]
        data_dir: PathBuf,
        /// Also write the backup's controller.toml (its data_dir set to --data-dir), CA and
        /// controller certificate here, for a controller whose config was lost too. Leave it
        /// out to keep the config you have.
        #[arg(long)]
        config_dir: Option<PathBuf>,
    },
    /// Makes a new admin credential with the CA key, when every admin credential is lost,
    /// expired or revoked (break glass; recorded as an event). Run it on the controller's host.
    ///
    /// Example: fleet-controller issue-admin --config /etc/fleet/controller.toml --out ./admin
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
    /// Copies a stopped one-node fleet's store (the redb file in its data directory) into
    /// etcd, so that it can move to several controllers; refuses an etcd prefix that holds
    /// data already, and prints the [etcd] table to add to controller.toml.
    ///
    /// Example: fleet-controller migrate --config /etc/fleet/controller.toml --to-etcd https://10.0.0.5:2379,https://10.0.0.6:2379 --etcd-ca /etc/fleet/etcd-ca.pem
    Migrate {
        /// The stopped controller's controller.toml.
        #[arg(long)]
        config: PathBuf,
        /// The etcd members' URLs, comma-separated (https://, or http:// on loopback).
        #[arg(
            long,
            value_name = "URL[,URL...]",
            value_delimiter = ',',
            required = true
        )]
        to_etcd: Vec<String>,
        /// The key prefix to copy to; it must be empty.
        #[arg(long, default_value = fleet_controller::store::etcd::DEFAULT_PREFIX)]
        etcd_prefix: String,
        /// The CA of etcd's certificate (required for https).
        #[arg(long)]
        etcd_ca: Option<PathBuf>,
        /// A client certificate for etcd, with --etcd-key.
        #[arg(long)]
        etcd_cert: Option<PathBuf>,
        /// The key of --etcd-cert.
        #[arg(long)]
        etcd_key: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    // Every file the controller makes (the store, artifacts, uploads, backups) is private to
    // its user, whatever umask it was started with.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let flags = Flags::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    if stderr_is_journal() {
        logs.without_time().with_ansi(false).init();
    } else {
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    match flags.command {
        Some(Command::Backup { config, to }) => backup(&config, &to),
        Some(Command::Restore {
            from,
            data_dir,
            config_dir,
        }) => restore(&from, &data_dir, config_dir.as_deref()),
        Some(Command::IssueAdmin { config, out, name }) => issue_admin(&config, &out, &name),
        Some(Command::Migrate {
            config,
            to_etcd,
            etcd_prefix,
            etcd_ca,
            etcd_cert,
            etcd_key,
        }) => {
            let absolute = |path: Option<PathBuf>| {
                path.map(|p| std::path::absolute(&p).unwrap_or(p).display().to_string())
            };
            let to = fleet_controller::config::EtcdFile {
                endpoints: to_etcd,
                prefix: Some(etcd_prefix),
                ca: absolute(etcd_ca),
                cert: absolute(etcd_cert),
                key: absolute(etcd_key),
            };
            migrate(&config, &to)
        }
        None => run(
            &flags.config.expect("clap requires --config"),
            Overrides {
                http_listen: flags.http_listen.as_deref(),
                listen: flags.listen.as_deref(),
                data_dir: flags.data_dir.as_deref(),
                advertise: flags.advertise.as_deref(),
            },
        ),
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

fn load_config(
    path: &std::path::Path,
) -> Result<fleet_controller::config::ControllerConfig, ExitCode> {
    fleet_controller::config::ControllerConfig::load(path).map_err(|e| {
        eprintln!("fleet-controller: {e}");
        ExitCode::from(2)
    })
}

/// Worker threads of the main runtime (the agents' lane) and of the clients' lane.
const WORKERS: usize = 2;
const CLIENT_WORKERS: usize = 2;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKERS)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Flags that override controller.toml for this controller.
struct Overrides<'a> {
    http_listen: Option<&'a str>,
    listen: Option<&'a str>,
    data_dir: Option<&'a std::path::Path>,
    advertise: Option<&'a str>,
}

fn run(config_path: &std::path::Path, overrides: Overrides<'_>) -> ExitCode {
    let mut config = match load_config(config_path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    if let Some(listen) = overrides.listen {
        if let Err(e) = config.override_listen(listen) {
            eprintln!("fleet-controller: --listen: {e}");
            return ExitCode::from(2);
        }
    }
    if let Some(data_dir) = overrides.data_dir {
        config.override_data_dir(&std::path::absolute(data_dir).unwrap_or(data_dir.into()));
    }
    if let Some(advertise) = overrides.advertise {
        if let Err(e) = config.override_advertise(advertise) {
            eprintln!("fleet-controller: --advertise: {e}");
            return ExitCode::from(2);
        }
    }
    if let Some(http_listen) = overrides.http_listen {
        if let Err(e) = config.override_http_listen(http_listen) {
            eprintln!("fleet-controller: --http-listen: {e}");
            return ExitCode::from(2);
        }
    }
    // The clients' lane: handshakes and client calls, at a lower priority than this runtime,
    // which runs the agents' sessions and the rollouts (see `fleet_controller::lanes`).
    let clients = match fleet_controller::lanes::clients_runtime(CLIENT_WORKERS) {
        Ok(clients) => clients,
        Err(e) => {
            eprintln!("fleet-controller: cannot start the threads that serve clients: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime().block_on(fleet_controller::server::run(
        config,
        clients.handle().clone(),
        fleet_controller::shutdown_signal(),
    ));
    // Calls still under way had their grace in `run`.
    clients.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleet-controller: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn migrate(config_path: &std::path::Path, to: &fleet_controller::config::EtcdFile) -> ExitCode {
    let config = match load_config(config_path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let to = match fleet_controller::config::check_etcd(to, std::path::Path::new("")) {
        Ok(to) => to,
        Err(e) => {
            eprintln!("fleet-controller: migrate: {e}");
            return ExitCode::from(2);
        }
    };
    match fleet_controller::migrate::migrate(&config, &to) {
        Ok(done) => {
            println!(
                "copied {} record(s) into etcd at {} prefix {}.\n\nNext: add this to {} and start the controller (the redb file in {} is no longer read; keep it as a backup until the fleet runs on etcd):\n\n{}",
                done.records,
                to.url(),
                to.prefix,
                config_path.display(),
                config.data_dir.display(),
                fleet_controller::migrate::etcd_table(&to)
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fleet-controller: migrate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn backup(config_path: &std::path::Path, to: &std::path::Path) -> ExitCode {
    let config = match load_config(config_path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    match runtime().block_on(fleet_controller::backup::take(config_path, &config, to)) {
        Ok(manifest) => {
            let n_artifacts = manifest
                .members
                .iter()
                .filter(|m| m.path.starts_with("artifacts/"))
                .count();
            eprintln!(
                "fleet-controller: backup written to {} ({n_artifacts} artifact(s)); it holds the CA key: keep it as secret as ca.key",
                to.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fleet-controller: backup failed: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn restore(
    from: &std::path::Path,
    data_dir: &std::path::Path,
    config_dir: Option<&std::path::Path>,
) -> ExitCode {
    match fleet_controller::backup::restore(from, data_dir, config_dir) {
        Ok(restored) => {
            eprintln!(
                "fleet-controller: restored a backup made by fleet-controller {} into {}: the store and {} artifact(s)",
                restored.manifest.controller_version,
                data_dir.display(),
                restored.n_artifacts,
            );
            match restored.config_dir {
                Some(dir) => eprintln!(
                    "fleet-controller: wrote controller.toml, the CA and the controller's certificate into {}; start it with `fleet-controller --config {}`",
                    dir.display(),
                    dir.join("controller.toml").display()
                ),
                None => eprintln!(
                    "fleet-controller: set data_dir in controller.toml to {} and start the controller; hosts reconnect by themselves",
                    data_dir.display()
                ),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fleet-controller: restore failed: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn issue_admin(config: &std::path::Path, out: &std::path::Path, name: &str) -> ExitCode {
    let config = match load_config(config) {
        Ok(config) => config,
        Err(code) => return code,
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
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fleet-controller: {e}");
            ExitCode::from(2)
        }
    }
}
