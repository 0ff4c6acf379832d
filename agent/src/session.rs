//! The agent's one long-lived `AgentService.Session` stream. On connect it sends `Hello` (name,
//! labels, advertise address, agent version and the latest report of every instance), then
//! forwards every instance report and a heartbeat every `Welcome.heartbeat_interval_ms` (the
//! controller stretches it as the fleet grows, and says so in answer to a heartbeat); it
//! hands each `DesiredState` to the supervisor. A controller that answers heartbeats
//! (`Welcome.answers_heartbeats`) and leaves one unanswered for [`ANSWER_TIMEOUT`] counts as
//! gone; the answers are what keep the connection's HTTP/2 keepalive pings from being sent. When the controller goes away or refuses it
//! reconnects forever with a backoff from 200ms doubling to 5s, to the next configured
//! controller each time, or first to the leader a follower's redirect names (see
//! [`crate::controllers`]); instances keep running meanwhile. The one exception is the controller's explicit revoked answer
//! (`fleet_proto::refusal`: the host was removed): the session ends for good with
//! [`SessionEnd::Revoked`] and the agent ends (see `crate::run`).
//!
//! [`Dialer`] holds which configured controller is dialled now (chosen by
//! [`crate::controllers::next`]) and the channel to it.
//!
//! This is the gRPC edge: prost types are converted to and from [`crate::model`] here and go
//! no further.

use crate::controllers::{Failure, Target};
use crate::model::{Assignment, InstanceState, Report, Reporter};
use crate::supervisor::{Desired, SupervisorCommand};
use crate::{AgentError, Config};
use fleet_proto::pb;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

/// The HTTP/2 flow-control window of one stream (an artifact download).
const HTTP2_STREAM_WINDOW: u32 = 4 << 20;
/// The HTTP/2 flow-control window of the whole connection.
const HTTP2_CONNECTION_WINDOW: u32 = 8 << 20;
/// The largest HTTP/2 frame the controller may send: an artifact chunk in a few frames rather
/// than in 64 of the default 16 KiB.
const HTTP2_MAX_FRAME: u32 = 256 << 10;

pub const MIN_RECONNECT_BACKOFF: Duration = Duration::from_millis(200);
pub const MAX_RECONNECT_BACKOFF: Duration = Duration::from_secs(5);
/// Heartbeat interval until the controller's `Welcome` says otherwise.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);
/// How long a heartbeat may go unanswered by a controller that answers them.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// The connection's HTTP/2 keepalive: a ping after this long without a frame from the
/// controller. Longer than the longest heartbeat interval a controller tells (60 s), so it is
/// never sent while heartbeats are answered: at 10,000 hosts, pings every 5 s were half of
/// the controller's idle wake-ups. With a controller that does not answer heartbeats (one
/// version behind), it is what notices a controller gone silent.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(75);
/// A session whose stream does not open within this is retried.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// A controller that does not take a message within this counts as gone.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// What the session says about this host.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub host_name: String,
    pub labels: BTreeMap<String, String>,
    pub advertise: String,
    /// Where the apps' logs are (`crate::app_log`), for the controller's log requests.
    pub logs_dir: std::path::PathBuf,
    /// Where this host serves peers (0: it does not), told in the hello.
    pub peer_port: u16,
}

impl SessionConfig {
    pub fn from_config(config: &Config) -> SessionConfig {
        SessionConfig {
            host_name: config.host_name.clone(),
            labels: config.labels.clone(),
            advertise: config.advertise.to_string(),
            logs_dir: std::path::absolute(&config.data_dir)
                .map(|dir| crate::model::DataLayout::new(&dir).logs_dir())
                .unwrap_or_else(|_| crate::model::DataLayout::new(&config.data_dir).logs_dir()),
            peer_port: config.peer_port,
        }
    }
}

