//! The host lifecycle verbs for on-call staff: `drain`, `undrain`, `remove`. Drain follows the
//! host until its last instance stopped, so "drained" on the screen means the processes are
//! gone.

use crate::client::{CliError, EXIT_FAILED, EXIT_OK};
use crate::commands::Context;
use crate::output;
use crate::parse::LabelChanges;
use fleet_proto::instance_state::InstanceState;
use fleet_proto::pb;
use std::time::Duration;
use tokio_stream::StreamExt;

/// Counts a host's instances that have not stopped.
fn n_running(host: &pb::Host) -> usize {
    host.apps
        .iter()
        .filter(|a| {
            a.actual
                .as_ref()
                .is_some_and(|i| output::instance_state(i) != Some(InstanceState::Stopped))
        })
        .count()
}

/// `fleetctl drain HOST [--deadline DUR]`: exit 0 once drained, 1 when the deadline passed.
pub async fn drain(ctx: &Context, host: &str, deadline: Duration) -> Result<u8, CliError> {
    let request = pb::DrainHostRequest {
        host: host.to_string(),
        deadline_ms: deadline.as_millis() as u64,
    };
    let mut stream = ctx
        .client()
        .drain_host(request)
        .await
        .map_err(|status| ctx.error(status))?
        .into_inner();
    let mut last = None;
    while let Some(item) = stream.next().await {
        match item {
            Ok(snapshot) => {
                if !ctx.json() {
                    eprintln!(
                        "{}: {} ({} instance(s) still running)",
                        snapshot.name,
                        snapshot.state,
                        n_running(&snapshot)
                    );
                }
                last = Some(snapshot);
            }
            Err(status) if status.code() == tonic::Code::DeadlineExceeded => {
                eprintln!("error: {}", status.message());
                if let (true, Some(last)) = (ctx.json(), &last) {
                    output::print_json(last);
                }
                return Ok(EXIT_FAILED);
            }
            Err(status) => return Err(ctx.error(status)),
        }
    }
    match last {
        Some(last) if ctx.json() => output::print_json(&last),
        Some(last) => println!(
            "{} is {}: it takes no new releases; `fleetctl undrain {}` brings it back",
            last.name, last.state, last.name
        ),
        None => {}
    }
    Ok(EXIT_OK)
}

/// `fleetctl undrain HOST`.
pub async fn undrain(ctx: &Context, host: &str) -> Result<(), CliError> {
    let snapshot = ctx
        .client()
        .undrain_host(pb::HostRef {
            host: host.to_string(),
        })
        .await
        .map_err(|status| ctx.error(status))?
        .into_inner();
    if ctx.json() {
        output::print_json(&snapshot);
    } else {
        println!(
            "{} is {}: it starts its releases again",
            snapshot.name, snapshot.state
        );
    }
    Ok(())
}

/// `fleetctl label HOST k=v,... k-`.
pub async fn label(ctx: &Context, host: &str, changes: &[LabelChanges]) -> Result<(), CliError> {
    let mut request = pb::LabelHostRequest {
        host: host.to_string(),
        ..Default::default()
    };
    for change in changes {
        request.set.extend(change.set.iter().cloned());
        request.remove.extend(change.remove.iter().cloned());
    }
    let snapshot = ctx
        .client()
        .label_host(request)
        .await
        .map_err(|status| ctx.error(status))?
        .into_inner();
    if ctx.json() {
        output::print_json(&snapshot);
    } else {
        println!(
            "{} has labels {}",
            snapshot.name,
            if snapshot.labels.is_empty() {
                "(none)".to_string()
            } else {
                output::labels(&snapshot.labels)
            }
        );
    }
    Ok(())
}

/// `fleetctl remove HOST [--purge]`.
pub async fn remove(ctx: &Context, host: &str, purge: bool) -> Result<(), CliError> {
    let response = ctx
        .client()
        .remove_host(pb::RemoveHostRequest {
            host: host.to_string(),
            purge,
        })
        .await
        .map_err(|status| ctx.error(status))?
        .into_inner();
    let drained = response.host.as_ref().is_some_and(|h| h.state == "drained");
    if ctx.json() {
        output::print_json(&response);
    } else if drained {
        println!("{host} is removed: it was drained, its credential revoked, and it is forgotten");
    } else {
        println!("{host} is removed: its credential is revoked and it is forgotten");
    }
    if !ctx.json() {
        println!(
            "its agent stops its instances and itself, and disables its unit, when it next hears from the controller{}",
            if purge {
                "; it also wipes the host's releases, secrets and state"
            } else {
                ""
            }
        );
    }
    if !drained {
        eprintln!(
            "warning: {host}'s instances were not confirmed stopped (its agent was not connected, or they \
             did not stop within a minute): they may still run on that machine; stop fleet-agent there"
        );
    }
    Ok(())
}
