//! `fleetctl bootstrap` and `fleetctl replace`: the controller's side of SSH bootstrap. For each
//! host it asks the controller for a fresh join token, hands the SSH work to
//! [`crate::ssh`], then waits until the host registered (ListHosts shows it connected),
//! watching the agent on the host so that one that died is reported at once with its log.
//! Hosts are done in parallel, one tokio task each, and each gets one result line.
//!
//! `replace OLD --with ssh://…` bootstraps the new host, converges it to every release OLD runs
//! (ConvergeLike, which returns once each passed its smoke checks), and only then drains and
//! removes OLD: the fleet never has fewer healthy instances than before.

use crate::args::{BootstrapArgs, BootstrapFlags, ReplaceArgs};
use crate::client::{usage, CliError, CA_FILE, EXIT_FAILED, EXIT_OK};
use crate::commands::Context;
use crate::output;
use crate::ssh::connection::{Credential, HostKeyPolicy};
use crate::ssh::deb::{AgentDeb, PACKAGE_REMOTE_DIR};
use crate::ssh::install::{AgentBinary, AgentSource, InstallOutcome, ServiceMode};
use crate::ssh::targets::{self, TargetSpec};
use crate::ssh::{self as ssh_bootstrap, HostJob, SharedSettings};

use fleet_proto::instance_state::InstanceState;
use fleet_proto::pb;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;

/// How long a host gets, from the SSH connect until it registered, when `--deadline` is not given.
pub const DEFAULT_BOOTSTRAP_DEADLINE: Duration = Duration::from_secs(180);
/// How long a bootstrap join token stays valid.
const JOIN_TOKEN_TTL: Duration = Duration::from_secs(30 * 60);
/// How often ListHosts is asked while waiting for a host to register, when the controller's
/// event stream cannot say at once that a host connected.
const REGISTER_POLL: Duration = Duration::from_millis(100);
/// How often ListHosts is asked anyway while the event stream is followed.
const REGISTER_POLL_WITH_EVENTS: Duration = Duration::from_secs(1);
/// How often the agent on the host is checked while waiting.
const HEALTH_CHECK_EVERY: Duration = Duration::from_secs(2);
/// At most this many hosts are worked on at once.
const MAX_PARALLEL_HOSTS: usize = 32;

/// One host's result.
#[derive(Debug, serde::Serialize)]
pub struct HostResult {
    pub target: String,
    pub name: String,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub install: Option<InstallOutcome>,
    pub host_key_fingerprint: String,
    pub host_key_recorded: bool,
    pub seconds: f64,
    /// The host as the controller lists it once registered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<pb::Host>,
}

/// What `--output json` prints for bootstrap.
#[derive(Debug, serde::Serialize)]
pub struct BootstrapReport {
    pub results: Vec<HostResult>,
}

/// The user SSH logs in as when the address names none.
fn local_user() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "root".to_string())
}

/// Everything resolved before any host is touched: bad input fails here with exit 2.
pub(crate) struct Prepared {
    pub(crate) jobs: Vec<HostJob>,
    pub(crate) shared: SharedSettings,
    /// The binary or the .deb (`--agent-deb`).
    pub(crate) agent: Arc<AgentSource>,
    /// The binary (or the .deb) as a tar entry, made once and sent to every host.
    pub(crate) binary_entry: Arc<Vec<u8>>,
    pub(crate) deadline: Duration,
}