/// A mutual-TLS channel to the controller (see [`crate::join::client_tls`]) that connects on
/// first use and reconnects by itself; HTTP/2 keepalives ([`KEEPALIVE_INTERVAL`]) notice a
/// controller that stopped answering while nothing else does. The session and artifact fetches share it.
pub fn lazy_channel(
    url: &str,
    credentials: &crate::join::Credentials,
) -> Result<Channel, AgentError> {
    let url_error = |reason: String| AgentError::ControllerUrl {
        url: url.to_string(),
        reason,
    };
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| url_error(e.to_string()))?
        .tls_config(crate::join::client_tls(credentials))
        .map_err(|e| url_error(e.to_string()))?;
    Ok(endpoint
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        // HTTP/2's default 64 KiB window stalls an artifact download every 64 KiB waiting for
        // the agent's window update; megabyte windows keep the stream full.
        .initial_stream_window_size(HTTP2_STREAM_WINDOW)
        .initial_connection_window_size(HTTP2_CONNECTION_WINDOW)
        .max_frame_size(HTTP2_MAX_FRAME)
        .connect_lazy())
}

/// The controller list, the one dialled now, and the channel to it.
pub struct Dialer {
    urls: Vec<String>,
    state: Mutex<(Target, crate::join::Credentials)>,
    channels: watch::Sender<Channel>,
}

impl Dialer {
    /// Dials the first of `urls` (never empty: the config checked it). The receiver follows
    /// the channel as it is replaced.
    pub fn new(
        urls: Vec<String>,
        credentials: crate::join::Credentials,
    ) -> Result<(Dialer, watch::Receiver<Channel>), AgentError> {
        let first = urls.first().cloned().unwrap_or_default();
        let channel = lazy_channel(&first, &credentials)?;
        let (channels, receiver) = watch::channel(channel);
        Ok((
            Dialer {
                urls,
                state: Mutex::new((Target::Listed(0), credentials)),
                channels,
            },
            receiver,
        ))
    }

    /// The URL dialled now.
    pub fn current_url(&self) -> String {
        let state = self.state.lock().expect("dialer lock");
        self.url_of(&state.0)
    }

    /// Whether more than one controller is configured.
    pub fn several(&self) -> bool {
        self.urls.len() > 1
    }

    fn url_of(&self, target: &Target) -> String {
        match target {
            Target::Listed(idx) => self.urls.get(*idx).cloned().unwrap_or_default(),
            Target::Leader { url, .. } => url.clone(),
        }
    }

    /// Moves on from the controller dialled now after `failure`; returns the URL dialled next.
    /// With one controller and no redirect, the channel is left as it is (it reconnects by
    /// itself).
    pub fn move_on(&self, failure: &Failure) -> String {
        let mut state = self.state.lock().expect("dialer lock");
        let target = crate::controllers::next(&self.urls, &state.0, failure);
        if target == state.0 {
            return self.url_of(&target);
        }
        let url = self.url_of(&target);
        match lazy_channel(&url, &state.1) {
            Ok(channel) => {
                state.0 = target;
                self.channels.send_replace(channel);
            }
            // A leader URL the redirect check let through that tonic cannot use: skip it.
            Err(e) => {
                tracing::warn!("cannot dial {url}: {e}; trying the next controller");
                let listed = crate::controllers::next(&self.urls, &state.0, &Failure::Lost);
                if let Ok(channel) = lazy_channel(&self.url_of(&listed), &state.1) {
                    state.0 = listed;
                    self.channels.send_replace(channel);
                }
            }
        }
        self.url_of(&state.0)
    }

    /// A renewed certificate: a new channel to the controller dialled now, with it.
    pub fn renewed(&self, credentials: crate::join::Credentials) -> Result<(), AgentError> {
        let mut state = self.state.lock().expect("dialer lock");
        let channel = lazy_channel(&self.url_of(&state.0), &credentials)?;
        state.1 = credentials;
        self.channels.send_replace(channel);
        Ok(())
    }

    /// The channel dialled now.
    pub fn channel(&self) -> Channel {
        self.channels.borrow().clone()
    }
}

/// Converts an instance report to its wire form.
pub fn report_to_pb(report: &Report) -> pb::InstanceReport {
    let mut wire = pb::InstanceReport {
        app: report.app.clone(),
        version: report.version.clone(),
        message: report.message.clone(),
        since_unix_ms: report.since_unix_ms,
        restarts: report.restarts,
        rollout_id: report.rollout_id.clone(),
        ..Default::default()
    };
    report.state.write_to(&mut wire);
    wire
}

