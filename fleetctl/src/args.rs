//! fleetctl's command line: the clap definitions of every verb and flag, in this one module.
//! Values are checked by the parsers of [`crate::parse`] as clap reads them.

use crate::parse::{
    parse_app, parse_batch, parse_certificate_ttl, parse_controller_urls, parse_duration_arg,
    parse_env_pair, parse_host, parse_join_token_ttl, parse_keep, parse_label_change,
    parse_max_unavailable, parse_min_healthy_arg, parse_selector, parse_version, ControllerUrls,
    LabelChanges, Selector,
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
    #[command(
        after_help = "Example:\n  fleetctl init --dir /var/lib/fleet --listen 0.0.0.0:7700 --url https://controller.example.com:7700 --certificate-ttl 30d"
    )]
    Init(InitArgs),
    /// Create releases, or prune old ones
    #[command(
        subcommand,
        after_help = "Examples:\n  fleetctl release create web 1.4.2 web.tar.gz --env LOG_LEVEL=info\n  fleetctl release prune web --keep 5"
    )]
    Release(ReleaseCommand),
    /// List the releases of an app
    #[command(after_help = "Example:\n  fleetctl releases web")]
    Releases {
        /// The app whose releases to list
        #[arg(value_parser = parse_app)]
        app: String,
    },
    /// List the hosts, what they run and when their certificates expire (each renews its own)
    #[command(
        after_help = "Examples:\n  fleetctl hosts --output json\n  fleetctl hosts --limit 100\n  fleetctl hosts --limit 100 --after web-0099"
    )]
    Hosts {
        /// Show one page of at most N hosts (in name order) instead of every host
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
        /// Start the page after this host (the name the page before ended on)
        #[arg(long, value_name = "HOST", value_parser = parse_host, requires = "limit")]
        after: Option<String>,
    },
    /// What runs where, since when, and the rollouts in progress
    #[command(
        after_help = "A fleet of more than 100 hosts is shown as counts (hosts by state, and by what they run); `fleetctl hosts --limit N` pages the hosts.\n\nExamples:\n  fleetctl status\n  fleetctl status web\n  fleetctl status --all-hosts"
    )]
    Status {
        /// Only this app
        #[arg(value_parser = parse_app)]
        app: Option<String>,
        /// List every host even in a fleet of more than 100
        #[arg(long)]
        all_hosts: bool,
    },
    /// The fleet's controllers: each one's URL, whether it leads, since when (on etcd; one
    /// controller on the embedded store)
    #[command(after_help = "Example:\n  fleetctl controllers --output json")]
    Controllers,
    /// The standing deployments (app, selector -> release), their hosts and drift
    #[command(after_help = "Example:\n  fleetctl deployments web")]
    Deployments {
        /// Only this app
        #[arg(value_parser = parse_app)]
        app: Option<String>,
    },
    /// The rollouts of an app, newest first, with each host's result, and each host that
    /// converged on its own between them (joined, undrained, back from lost, relabeled,
    /// replaced)
    #[command(after_help = "Example:\n  fleetctl history web --limit 5")]
    History {
        /// The app whose history to show
        #[arg(value_parser = parse_app)]
        app: String,
        /// At most this many rollouts and this many convergences (0: the controller's default)
        #[arg(long, default_value_t = 0)]
        limit: u32,
    },
    /// The event log: every change and who made it
    #[command(
        after_help = "Examples:\n  fleetctl events --limit 50\n  fleetctl events --follow --output json"
    )]
    Events {
        /// Keep printing new events as they happen (Ctrl-C stops)
        #[arg(long)]
        follow: bool,
        /// At most this many past events (0: the controller's default)
        #[arg(long, default_value_t = 0)]
        limit: u32,
    },
    /// The last lines of an app's log (stdout and stderr) on each host that runs it, kept by
    /// the agents and relayed by the controller: no SSH needed
    #[command(
        after_help = "Examples:\n  fleetctl logs web\n  fleetctl logs web --host web-2 --lines 50\n  fleetctl logs web --follow"
    )]
    Logs {
        /// The app whose log to show
        #[arg(value_parser = parse_app)]
        app: String,
        /// Only this host (its lines are then not prefixed with its name)
        #[arg(long, value_parser = parse_host)]
        host: Option<String>,
        /// How many of the last lines, per host (at most 10000)
        #[arg(long, short = 'n', default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        lines: u32,
        /// Keep printing new lines as the app writes them (Ctrl-C stops)
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Roll a release out wave by wave, or act on a running rollout
    #[command(
        after_help = "Examples:\n  fleetctl rollout web 1.4.2 --selector env=prod --canary 1 --batch 25%\n  fleetctl rollout web 1.4.2 --dry-run\n  fleetctl rollout web 1.4.2 --pause-after-canary 10m --detach\n  fleetctl rollout status r7"
    )]
    Rollout(RolloutArgs),
    /// Roll an app back to the release it ran before (or to --to VERSION): the hosts that are
    /// down first, then the others at most --max-unavailable at a time
    #[command(
        after_help = "Examples:\n  fleetctl rollback web\n  fleetctl rollback web --to 1.4.1 --selector env=prod\n  fleetctl rollback web --max-unavailable 25%"
    )]
    Rollback(RollbackArgs),
    /// Stop a host's instances gracefully and keep new releases off it
    #[command(after_help = "Example:\n  fleetctl drain web-1 --deadline 2m")]
    Drain {
        /// The host to drain
        #[arg(value_parser = parse_host)]
        host: String,
        /// Give up waiting after this long, e.g. 2m [default: 5m]
        #[arg(long, value_name = "DUR", value_parser = parse_duration_arg)]
        deadline: Option<Duration>,
    },
    /// Bring a drained host back to its releases
    #[command(after_help = "Example:\n  fleetctl undrain web-1")]
    Undrain {
        /// The drained host
        #[arg(value_parser = parse_host)]
        host: String,
    },
    /// Set (k=v) or remove (k-) labels of a host, e.g. `label web-1 zone=b,tier-`; the only
    /// way a host's labels change after it joined
    #[command(after_help = "Example:\n  fleetctl label web-1 zone=b,tier-")]
    Label {
        /// The host whose labels change
        #[arg(value_parser = parse_host)]
        host: String,
        /// k=v to set, k- to remove; comma-separated or several arguments
        #[arg(value_name = "k=v|k-", required = true, value_parser = parse_label_change)]
        changes: Vec<LabelChanges>,
    },
    /// Drain a host, revoke its credential and forget it; its agent stops its instances and
    /// itself, and disables its unit
    #[command(after_help = "Examples:\n  fleetctl remove web-3\n  fleetctl remove web-3 --purge")]
    Remove {
        /// The host to remove
        #[arg(value_parser = parse_host)]
        host: String,
        /// Also have the agent wipe the host's releases, secrets and state directories
        #[arg(long)]
        purge: bool,
    },
    /// Install and start the agent on fresh hosts over SSH, and wait until they registered
    #[command(
        after_help = "Examples:\n  fleetctl bootstrap ssh://root@web-1 ssh://root@web-2 --labels env=prod\n  fleetctl bootstrap --targets hosts.txt --known-hosts ./known_hosts\n  fleetctl bootstrap ssh://root@web-3 --agent-deb target/debian/fleet-agent_0.1.0-1_amd64.deb"
    )]
    Bootstrap(BootstrapArgs),
    /// Bring a new host in (over SSH) with every release OLD runs, then drain and remove OLD
    #[command(
        after_help = "Example:\n  fleetctl replace web-1 --with ssh://root@10.0.0.12 --name web-5 --labels env=prod"
    )]
    Replace(ReplaceArgs),
    /// Install a new agent binary on the fleet's hosts over SSH, one host first, then wave by
    /// wave; the apps keep running (the new agent adopts them)
    #[command(
        after_help = "Example:\n  fleetctl upgrade-agents --targets hosts.txt --agent-binary ./fleet-agent --batch 25%"
    )]
    UpgradeAgents(UpgradeAgentsArgs),
    /// One-time tokens a new host joins the fleet with
    #[command(
        subcommand,
        after_help = "Example:\n  fleetctl join-token create --ttl 1h --labels env=prod"
    )]
    JoinToken(JoinTokenCommand),
    /// Client credentials (certificates with a role) for operators and CI
    #[command(
        subcommand,
        after_help = "Examples:\n  fleetctl credentials create ci --role deployer --ttl 7d --out ./ci-credential\n  fleetctl credentials list"
    )]
    Credentials(CredentialsCommand),
    /// The fleet CA: rotate it while the fleet runs (hosts move over their own sessions)
    #[command(
        subcommand,
        after_help = "Example:\n  fleetctl ca rotate && fleetctl ca rotate --finish"
    )]
    Ca(CaCommand),
    /// Start a whole local fleet (a controller and N hosts) on this machine, deploy the example
    /// web app to it, and clean everything up again (text output only: --output json is
    /// refused)
    #[command(
        after_help = "Examples:\n  fleetctl demo\n  fleetctl demo --hosts 5 --keep\n  fleetctl demo --stop /tmp/fleet-demo-AbC123"
    )]
    Demo(DemoArgs),
    /// Print the shell completion script for bash, zsh or fish
    #[command(
        after_help = "Examples:\n  source <(fleetctl completions bash)\n  fleetctl completions zsh > \"${fpath[1]}/_fleetctl\"\n  fleetctl completions fish > ~/.config/fish/completions/fleetctl.fish"
    )]
    Completions {
        /// The shell to complete in
        #[arg(value_enum, value_name = "SHELL")]
        shell: CompletionShell,
    },
    /// Print fleetctl's manual page (roff) on stdout, or write every page (one per verb) into
    /// --dir
    #[command(
        after_help = "Examples:\n  fleetctl man | man -l -\n  fleetctl man --dir /usr/local/share/man/man1"
    )]
    Man {
        /// Write fleetctl.1 and a page per verb (fleetctl-rollout.1, ...) into this directory
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// The shells `fleetctl completions` writes a script for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
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
    /// Where the controller serves metrics, /healthz, /readyz and the status page: plain HTTP
    /// without authentication, so a loopback address (port 0: any free port, written to
    /// controller.http.addr)
    #[arg(long, value_name = "ADDR:PORT", default_value = crate::init::DEFAULT_HTTP_LISTEN)]
    pub http_listen: String,
    /// How long the certificates the controller issues to hosts and clients are valid, the
    /// admin credential written here included (at least 1m, at most 365d); each renews itself
    /// after two thirds of it. Written to controller.toml as certificate_ttl [default: 30d]
    #[arg(long, value_name = "DUR", value_parser = parse_certificate_ttl)]
    pub certificate_ttl: Option<Duration>,
    /// Keep the controller's state in etcd at these URLs (https://HOST:PORT, or http:// on
    /// loopback) instead of the redb file in its data directory; written to controller.toml
    /// as [etcd]
    #[arg(long, value_name = "URL[,URL...]", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// The CA of etcd's certificate (required with https:// URLs)
    #[arg(long, value_name = "FILE", requires = "etcd")]
    pub etcd_ca: Option<PathBuf>,
    /// A client certificate for an etcd that requires one, with --etcd-key
    #[arg(long, value_name = "FILE", requires = "etcd")]
    pub etcd_cert: Option<PathBuf>,
    /// The key of --etcd-cert
    #[arg(long, value_name = "FILE", requires = "etcd")]
    pub etcd_key: Option<PathBuf>,
    /// The etcd key prefix of this fleet's records [default: /fleet]
    #[arg(long, value_name = "PREFIX", requires = "etcd")]
    pub etcd_prefix: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum ReleaseCommand {
    /// Upload an artifact (.tar.gz with fleet.toml at its root) as APP@VERSION
    #[command(
        after_help = "Example:\n  fleetctl release create web 1.4.2 web.tar.gz --env LOG_LEVEL=info --secret-file DB_PASSWORD=./db-password"
    )]
    Create(ReleaseCreateArgs),
    /// Delete old releases of an app on the controller, with their artifacts when no other
    /// release shares them; never the newest N, nor one a deployment or a host still uses
    #[command(after_help = "Example:\n  fleetctl release prune web --keep 5")]
    Prune(ReleasePruneArgs),
}

