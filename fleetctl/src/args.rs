//! fleetctl's command line: the clap definitions of every verb and flag, in this one module.
//! Values are checked by the parsers of [`crate::parse`] as clap reads them.

use crate::parse::{
    parse_app, parse_batch, parse_controller_urls, parse_duration_arg, parse_env_pair, parse_host,
    parse_join_token_ttl, parse_label_change, parse_max_unavailable, parse_min_healthy_arg,
    parse_selector, parse_version, ControllerUrls, LabelChanges, Selector,
};
use crate::ssh::install::DEFAULT_REMOTE_DIR;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

/// The default address `fleetctl init` tells the controller to listen on.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7700";
/// Hosts in the first wave when `--canary` is not given.
pub const DEFAULT_CANARY: u32 = 1;
/// Hosts per later wave when `--batch` is not given.
pub const DEFAULT_BATCH: &str = "25%";

/// fleetctl: deploy versioned releases to a fleet of hosts through fleet-controller.
#[derive(Debug, Parser)]
#[command(name = "fleetctl", version)]
pub struct Cli {
    /// Directory holding client.toml (written by `fleetctl init`) [default: ~/.config/fleet]
    #[arg(long, global = true, env = "FLEET_CONFIG_DIR", value_name = "DIR")]
    pub config_dir: Option<PathBuf>,

    /// The controller's URL, e.g. https://controller.example.com:7700 (overrides
    /// DIR/client.toml)
    #[arg(long, global = true, env = "FLEET_CONTROLLER", value_name = "URL")]
    pub controller: Option<String>,

    /// Print results as text tables or as JSON (the proto response message) for scripts
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write controller.toml and client.toml for a new controller
    Init(InitArgs),
    /// Create releases
    #[command(subcommand)]
    Release(ReleaseCommand),
    /// List the releases of an app
    Releases {
        #[arg(value_parser = parse_app)]
        app: String,
    },
    /// List the hosts and what they run
    Hosts,
    /// What runs where, since when, and the rollouts in progress
    Status {
        /// Only this app
        #[arg(value_parser = parse_app)]
        app: Option<String>,
    },
    /// The standing deployments (app, selector -> release), their hosts and drift
    Deployments {
        /// Only this app
        #[arg(value_parser = parse_app)]
        app: Option<String>,
    },
    /// The rollouts of an app, newest first, with each host's result, and each host that
    /// converged on its own between them (joined, undrained, back from lost, relabeled,
    /// replaced)
    History {
        #[arg(value_parser = parse_app)]
        app: String,
        /// At most this many rollouts and this many convergences (0: the controller's default)
        #[arg(long, default_value_t = 0)]
        limit: u32,
    },
    /// The event log: every change and who made it
    Events {
        /// Keep printing new events as they happen (Ctrl-C stops)
        #[arg(long)]
        follow: bool,
        /// At most this many past events (0: the controller's default)
        #[arg(long, default_value_t = 0)]
        limit: u32,
    },
    /// Roll a release out wave by wave, or act on a running rollout
    Rollout(RolloutArgs),
    /// Roll an app back to the release it ran before (or to --to VERSION)
    Rollback(RollbackArgs),
    /// Stop a host's instances gracefully and keep new releases off it
    Drain {
        #[arg(value_parser = parse_host)]
        host: String,
        /// Give up waiting after this long, e.g. 2m [default: 5m]
        #[arg(long, value_name = "DUR", value_parser = parse_duration_arg)]
        deadline: Option<Duration>,
    },
    /// Bring a drained host back to its releases
    Undrain {
        #[arg(value_parser = parse_host)]
        host: String,
    },
    /// Set (k=v) or remove (k-) labels of a host, e.g. `label web-1 zone=b,tier-`; the only
    /// way a host's labels change after it joined
    Label {
        #[arg(value_parser = parse_host)]
        host: String,
        /// k=v to set, k- to remove; comma-separated or several arguments
        #[arg(value_name = "k=v|k-", required = true, value_parser = parse_label_change)]
        changes: Vec<LabelChanges>,
    },
    /// Drain a host, revoke its credential and forget it
    Remove {
        #[arg(value_parser = parse_host)]
        host: String,
    },
    /// Install and start the agent on fresh hosts over SSH, and wait until they registered
    Bootstrap(BootstrapArgs),
    /// Bring a new host in (over SSH) with every release OLD runs, then drain and remove OLD
    Replace(ReplaceArgs),
    /// One-time tokens a new host joins the fleet with
    #[command(subcommand)]
    JoinToken(JoinTokenCommand),
    /// Client credentials (certificates with a role) for operators and CI
    #[command(subcommand)]
    Credentials(CredentialsCommand),
    /// The fleet CA: rotate it while the fleet runs (hosts move over their own sessions)
    #[command(subcommand)]
    Ca(CaCommand),
    /// Start a whole local fleet (a controller and N hosts) on this machine, deploy the example
    /// web app to it, and clean everything up again (text output only: --output json is
    /// refused)
    Demo(DemoArgs),
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Where to write the files [default: the config dir]
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// The address the controller listens on (any address: every call is mutual TLS); with
    /// 0.0.0.0 or :: also pass --url
    #[arg(long, value_name = "ADDR:PORT", default_value = DEFAULT_LISTEN)]
    pub listen: String,
    /// The address hosts, operators and CI dial the controller at, e.g.
    /// https://controller.example.com:7700 (several: URL1,URL2); it goes into client.toml,
    /// what bootstrap and `credentials create` write, and the controller's certificate
    /// [default: https://LISTEN]
    #[arg(long, value_name = "URL[,URL...]", value_parser = parse_controller_urls)]
    pub url: Option<ControllerUrls>,
}