/// Converts and checks an assignment from the wire; the error says what is wrong with it.
pub fn assignment_from_pb(assignment: pb::Assignment) -> Result<Assignment, String> {
    fleet_proto::names::check_app(&assignment.app).map_err(|e| e.to_string())?;
    fleet_proto::names::check_version(&assignment.version).map_err(|e| e.to_string())?;
    if !fleet_proto::artifact::check_digest(&assignment.artifact_digest) {
        return Err(format!(
            "artifact digest {:?} is not sha256:<64 hex>",
            assignment.artifact_digest
        ));
    }
    for key in assignment.env.keys().chain(assignment.secrets.keys()) {
        if !fleet_proto::names::check_env_key(key) {
            return Err(format!(
                "release env key {} is invalid",
                fleet_proto::names::quoted(key)
            ));
        }
    }
    Ok(Assignment {
        app: assignment.app,
        version: assignment.version,
        artifact_digest: assignment.artifact_digest,
        artifact_size: assignment.artifact_size,
        env: assignment.env.into_iter().collect(),
        secrets: assignment.secrets.into_iter().collect(),
        rollout_id: assignment.rollout_id,
        generation: assignment.generation,
        smoke_timeout_ms: assignment.smoke_timeout_ms,
        run_release_hook: assignment.run_release_hook,
        min_healthy_ms: assignment.min_healthy_ms,
        unpacked_size: assignment.unpacked_size,
    })
}

/// Checks every assignment of a desired state; a bad one is reported failed and its app
/// listed in `refused`, so the supervisor leaves what that app runs as it is.
fn desired_from_pb(desired: pb::DesiredState, reporter: &Reporter) -> Desired {
    let mut out = Desired {
        assignments: Vec::with_capacity(desired.assignments.len()),
        refused: Default::default(),
    };
    for assignment in desired.assignments {
        let (app, version, rollout_id) = (
            assignment.app.clone(),
            assignment.version.clone(),
            assignment.rollout_id.clone(),
        );
        match assignment_from_pb(assignment) {
            Ok(assignment) => out.assignments.push(assignment),
            Err(message) => {
                tracing::warn!(%app, "refusing an assignment: {message}");
                // An app of an invalid name runs nowhere: nothing to keep or report.
                if fleet_proto::names::check_app(&app).is_ok() {
                    out.refused.insert(app.clone());
                    reporter.publish(Report {
                        app,
                        version,
                        state: InstanceState::Failed,
                        message: format!(
                            "the assignment is invalid: {message}; what the host runs of this app is left as it is"
                        ),
                        since_unix_ms: fleet_proto::now_unix_ms(),
                        restarts: 0,
                        rollout_id,
                    });
                }
            }
        }
    }
    out
}

/// How the session task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// The agent is shutting down.
    Stopped,
    /// The controller answered that this host's certificate was revoked (`fleetctl remove`);
    /// `why` is its message.
    Revoked { purge: bool, why: String },
}

/// How one session ended.
enum Ended {
    /// The agent is shutting down.
    Stopped,
    /// A renewed certificate brought a new channel: reconnect to the same controller.
    Renewed,
    /// The explicit revoked answer: never retried.
    Revoked { purge: bool, why: String },
    /// The controller went away or refused; `welcomed` says whether it had answered at all,
    /// `failure` whether it sent the agent to its leader.
    Lost {
        welcomed: bool,
        why: String,
        failure: Failure,
    },
}

/// What a refused or failed session means: `Some` only for the controller's explicit revoked
/// answer, which ends the agent; anything else (another CA, a host the controller does not
/// know, a restored backup, an older controller) is `None` and retried.
fn ended_by(welcomed: bool, status: &tonic::Status) -> Ended {
    let why = format!("{:?}: {}", status.code(), status.message());
    match fleet_proto::refusal::revoked(status) {
        Some(revoked) => Ended::Revoked {
            purge: revoked.purge,
            why: status.message().to_string(),
        },
        None => Ended::Lost {
            welcomed,
            why,
            failure: match fleet_proto::leader::leader_of(status) {
                Some(leader) => Failure::NotLeader(Some(leader)),
                None => Failure::Lost,
            },
        },
    }
}

