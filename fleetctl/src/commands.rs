//! One function per fleetctl verb that talks to the controller: it builds the request, calls
//! FleetService, and prints the answer as text or JSON. `fleetctl demo` calls these same
//! functions, so the demo shows exactly what the verbs do.

use crate::client::{usage, CliError, Connection, EXIT_FAILED, EXIT_OK};
use crate::output::{self, OutputFormat, Table};
use fleet_proto::instance_state::InstanceState;
use fleet_proto::pb;
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio_stream::StreamExt;

/// Artifact bytes travel in chunks of this size.
pub const UPLOAD_CHUNK_BYTES: usize = 1024 * 1024;

/// What every verb needs: the controller connection and how to print.
#[derive(Clone)]
pub struct Context {
    pub connection: Connection,
    pub output: OutputFormat,
}

impl Context {
    pub(crate) fn client(&self) -> crate::client::FleetClient {
        self.connection.client.clone()
    }

    pub(crate) fn error(&self, status: tonic::Status) -> CliError {
        self.connection.error(status)
    }

    pub(crate) fn json(&self) -> bool {
        self.output == OutputFormat::Json
    }
}

// ---------------------------------------------------------------- release create, releases

/// `fleetctl release create APP VERSION ARTIFACT [--env KEY=VALUE]...`: checks the artifact
/// locally, then streams it to the controller in 1 MiB chunks (never whole in memory).
pub async fn release_create(
    ctx: &Context,
    app: &str,
    version: &str,
    artifact: &Path,
    env: &[(String, String)],
    secrets: &[(String, String)],
) -> Result<pb::CreateReleaseResponse, CliError> {
    fleet_proto::names::check_app(app).map_err(|e| usage(e.to_string()))?;
    fleet_proto::names::check_version(version).map_err(|e| usage(e.to_string()))?;
    let mut env_map = HashMap::new();
    for (key, value) in env {
        if !fleet_proto::names::check_env_key(key) {
            return Err(usage(format!(
                "environment variable name {key:?} is invalid: use letters, digits and '_', not starting with a digit"
            )));
        }
        if env_map.insert(key.clone(), value.clone()).is_some() {
            return Err(usage(format!(
                "--env {key} is given twice: give each variable once"
            )));
        }
    }
    let mut secret_map = HashMap::new();
    for (key, value) in secrets {
        if env_map.contains_key(key) || secret_map.insert(key.clone(), value.clone()).is_some() {
            return Err(usage(format!(
                "{key} is given twice (as --env or --secret): give each variable once"
            )));
        }
    }
    check_artifact_file(artifact).await?;

    let file = tokio::fs::File::open(artifact)
        .await
        .map_err(|e| usage(format!("cannot read {}: {e}", artifact.display())))?;
    let header = pb::CreateReleaseRequest {
        body: Some(pb::create_release_request::Body::Header(
            pb::ReleaseHeader {
                app: app.to_string(),
                version: version.to_string(),
                env: env_map,
                secrets: secret_map,
            },
        )),
    };
    let (read_error_tx, read_error_rx) = tokio::sync::oneshot::channel::<std::io::Error>();
    let requests = artifact_stream(header, file, read_error_tx);

    // Sent once: to the leader, when the controller reached follows it.
    let ctx = &Context {
        connection: ctx.connection.to_leader().await,
        output: ctx.output,
    };
    let mut client = ctx.client();
    let call = client.create_release(requests);
    let response = tokio::select! {
        response = call => response.map_err(|status| ctx.error(status))?.into_inner(),
        Ok(error) = read_error_rx => {
            // Dropping the call cancels the upload, so the controller never records a release
            // made of half a file.
            return Err(usage(format!(
                "cannot read {} while uploading it: {error}",
                artifact.display()
            )));
        }
    };

    if ctx.json() {
        output::print_json(&response);
    } else {
        let release = response.release.clone().unwrap_or_default();
        if response.created {
            println!(
                "created {}@{} {}",
                release.app, release.version, release.artifact_digest
            );
        } else {
            println!(
                "{}@{} already exists with the same artifact and config (nothing to do)",
                release.app, release.version
            );
        }
    }
    Ok(response)
}

/// Checks the file is a readable artifact before a byte is uploaded, so a missing fleet.toml
/// or a broken tarball is reported at once, with the file's name.
async fn check_artifact_file(artifact: &Path) -> Result<(), CliError> {
    let metadata = tokio::fs::metadata(artifact).await.map_err(|e| {
        usage(format!(
            "cannot read artifact {}: {e}; pass the path of a .tar.gz with fleet.toml at its root",
            artifact.display()
        ))
    })?;
    if !metadata.is_file() {
        return Err(usage(format!(
            "artifact {} is not a file: pass the path of a .tar.gz with fleet.toml at its root",
            artifact.display()
        )));
    }
    // Only for tests that prove the controller refuses on its own what fleetctl would refuse.
    if std::env::var_os("FLEET_SKIP_LOCAL_ARTIFACT_CHECK").is_some() {
        return Ok(());
    }
    let path = artifact.to_path_buf();
    let checked = tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&path)?;
        Ok::<_, std::io::Error>(fleet_proto::artifact::read_artifact(
            std::io::BufReader::new(file),
            None,
            fleet_proto::artifact::Limits::default(),
        ))
    })
    .await
    .map_err(|e| CliError::Failed(format!("checking the artifact stopped: {e}")))?;
    match checked {
        Ok(Ok(_manifest)) => Ok(()),
        Ok(Err(e)) => Err(usage(format!(
            "{} is not a valid artifact: {e}",
            artifact.display()
        ))),
        Err(e) => Err(usage(format!(
            "cannot read artifact {}: {e}",
            artifact.display()
        ))),
    }
}

/// The CreateRelease request stream: the header, then the file in chunks. A read error is sent
/// to `read_error_tx` and the stream then never ends, so the caller cancels the call instead of
/// the controller seeing a clean end of a truncated artifact.
fn artifact_stream(
    header: pb::CreateReleaseRequest,
    file: tokio::fs::File,
    read_error_tx: tokio::sync::oneshot::Sender<std::io::Error>,
) -> impl tokio_stream::Stream<Item = pb::CreateReleaseRequest> + Send + 'static {
    struct State {
        header: Option<pb::CreateReleaseRequest>,
        file: tokio::fs::File,
        read_error_tx: Option<tokio::sync::oneshot::Sender<std::io::Error>>,
    }
    let state = State {
        header: Some(header),
        file,
        read_error_tx: Some(read_error_tx),
    };
    futures::stream::unfold(state, |mut state| async move {
        if let Some(header) = state.header.take() {
            return Some((header, state));
        }
        let mut chunk = vec![0u8; UPLOAD_CHUNK_BYTES];
        match read_up_to(&mut state.file, &mut chunk).await {
            Ok(0) => None,
            Ok(n_bytes) => {
                chunk.truncate(n_bytes);
                let request = pb::CreateReleaseRequest {
                    body: Some(pb::create_release_request::Body::Chunk(chunk.into())),
                };
                Some((request, state))
            }
            Err(error) => {
                if let Some(tx) = state.read_error_tx.take() {
                    let _ = tx.send(error);
                }
                futures::future::pending::<Option<(pb::CreateReleaseRequest, State)>>().await
            }
        }
    })
}