pub(crate) async fn prepare(
    ctx: &Context,
    config_dir: &Path,
    specs: Vec<TargetSpec>,
    flags: &BootstrapFlags,
) -> Result<Prepared, CliError> {
    if specs.is_empty() {
        return Err(usage(
            "bootstrap needs at least one host: ssh://USER@HOST[:PORT] or --targets FILE",
        ));
    }
    if specs.len() > 1 && flags.name.is_some() {
        return Err(usage(
            "--name names one host: with several hosts give each its name= in a --targets file",
        ));
    }
    let mut jobs = Vec::new();
    let mut names = BTreeSet::new();
    let mut places = BTreeSet::new();
    for spec in specs {
        let host_name = spec
            .name
            .clone()
            .or_else(|| flags.name.clone())
            .unwrap_or_else(|| targets::default_host_name(&spec.address.host));
        fleet_proto::names::check_host(&host_name).map_err(|e| usage(e.to_string()))?;
        if !names.insert(host_name.clone()) {
            return Err(usage(format!(
                "host name {host_name} is given to two hosts: give each its own name="
            )));
        }
        let advertise = match spec.advertise.clone().or_else(|| flags.advertise.clone()) {
            Some(advertise) => advertise,
            None => default_advertise(&spec.address.host, spec.address.port).await?,
        };
        if advertise.parse::<std::net::IpAddr>().is_err() {
            return Err(usage(format!(
                "advertise address {advertise:?} of {host_name} is not an IP address: give --advertise IP"
            )));
        }
        let labels_text = spec.labels.clone().or_else(|| flags.labels.clone());
        let labels: BTreeMap<String, String> = match labels_text {
            Some(text) if !text.trim().is_empty() => fleet_proto::names::parse_labels(&text)
                .map_err(|e| usage(format!("labels of {host_name}: {e}")))?
                .into_iter()
                .collect(),
            _ => BTreeMap::new(),
        };
        let remote_dir = match (&flags.agent_deb, &spec.remote_dir) {
            // The package's unit reads its config from one place.
            (Some(_), Some(dir)) => {
                return Err(usage(format!(
                    "{host_name} has remote_dir={} but --agent-deb installs the agent in {PACKAGE_REMOTE_DIR}: drop remote_dir= from the targets file",
                    dir.display()
                )))
            }
            (Some(_), None) => std::path::PathBuf::from(PACKAGE_REMOTE_DIR),
            (None, dir) => dir.clone().unwrap_or_else(|| flags.remote_dir.clone()),
        };
        crate::ssh::install::check_remote_dir(&remote_dir).map_err(|e| usage(e.to_string()))?;
        let place = (
            spec.address.host.clone(),
            spec.address.port,
            remote_dir.clone(),
        );
        if !places.insert(place) {
            return Err(usage(format!(
                "two hosts share {} and remote dir {}: give each its own remote_dir=",
                spec.address,
                remote_dir.display()
            )));
        }
        jobs.push(HostJob {
            address: spec.address,
            host_name,
            advertise,
            labels,
            remote_dir,
        });
    }

    let agent = read_agent(flags).await?;

    let credential = match &flags.identity {
        Some(path) => {
            // Fail before any host is touched when the key cannot be used.
            crate::ssh::connection::load_identity(path).map_err(|e| usage(e.to_string()))?;
            Credential::KeyFile(path.clone())
        }
        None if std::env::var_os("SSH_AUTH_SOCK").is_some_and(|s| !s.is_empty()) => {
            Credential::Agent
        }
        None => match ssh_bootstrap::default_identities().into_iter().next() {
            Some(path) => Credential::KeyFile(path),
            None => {
                return Err(usage(
                    "no SSH credential: pass --identity KEY, or start ssh-agent (SSH_AUTH_SOCK) with a key",
                ))
            }
        },
    };
    // What fleetctl was given (`--controller`, or client.toml's URLs from `fleetctl init
    // --url`), every one: the agent dials them in turn.
    let controller_urls = match &flags.controller_url {
        Some(text) => agent_controller_urls(text)?,
        None => ctx.connection.controller_urls.clone(),
    };
    let ca_pem = if controller_urls
        .iter()
        .all(|url| url.starts_with("https://"))
    {
        let path = config_dir.join(CA_FILE);
        Some(std::fs::read_to_string(&path).map_err(|e| {
            usage(format!(
                "cannot read the fleet CA {} the agent must trust: {e}; run fleetctl with --config-dir DIR of `fleetctl init`",
                path.display()
            ))
        })?)
    } else {
        None
    };
    Ok(Prepared {
        jobs,
        shared: SharedSettings {
            policy: HostKeyPolicy {
                known_hosts: flags
                    .known_hosts
                    .clone()
                    .unwrap_or_else(ssh_bootstrap::default_known_hosts),
                accept_new: flags.accept_new_host_key,
            },
            credential,
            controller_urls,
            ca_pem,
        },
        binary_entry: Arc::new(agent.tar_entry()),
        agent: Arc::new(agent),
        deadline: flags.deadline.unwrap_or(DEFAULT_BOOTSTRAP_DEADLINE),
    })
}