/// Keeps a session to the controller open until `stop` turns true, reconnecting forever, or
/// until the controller answers that this host was revoked. Each session takes the channel
/// current at its start and ends when a renewed certificate brings a new one (see
/// [`crate::renew`]); the controller's `RenewCertificate` goes to `renew_advice`.
#[allow(clippy::too_many_arguments)]
pub async fn run_session(
    config: SessionConfig,
    dialer: Arc<Dialer>,
    mut channel: watch::Receiver<Channel>,
    renew_advice: mpsc::UnboundedSender<String>,
    reporter: Arc<Reporter>,
    mut report_rx: mpsc::UnboundedReceiver<Report>,
    supervisor: mpsc::UnboundedSender<SupervisorCommand>,
    mut stop: watch::Receiver<bool>,
) -> SessionEnd {
    let mut backoff = MIN_RECONNECT_BACKOFF;
    let mut was_connected = true;
    loop {
        let ended = session_once(
            &config,
            &mut channel,
            &renew_advice,
            &reporter,
            &mut report_rx,
            &supervisor,
            &mut stop,
            &dialer,
        )
        .await;
        match ended {
            Ended::Stopped => return SessionEnd::Stopped,
            Ended::Revoked { purge, why } => return SessionEnd::Revoked { purge, why },
            Ended::Renewed => {
                tracing::info!("the certificate was renewed: reconnecting with it");
                backoff = MIN_RECONNECT_BACKOFF;
                was_connected = true;
            }
            Ended::Lost {
                welcomed,
                why,
                failure,
            } => {
                if welcomed {
                    backoff = MIN_RECONNECT_BACKOFF;
                }
                let lost_url = dialer.current_url();
                let next_url = dialer.move_on(&failure);
                if let Failure::NotLeader(Some(leader)) = &failure {
                    tracing::info!(
                        "the controller at {lost_url} is not the leader; following it to {leader}"
                    );
                } else if welcomed || was_connected {
                    tracing::warn!("the session with the controller at {lost_url} was lost ({why}); reconnecting to {next_url}");
                } else {
                    tracing::debug!(
                        "controller still unreachable at {lost_url} ({why}); trying {next_url}"
                    );
                }
                was_connected = welcomed;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stopped(&mut stop) => return SessionEnd::Stopped,
        }
        backoff = (backoff * 2).min(MAX_RECONNECT_BACKOFF);
    }
}

/// Resolves once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

#[allow(clippy::too_many_arguments)]
async fn session_once(
    config: &SessionConfig,
    channels: &mut watch::Receiver<Channel>,
    renew_advice: &mpsc::UnboundedSender<String>,
    reporter: &Reporter,
    report_rx: &mut mpsc::UnboundedReceiver<Report>,
    supervisor: &mpsc::UnboundedSender<SupervisorCommand>,
    stop: &mut watch::Receiver<bool>,
    dialer: &Dialer,
) -> Ended {
    let lost = |welcomed, why: String| Ended::Lost {
        welcomed,
        why,
        failure: Failure::Lost,
    };
    let (out_tx, out_rx) = mpsc::channel::<pb::AgentMessage>(256);
    // Everything queued before the snapshot is older than it: the Hello says it all.
    let instances = reporter.snapshot(report_rx);
    let hello = pb::Hello {
        host_name: config.host_name.clone(),
        labels: config.labels.clone().into_iter().collect(),
        advertise_addr: config.advertise.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        agent_arch: std::env::consts::ARCH.to_string(),
        instances: instances.iter().map(report_to_pb).collect(),
        peer_port: config.peer_port.into(),
    };
    let _ = out_tx.try_send(pb::AgentMessage {
        body: Some(pb::agent_message::Body::Hello(hello)),
    });
    let channel = channels.borrow_and_update().clone();
    let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
    let opened = tokio::select! {
        opened = tokio::time::timeout(OPEN_TIMEOUT, client.session(ReceiverStream::new(out_rx))) => opened,
        _ = stopped(stop) => return Ended::Stopped,
    };
    let mut inbound = match opened {
        Err(_) => return lost(false, "the session did not open in time".into()),
        Ok(Err(status)) => return ended_by(false, &status),
        Ok(Ok(response)) => response.into_inner(),
    };
    // Aborted when the session ends: a follow never outlives the session that asked for it.
    let mut log_tasks = LogTasks::default();
    let mut welcomed = false;
    // Whether the controller answers heartbeats, and by when the last one must be.
    let mut answers = false;
    let mut answer_due: Option<tokio::time::Instant> = None;
    let mut period = DEFAULT_HEARTBEAT;
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let outgoing = tokio::select! {
            _ = stopped(stop) => return Ended::Stopped,
            _ = channels.changed() => return Ended::Renewed,
            _ = tokio::time::sleep_until(answer_due.unwrap_or_else(tokio::time::Instant::now)), if answer_due.is_some() => {
                return lost(welcomed, format!("the controller left a heartbeat unanswered for {}s", ANSWER_TIMEOUT.as_secs()));
            }
            message = inbound.message() => {
                if matches!(message, Ok(Some(_))) {
                    // Whatever the controller sends shows it hears this host.
                    answer_due = None;
                }
                match message {
                    Ok(Some(message)) => match message.body {
                        Some(pb::controller_message::Body::Welcome(welcome)) => {
                            if !welcomed {
                                tracing::info!(host = %config.host_name, controller = %dialer.current_url(), "connected to the controller");
                                // Under systemd (Type=notify): ready once a session is up
                                // (again after a reconnect, which systemd ignores).
                                if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
                                    tracing::warn!("cannot tell systemd the agent is ready (NOTIFY_SOCKET): {e}");
                                }
                            }
                            welcomed = true;
                            answers = welcome.answers_heartbeats;
                            if welcome.heartbeat_interval_ms > 0 {
                                let asked = Duration::from_millis(welcome.heartbeat_interval_ms)
                                    .max(Duration::from_millis(50));
                                if asked != period {
                                    period = asked;
                                    heartbeat = tokio::time::interval_at(
                                        tokio::time::Instant::now() + period,
                                        period,
                                    );
                                    heartbeat.set_missed_tick_behavior(
                                        tokio::time::MissedTickBehavior::Delay,
                                    );
                                }
                            }
                            None
                        }
                        Some(pb::controller_message::Body::Desired(desired)) => {
                            welcomed = true;
                            let desired = desired_from_pb(desired, reporter);
                            tracing::info!(n_assignments = desired.assignments.len(), "desired state received");
                            let _ = supervisor.send(SupervisorCommand::Desired(desired));
                            None
                        }
                        Some(pb::controller_message::Body::Renew(renew)) => {
                            let _ = renew_advice.send(renew.reason);
                            None
                        }
                        Some(pb::controller_message::Body::LogRequest(request)) => {
                            log_tasks.start(&config.logs_dir, request, out_tx.clone());
                            None
                        }
                        Some(pb::controller_message::Body::LogCancel(cancel)) => {
                            log_tasks.cancel(&cancel.request_id);
                            None
                        }
                        None => None,
                    },
                    Ok(None) => return lost(welcomed, "the controller closed the session".into()),
                    Err(status) => return ended_by(welcomed, &status),
                }
            }
            report = report_rx.recv() => report.map(|report| pb::AgentMessage {
                body: Some(pb::agent_message::Body::Report(report_to_pb(&report))),
            }),
            _ = heartbeat.tick() => {
                if answers && answer_due.is_none() {
                    answer_due = Some(tokio::time::Instant::now() + ANSWER_TIMEOUT);
                }
                Some(pb::AgentMessage {
                    body: Some(pb::agent_message::Body::Heartbeat(pb::Heartbeat {})),
                })
            }
        };
        if let Some(message) = outgoing {
            match tokio::time::timeout(SEND_TIMEOUT, out_tx.send(message)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return lost(welcomed, "the session's send side closed".into()),
                Err(_) => return lost(welcomed, "the controller stopped taking messages".into()),
            }
        }
    }
}