#[derive(Debug, Args)]
pub struct ReleasePruneArgs {
    /// The app whose old releases to delete
    #[arg(value_parser = parse_app)]
    pub app: String,
    /// How many of the newest releases to keep, at least 1
    #[arg(long, value_name = "N", value_parser = parse_keep)]
    pub keep: u32,
}

#[derive(Debug, Args)]
pub struct ReleaseCreateArgs {
    /// The app, e.g. web (lowercase letters, digits and '-')
    #[arg(value_parser = parse_app)]
    pub app: String,
    /// The release's version, e.g. 1.4.2; once created it always means the same bytes and config
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
    /// Print the plan (waves, hosts, budget) the controller would follow now, and change
    /// nothing
    #[arg(long, conflicts_with = "detach")]
    pub dry_run: bool,
}

#[derive(Debug, Subcommand)]
pub enum RolloutAction {
    /// Show a rollout's state and each host's result
    #[command(after_help = "Example:\n  fleetctl rollout status r7")]
    Status {
        /// The rollout's id, e.g. r7 (`fleetctl history APP` lists them)
        rollout_id: String,
    },
    /// Stop widening a rollout after the current wave
    #[command(after_help = "Example:\n  fleetctl rollout pause r7")]
    Pause {
        /// The rollout's id, e.g. r7
        rollout_id: String,
    },
    /// Continue a paused rollout
    #[command(after_help = "Example:\n  fleetctl rollout resume r7")]
    Resume {
        /// The rollout's id, e.g. r7
        rollout_id: String,
    },
    /// Stop a rollout where it stands: hosts keep the release they run now (also those the
    /// rollout already moved); take them back with `fleetctl rollback APP`
    #[command(after_help = "Example:\n  fleetctl rollout abort r7")]
    Abort {
        /// The rollout's id, e.g. r7
        rollout_id: String,
    },
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// The app to roll back
    #[arg(value_parser = parse_app)]
    pub app: String,
    /// Roll back to this version instead of the one that ran before
    #[arg(long = "to", value_name = "VERSION", value_parser = parse_version)]
    pub to_version: Option<String>,
    /// The deployment to roll back, by its selector (needed when the app has several)
    #[arg(long, value_name = "k=v,...", value_parser = parse_selector)]
    pub selector: Option<Selector>,
    /// At no moment may more hosts than this be without a healthy instance, beyond those
    /// already down: N hosts or P% of them [default: the deployment's budget, from its last
    /// rollout's --max-unavailable, or 1]
    #[arg(long, value_name = "N|P%", value_parser = parse_max_unavailable)]
    pub max_unavailable: Option<String>,
    /// Print the rollout id and return at once instead of following the progress
    #[arg(long)]
    pub detach: bool,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How many hosts (agents) to start, 1 to 20
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub hosts: u32,
    /// Leave the fleet running at the end and print the commands to try on it
    #[arg(long)]
    pub keep: bool,
    /// Stop what `demo --keep` left running in DIR (the pids it started) and remove DIR
    #[arg(long, value_name = "DIR", conflicts_with_all = ["hosts", "keep"])]
    pub stop: Option<PathBuf>,
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
    /// Install the agent from its .deb (target/debian/fleet-agent_*.deb of scripts/package.sh)
    /// with the host's dpkg; its unit reads /var/lib/fleet-agent/agent.toml
    #[arg(long, value_name = "PATH", conflicts_with_all = ["agent_binary", "remote_dir"])]
    pub agent_deb: Option<PathBuf>,
    /// The controller URLs the host dials, in turn (several: URL1,URL2) [default: every URL
    /// fleetctl was given, by --controller or client.toml]
    #[arg(long, value_name = "URL[,URL...]")]
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

/// `fleetctl upgrade-agents`.
#[derive(Debug, Clone, Args)]
pub struct UpgradeAgentsArgs {
    /// The hosts, each ssh://USER@HOST[:PORT] (as bootstrap was given them)
    #[arg(value_name = "ssh://USER@HOST[:PORT]")]
    pub targets: Vec<String>,
    /// A file of hosts, one a line, as for bootstrap: ssh://USER@HOST[:PORT] [name=N]
    /// [advertise=IP] [labels=k=v,...] [remote_dir=DIR]
    #[arg(long = "targets", value_name = "FILE")]
    pub targets_file: Option<PathBuf>,
    /// Only the hosts (of the targets) whose labels in the fleet match, e.g. role=web
    #[arg(long, value_name = "k=v,...", value_parser = parse_selector)]
    pub selector: Option<Selector>,
    /// Hosts per wave after the first (which is one host): N hosts or P% of them
    #[arg(long, value_name = "N|P%", default_value = "1", value_parser = parse_batch)]
    pub batch: String,
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
    #[command(
        after_help = "Example:\n  fleetctl join-token create --ttl 30m --labels env=prod,zone=a"
    )]
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
    #[command(after_help = "Example:\n  fleetctl ca rotate && fleetctl ca rotate --finish")]
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
    /// Create a client credential (key, certificate, CA, client.toml) usable with --config-dir;
    /// fleetctl renews it by itself while its files are writable
    #[command(
        after_help = "Example:\n  fleetctl credentials create ci --role deployer --ttl 7d --out ./ci-credential"
    )]
    Create(CredentialsCreateArgs),
    /// List the operator and CI credentials: name, role, expiry, last use, revoked or not
    #[command(after_help = "Example:\n  fleetctl credentials list")]
    List,
    /// Revoke a credential by name, e.g. `credentials revoke ci`: refused from its next call
    /// on, also on connections already open (never the last admin credential)
    #[command(after_help = "Example:\n  fleetctl credentials revoke ci")]
    Revoke {
        /// The credential's name, as `credentials list` shows it
        #[arg(value_parser = parse_app)]
        name: String,
    },
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
    /// How long its certificate is valid, e.g. 7d (at least 1m, at most 365d); fleetctl renews
    /// it by itself, with this lifetime, after two thirds of it [default: the controller's
    /// certificate_ttl]
    #[arg(long, value_name = "DUR", value_parser = parse_certificate_ttl)]
    pub ttl: Option<Duration>,
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