#[derive(Debug, Subcommand)]
pub enum ReleaseCommand {
    /// Upload an artifact (.tar.gz with fleet.toml at its root) as APP@VERSION
    Create(ReleaseCreateArgs),
}

#[derive(Debug, Args)]
pub struct ReleaseCreateArgs {
    #[arg(value_parser = parse_app)]
    pub app: String,
    #[arg(value_parser = parse_version)]
    pub version: String,
    /// The artifact file
    pub artifact: PathBuf,
    /// Configuration stored with the release and given to every instance (repeatable)
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env_pair)]
    pub env: Vec<(String, String)>,
    /// A secret given to every instance through its environment, never shown afterwards
    /// (repeatable; the command line is visible to other local users: prefer --secret-file)
    // Raw text, checked by `parse::parse_secret`: clap would quote a refused value whole.
    #[arg(long = "secret", value_name = "KEY=VALUE")]
    pub secrets: Vec<String>,
    /// A secret whose value is the content of FILE (repeatable)
    #[arg(long = "secret-file", value_name = "KEY=FILE", value_parser = parse_env_pair)]
    pub secret_files: Vec<(String, String)>,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct RolloutArgs {
    #[command(subcommand)]
    pub action: Option<RolloutAction>,

    /// The app to roll out
    #[arg(required = true, value_parser = parse_app)]
    pub app: Option<String>,
    /// The release version to roll out (created with `fleetctl release create`)
    #[arg(required = true, value_parser = parse_version)]
    pub version: Option<String>,
    /// Only hosts with these labels, e.g. env=prod,zone=a [default: every host]
    #[arg(long, value_name = "k=v,...", value_parser = parse_selector)]
    pub selector: Option<Selector>,
    /// Hosts in the first (canary) wave; 0 for no canary wave
    #[arg(long, value_name = "N", default_value_t = DEFAULT_CANARY)]
    pub canary: u32,
    /// Hosts per later wave: a count N or a share P% of the selected hosts
    #[arg(long, value_name = "N|P%", default_value = DEFAULT_BATCH, value_parser = parse_batch)]
    pub batch: String,
    /// Wait this long after the canary wave passed before widening, e.g. 5m
    #[arg(long, value_name = "DUR", value_parser = parse_duration_arg)]
    pub pause_after_canary: Option<Duration>,
    /// Give the smoke checks of each host at most this long, e.g. 90s [default: fleet.toml's]
    #[arg(long, value_name = "DUR", value_parser = parse_duration_arg)]
    pub smoke_timeout: Option<Duration>,
    /// A host passes only once its instance has stayed up this long after its smoke checks,
    /// e.g. 30s [default: the manifest's min_healthy; 5s when it declares no smoke checks]
    #[arg(long, value_name = "DUR", value_parser = parse_min_healthy_arg)]
    pub min_healthy: Option<Duration>,
    /// At no moment may more of the selected hosts be without a healthy instance than this:
    /// N hosts or P% of them (waves shrink to fit) [default: the batch size plus the hosts
    /// already down]
    #[arg(long, value_name = "N|P%", value_parser = parse_max_unavailable)]
    pub max_unavailable: Option<String>,
    /// Halt on failure but leave the hosts that took the new release on it
    #[arg(long)]
    pub no_auto_rollback: bool,
    /// Print the rollout id and return at once instead of following the progress
    #[arg(long)]
    pub detach: bool,
    /// Leave out hosts that are lost instead of halting on them
    #[arg(long)]
    pub skip_lost: bool,
}

