//! `FleetService.Logs` (`fleetctl logs`): which hosts to ask for an app's log, the requests
//! relayed down their sessions (`crate::log_relay`), and the answers merged into one stream of
//! lines, each with its host. Bounded: at most [`MAX_LINES`] lines per host, a first answer
//! within [`ANSWER_TIMEOUT`], and a follow ends when the client goes away (the agents are told
//! to stop) or the controller shuts down.

use super::store_status;
use crate::auth::{self, Role};
use crate::fleet_state::FleetState;
use crate::log_relay::LogRelay;
use fleet_proto::{names, pb};
use std::sync::Arc;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// The most lines one call may ask of each host.
pub const MAX_LINES: u32 = 10_000;
/// Lines per host when the call names no number.
pub const DEFAULT_LINES: u32 = 100;
/// How long an agent has to answer a log request at all (an agent one version behind never
/// does: it does not know the request).
pub const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub type LogsStream = ReceiverStream<Result<pb::LogLine, Status>>;

fn line_error(host: &str, error: String) -> Result<pb::LogLine, Status> {
    Ok(pb::LogLine {
        host: host.to_string(),
        line: String::new(),
        error,
    })
}

/// The `Logs` call (`shutdown` turns true when the controller stops: follows end then).
pub async fn logs(
    fleet: &FleetState,
    relay: &Arc<LogRelay>,
    shutdown: &watch::Receiver<bool>,
    request: Request<pb::LogsRequest>,
) -> Result<Response<LogsStream>, Status> {
    auth::require(fleet, &request, Role::Deployer)?;
    let request = request.into_inner();
    let app = request.app;
    names::check_app(&app).map_err(|e| Status::invalid_argument(e.to_string()))?;
    if request.lines > MAX_LINES {
        return Err(Status::invalid_argument(format!(
            "--lines {} is more than {MAX_LINES}: ask for fewer",
            request.lines
        )));
    }
    let lines = if request.lines == 0 {
        DEFAULT_LINES
    } else {
        request.lines
    };
    let hosts = fleet.host_records().map_err(store_status)?;
    let runs_app = |host: &crate::model::HostRecord| {
        host.desired.contains_key(&app) || fleet.instance(&host.name, &app).is_some()
    };
    let known_app =
        !fleet.releases(&app).map_err(store_status)?.is_empty() || hosts.iter().any(runs_app);
    if !known_app {
        return Err(Status::not_found(format!(
            "no app named {}: `fleetctl status` lists the apps the fleet runs, `fleetctl releases APP` the releases of one",
            names::quoted(&app)
        )));
    }
    let targets: Vec<String> = if request.host.is_empty() {
        let targets: Vec<String> = hosts
            .iter()
            .filter(|h| runs_app(h))
            .map(|h| h.name.clone())
            .collect();
        if targets.is_empty() {
            return Err(Status::not_found(format!(
                "app {} runs on no host, so there is no log to show: roll a release of it out first (`fleetctl rollout {app} VERSION`)",
                names::quoted(&app)
            )));
        }
        targets
    } else {
        if !hosts.iter().any(|h| h.name == request.host) {
            let known: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
            return Err(Status::not_found(format!(
                "no host named {}: the fleet has {} (`fleetctl hosts` lists them)",
                names::quoted(&request.host),
                if known.is_empty() {
                    "no hosts yet".to_string()
                } else {
                    known.join(", ")
                }
            )));
        }
        vec![request.host]
    };

    let (tx, rx) = mpsc::channel(256);
    for host in targets {
        let tx = tx.clone();
        let Some(mut stream) = relay.open(&host, &app, lines, request.follow) else {
            let _ = tx
                .send(line_error(
                    &host,
                    format!("host {host} is not connected, so its log cannot be read now (`fleetctl hosts` shows its state)"),
                ))
                .await;
            continue;
        };
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut answered = false;
            loop {
                let wait = async {
                    if answered {
                        Ok(stream.rx.recv().await)
                    } else {
                        tokio::time::timeout(ANSWER_TIMEOUT, stream.rx.recv()).await
                    }
                };
                let chunk = tokio::select! {
                    chunk = wait => chunk,
                    _ = tx.closed() => return,
                    _ = shutdown.wait_for(|stop| *stop) => return,
                };
                let chunk = match chunk {
                    Err(_) => {
                        let _ = tx.send(line_error(&host, format!(
                            "the agent of host {host} did not answer in {}s: it may be older than the controller and not know log requests; upgrade it (`fleetctl upgrade-agents`)",
                            ANSWER_TIMEOUT.as_secs()
                        ))).await;
                        return;
                    }
                    Ok(None) => {
                        let _ = tx
                            .send(line_error(
                                &host,
                                format!("the session of host {host} ended before its log was sent"),
                            ))
                            .await;
                        return;
                    }
                    Ok(Some(chunk)) => chunk,
                };
                answered = true;
                for line in chunk.lines {
                    let line = pb::LogLine {
                        host: host.clone(),
                        line,
                        error: String::new(),
                    };
                    if tx.send(Ok(line)).await.is_err() {
                        return;
                    }
                }
                if let Some(error) = chunk.error {
                    let _ = tx.send(line_error(&host, error)).await;
                    return;
                }
                if chunk.done {
                    return;
                }
            }
        });
    }
    Ok(Response::new(ReceiverStream::new(rx)))
}