/// The log requests being answered on one session, by request id.
#[derive(Default)]
struct LogTasks(std::collections::HashMap<String, tokio::task::AbortHandle>);

/// How often a follow looks for new lines.
const FOLLOW_EVERY: Duration = Duration::from_millis(200);
/// At most this many lines go in one `LogLines` message.
const LINES_PER_MESSAGE: usize = 500;

impl LogTasks {
    fn start(
        &mut self,
        logs_dir: &std::path::Path,
        request: pb::LogRequest,
        out: mpsc::Sender<pb::AgentMessage>,
    ) {
        self.0.retain(|_, task| !task.is_finished());
        // The app name is checked here, at the edge: it becomes a file name.
        let log = fleet_proto::names::check_app(&request.app)
            .map(|()| logs_dir.join(format!("{}.log", request.app)));
        let id = request.request_id.clone();
        let task = tokio::spawn(async move {
            let send = |lines: Vec<String>, done: bool, error: String| {
                let out = out.clone();
                let request_id = request.request_id.clone();
                async move {
                    out.send(pb::AgentMessage {
                        body: Some(pb::agent_message::Body::LogLines(pb::LogLines {
                            request_id,
                            lines,
                            done,
                            error,
                        })),
                    })
                    .await
                    .is_ok()
                }
            };
            let log = match log {
                Ok(log) => log,
                Err(e) => {
                    send(Vec::new(), true, e.to_string()).await;
                    return;
                }
            };
            let (path, lines) = (log.clone(), request.lines);
            let read = tokio::task::spawn_blocking(move || {
                let follower = crate::app_log::Follower::from_end(&path);
                crate::app_log::tail(&path, lines).map(|tail| (tail, follower))
            })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
            let (tail, mut follower) = match read {
                Ok((Some(tail), follower)) => (tail, follower),
                Ok((None, _)) => {
                    let why = format!(
                        "app {} has no log on this host (it never ran here)",
                        request.app
                    );
                    send(Vec::new(), true, why).await;
                    return;
                }
                Err(e) => {
                    send(
                        Vec::new(),
                        true,
                        format!("cannot read the log of app {}: {e}", request.app),
                    )
                    .await;
                    return;
                }
            };
            let mut chunks = tail.chunks(LINES_PER_MESSAGE).peekable();
            while let Some(chunk) = chunks.next() {
                let last = chunks.peek().is_none() && !request.follow;
                if !send(chunk.to_vec(), last, String::new()).await {
                    return;
                }
            }
            // An empty log still gets an answer: the controller takes silence for an agent
            // too old to know log requests.
            if tail.is_empty() && !send(Vec::new(), !request.follow, String::new()).await {
                return;
            }
            if !request.follow {
                return;
            }
            // Until cancelled (the task is aborted) or the session ends.
            loop {
                tokio::time::sleep(FOLLOW_EVERY).await;
                let polled = tokio::task::spawn_blocking(move || {
                    let lines = follower.poll();
                    (follower, lines)
                })
                .await;
                let Ok((back, lines)) = polled else { return };
                follower = back;
                let lines = lines.unwrap_or_default();
                for chunk in lines.chunks(LINES_PER_MESSAGE) {
                    if !send(chunk.to_vec(), false, String::new()).await {
                        return;
                    }
                }
            }
        });
        self.0.insert(id, task.abort_handle());
    }