/// Fills `buffer` from `file` unless the file ends first; returns how many bytes it read.
async fn read_up_to(file: &mut tokio::fs::File, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        let n_read = file.read(&mut buffer[filled..]).await?;
        if n_read == 0 {
            break;
        }
        filled += n_read;
    }
    Ok(filled)
}

/// `fleetctl releases APP`.
pub async fn releases(ctx: &Context, app: &str) -> Result<(), CliError> {
    let response = ctx
        .client()
        .list_releases(pb::ListReleasesRequest {
            app: app.to_string(),
        })
        .await
        .map_err(|status| ctx.error(status))?
        .into_inner();
    if ctx.json() {
        output::print_json(&response);
        return Ok(());
    }
    if response.releases.is_empty() {
        println!("{app} has no releases yet: create one with `fleetctl release create {app} VERSION ARTIFACT`");
        return Ok(());
    }
    let now = fleet_proto::now_unix_ms();
    let mut table = Table::new(&["VERSION", "ARTIFACT", "SIZE", "CREATED", "BY", "ENV"]);
    for release in &response.releases {
        // Environment variables by name; secrets as NAME=*** (the controller never sends
        // their values back).
        let mut env: Vec<String> = release.env.keys().cloned().collect();
        env.sort();
        let mut secrets: Vec<String> = release.secrets.keys().map(|k| format!("{k}=***")).collect();
        secrets.sort();
        env.extend(secrets);
        table.row(vec![
            release.version.clone(),
            output::short_digest(&release.artifact_digest),
            output::size(release.artifact_size),
            output::ago(release.created_unix_ms, now),
            release.created_by.clone(),
            env.join(","),
        ]);
    }
    table.print();
    Ok(())
}

/// `fleetctl release prune APP --keep N`: prints what went and what stayed, and why.
pub async fn release_prune(ctx: &Context, app: &str, keep: u32) -> Result<(), CliError> {
    let response = ctx
        .client()
        .prune_releases(pb::PruneReleasesRequest {
            app: app.to_string(),
            keep,
        })
        .await
        .map_err(|status| ctx.error(status))?
        .into_inner();
    if ctx.json() {
        output::print_json(&response);
        return Ok(());
    }
    if response.removed.is_empty() && response.kept.is_empty() {
        println!("{app} has no releases: nothing to prune");
        return Ok(());
    }
    let mut table = Table::new(&["VERSION", "ARTIFACT", "", "WHY"]);
    for (what, releases) in [("removed", &response.removed), ("kept", &response.kept)] {
        for release in releases {
            table.row(vec![
                release.version.clone(),
                output::short_digest(&release.artifact_digest),
                what.to_string(),
                release.reason.clone(),
            ]);
        }
    }
    table.print();
    println!(
        "{} release(s) of {app} removed, {} kept",
        response.removed.len(),
        response.kept.len()
    );
    Ok(())
}

/// `fleetctl controllers`.
pub async fn controllers(ctx: &Context) -> Result<(), CliError> {
    let response = ctx
        .client()
        .list_controllers(pb::ListControllersRequest {})
        .await
        .map_err(|status| ctx.error(status))?
        .into_inner();
    if ctx.json() {
        output::print_json(&response);
        return Ok(());
    }
    print!(
        "{}",
        render_controllers(&response, fleet_proto::now_unix_ms())
    );
    Ok(())
}

/// The controllers table: the leader first, then the others by URL, and where the state is.
pub fn render_controllers(response: &pb::ListControllersResponse, now: i64) -> String {
    let mut controllers = response.controllers.clone();
    controllers.sort_by(|a, b| b.leader.cmp(&a.leader).then(a.url.cmp(&b.url)));
    let mut table = Table::new(&["CONTROLLER", "ROLE", "SINCE", "UP", "HTTP"]);
    for c in &controllers {
        let (role, since) = if c.leader {
            ("leader", output::ago(c.leading_since_unix_ms, now))
        } else {
            ("follower", "-".to_string())
        };
        table.row(vec![
            c.url.clone(),
            role.to_string(),
            since,
            output::ago(c.up_since_unix_ms, now),
            if c.http.is_empty() {
                "-".to_string()
            } else {
                c.http.clone()
            },
        ]);
    }
    let mut text = table.render();
    if !controllers.iter().any(|c| c.leader) {
        text.push_str("no leader right now: one is elected within a few seconds of the last one's lease ending\n");
    }
    text.push_str(&format!("state: {}\n", response.store));
    text
}

/// `fleetctl deployments [APP]`.
pub async fn deployments(ctx: &Context, app: Option<&str>) -> Result<(), CliError> {
    let response = ctx
        .client()
        .list_deployments(pb::ListDeploymentsRequest {
            app: app.unwrap_or_default().to_string(),
        })
        .await
        .map_err(|status| ctx.error(status))?
        .into_inner();
    if ctx.json() {
        output::print_json(&response);
        return Ok(());
    }
    if response.deployments.is_empty() {
        println!("no deployments yet: a rollout that completes leaves one (`fleetctl rollout APP VERSION [--selector k=v]`)");
        return Ok(());
    }
    print!(
        "{}",
        render_deployments(&response.deployments, fleet_proto::now_unix_ms())
    );
    Ok(())
}

/// The deployments table and one line per drifting host, as `deployments` and `status` show
/// them.
pub fn render_deployments(deployments: &[pb::Deployment], now: i64) -> String {
    let mut table = Table::new(&[
        "APP",
        "SELECTOR",
        "RELEASE",
        "HOSTS",
        "ON RELEASE",
        "HEALTHY",
        "SINCE",
        "BY",
    ]);
    let mut drift = Vec::new();
    for d in deployments {
        let selector = if d.selector.is_empty() {
            "(every host)".to_string()
        } else {
            output::labels(&d.selector)
        };
        table.row(vec![
            d.app.clone(),
            selector.clone(),
            d.version.clone(),
            d.hosts_matching.to_string(),
            d.hosts_on_release.to_string(),
            d.hosts_healthy.to_string(),
            output::ago(d.updated_unix_ms, now),
            d.updated_by.clone(),
        ]);
        for entry in &d.drift {
            drift.push(format!(
                "drift: {} {}@{} ({selector}): {}",
                entry.host, d.app, d.version, entry.why
            ));
        }
    }
    let mut out = table.render();
    for line in drift {
        out.push_str(&line);
        out.push('\n');
    }
    out
}