/// The agent to install: `--agent-deb`'s package (checked here: a Debian package of
/// fleet-agent), `--agent-binary`, or the fleet-agent beside fleetctl.
async fn read_agent(flags: &BootstrapFlags) -> Result<AgentSource, CliError> {
    if let Some(path) = &flags.agent_deb {
        let bytes = tokio::fs::read(path).await.map_err(|e| {
            usage(format!(
                "cannot read the agent package {}: {e}",
                path.display()
            ))
        })?;
        let deb = AgentDeb::read(bytes).map_err(|e| usage(format!("{}: {e}", path.display())))?;
        return Ok(AgentSource::Package(deb));
    }
    let agent_path = match &flags.agent_binary {
        Some(path) => path.clone(),
        None => ssh_bootstrap::default_agent_binary()
            .ok_or_else(|| usage("no fleet-agent beside fleetctl: pass --agent-binary PATH"))?,
    };
    let agent_binary = tokio::fs::read(&agent_path).await.map_err(|e| {
        usage(format!(
            "cannot read the agent binary {}: {e}",
            agent_path.display()
        ))
    })?;
    Ok(AgentSource::Binary(AgentBinary::new(agent_binary)))
}

/// The address to advertise when none is given: the SSH host's own IP.
async fn default_advertise(host: &str, port: u16) -> Result<String, CliError> {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(ip.to_string());
    }
    let mut addrs = tokio::net::lookup_host((host, port)).await.map_err(|e| {
        usage(format!(
            "cannot resolve {host} to pick its advertise address: {e}; give --advertise IP"
        ))
    })?;
    addrs.next().map(|a| a.ip().to_string()).ok_or_else(|| {
        usage(format!(
            "{host} resolves to no address: give --advertise IP"
        ))
    })
}

/// `--controller-url URL1,URL2`: each checked, named when it is not `https://HOST:PORT`.
fn agent_controller_urls(text: &str) -> Result<Vec<String>, CliError> {
    let urls: Vec<String> = text
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(|url| url.trim_end_matches('/').to_string())
        .collect();
    if urls.is_empty() {
        return Err(usage(
            "--controller-url is empty: write the URL hosts dial, e.g. https://controller.example.com:7700",
        ));
    }
    for url in &urls {
        fleet_proto::leader::check_controller_url(url).map_err(|why| {
            usage(format!(
                "--controller-url {url:?} is invalid: {why}; write it like https://controller.example.com:7700 (several: URL1,URL2)"
            ))
        })?;
    }
    Ok(urls)
}

/// A fresh join token that gives the host `labels`, or None when the controller issues none
/// (it runs without mTLS).
async fn join_token(
    ctx: &Context,
    labels: &BTreeMap<String, String>,
) -> Result<Option<String>, CliError> {
    let request = pb::CreateJoinTokenRequest {
        ttl_ms: JOIN_TOKEN_TTL.as_millis() as u64,
        labels: labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    };
    match ctx.client().create_join_token(request).await {
        Ok(response) => Ok(Some(response.into_inner().token)),
        Err(status) if status.code() == tonic::Code::Unimplemented => Ok(None),
        Err(status) => Err(ctx.error(status)),
    }
}

/// Finds a host in ListHosts.
async fn find_host(ctx: &Context, name: &str) -> Result<Option<pb::Host>, CliError> {
    let hosts = ctx
        .client()
        .list_hosts(pb::ListHostsRequest::default())
        .await
        .map_err(|status| ctx.error(status))?
        .into_inner();
    Ok(hosts.hosts.into_iter().find(|h| h.name == name))
}

/// Bootstraps one host: token, SSH install, then waits until it registered.
async fn bootstrap_one(
    ctx: &Context,
    job: &HostJob,
    shared: &SharedSettings,
    agent: &AgentSource,
    binary_entry: &[u8],
    deadline: Duration,
    registrations: &Registrations,
) -> HostResult {
    let started = Instant::now();
    let mut result = HostResult {
        target: job.address.to_string(),
        name: job.host_name.clone(),
        ok: false,
        error: None,
        install: None,
        host_key_fingerprint: String::new(),
        host_key_recorded: false,
        seconds: 0.0,
        host: None,
    };
    let name = job.host_name.clone();
    let progress = move |line: &str| eprintln!("{name}: {line}");
    let work = async {
        let token = async {
            join_token(ctx, &job.labels)
                .await
                .map_err(|e| e.to_string())
        };
        let done =
            ssh_bootstrap::bootstrap_host(job, shared, agent, binary_entry, token, &progress)
                .await
                .map_err(|e| e.to_string())?;
        result.host_key_fingerprint = done.session.host_key.fingerprint.clone();
        result.host_key_recorded = done.session.host_key.recorded;
        result.install = Some(done.outcome.clone());
        progress(&match &done.outcome.mode {
            ServiceMode::Systemd => {
                "agent started as fleet-agent.service; waiting for it to register".to_string()
            }
            ServiceMode::Detached { pid } => format!(
                "no systemd on the host: agent started detached (pid {pid}, log {}/fleet-agent.log); waiting for it to register",
                done.outcome.remote_dir.display()
            ),
        });
        let registered = wait_registered(ctx, job, &done, registrations).await;
        done.session.close().await;
        registered
    };
    match tokio::time::timeout(deadline, work).await {
        Ok(Ok(host)) => {
            result.ok = true;
            result.host = Some(host);
        }
        Ok(Err(error)) => result.error = Some(error),
        Err(_) => {
            result.error = Some(format!(
                "not registered within {}: check the agent's log on the host and that it can reach the controller",
                fleet_proto::duration::format_duration(deadline)
            ))
        }
    }
    result.seconds = started.elapsed().as_secs_f64();
    result
}