#[derive(Debug, Subcommand)]
pub enum RolloutAction {
    /// Show a rollout's state and each host's result
    Status { rollout_id: String },
    /// Stop widening a rollout after the current wave
    Pause { rollout_id: String },
    /// Continue a paused rollout
    Resume { rollout_id: String },
    /// Stop a rollout where it stands: hosts keep the release they run now (also those the
    /// rollout already moved); take them back with `fleetctl rollback APP`
    Abort { rollout_id: String },
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    #[arg(value_parser = parse_app)]
    pub app: String,
    /// Roll back to this version instead of the one that ran before
    #[arg(long = "to", value_name = "VERSION", value_parser = parse_version)]
    pub to_version: Option<String>,
    /// The deployment to roll back, by its selector (needed when the app has several)
    #[arg(long, value_name = "k=v,...", value_parser = parse_selector)]
    pub selector: Option<Selector>,
    /// Print the rollout id and return at once instead of following the progress
    #[arg(long)]
    pub detach: bool,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How many hosts (agents) to start, 1 to 20
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub hosts: u32,
}

/// The flags `bootstrap` and `replace` share.
#[derive(Debug, Clone, Args)]
pub struct BootstrapFlags {
    /// The host's name in the fleet [default: derived from the SSH host, e.g. 10-0-0-5]
    #[arg(long, value_parser = parse_host)]
    pub name: Option<String>,
    /// The host's labels, e.g. env=prod,zone=a
    #[arg(long, value_name = "k=v,...")]
    pub labels: Option<String>,
    /// The IP address app instances bind and advertise [default: the SSH host's address]
    #[arg(long, value_name = "IP")]
    pub advertise: Option<String>,
    /// The private key to log in with [default: ssh-agent when SSH_AUTH_SOCK is set, else
    /// ~/.ssh/id_ed25519, id_ecdsa, id_rsa]
    #[arg(long, value_name = "KEY")]
    pub identity: Option<PathBuf>,
    /// The known_hosts file host keys are checked against [default: ~/.ssh/known_hosts]
    #[arg(long, value_name = "FILE")]
    pub known_hosts: Option<PathBuf>,
    /// Trust and record the key of a host the known_hosts file does not know yet (a changed
    /// key is always refused)
    #[arg(long)]
    pub accept_new_host_key: bool,
    /// Where on the host the agent, its config and its data live
    #[arg(long, value_name = "DIR", default_value = DEFAULT_REMOTE_DIR)]
    pub remote_dir: PathBuf,
    /// The fleet-agent binary to install [default: the one beside fleetctl]
    #[arg(long, value_name = "PATH")]
    pub agent_binary: Option<PathBuf>,
    /// The controller URL the host dials [default: the one fleetctl uses]
    #[arg(long, value_name = "URL")]
    pub controller_url: Option<String>,
    /// Give each host at most this long, from connect until it registered, e.g. 5m [default: 3m]
    #[arg(long, value_name = "DUR", value_parser = parse_duration_arg)]
    pub deadline: Option<Duration>,
}

/// `fleetctl bootstrap`.
#[derive(Debug, Clone, Args)]
pub struct BootstrapArgs {
    /// The hosts, each ssh://USER@HOST[:PORT]
    #[arg(value_name = "ssh://USER@HOST[:PORT]")]
    pub targets: Vec<String>,
    /// A file of hosts, one a line: ssh://USER@HOST[:PORT] [name=N] [advertise=IP]
    /// [labels=k=v,...] [remote_dir=DIR]
    #[arg(long = "targets", value_name = "FILE")]
    pub targets_file: Option<PathBuf>,
    #[command(flatten)]
    pub flags: BootstrapFlags,
}

/// `fleetctl replace`.
#[derive(Debug, Clone, Args)]
pub struct ReplaceArgs {
    /// The host to replace
    #[arg(value_parser = parse_host)]
    pub old: String,
    /// The new host: ssh://USER@HOST[:PORT]
    #[arg(long = "with", value_name = "ssh://USER@HOST[:PORT]")]
    pub with: String,
    #[command(flatten)]
    pub flags: BootstrapFlags,
}

#[derive(Debug, Subcommand)]
pub enum JoinTokenCommand {
    /// Create a one-time token a new host joins with (`fleet-agent --join-token TOKEN`)
    Create(JoinTokenCreateArgs),
}

#[derive(Debug, Args)]
pub struct JoinTokenCreateArgs {
    /// How long the token may be used, e.g. 30m, 1h, 7d (at most 7 days)
    #[arg(long, value_name = "DUR", default_value = "1h", value_parser = parse_join_token_ttl)]
    pub ttl: Duration,
    /// The labels the host that joins with it gets, whatever its agent claims, e.g.
    /// env=prod,zone=a [default: the host's first claim]
    #[arg(long, value_name = "k=v,...", value_parser = parse_selector)]
    pub labels: Option<Selector>,
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Start a CA rotation: a new CA signs from now on, old and new are both trusted, every
    /// connected host renews its certificate over its session, and this credential (client.pem,
    /// ca.pem in --config-dir) is re-issued by the new CA. Then `ca rotate --finish`.
    ///
    /// Example: fleetctl ca rotate && fleetctl ca rotate --finish
    Rotate(CaRotateArgs),
}