// ---------------------------------------------------------------- hosts, status

/// `fleetctl hosts [--limit N [--after HOST]]`: one page, or every host.
pub async fn hosts(
    ctx: &Context,
    limit: Option<u32>,
    after: Option<&str>,
) -> Result<pb::ListHostsResponse, CliError> {
    if limit == Some(0) {
        return Err(crate::client::usage("--limit must be at least 1"));
    }
    let response = match limit {
        Some(limit) => list_hosts_page(ctx, limit, after.unwrap_or_default()).await?,
        None => list_hosts(ctx).await?,
    };
    if ctx.json() {
        output::print_json(&response);
        return Ok(response);
    }
    if response.hosts.is_empty() {
        println!(
            "no hosts yet: start fleet-agent on a host (or run `fleetctl demo` for a local fleet)"
        );
        return Ok(response);
    }
    let now = fleet_proto::now_unix_ms();
    let mut table = Table::new(&[
        "HOST",
        "STATE",
        "CONNECTED",
        "ADDRESS",
        "LABELS",
        "LAST SEEN",
        "AGENT",
        "CERT EXPIRES",
        "APPS",
    ]);
    for host in naturally_sorted(&response.hosts) {
        let apps = host
            .apps
            .iter()
            .map(|app| format!("{}@{}", app.app, app.desired_version))
            .collect::<Vec<_>>()
            .join(",");
        table.row(vec![
            host.name.clone(),
            host.state.clone(),
            yes_no(host.connected),
            host.advertise_addr.clone(),
            output::labels(&host.labels),
            if host.connected {
                "now".to_string()
            } else {
                output::ago(host.last_seen_unix_ms, now)
            },
            if host.agent_version.is_empty() {
                "-".to_string()
            } else {
                format!("{} {}", host.agent_version, host.agent_arch)
            },
            output::until(host.certificate_not_after_unix_ms, now),
            apps,
        ]);
    }
    table.print();
    if !response.next_after.is_empty() {
        println!(
            "{} of {} hosts; the next page: fleetctl hosts --limit {} --after {}",
            response.hosts.len(),
            response.total,
            limit.unwrap_or_default(),
            response.next_after
        );
    }
    Ok(response)
}

/// Hosts fetched per call when every host is listed: each answer stays far below gRPC's
/// 4 MiB message limit however large the fleet.
const HOSTS_PAGE: u32 = 1000;

/// Every host, page by page, without printing (the demo polls it).
pub async fn list_hosts(ctx: &Context) -> Result<pb::ListHostsResponse, CliError> {
    let mut all = list_hosts_page(ctx, HOSTS_PAGE, "").await?;
    // Bounded: each page moves past the last name of the one before.
    while !all.next_after.is_empty() {
        let mut page = list_hosts_page(ctx, HOSTS_PAGE, &all.next_after).await?;
        if page.hosts.is_empty() {
            break;
        }
        all.hosts.append(&mut page.hosts);
        all.next_after = page.next_after;
        all.total = page.total;
    }
    Ok(all)
}

/// One page of hosts: at most `limit`, named after `after`.
pub async fn list_hosts_page(
    ctx: &Context,
    limit: u32,
    after: &str,
) -> Result<pb::ListHostsResponse, CliError> {
    Ok(ctx
        .client()
        .list_hosts(pb::ListHostsRequest {
            limit,
            after: after.to_string(),
        })
        .await
        .map_err(|status| ctx.error(status))?
        .into_inner())
}

/// `fleetctl status [APP]`: per host, each app's desired and running version and instance
/// state, then the rollouts in progress.
pub async fn status(
    ctx: &Context,
    app: Option<&str>,
    all_hosts: bool,
) -> Result<pb::StatusResponse, CliError> {
    let response = ctx
        .client()
        .status(pb::StatusRequest {
            app: app.unwrap_or_default().to_string(),
            all_hosts,
        })
        .await
        .map_err(|status| ctx.error(status))?
        .into_inner();
    if ctx.json() {
        output::print_json(&response);
        return Ok(response);
    }
    print!(
        "{}",
        render_status(&response, app, fleet_proto::now_unix_ms())
    );
    Ok(response)
}

/// The text of `fleetctl status`.
pub fn render_status(response: &pb::StatusResponse, app: Option<&str>, now: i64) -> String {
    let mut text = String::new();
    let mut table = Table::new(&[
        "HOST",
        "STATE",
        "CONNECTED",
        "APP",
        "DESIRED",
        "RUNNING",
        "INSTANCE",
        "SINCE",
    ]);
    let mut problems = Vec::new();
    let mut any_drift = false;
    for host in naturally_sorted(&response.hosts) {
        let host_apps: Vec<&pb::HostApp> = host
            .apps
            .iter()
            .filter(|host_app| app.is_none_or(|only| host_app.app == only))
            .collect();
        if host_apps.is_empty() {
            table.row(vec![
                host.name.clone(),
                host.state.clone(),
                yes_no(host.connected),
            ]);
        }
        for host_app in host_apps {
            let actual = host_app.actual.clone().unwrap_or_default();
            let drift = !actual.version.is_empty() && actual.version != host_app.desired_version;
            any_drift |= drift;
            table.row(vec![
                host.name.clone(),
                host.state.clone(),
                yes_no(host.connected),
                host_app.app.clone(),
                host_app.desired_version.clone(),
                if drift {
                    format!("{} *", actual.version)
                } else {
                    actual.version.clone()
                },
                output::instance_state_name(&actual).to_string(),
                output::ago(actual.since_unix_ms, now),
            ]);
            let state = output::instance_state(&actual);
            if matches!(state, Some(InstanceState::Failed | InstanceState::Crashed))
                && !actual.message.is_empty()
            {
                problems.push(format!(
                    "{} {}@{} {}: {}",
                    host.name,
                    host_app.app,
                    actual.version,
                    output::instance_state_name(&actual),
                    actual.message
                ));
            }
        }
    }
    if response.hosts_omitted > 0 {
        text.push_str(&render_summary(response));
    } else if table.is_empty() {
        text.push_str("no hosts yet: start fleet-agent on a host (or run `fleetctl demo`)\n");
    } else {
        text.push_str(&table.render());
        if any_drift {
            text.push_str(
                "(* running differs from desired: a rollout or a restart is under way)\n",
            );
        }
    }
    for problem in problems {
        text.push_str(&problem);
        text.push('\n');
    }
    if !response.deployments.is_empty() {
        text.push_str("deployments:\n");
        text.push_str(&render_deployments(&response.deployments, now));
    }
    if response.active_rollouts.is_empty() {
        text.push_str("no rollout in progress\n");
    } else {
        text.push_str("rollouts in progress:\n");
        for rollout in &response.active_rollouts {
            let wave = if rollout.waves.is_empty() {
                "not planned yet".to_string()
            } else {
                format!(
                    "wave {}/{}",
                    (rollout.current_wave as usize + 1).min(rollout.waves.len()),
                    rollout.waves.len()
                )
            };
            text.push_str(&format!(
                "  {}  {}@{}  {}  {wave}  started {} by {}\n",
                rollout.id,
                rollout.app,
                rollout.version,
                rollout.state,
                output::ago(rollout.started_unix_ms, now),
                dash(&rollout.started_by),
            ));
        }
    }
    text
}