/// Wakes the hosts waiting to register each time the controller reports a host connected (one
/// `Events` stream for all of them), so a host is seen the moment it registers instead of at
/// the next poll. Without the stream (an older controller) the waiters poll.
struct Registrations {
    connected: tokio::sync::watch::Receiver<u64>,
    follower: Option<tokio::task::JoinHandle<()>>,
}

impl Registrations {
    async fn follow(ctx: &Context) -> Registrations {
        let (tx, connected) = tokio::sync::watch::channel(0u64);
        let request = pb::EventsRequest {
            follow: true,
            limit: 1,
        };
        let follower = match ctx.client().events(request).await {
            Ok(response) => {
                let mut stream = response.into_inner();
                Some(tokio::spawn(async move {
                    while let Some(Ok(event)) = stream.next().await {
                        if event.kind == "host.connected" {
                            tx.send_modify(|n| *n += 1);
                        }
                    }
                }))
            }
            // The waiters poll, as `follower` being None tells them.
            Err(_) => None,
        };
        Registrations {
            connected,
            follower,
        }
    }
}

impl Drop for Registrations {
    fn drop(&mut self) {
        if let Some(follower) = &self.follower {
            follower.abort();
        }
    }
}

/// Waits until ListHosts shows the host connected, asking again whenever some host connects
/// (or every poll interval); checks now and then that the agent still runs.
async fn wait_registered(
    ctx: &Context,
    job: &HostJob,
    done: &ssh_bootstrap::Bootstrapped,
    registrations: &Registrations,
) -> Result<pb::Host, String> {
    let mut last_health_check = Instant::now();
    let mut connected = registrations.connected.clone();
    let mut following = registrations.follower.is_some();
    // Bounded by the caller's deadline.
    loop {
        // Marked seen before asking, so a host that connects meanwhile wakes the wait below.
        connected.borrow_and_update();
        if let Some(host) = find_host(ctx, &job.host_name)
            .await
            .map_err(|e| e.to_string())?
        {
            if host.connected {
                // After an upgrade the old agent may not have been seen to leave yet: make sure
                // the one just started runs. A fresh host has no other agent to confuse.
                if done.outcome.upgraded {
                    check_health(done).await?;
                }
                return Ok(host);
            }
        }
        if last_health_check.elapsed() >= HEALTH_CHECK_EVERY {
            last_health_check = Instant::now();
            check_health(done).await?;
        }
        if following {
            let woken = tokio::time::timeout(REGISTER_POLL_WITH_EVENTS, connected.changed()).await;
            if let Ok(Err(_)) = woken {
                // The stream ended: poll from now on.
                following = false;
            }
        } else {
            tokio::time::sleep(REGISTER_POLL).await;
        }
    }
}

async fn check_health(done: &ssh_bootstrap::Bootstrapped) -> Result<(), String> {
    match crate::ssh::install::agent_health(
        &done.session,
        &done.outcome.remote_dir,
        &done.outcome.mode,
    )
    .await
    {
        Ok(Ok(())) => Ok(()),
        Ok(Err(log)) => Err(format!(
            "the agent stopped right after it started; the end of its log:\n{log}"
        )),
        Err(e) => Err(format!("cannot check the agent on the host: {e}")),
    }
}

