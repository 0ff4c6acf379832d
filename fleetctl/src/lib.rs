//! fleetctl, the one tool an operator or a CI job touches: the command line (`args`), how it
//! reaches the controller and maps failures to exit codes (`client`), how its credential renews
//! itself (`renewal`), how it prints (`output`), one function per verb (`commands`), `init`,
//! the local `demo` and the shell's completions and manual pages (`shell`). `run` dispatches a parsed
//! command line and returns the process exit code; the binary only parses and calls it.
//!
//! **Architecture Invariant:** fleetctl talks to the controller only through FleetService; it
//! never opens the controller's store or data directory.

pub mod args;
pub mod bootstrap;
pub mod client;
pub mod commands;
pub mod credential_files;
pub mod demo;
pub mod host_commands;
pub mod init;
pub mod output;
pub mod parse;
pub mod redirect;
pub mod renewal;
pub mod shell;
pub mod ssh;
pub mod trust;
pub mod upgrade;

use args::{Cli, Command, ReleaseCommand, RolloutAction};
use client::{CliError, EXIT_OK};
use commands::{Context, RolloutActionKind, RolloutOptions};
use output::OutputFormat;
use std::time::Duration;

/// Runs one fleetctl command line and returns the exit code; errors are printed on stderr.
pub async fn run(cli: Cli) -> u8 {
    match run_command(cli).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error}");
            error.exit_code()
        }
    }
}