/// A large fleet's status: hosts counted by state and by what they run of each app.
fn render_summary(response: &pb::StatusResponse) -> String {
    let summary = response.summary.clone().unwrap_or_default();
    let states = summary
        .by_state
        .iter()
        .map(|(state, n)| format!("{n} {state}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut text = format!(
        "{} hosts ({states}), {} connected\n",
        summary.hosts, summary.connected
    );
    let mut table = Table::new(&["APP", "DESIRED", "RUNNING", "INSTANCE", "HOSTS"]);
    for count in &summary.apps {
        table.row(vec![
            count.app.clone(),
            dash(&count.desired_version).to_string(),
            dash(&count.version).to_string(),
            dash(&count.state).to_string(),
            count.hosts.to_string(),
        ]);
    }
    if !table.is_empty() {
        text.push_str(&table.render());
    }
    text.push_str(&format!(
        "({} hosts not listed one by one: `fleetctl hosts --limit 100` pages them, `fleetctl status --all-hosts` lists them all)\n",
        response.hosts_omitted
    ));
    text
}

/// Hosts in natural order of names (`web-2` before `web-10`), whatever order they came in.
fn naturally_sorted(hosts: &[pb::Host]) -> Vec<&pb::Host> {
    let mut sorted: Vec<&pb::Host> = hosts.iter().collect();
    sorted.sort_by(|a, b| fleet_proto::names::natural_cmp(&a.name, &b.name));
    sorted
}

fn yes_no(value: bool) -> String {
    if value { "yes" } else { "no" }.to_string()
}

fn dash(text: &str) -> &str {
    if text.is_empty() {
        "-"
    } else {
        text
    }
}

// ---------------------------------------------------------------- history, events

/// `fleetctl history APP`.
pub async fn history(ctx: &Context, app: &str, limit: u32) -> Result<(), CliError> {
    let response = ctx
        .client()
        .history(pb::HistoryRequest {
            app: app.to_string(),
            limit,
        })
        .await
        .map_err(|status| ctx.error(status))?
        .into_inner();
    if ctx.json() {
        output::print_json(&response);
        return Ok(());
    }
    if response.rollouts.is_empty() && response.convergences.is_empty() {
        println!("{app} has no rollouts yet: start one with `fleetctl rollout {app} VERSION`");
        return Ok(());
    }
    let now = fleet_proto::now_unix_ms();
    // Rollouts and convergences, newest first.
    let mut entries: Vec<(i64, String)> = response
        .rollouts
        .iter()
        .map(|rollout| (rollout.started_unix_ms, render_rollout(rollout, now)))
        .chain(response.convergences.iter().map(|convergence| {
            (
                convergence.started_unix_ms,
                render_convergence(convergence, now),
            )
        }))
        .collect();
    entries.sort_by_key(|(started, _)| std::cmp::Reverse(*started));
    let text: Vec<String> = entries.into_iter().map(|(_, text)| text).collect();
    print!("{}", text.join("\n"));
    Ok(())
}

/// A convergence for people: one line (host, from -> to, result, why, deployment, when), and
/// what went wrong when it did not pass.
pub fn render_convergence(convergence: &pb::Convergence, now: i64) -> String {
    let version = |v: &str| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.to_string()
        }
    };
    let mut text = format!(
        "{}  {} {} -> {} on {}  {}  {}  deployment {}  {}  took {}\n",
        convergence.id,
        convergence.app,
        version(&convergence.from_version),
        version(&convergence.to_version),
        convergence.host,
        convergence.result,
        dash(&convergence.why),
        dash(&convergence.deployment),
        output::ago(convergence.started_unix_ms, now),
        if convergence.finished_unix_ms > 0 {
            output::took(convergence.started_unix_ms, convergence.finished_unix_ms)
        } else {
            format!(
                "{} so far",
                output::took(
                    convergence.started_unix_ms,
                    now.max(convergence.started_unix_ms)
                )
            )
        },
    );
    if !convergence.message.is_empty()
        && matches!(convergence.result.as_str(), "failed" | "superseded")
    {
        text.push_str(&format!("  {}\n", convergence.message));
    }
    text
}