/// One result line.
fn render_result(result: &HostResult) -> String {
    if !result.ok {
        return format!(
            "{}  FAILED  {}: {}",
            result.name,
            result.target,
            result.error.as_deref().unwrap_or("unknown error")
        );
    }
    let how = match result.install.as_ref().map(|i| (&i.mode, i.upgraded)) {
        Some((ServiceMode::Systemd, true)) => "agent upgraded in place (systemd)".to_string(),
        Some((ServiceMode::Systemd, false)) => {
            "agent installed as fleet-agent.service (enabled)".to_string()
        }
        Some((ServiceMode::Detached { pid }, upgraded)) => format!(
            "agent {} detached, pid {pid} (no systemd on the host)",
            if upgraded {
                "upgraded in place,"
            } else {
                "started"
            }
        ),
        None => "agent started".to_string(),
    };
    let how = match result.install.as_ref().and_then(|i| i.package.as_ref()) {
        Some(package) => format!("{package} installed with dpkg, {how}"),
        None => how,
    };
    let key = if result.host_key_recorded {
        format!(", new host key {} recorded", result.host_key_fingerprint)
    } else {
        String::new()
    };
    format!(
        "{}  ok  {}: {how}, registered in {:.1}s{key}",
        result.name, result.target, result.seconds
    )
}

/// Bootstraps every job in parallel (bounded) and returns their results in job order.
pub(crate) async fn run_jobs(ctx: &Context, prepared: &Prepared) -> Vec<HostResult> {
    let semaphore = Arc::new(tokio::sync::Semaphore::new(MAX_PARALLEL_HOSTS));
    let registrations = Arc::new(Registrations::follow(ctx).await);
    let mut tasks = Vec::new();
    for job in prepared.jobs.clone() {
        let ctx = ctx.clone();
        let shared = prepared.shared.clone();
        let agent = prepared.agent.clone();
        let binary_entry = prepared.binary_entry.clone();
        let deadline = prepared.deadline;
        let semaphore = semaphore.clone();
        let registrations = registrations.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = semaphore.acquire_owned().await;
            bootstrap_one(
                &ctx,
                &job,
                &shared,
                &agent,
                &binary_entry,
                deadline,
                &registrations,
            )
            .await
        }));
    }
    let mut results = Vec::new();
    for (task, job) in tasks.into_iter().zip(&prepared.jobs) {
        results.push(task.await.unwrap_or_else(|e| HostResult {
            target: job.address.to_string(),
            name: job.host_name.clone(),
            ok: false,
            error: Some(format!("the bootstrap task failed: {e}")),
            install: None,
            host_key_fingerprint: String::new(),
            host_key_recorded: false,
            seconds: 0.0,
            host: None,
        }));
    }
    results
}

/// The hosts named on the command line and in a targets file.
pub(crate) fn read_targets(
    addresses: &[String],
    targets_file: Option<&Path>,
) -> Result<Vec<TargetSpec>, CliError> {
    let user = local_user();
    let mut specs = Vec::new();
    for text in addresses {
        specs.push(TargetSpec::new(
            targets::parse_ssh_address(text, &user).map_err(|e| usage(e.to_string()))?,
        ));
    }
    if let Some(path) = targets_file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            usage(format!(
                "cannot read the targets file {}: {e}",
                path.display()
            ))
        })?;
        specs.extend(
            targets::parse_targets_file(&text, &user)
                .map_err(|e| usage(format!("{}: {e}", path.display())))?,
        );
    }
    Ok(specs)
}

/// `fleetctl bootstrap`: exit 0 only when every host registered.
pub async fn bootstrap(
    ctx: &Context,
    config_dir: &Path,
    args: &BootstrapArgs,
) -> Result<u8, CliError> {
    let specs = read_targets(&args.targets, args.targets_file.as_deref())?;
    let prepared = prepare(ctx, config_dir, specs, &args.flags).await?;
    let results = run_jobs(ctx, &prepared).await;
    let all_ok = results.iter().all(|r| r.ok);
    if ctx.json() {
        output::print_json(&BootstrapReport { results });
    } else {
        for result in &results {
            println!("{}", render_result(result));
        }
    }
    Ok(if all_ok { EXIT_OK } else { EXIT_FAILED })
}

/// What `--output json` prints for replace.
#[derive(Debug, serde::Serialize)]
pub struct ReplaceReport {
    pub bootstrap: HostResult,
    /// The new host once it runs every release the old one ran.
    pub converged: Option<pb::Host>,
    /// The old host as it was removed.
    pub removed: Option<pb::Host>,
}