#[derive(Debug, Args)]
pub struct CaRotateArgs {
    /// End the rotation: refused while a connected host still uses an old-CA certificate
    /// (named); otherwise the controller takes a certificate of the new CA and stops trusting
    /// the old one
    #[arg(long)]
    pub finish: bool,
}

#[derive(Debug, Subcommand)]
pub enum CredentialsCommand {
    /// Create a client credential (key, certificate, CA, client.toml) usable with --config-dir
    Create(CredentialsCreateArgs),
}

#[derive(Debug, Args)]
pub struct CredentialsCreateArgs {
    /// Who holds it, e.g. ci or alice (lowercase letters, digits and '-')
    #[arg(value_parser = parse_app)]
    pub name: String,
    /// admin may do everything; deployer may release, roll out, roll back and read (what CI holds)
    #[arg(long, value_enum)]
    pub role: CredentialRole,
    /// The directory to write client.key, client.pem, ca.pem and client.toml into
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CredentialRole {
    Admin,
    Deployer,
}

impl CredentialRole {
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialRole::Admin => "admin",
            CredentialRole::Deployer => "deployer",
        }
    }
}

/// `--output text|json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Tables and sentences for people
    Text,
    /// The proto response message as JSON
    Json,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("fleetctl").chain(args.iter().copied()))
    }

    #[test]
    fn rollout_takes_app_and_version_or_a_subcommand() {
        let cli = parse(&[
            "rollout",
            "web",
            "1.4.2",
            "--selector",
            "env=prod",
            "--canary",
            "2",
            "--batch",
            "50%",
            "--pause-after-canary",
            "5m",
            "--smoke-timeout",
            "90s",
            "--no-auto-rollback",
        ])
        .unwrap();
        let Command::Rollout(rollout) = cli.command else {
            panic!("not a rollout")
        };
        assert!(rollout.action.is_none());
        assert_eq!(rollout.app.as_deref(), Some("web"));
        assert_eq!(rollout.version.as_deref(), Some("1.4.2"));
        assert_eq!(rollout.canary, 2);
        assert_eq!(rollout.batch, "50%");
        assert_eq!(rollout.pause_after_canary, Some(Duration::from_secs(300)));
        assert_eq!(rollout.smoke_timeout, Some(Duration::from_secs(90)));
        assert!(rollout.no_auto_rollback);

        let cli = parse(&["rollout", "web", "1.4.2"]).unwrap();
        let Command::Rollout(rollout) = cli.command else {
            panic!("not a rollout")
        };
        assert_eq!(rollout.canary, DEFAULT_CANARY);
        assert_eq!(rollout.batch, DEFAULT_BATCH);

        for action in ["status", "pause", "resume", "abort"] {
            let cli = parse(&["rollout", action, "r-123"]).unwrap();
            let Command::Rollout(rollout) = cli.command else {
                panic!("not a rollout")
            };
            assert!(rollout.action.is_some(), "{action}");
        }

        for bad in [
            &["rollout"][..],
            &["rollout", "web"],
            &["rollout", "Web", "1.0"],
            &["rollout", "web", "1/0"],
            &["rollout", "web", "1.0", "--batch", "0"],
            &["rollout", "web", "1.0", "--smoke-timeout", "soon"],
            &["rollout", "web", "1.0", "--selector", "env"],
            &["rollout", "status"],
        ] {
            let error = parse(bad).unwrap_err();
            assert_eq!(error.exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn global_flags_and_other_verbs() {
        let cli = parse(&[
            "--output",
            "json",
            "release",
            "create",
            "web",
            "1.0.0",
            "web.tar.gz",
            "--env",
            "A=1",
            "--env",
            "B=2",
        ])
        .unwrap();
        assert_eq!(cli.output, OutputFormat::Json);
        let Command::Release(ReleaseCommand::Create(create)) = cli.command else {
            panic!("not release create")
        };
        assert_eq!(create.env.len(), 2);

        let cli = parse(&["status", "--controller", "http://127.0.0.1:1"]).unwrap();
        assert_eq!(cli.controller.as_deref(), Some("http://127.0.0.1:1"));
        assert!(parse(&["demo", "--hosts", "0"]).is_err());
        assert!(parse(&["demo", "--hosts", "21"]).is_err());
        assert!(parse(&["demo", "--hosts", "20"]).is_ok());
        assert!(parse(&["release", "create", "web", "..", "x"]).is_err());
        assert!(parse(&["release", "create", "web", "1", "x", "--env", "1=x"]).is_err());
        assert!(parse(&["rollback", "web", "--to", "1.0.0", "--detach"]).is_ok());
        assert!(parse(&["events", "--follow", "--limit", "10"]).is_ok());
    }
}