/// The global flags a verb ignores, hidden from its help: `init` writes the config dir and
/// dials no controller; `demo` makes a fleet of its own in a temporary directory.
const IGNORED_GLOBAL_FLAGS: &[(&str, &[&str])] = &[
    ("init", &["controller"]),
    ("demo", &["config_dir", "controller"]),
    ("completions", &["config_dir", "controller", "output"]),
    ("man", &["config_dir", "controller", "output"]),
];

/// fleetctl's clap command, as `main` parses with it: [`Cli`] with the global flags a verb
/// ignores hidden from that verb's help. A verb that has an argument of a global flag's id is
/// not given the global one, so each such verb gets a hidden copy of it.
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    let mut command = Cli::command();
    for (verb, flags) in IGNORED_GLOBAL_FLAGS {
        let hidden: Vec<clap::Arg> = flags
            .iter()
            .filter_map(|flag| {
                let arg = command.get_arguments().find(|arg| arg.get_id() == *flag)?;
                Some(arg.clone().hide(true))
            })
            .collect();
        command = command.mut_subcommand(verb, |subcommand| subcommand.args(hidden));
    }
    command
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
        command().debug_assert();
    }

    /// Every verb and sub-verb, with its path (`fleetctl rollout status`).
    fn every_verb(command: &clap::Command, path: &str, out: &mut Vec<(String, clap::Command)>) {
        for subcommand in command.get_subcommands() {
            if subcommand.get_name() == "help" {
                continue;
            }
            let sub_path = format!("{path} {}", subcommand.get_name());
            out.push((sub_path.clone(), subcommand.clone()));
            every_verb(subcommand, &sub_path, out);
        }
    }

    #[test]
    fn every_verb_has_an_example_and_every_argument_a_description() {
        let mut command = command();
        // Built, as for parsing: the global flags are then on every verb.
        command.build();
        let mut verbs = Vec::new();
        every_verb(&command, "fleetctl", &mut verbs);
        assert!(verbs.len() > 20, "{} verbs", verbs.len());
        let mut problems = Vec::new();
        for (path, mut verb) in verbs {
            let help = verb.render_long_help().to_string();
            let example = help
                .split_once("Example")
                .map(|(_, rest)| rest.to_string())
                .unwrap_or_default();
            let verb_words = path.trim_start_matches("fleetctl ");
            if !example.contains(&format!("fleetctl {verb_words}")) {
                problems.push(format!("`{path} --help` shows no example of `{path}`"));
            }
            if verb.get_about().is_none() {
                problems.push(format!("`{path}` has no description"));
            }
            for arg in verb.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" || arg.is_hide_set() {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    problems.push(format!("`{path}`: argument {id} has no help text"));
                }
            }
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }

    #[test]
    fn verbs_do_not_show_global_flags_they_ignore() {
        let mut command = command();
        command.build();
        let demo_help = command
            .find_subcommand_mut("demo")
            .unwrap()
            .render_long_help()
            .to_string();
        assert!(!demo_help.contains("--config-dir"), "{demo_help}");
        assert!(!demo_help.contains("--controller"), "{demo_help}");
        let init_help = command
            .find_subcommand_mut("init")
            .unwrap()
            .render_long_help()
            .to_string();
        assert!(!init_help.contains("--controller"), "{init_help}");
        let status_help = command
            .find_subcommand_mut("status")
            .unwrap()
            .render_long_help()
            .to_string();
        for flag in ["--config-dir", "--controller", "--output"] {
            assert!(status_help.contains(flag), "{flag}: {status_help}");
        }
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
        let cli = parse(&["release", "prune", "web", "--keep", "3"]).unwrap();
        let Command::Release(ReleaseCommand::Prune(prune)) = cli.command else {
            panic!("not release prune")
        };
        assert_eq!((prune.app.as_str(), prune.keep), ("web", 3));
        let error = parse(&["release", "prune", "web", "--keep", "0"]).unwrap_err();
        assert_eq!(error.exit_code(), 2);
        assert!(error.to_string().contains("keep at least 1"), "{error}");
        assert!(parse(&["release", "prune", "web"]).is_err());
    }
}