/// Whether every app on the host runs its desired version and passed its smoke checks.
pub(crate) fn converged(host: &pb::Host, apps: &BTreeSet<String>) -> bool {
    apps.iter().all(|app| {
        host.apps.iter().any(|a| {
            &a.app == app
                && a.actual.as_ref().is_some_and(|actual| {
                    output::instance_state(actual) == Some(InstanceState::Running)
                        && actual.version == a.desired_version
                })
        })
    })
}

pub(crate) fn describe_apps(host: &pb::Host) -> String {
    if host.apps.is_empty() {
        return "no apps".to_string();
    }
    host.apps
        .iter()
        .map(|a| {
            let actual = a
                .actual
                .as_ref()
                .map(|i| format!("{} {}", i.version, output::instance_state_name(i)))
                .unwrap_or_else(|| "nothing yet".to_string());
            format!("{}@{}: {actual}", a.app, a.desired_version)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `fleetctl replace OLD --with ssh://…`: bootstrap NEW, converge it like OLD, then drain and
/// remove OLD. OLD is touched only after NEW passed; any failure before leaves OLD as it was.
pub async fn replace(ctx: &Context, config_dir: &Path, args: &ReplaceArgs) -> Result<u8, CliError> {
    let address =
        targets::parse_ssh_address(&args.with, &local_user()).map_err(|e| usage(e.to_string()))?;
    let old = find_host(ctx, &args.old).await?.ok_or_else(|| {
        usage(format!(
            "there is no host {}: `fleetctl hosts` lists them",
            args.old
        ))
    })?;
    // NEW takes OLD's labels unless told otherwise: it joins the same deployments.
    let mut flags = args.flags.clone();
    if flags.labels.is_none() && !old.labels.is_empty() {
        flags.labels = Some(output::labels(&old.labels));
    }
    let prepared = prepare(ctx, config_dir, vec![TargetSpec::new(address)], &flags).await?;
    let new_name = prepared.jobs[0].host_name.clone();
    if new_name == args.old {
        return Err(usage(format!(
            "the new host would also be called {new_name}: give it another --name"
        )));
    }
    let old_apps: BTreeSet<String> = old
        .apps
        .iter()
        .filter(|a| !a.desired_version.is_empty())
        .map(|a| a.app.clone())
        .collect();
    let mut report = ReplaceReport {
        bootstrap: run_jobs(ctx, &prepared).await.remove(0),
        converged: None,
        removed: None,
    };
    let finish = |report: &ReplaceReport, code: u8| {
        if ctx.json() {
            output::print_json(report);
        }
        code
    };
    if !report.bootstrap.ok {
        eprintln!("{}", render_result(&report.bootstrap));
        eprintln!("error: {} is untouched", args.old);
        return Ok(finish(&report, EXIT_FAILED));
    }
    if !ctx.json() {
        println!("{}", render_result(&report.bootstrap));
    }

    // Converge NEW like OLD and wait for its smoke checks.
    eprintln!(
        "{new_name}: taking every release {} runs ({} app(s))",
        args.old,
        old_apps.len()
    );
    let deadline = prepared.deadline;
    let request = pb::ConvergeLikeRequest {
        host: new_name.clone(),
        like: args.old.clone(),
        deadline_ms: deadline.as_millis() as u64,
    };
    let mut last = None;
    let converge = async {
        let mut stream = ctx
            .client()
            .converge_like(request)
            .await
            .map_err(|status| ctx.error(status))?
            .into_inner();
        while let Some(item) = stream.next().await {
            let host = item.map_err(|status| ctx.error(status))?;
            eprintln!("{new_name}: {}", describe_apps(&host));
            last = Some(host);
        }
        Ok::<(), CliError>(())
    };
    // The controller enforces the deadline; this bound only guards against a silent stream.
    let outcome = tokio::time::timeout(deadline + Duration::from_secs(30), converge).await;
    let converge_error = match outcome {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some("the controller stopped answering".to_string()),
    };
    let done = last.as_ref().is_some_and(|h| converged(h, &old_apps));
    report.converged = last.clone();
    if converge_error.is_some() || !done {
        eprintln!(
            "error: {new_name} did not take every release of {} ({}); {} is untouched and {new_name} stays in the fleet",
            args.old,
            converge_error.unwrap_or_else(|| last
                .as_ref()
                .map(describe_apps)
                .unwrap_or_else(|| "no answer".to_string())),
            args.old
        );
        return Ok(finish(&report, EXIT_FAILED));
    }
    eprintln!(
        "{new_name}: runs every release of {} and passed its smoke checks",
        args.old
    );

    // Only now drain and remove OLD.
    let drain = pb::DrainHostRequest {
        host: args.old.clone(),
        deadline_ms: deadline.as_millis() as u64,
    };
    let drained = async {
        let mut stream = ctx
            .client()
            .drain_host(drain)
            .await
            .map_err(|status| ctx.error(status))?
            .into_inner();
        while let Some(item) = stream.next().await {
            let host = item.map_err(|status| ctx.error(status))?;
            eprintln!("{}: {}", host.name, host.state);
        }
        Ok::<(), CliError>(())
    };
    if let Err(e) = drained.await {
        eprintln!(
            "error: {new_name} runs every release, but draining {} failed: {e}; retry with `fleetctl remove {}`",
            args.old, args.old
        );
        return Ok(finish(&report, EXIT_FAILED));
    }
    let removed = ctx
        .client()
        .remove_host(pb::RemoveHostRequest {
            host: args.old.clone(),
            purge: false,
        })
        .await;
    match removed {
        Ok(response) => report.removed = response.into_inner().host,
        Err(status) => {
            eprintln!(
                "error: {} is drained but could not be removed: {}; retry with `fleetctl remove {}`",
                args.old,
                ctx.error(status),
                args.old
            );
            return Ok(finish(&report, EXIT_FAILED));
        }
    }
    if !ctx.json() {
        println!(
            "{} replaced by {new_name}: {new_name} runs every release {} ran; {} is drained and removed",
            args.old, args.old, args.old
        );
    }
    Ok(finish(&report, EXIT_OK))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(name: &str, desired: &str, actual: Option<(&str, &str)>) -> pb::HostApp {
        pb::HostApp {
            app: name.into(),
            desired_version: desired.into(),
            actual: actual.map(|(version, state)| {
                let mut report = pb::InstanceReport {
                    app: name.into(),
                    version: version.into(),
                    ..Default::default()
                };
                InstanceState::parse(state).unwrap().write_to(&mut report);
                report
            }),
        }
    }

    #[test]
    fn converged_means_every_app_running_its_desired_version() {
        let apps: BTreeSet<String> = ["web".to_string(), "api".to_string()].into();
        let mut host = pb::Host {
            name: "new".into(),
            apps: vec![
                app("web", "2", Some(("2", "running"))),
                app("api", "1", Some(("1", "checking"))),
            ],
            ..Default::default()
        };
        assert!(!converged(&host, &apps));
        host.apps[1] = app("api", "1", Some(("1", "running")));
        assert!(converged(&host, &apps));
        host.apps[0] = app("web", "2", Some(("1", "running")));
        assert!(!converged(&host, &apps));
        assert!(converged(&host, &BTreeSet::new()));
    }

    #[test]
    fn bootstrap_and_replace_parse() {
        use crate::args::{Cli, Command};
        use clap::Parser;
        let cli = Cli::try_parse_from([
            "fleetctl",
            "bootstrap",
            "ssh://root@10.0.0.5",
            "ssh://root@10.0.0.6:2222",
            "--labels",
            "env=prod",
            "--accept-new-host-key",
            "--deadline",
            "2m",
        ])
        .unwrap();
        let Command::Bootstrap(args) = cli.command else {
            panic!("not bootstrap")
        };
        assert_eq!(args.targets.len(), 2);
        assert!(args.flags.accept_new_host_key);
        assert_eq!(
            args.flags.remote_dir,
            std::path::PathBuf::from("/opt/fleet")
        );
        assert_eq!(args.flags.deadline, Some(Duration::from_secs(120)));

        let cli = Cli::try_parse_from([
            "fleetctl",
            "replace",
            "web-1",
            "--with",
            "ssh://root@10.0.0.7",
            "--name",
            "web-7",
        ])
        .unwrap();
        let Command::Replace(args) = cli.command else {
            panic!("not replace")
        };
        assert_eq!(args.old, "web-1");
        assert_eq!(args.flags.name.as_deref(), Some("web-7"));
        assert!(Cli::try_parse_from(["fleetctl", "replace", "web-1"]).is_err());
        assert!(Cli::try_parse_from(["fleetctl", "bootstrap", "--name", "Bad_Name"]).is_err());
    }
}