/// A rollout for people: one summary line, its message, and each wave's host results.
pub fn render_rollout(rollout: &pb::Rollout, now: i64) -> String {
    let mut text = format!(
        "{}  {}@{}{}  {}  by {}  {}  took {}\n",
        rollout.id,
        rollout.app,
        rollout.version,
        if rollout.is_rollback {
            " (rollback)"
        } else {
            ""
        },
        rollout.state,
        dash(&rollout.started_by),
        output::ago(rollout.started_unix_ms, now),
        if rollout.finished_unix_ms > 0 {
            output::took(rollout.started_unix_ms, rollout.finished_unix_ms)
        } else {
            format!(
                "{} so far",
                output::took(rollout.started_unix_ms, now.max(rollout.started_unix_ms))
            )
        },
    );
    if !rollout.message.is_empty() {
        text.push_str(&format!("  {}\n", rollout.message));
    }
    if rollout.max_unavailable > 0 {
        text.push_str(&format!(
            "  at most {} host(s) unavailable{}\n",
            rollout.max_unavailable,
            if rollout.unavailable_at_start.is_empty() {
                String::new()
            } else {
                format!(
                    "; already down at the start: {}",
                    rollout.unavailable_at_start.join(", ")
                )
            }
        ));
    }
    if rollout.hold_until_unix_ms > now {
        text.push_str(&format!(
            "  canary passed: widening in {}\n",
            output::took(now, rollout.hold_until_unix_ms)
        ));
    }
    let has_canary = !rollout.is_rollback
        && rollout
            .request
            .as_ref()
            .is_some_and(|request| request.canary > 0);
    for (wave_idx, wave) in rollout.waves.iter().enumerate() {
        let hosts = wave
            .hosts
            .iter()
            .map(|wave_host| {
                let from = if wave_host.previous_version.is_empty() {
                    String::new()
                } else {
                    format!(" (was {})", wave_host.previous_version)
                };
                format!("{} {}{from}", wave_host.host, wave_host.result)
            })
            .collect::<Vec<_>>()
            .join(", ");
        text.push_str(&format!(
            "  wave {}{} {}: {}\n",
            wave_idx + 1,
            if wave_idx == 0 && has_canary {
                " (canary)"
            } else {
                ""
            },
            wave.state,
            if hosts.is_empty() { "no hosts" } else { &hosts },
        ));
        for wave_host in &wave.hosts {
            if !wave_host.message.is_empty()
                && matches!(
                    wave_host.result.as_str(),
                    "failed" | "rolled_back" | "skipped"
                )
            {
                // A failed check's message carries the app's last log lines, one per line.
                let message = wave_host.message.replace('\n', "\n      ");
                text.push_str(&format!("    {}: {message}\n", wave_host.host));
            }
        }
    }
    text
}

/// `fleetctl events [--follow] [--limit N]`: one line (or one JSON object) per event.
pub async fn events(ctx: &Context, follow: bool, limit: u32) -> Result<(), CliError> {
    let mut stream = ctx
        .client()
        .events(pb::EventsRequest { follow, limit })
        .await
        .map_err(|status| ctx.error(status))?
        .into_inner();
    let mut n_events = 0u64;
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(event) => event,
            // The connection went while following: say which controller, and how to go on.
            Err(status) if follow && lost_mid_stream(&status) => {
                return Err(CliError::Unreachable(format!(
                    "lost the controller at {} while following events ({:?}: {}); `fleetctl events` shows what happened since, and `fleetctl events --follow` follows again",
                    ctx.connection.url,
                    status.code(),
                    status.message()
                )))
            }
            Err(status) => return Err(ctx.error(status)),
        };
        n_events += 1;
        if ctx.json() {
            output::print_json_line(&event);
        } else {
            println!("{}", render_event(&event));
        }
    }
    if n_events == 0 && !ctx.json() {
        println!("no events yet");
    }
    Ok(())
}

/// `fleetctl logs`: the app's last lines on each host (prefixed with the host's name unless
/// one host was asked for), then, with `--follow`, new lines until Ctrl-C. A host whose log
/// cannot be read is said on stderr, and the exit status is then 1.
pub async fn logs(
    ctx: &Context,
    app: &str,
    host: Option<String>,
    lines: u32,
    follow: bool,
) -> Result<(), CliError> {
    let one_host = host.is_some();
    let mut stream = ctx
        .client()
        .logs(pb::LogsRequest {
            app: app.to_string(),
            host: host.unwrap_or_default(),
            lines,
            follow,
        })
        .await
        .map_err(|status| ctx.error(status))?
        .into_inner();
    let mut failed_hosts = Vec::new();
    while let Some(line) = stream.next().await {
        let line = line.map_err(|status| ctx.error(status))?;
        if ctx.json() {
            output::print_json_line(&line);
        } else if !line.error.is_empty() {
            eprintln!("{}: {}", line.host, line.error);
        } else if one_host {
            println!("{}", line.line);
        } else {
            println!("{}: {}", line.host, line.line);
        }
        if !line.error.is_empty() {
            failed_hosts.push(line.host);
        }
    }
    if failed_hosts.is_empty() {
        Ok(())
    } else {
        Err(CliError::Failed(format!(
            "the log of app {app} could not be read on {}",
            failed_hosts.join(", ")
        )))
    }
}

/// One event as a line: time, kind, app and host, message, who.
pub fn render_event(event: &pb::Event) -> String {
    let mut line = format!("{}  {}", output::utc_time(event.unix_ms), event.kind);
    if !event.app.is_empty() {
        line.push_str(&format!("  app={}", event.app));
    }
    if !event.host.is_empty() {
        line.push_str(&format!("  host={}", event.host));
    }
    if !event.message.is_empty() {
        line.push_str(&format!("  {}", event.message));
    }
    if !event.actor.is_empty() {
        line.push_str(&format!("  ({})", event.actor));
    }
    line
}

// ---------------------------------------------------------------- rollout, rollback

/// Everything `fleetctl rollout APP VERSION` sends, already checked.
#[derive(Debug, Clone)]
pub struct RolloutOptions {
    pub app: String,
    pub version: String,
    pub selector: Vec<(String, String)>,
    pub canary: u32,
    /// `N` or `P%`, as `parse::parse_batch` returns it.
    pub batch: String,
    pub pause_after_canary: Duration,
    pub smoke_timeout: Duration,
    pub min_healthy: Option<Duration>,
    /// `N` or `P%`, as `parse::parse_max_unavailable` returns it.
    pub max_unavailable: Option<String>,
    pub auto_rollback: bool,
    pub detach: bool,
    pub skip_lost: bool,
    /// Only print the plan the controller would follow; nothing changes.
    pub dry_run: bool,
}

/// How a followed rollout ended.
#[derive(Debug, Clone)]
pub struct RolloutOutcome {
    pub rollout: pb::Rollout,
    /// The exit code: 0 when it succeeded (or was detached), 1 otherwise.
    pub exit_code: u8,
}

/// `fleetctl rollout APP VERSION ...`.
pub async fn rollout(ctx: &Context, options: &RolloutOptions) -> Result<RolloutOutcome, CliError> {
    let request = pb::StartRolloutRequest {
        skip_lost: options.skip_lost,
        app: options.app.clone(),
        version: options.version.clone(),
        selector: options.selector.iter().cloned().collect(),
        canary: options.canary,
        batch: options.batch.clone(),
        pause_after_canary_ms: duration_ms(options.pause_after_canary),
        smoke_timeout_ms: duration_ms(options.smoke_timeout),
        no_auto_rollback: !options.auto_rollback,
        detach: options.detach,
        min_healthy_ms: options.min_healthy.map(duration_ms),
        max_unavailable: options.max_unavailable.clone().unwrap_or_default(),
        dry_run: options.dry_run,
    };
    let started = Instant::now();
    let stream = ctx
        .client()
        .start_rollout(request)
        .await
        .map_err(|status| ctx.error(status))?
        .into_inner();
    if options.dry_run {
        return print_plan(ctx, stream).await;
    }
    follow_progress(ctx, stream, started, options.detach).await
}