    fn cancel(&mut self, request_id: &str) {
        if let Some(task) = self.0.remove(request_id) {
            task.abort();
        }
    }
}

impl Drop for LogTasks {
    fn drop(&mut self) {
        for task in self.0.values() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_assignments_at_the_edge() {
        let good = pb::Assignment {
            app: "web".into(),
            version: "1.0".into(),
            artifact_digest: format!("sha256:{}", "b".repeat(64)),
            artifact_size: 3,
            env: [("K".to_string(), "v".to_string())].into_iter().collect(),
            secrets: Default::default(),
            min_healthy_ms: None,
            unpacked_size: 0,
            rollout_id: "r".into(),
            generation: 1,
            smoke_timeout_ms: 5,
            run_release_hook: false,
        };
        let converted = assignment_from_pb(good.clone()).unwrap();
        assert_eq!(converted.env["K"], "v");
        for bad in [
            pb::Assignment {
                app: "../x".into(),
                ..good.clone()
            },
            pb::Assignment {
                version: "..".into(),
                ..good.clone()
            },
            pb::Assignment {
                artifact_digest: "md5:x".into(),
                ..good.clone()
            },
            pb::Assignment {
                env: [("1BAD".to_string(), "v".to_string())]
                    .into_iter()
                    .collect(),
                ..good.clone()
            },
        ] {
            assert!(assignment_from_pb(bad).is_err());
        }
        let reporter = Reporter::new();
        let mut rx = reporter.take_receiver();
        let desired = pb::DesiredState {
            assignments: vec![
                good.clone(),
                pb::Assignment {
                    app: "api".into(),
                    version: "/".into(),
                    ..good
                },
            ],
            ..Default::default()
        };
        let desired = desired_from_pb(desired, &reporter);
        assert_eq!(desired.assignments.len(), 1);
        assert_eq!(desired.refused, ["api".to_string()].into());
        let report = rx.try_recv().unwrap();
        assert_eq!(
            (report.app.as_str(), report.state),
            ("api", InstanceState::Failed)
        );
    }
}