async fn run_command(cli: Cli) -> Result<u8, CliError> {
    let config_dir = cli
        .config_dir
        .clone()
        .unwrap_or_else(client::default_config_dir);
    match cli.command {
        Command::Init(init_args) => {
            let dir = init_args.dir.unwrap_or(config_dir);
            let absolute = |path: Option<std::path::PathBuf>| {
                path.map(|p| std::path::absolute(&p).unwrap_or(p).display().to_string())
            };
            let etcd = (!init_args.etcd.is_empty()).then(|| fleet_proto::etcd_config::EtcdFile {
                endpoints: init_args.etcd.clone(),
                prefix: init_args.etcd_prefix.clone(),
                ca: absolute(init_args.etcd_ca.clone()),
                cert: absolute(init_args.etcd_cert.clone()),
                key: absolute(init_args.etcd_key.clone()),
            });
            let outcome = init::init_dir_with_etcd(
                &dir,
                &init_args.listen,
                init_args.url.as_ref(),
                &init_args.http_listen,
                init_args.certificate_ttl,
                etcd.as_ref(),
            )?;
            if cli.output == OutputFormat::Json {
                output::print_json(&outcome);
            } else {
                println!(
                    "wrote {} and {}, the fleet CA {} and an admin credential (client.pem, client.key)",
                    outcome.controller_config.display(),
                    outcome.client_config.display(),
                    outcome.ca.display()
                );
                println!(
                    "next: fleet-controller --config {}; then, for each host, `fleetctl join-token create` and fleet-agent --controller {} --ca {} --join-token TOKEN ...",
                    outcome.controller_config.display(),
                    outcome.controller_url,
                    outcome.ca.display()
                );
            }
            return Ok(EXIT_OK);
        }
        Command::Demo(demo_args) => {
            if let Some(dir) = &demo_args.stop {
                return demo::stop(dir);
            }
            // The demo's steps print through the verbs' own text output; a JSON document of its
            // own would need them silenced, so it is refused rather than ignored.
            if cli.output == OutputFormat::Json {
                return Err(client::usage(
                    "demo prints its steps for people and has no JSON output: run it without --output json, and use --output json with the verbs (status, hosts, history) against a fleet",
                ));
            }
            return demo::run(demo_args.hosts, demo_args.keep).await;
        }
        Command::Completions { shell } => {
            shell::completions(shell, &mut std::io::stdout());
            return Ok(EXIT_OK);
        }
        Command::Man { dir: None } => {
            shell::man_page(&mut std::io::stdout())?;
            return Ok(EXIT_OK);
        }
        Command::Man { dir: Some(dir) } => {
            let n_pages = shell::man_pages_into(&dir)?;
            eprintln!("wrote {n_pages} manual pages into {}", dir.display());
            return Ok(EXIT_OK);
        }
        _ => {}
    }

    // Several controllers: the first that answers (a follower sends writes to its leader).
    let urls = client::resolve_controller_urls(cli.controller.as_deref(), &config_dir)?;
    // The credential renews itself once two thirds of its lifetime passed (`renewal`); not in
    // `ca rotate`, which re-issues it itself.
    let renew = match &cli.command {
        Command::Ca(_) => None,
        _ => std::fs::read_to_string(config_dir.join(client::CLIENT_CERT_FILE))
            .ok()
            .and_then(|cert_pem| renewal::before_connect(&config_dir, &cert_pem)),
    };
    let connection = client::connect_any(&urls, &config_dir).await?;
    if let Some(identity) = &renew {
        renewal::renew(&connection, &config_dir, identity).await;
    }
    let ctx = Context {
        connection,
        output: cli.output,
    };
    match cli.command {
        Command::Init(_) | Command::Demo(_) | Command::Completions { .. } | Command::Man { .. } => {
            unreachable!("handled above")
        }
        Command::Release(ReleaseCommand::Create(create)) => {
            let mut secrets = Vec::new();
            for text in &create.secrets {
                secrets.push(parse::parse_secret(text).map_err(client::usage)?);
            }
            for (key, path) in &create.secret_files {
                let value = std::fs::read_to_string(path).map_err(|e| {
                    client::usage(format!("cannot read the secret file {path} for {key}: {e}"))
                })?;
                secrets.push((key.clone(), value));
            }
            commands::release_create(
                &ctx,
                &create.app,
                &create.version,
                &create.artifact,
                &create.env,
                &secrets,
            )
            .await?;
        }
        Command::Release(ReleaseCommand::Prune(prune)) => {
            commands::release_prune(&ctx, &prune.app, prune.keep).await?
        }
        Command::Releases { app } => commands::releases(&ctx, &app).await?,
        Command::Deployments { app } => commands::deployments(&ctx, app.as_deref()).await?,
        Command::Controllers => commands::controllers(&ctx).await?,
        Command::Hosts { limit, after } => {
            commands::hosts(&ctx, limit, after.as_deref()).await?;
        }
        Command::Status { app, all_hosts } => {
            commands::status(&ctx, app.as_deref(), all_hosts).await?;
        }
        Command::History { app, limit } => commands::history(&ctx, &app, limit).await?,
        Command::Events { follow, limit } => commands::events(&ctx, follow, limit).await?,
        Command::Logs {
            app,
            host,
            lines,
            follow,
        } => commands::logs(&ctx, &app, host, lines, follow).await?,
        Command::Rollout(rollout_args) => {
            if let Some(action) = rollout_args.action {
                let (kind, rollout_id) = match action {
                    RolloutAction::Status { rollout_id } => (RolloutActionKind::Status, rollout_id),
                    RolloutAction::Pause { rollout_id } => (RolloutActionKind::Pause, rollout_id),
                    RolloutAction::Resume { rollout_id } => (RolloutActionKind::Resume, rollout_id),
                    RolloutAction::Abort { rollout_id } => (RolloutActionKind::Abort, rollout_id),
                };
                commands::rollout_action(&ctx, kind, &rollout_id).await?;
                return Ok(EXIT_OK);
            }
            let (Some(app), Some(version)) = (rollout_args.app, rollout_args.version) else {
                return Err(client::usage(
                    "rollout needs APP and VERSION, or one of status|pause|resume|abort ROLLOUT_ID",
                ));
            };
            let options = RolloutOptions {
                app,
                version,
                selector: rollout_args.selector.unwrap_or_default().0,
                canary: rollout_args.canary,
                batch: rollout_args.batch,
                pause_after_canary: rollout_args.pause_after_canary.unwrap_or(Duration::ZERO),
                smoke_timeout: rollout_args.smoke_timeout.unwrap_or(Duration::ZERO),
                min_healthy: rollout_args.min_healthy,
                max_unavailable: rollout_args.max_unavailable,
                auto_rollback: !rollout_args.no_auto_rollback,
                detach: rollout_args.detach,
                skip_lost: rollout_args.skip_lost,
                dry_run: rollout_args.dry_run,
            };
            return Ok(commands::rollout(&ctx, &options).await?.exit_code);
        }
        Command::Drain { host, deadline } => {
            return host_commands::drain(&ctx, &host, deadline.unwrap_or(Duration::ZERO)).await;
        }
        Command::Undrain { host } => host_commands::undrain(&ctx, &host).await?,
        Command::Remove { host, purge } => host_commands::remove(&ctx, &host, purge).await?,
        Command::Label { host, changes } => host_commands::label(&ctx, &host, &changes).await?,
        Command::Bootstrap(bootstrap_args) => {
            return bootstrap::bootstrap(&ctx, &config_dir, &bootstrap_args).await;
        }
        Command::Replace(replace_args) => {
            return bootstrap::replace(&ctx, &config_dir, &replace_args).await;
        }
        Command::UpgradeAgents(upgrade_args) => {
            return upgrade::upgrade_agents(&ctx, &config_dir, &upgrade_args).await;
        }
        Command::JoinToken(args::JoinTokenCommand::Create(create)) => {
            let labels = create.labels.map(|s| s.0).unwrap_or_default();
            trust::join_token_create(&ctx, create.ttl, &labels).await?;
        }
        Command::Credentials(args::CredentialsCommand::Create(create)) => {
            trust::credentials_create(&ctx, &create).await?;
        }
        Command::Credentials(args::CredentialsCommand::List) => {
            trust::credentials_list(&ctx).await?;
        }
        Command::Credentials(args::CredentialsCommand::Revoke { name }) => {
            trust::credentials_revoke(&ctx, &name).await?;
        }
        Command::Ca(args::CaCommand::Rotate(rotate)) => {
            trust::ca_rotate(&ctx, &config_dir, rotate.finish).await?;
        }
        Command::Rollback(rollback_args) => {
            let outcome = commands::rollback(
                &ctx,
                &rollback_args.app,
                &rollback_args.selector.unwrap_or_default().0,
                rollback_args.to_version.as_deref(),
                rollback_args.max_unavailable.as_deref(),
                rollback_args.detach,
            )
            .await?;
            return Ok(outcome.exit_code);
        }
    }
    Ok(EXIT_OK)
}