/// `rollout --dry-run`: the one answer holds the plan; printed on stdout, it is the result.
async fn print_plan(
    ctx: &Context,
    mut stream: tonic::Streaming<pb::RolloutProgress>,
) -> Result<RolloutOutcome, CliError> {
    let mut planned = None;
    while let Some(progress) = stream.next().await {
        let progress = progress.map_err(|status| ctx.error(status))?;
        planned = progress.rollout.or(planned);
    }
    let rollout = planned.ok_or_else(|| {
        CliError::Failed(
            "the controller answered the dry run without a plan: is it older than this fleetctl? \
             `fleetctl --version` and the controller's version should match"
                .to_string(),
        )
    })?;
    if rollout.state != "planned" {
        // A controller that does not know dry runs would have started the rollout.
        return Err(CliError::Failed(format!(
            "the controller does not know --dry-run and started rollout {} instead; follow it with `fleetctl rollout status {}` or stop it with `fleetctl rollout abort {}`",
            rollout.id, rollout.id, rollout.id
        )));
    }
    if ctx.json() {
        output::print_json(&rollout);
    } else {
        print!("{}", render_plan(&rollout));
    }
    Ok(RolloutOutcome {
        rollout,
        exit_code: EXIT_OK,
    })
}

/// A dry run's plan for people: each wave and its hosts (with the release each runs now), the
/// budget, the pause after the canary, and that nothing changed.
pub fn render_plan(rollout: &pb::Rollout) -> String {
    let request = rollout.request.clone().unwrap_or_default();
    let n_hosts: usize = rollout.waves.iter().map(|wave| wave.hosts.len()).sum();
    let mut text = format!(
        "plan: {}@{} to {n_hosts} host(s) in {} wave(s) (dry run: nothing was changed)\n",
        rollout.app,
        rollout.version,
        rollout.waves.len()
    );
    for (wave_idx, wave) in rollout.waves.iter().enumerate() {
        let hosts = wave
            .hosts
            .iter()
            .map(|wave_host| {
                if wave_host.previous_version.is_empty() {
                    format!("{} (new)", wave_host.host)
                } else if wave_host.previous_version == rollout.version {
                    format!("{} (runs {} already)", wave_host.host, rollout.version)
                } else {
                    format!("{} (from {})", wave_host.host, wave_host.previous_version)
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        text.push_str(&format!(
            "  wave {}{}: {hosts}\n",
            wave_idx + 1,
            if wave_idx == 0 && request.canary > 0 {
                " (canary)"
            } else {
                ""
            },
        ));
    }
    text.push_str(&format!(
        "  budget: at most {} host(s) unavailable at once{}\n",
        rollout.max_unavailable,
        if rollout.unavailable_at_start.is_empty() {
            String::new()
        } else {
            format!(
                "; already down: {}",
                rollout.unavailable_at_start.join(", ")
            )
        }
    ));
    if request.pause_after_canary_ms > 0 {
        text.push_str(&format!(
            "  after the canary: a pause of {}\n",
            fleet_proto::duration::format_duration(Duration::from_millis(
                request.pause_after_canary_ms
            ))
        ));
    }
    text.push_str(&format!(
        "  on failure: {}\n",
        if request.no_auto_rollback {
            "halt, hosts stay where they are"
        } else {
            "halt and roll back"
        }
    ));
    text
}

/// `fleetctl rollback APP [--to VERSION] [--max-unavailable N|P%] [--detach]`.
pub async fn rollback(
    ctx: &Context,
    app: &str,
    selector: &[(String, String)],
    to_version: Option<&str>,
    max_unavailable: Option<&str>,
    detach: bool,
) -> Result<RolloutOutcome, CliError> {
    let started = Instant::now();
    let stream = ctx
        .client()
        .rollback(pb::RollbackRequest {
            app: app.to_string(),
            to_version: to_version.unwrap_or_default().to_string(),
            detach,
            selector: selector.iter().cloned().collect(),
            max_unavailable: max_unavailable.unwrap_or_default().to_string(),
        })
        .await
        .map_err(|status| ctx.error(status))?
        .into_inner();
    follow_progress(ctx, stream, started, detach).await
}

fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Prints each progress line on stderr as it arrives, then the outcome on stdout.
async fn follow_progress(
    ctx: &Context,
    mut stream: tonic::Streaming<pb::RolloutProgress>,
    started: Instant,
    detach: bool,
) -> Result<RolloutOutcome, CliError> {
    let mut last: Option<pb::Rollout> = None;
    // A bar on a terminal, else the lines alone (as scripts, CI logs and tests read them).
    let mut printer = (!detach).then(|| output::ProgressPrinter::new(started));
    while let Some(progress) = stream.next().await {
        let progress = match (progress, &last) {
            (Ok(progress), _) => progress,
            // The connection went in the middle: the rollout goes on without fleetctl.
            (Err(status), Some(rollout)) if lost_mid_stream(&status) => {
                if let Some(printer) = printer.take() {
                    printer.finish();
                }
                return Err(CliError::Unreachable(lost_rollout_stream(
                    &ctx.connection.url,
                    rollout,
                    &status,
                )));
            }
            (Err(status), _) => return Err(ctx.error(status)),
        };
        if let Some(printer) = &printer {
            if !progress.line.is_empty() {
                printer.line(&progress.line);
            }
            if let Some(rollout) = &progress.rollout {
                printer.update(rollout);
            }
        }
        if let Some(rollout) = progress.rollout {
            last = Some(rollout);
        }
    }
    if let Some(printer) = printer {
        printer.finish();
    }
    let rollout = last.ok_or_else(|| {
        CliError::Failed(
            "the controller ended the rollout stream without saying what happened; check `fleetctl status`"
                .to_string(),
        )
    })?;
    if detach {
        if ctx.json() {
            output::print_json(&rollout);
        } else {
            println!("{}", rollout.id);
        }
        return Ok(RolloutOutcome {
            rollout,
            exit_code: EXIT_OK,
        });
    }
    let exit_code = if rollout.state == "succeeded" {
        EXIT_OK
    } else {
        EXIT_FAILED
    };
    if ctx.json() {
        output::print_json(&rollout);
    } else {
        print!("{}", render_rollout(&rollout, fleet_proto::now_unix_ms()));
        if let Some(hint) = rollout_hint(&rollout) {
            println!("{hint}");
        }
    }
    Ok(RolloutOutcome { rollout, exit_code })
}

/// Whether a rollout stream's error is the connection lost (the controller died or went
/// away) rather than the controller's own answer.
fn lost_mid_stream(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown
    ) || std::error::Error::source(status).is_some()
}

/// The error for a rollout stream lost in the middle: which controller went, and how to watch
/// the rollout again (it goes on without fleetctl; no verb re-attaches to its progress).
fn lost_rollout_stream(url: &str, rollout: &pb::Rollout, status: &tonic::Status) -> String {
    format!(
        "lost the controller at {url} while following rollout {id} of {app} ({code:?}: {message}); the rollout goes on without fleetctl: watch it with `fleetctl rollout status {id}` and see how it ended with `fleetctl history {app}`",
        id = rollout.id,
        app = rollout.app,
        code = status.code(),
        message = status.message(),
    )
}

/// What the user can do next when a followed rollout did not succeed.
fn rollout_hint(rollout: &pb::Rollout) -> Option<String> {
    let id = &rollout.id;
    match rollout.state.as_str() {
        "succeeded" => None,
        "paused" => Some(format!(
            "rollout {id} is paused: continue it with `fleetctl rollout resume {id}` or stop it with `fleetctl rollout abort {id}`"
        )),
        "pending" | "running" => Some(format!(
            "rollout {id} is still {}: follow it with `fleetctl rollout status {id}`",
            rollout.state
        )),
        "rolled_back" => Some(format!(
            "the hosts went back to their previous release; see `fleetctl history {}`",
            rollout.app
        )),
        _ => Some(format!(
            "see `fleetctl status {}` for what runs where now",
            rollout.app
        )),
    }
}

/// Which action `fleetctl rollout ACTION ROLLOUT_ID` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutActionKind {
    Status,
    Pause,
    Resume,
    Abort,
}

/// `fleetctl rollout status|pause|resume|abort ROLLOUT_ID`.
pub async fn rollout_action(
    ctx: &Context,
    action: RolloutActionKind,
    rollout_id: &str,
) -> Result<pb::Rollout, CliError> {
    let reference = pb::RolloutRef {
        id: rollout_id.to_string(),
    };
    let mut client = ctx.client();
    let response = match action {
        RolloutActionKind::Status => client.get_rollout(reference).await,
        RolloutActionKind::Pause => client.pause_rollout(reference).await,
        RolloutActionKind::Resume => client.resume_rollout(reference).await,
        RolloutActionKind::Abort => client.abort_rollout(reference).await,
    };
    let rollout = response.map_err(|status| ctx.error(status))?.into_inner();
    if ctx.json() {
        output::print_json(&rollout);
    } else {
        print!("{}", render_rollout(&rollout, fleet_proto::now_unix_ms()));
    }
    Ok(rollout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_controllers_table_puts_the_leader_first_and_says_when_there_is_none() {
        let controller = |url: &str, leader: bool| pb::Controller {
            url: url.into(),
            leader,
            leading_since_unix_ms: if leader { 40_000 } else { 0 },
            up_since_unix_ms: 10_000,
            http: String::new(),
        };
        let mut response = pb::ListControllersResponse {
            controllers: vec![
                controller("https://127.0.0.1:7701", false),
                controller("https://127.0.0.1:7702", true),
            ],
            store: "etcd at http://127.0.0.1:2379 prefix /fleet".into(),
            answered_by: "https://127.0.0.1:7701".into(),
        };
        let text = render_controllers(&response, 100_000);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[1].starts_with("https://127.0.0.1:7702") && lines[1].contains("leader"),
            "{text}"
        );
        assert!(
            lines[2].starts_with("https://127.0.0.1:7701") && lines[2].contains("follower"),
            "{text}"
        );
        assert!(
            text.ends_with("state: etcd at http://127.0.0.1:2379 prefix /fleet\n"),
            "{text}"
        );
        assert!(!text.contains("no leader"), "{text}");
        response.controllers[1].leader = false;
        assert!(render_controllers(&response, 100_000).contains("no leader right now"));
    }

    fn sample_rollout() -> pb::Rollout {
        pb::Rollout {
            id: "r-1".into(),
            app: "web".into(),
            version: "1.1.0".into(),
            state: "rolled_back".into(),
            started_by: "ann@box".into(),
            started_unix_ms: 1_000_000,
            finished_unix_ms: 1_042_000,
            waves: vec![
                pb::Wave {
                    state: "passed".into(),
                    hosts: vec![pb::WaveHost {
                        host: "demo-1".into(),
                        previous_version: "1.0.0".into(),
                        result: "rolled_back".into(),
                        message: "went back to 1.0.0".into(),
                    }],
                },
                pb::Wave {
                    state: "failed".into(),
                    hosts: vec![pb::WaveHost {
                        host: "demo-2".into(),
                        previous_version: "1.0.0".into(),
                        result: "failed".into(),
                        message: "smoke check returned 500".into(),
                    }],
                },
            ],
            current_wave: 1,
            message: "wave 2 failed on demo-2".into(),
            request: Some(pb::StartRolloutRequest {
                canary: 1,
                ..Default::default()
            }),
            is_rollback: false,
            hold_until_unix_ms: 0,
            max_unavailable: 2,
            unavailable_at_start: vec!["demo-3: drained".into()],
        }
    }

    #[test]
    fn rollout_text_names_every_host_result() {
        let text = render_rollout(&sample_rollout(), 1_100_000);
        assert_eq!(
            text,
            "r-1  web@1.1.0  rolled_back  by ann@box  1m ago  took 42.0s\n\
             \x20 wave 2 failed on demo-2\n\
             \x20 at most 2 host(s) unavailable; already down at the start: demo-3: drained\n\
             \x20 wave 1 (canary) passed: demo-1 rolled_back (was 1.0.0)\n\
             \x20   demo-1: went back to 1.0.0\n\
             \x20 wave 2 failed: demo-2 failed (was 1.0.0)\n\
             \x20   demo-2: smoke check returned 500\n"
        );
        assert!(rollout_hint(&sample_rollout()).is_some());
    }

    #[test]
    fn a_rollout_in_its_canary_pause_says_when_it_widens() {
        let mut rollout = sample_rollout();
        rollout.hold_until_unix_ms = 1_100_000 + 90_000;
        assert!(render_rollout(&rollout, 1_100_000).contains("canary passed: widening in 1m30s\n"));
        rollout.hold_until_unix_ms = 1_000;
        assert!(!render_rollout(&rollout, 1_100_000).contains("widening"));
    }

    #[test]
    fn a_large_fleet_status_is_a_summary() {
        let response = pb::StatusResponse {
            hosts_omitted: 10_000,
            summary: Some(pb::StatusSummary {
                hosts: 10_000,
                connected: 9_999,
                by_state: [("ready".to_string(), 9_999), ("lost".to_string(), 1)]
                    .into_iter()
                    .collect(),
                apps: vec![pb::StatusCount {
                    app: "sim".into(),
                    desired_version: "1.0".into(),
                    version: "1.0".into(),
                    state: "running".into(),
                    hosts: 9_999,
                }],
            }),
            ..Default::default()
        };
        let text = render_status(&response, None, 100_000);
        assert!(text.contains("10000 hosts ("), "{text}");
        assert!(text.contains("9999 ready"), "{text}");
        assert!(text.contains("9999 connected"), "{text}");
        assert!(
            text.contains("sim  1.0      1.0      running   9999"),
            "{text}"
        );
        assert!(text.contains("fleetctl hosts --limit 100"), "{text}");
        assert!(!text.contains("no hosts yet"), "{text}");
    }

    #[test]
    fn status_text_shows_drift_and_failures() {
        let response = pb::StatusResponse {
            hosts: vec![
                pb::Host {
                    name: "demo-1".into(),
                    state: "ready".into(),
                    connected: true,
                    apps: vec![pb::HostApp {
                        app: "web".into(),
                        desired_version: "1.1.0".into(),
                        actual: Some(pb::InstanceReport {
                            app: "web".into(),
                            version: "1.0.0".into(),
                            state: pb::InstanceState::Failed.into(),
                            message: "exit status 1".into(),
                            since_unix_ms: 40_000,
                            ..Default::default()
                        }),
                    }],
                    ..Default::default()
                },
                pb::Host {
                    name: "demo-2".into(),
                    state: "lost".into(),
                    ..Default::default()
                },
            ],
            active_rollouts: vec![],
            deployments: vec![pb::Deployment {
                app: "web".into(),
                selector: [("env".to_string(), "prod".to_string())].into(),
                version: "1.1.0".into(),
                hosts_matching: 2,
                hosts_on_release: 1,
                hosts_healthy: 0,
                updated_unix_ms: 40_000,
                updated_by: "ci".into(),
                drift: vec![pb::Drift {
                    host: "demo-1".into(),
                    why: "crash-looping: restarted 3 time(s)".into(),
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let text = render_status(&response, None, 100_000);
        assert!(
            text.contains("web  env=prod  1.1.0    2      1           0        1m ago  ci"),
            "{text}"
        );
        assert!(
            text.contains("drift: demo-1 web@1.1.0 (env=prod): crash-looping: restarted 3 time(s)"),
            "{text}"
        );
        assert!(
            text.contains("demo-1  ready  yes        web  1.1.0    1.0.0 *  failed    1m ago"),
            "{text}"
        );
        assert!(text.contains("demo-2  lost   no"), "{text}");
        assert!(
            text.contains("demo-1 web@1.0.0 failed: exit status 1"),
            "{text}"
        );
        assert!(text.contains("no rollout in progress"), "{text}");
    }

    #[test]
    fn status_lists_hosts_in_natural_order() {
        let host = |name: &str| pb::Host {
            name: name.into(),
            state: "ready".into(),
            ..Default::default()
        };
        let response = pb::StatusResponse {
            hosts: vec![host("web-10"), host("web-2"), host("web-1")],
            ..Default::default()
        };
        let text = render_status(&response, None, 0);
        let order: Vec<&str> = text
            .lines()
            .filter_map(|line| line.split_whitespace().next())
            .filter(|first| first.starts_with("web-"))
            .collect();
        assert_eq!(order, ["web-1", "web-2", "web-10"], "{text}");
    }

    #[test]
    fn a_plan_shows_waves_hosts_and_budget() {
        let wave_host = |host: &str, previous: &str| pb::WaveHost {
            host: host.into(),
            previous_version: previous.into(),
            result: "pending".into(),
            ..Default::default()
        };
        let rollout = pb::Rollout {
            id: "dry-run".into(),
            app: "web".into(),
            version: "1.1.0".into(),
            state: "planned".into(),
            waves: vec![
                pb::Wave {
                    state: "pending".into(),
                    hosts: vec![wave_host("web-1", "1.0.0")],
                },
                pb::Wave {
                    state: "pending".into(),
                    hosts: vec![wave_host("web-2", "1.1.0"), wave_host("web-10", "")],
                },
            ],
            max_unavailable: 2,
            unavailable_at_start: vec!["web-3: drained".into()],
            request: Some(pb::StartRolloutRequest {
                canary: 1,
                pause_after_canary_ms: 300_000,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            render_plan(&rollout),
            "plan: web@1.1.0 to 3 host(s) in 2 wave(s) (dry run: nothing was changed)\n\
             \x20 wave 1 (canary): web-1 (from 1.0.0)\n\
             \x20 wave 2: web-2 (runs 1.1.0 already), web-10 (new)\n\
             \x20 budget: at most 2 host(s) unavailable at once; already down: web-3: drained\n\
             \x20 after the canary: a pause of 5m0s\n\
             \x20 on failure: halt and roll back\n"
        );
    }

    #[test]
    fn event_lines() {
        let event = pb::Event {
            seq: 1,
            unix_ms: 0,
            actor: "ann@box".into(),
            kind: "rollout_started".into(),
            app: "web".into(),
            host: String::new(),
            message: "web@1.1.0".into(),
        };
        assert_eq!(
            render_event(&event),
            "1970-01-01 00:00:00Z  rollout_started  app=web  web@1.1.0  (ann@box)"
        );
    }

    #[tokio::test]
    async fn artifact_stream_sends_header_then_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tar.gz");
        let bytes: Vec<u8> = (0..(UPLOAD_CHUNK_BYTES * 2 + 10))
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(&path, &bytes).unwrap();
        let file = tokio::fs::File::open(&path).await.unwrap();
        let (tx, _rx) = tokio::sync::oneshot::channel();
        let header = pb::CreateReleaseRequest {
            body: Some(pb::create_release_request::Body::Header(
                pb::ReleaseHeader::default(),
            )),
        };
        let messages: Vec<_> = artifact_stream(header, file, tx).collect().await;
        assert_eq!(messages.len(), 4);
        assert!(matches!(
            messages[0].body,
            Some(pb::create_release_request::Body::Header(_))
        ));
        let mut sent = Vec::new();
        for message in &messages[1..] {
            let Some(pb::create_release_request::Body::Chunk(chunk)) = &message.body else {
                panic!("not a chunk")
            };
            assert!(chunk.len() <= UPLOAD_CHUNK_BYTES);
            sent.extend_from_slice(chunk);
        }
        assert_eq!(sent, bytes);
    }
}
