//! `[[webhook]]`: notifications of events, POSTed to a URL as JSON, either fleet's own
//! (`format = "json"`) or Slack's incoming-webhook shape (`format = "slack"`, a body with
//! `text`, which Mattermost and Rocket.Chat accept too).
//!
//! Delivery never holds up the controller: the observer offers each event to a bounded queue
//! per webhook ([`QUEUE`]; when it is full the event is dropped for that webhook, with a
//! warning), and one task per webhook sends them in order, each try bounded by
//! [`TRY_TIMEOUT`], [`TRIES`] tries with back-off. A delivery that finally fails is recorded as a
//! `webhook.failed` event (never sent back to the webhook that failed, and a `webhook.failed`
//! event that cannot be delivered is only logged, so dead receivers cannot feed each other). URLs are shown without their path, which holds the secret of a Slack
//! webhook.

pub use crate::config::{Format, Webhook, WebhookFile};
use crate::fleet_state::FleetState;
pub use crate::model::{glob_matches, EVENT_KINDS};
use crate::model::{EventRecord, HostResult, RolloutRecord};
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// Events waiting per webhook; more are dropped (with a warning) until it catches up.
pub const QUEUE: usize = 256;
/// Tries per event.
pub const TRIES: u32 = 3;
/// How long one try may take, connecting included.
pub const TRY_TIMEOUT: Duration = Duration::from_secs(5);
/// The pause before the second try; doubled before each next one.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);

/// The one-line text of a notification: for a rollout's end, the app, release, result, who
/// started it, how long it took and each failed host with why.
pub fn text(event: &EventRecord, rollout: Option<&RolloutRecord>) -> String {
    let Some(rollout) = rollout else {
        return format!("[fleet] {}: {}", event.kind, event.message);
    };
    let what = if rollout.is_rollback {
        "rollback"
    } else {
        "rollout"
    };
    if !rollout.state.is_final() {
        return format!(
            "[fleet] {}@{} {what} {} {} by {}: {}",
            rollout.app,
            rollout.version,
            rollout.id,
            event.kind.rsplit('.').next().unwrap_or(&event.kind),
            event.actor,
            event.message
        );
    }
    let took =
        Duration::from_millis((rollout.finished_unix_ms - rollout.started_unix_ms).max(0) as u64);
    let mut text = format!(
        "[fleet] {}@{} {what} {} {} (started by {}, took {})",
        rollout.app,
        rollout.version,
        rollout.id,
        rollout.state.as_str(),
        rollout.started_by,
        fleet_proto::duration::format_duration(took)
    );
    let failed = failed_hosts(rollout);
    if !failed.is_empty() {
        text.push_str(": ");
        text.push_str(
            &failed
                .iter()
                .map(|(host, why)| format!("{host} failed: {why}"))
                .collect::<Vec<_>>()
                .join("; "),
        );
    } else if !rollout.message.is_empty() {
        text.push_str(": ");
        text.push_str(&rollout.message);
    }
    text
}

/// `(host, why)` of each host that failed the rollout.
fn failed_hosts(rollout: &RolloutRecord) -> Vec<(String, String)> {
    rollout
        .waves
        .iter()
        .flat_map(|w| &w.hosts)
        .filter(|h| h.result == HostResult::Failed)
        .map(|h| (h.host.clone(), h.message.clone()))
        .collect()
}

/// The body for `format`.
pub fn body(format: Format, event: &EventRecord, rollout: Option<&RolloutRecord>) -> Vec<u8> {
    let text = text(event, rollout);
    let value = match format {
        Format::Slack => serde_json::json!({ "text": text }),
        Format::Json => serde_json::json!({
            "text": text,
            "kind": event.kind,
            "seq": event.seq,
            "unix_ms": event.unix_ms,
            "actor": event.actor,
            "app": event.app,
            "host": event.host,
            "message": event.message,
            "rollout": rollout.map(|r| serde_json::json!({
                "id": r.id,
                "app": r.app,
                "release": r.version,
                "state": r.state.as_str(),
                "started_by": r.started_by,
                "is_rollback": r.is_rollback,
                "duration_seconds": if r.state.is_final() {
                    Some((r.finished_unix_ms - r.started_unix_ms).max(0) as f64 / 1000.0)
                } else {
                    None
                },
                "failed_hosts": failed_hosts(r)
                    .into_iter()
                    .map(|(host, why)| serde_json::json!({"host": host, "why": why}))
                    .collect::<Vec<_>>(),
            })),
        }),
    };
    serde_json::to_vec(&value).unwrap_or_default()
}

/// One event on its way to one webhook.
struct Delivery {
    kind: String,
    app: String,
    host: String,
    body: Vec<u8>,
}

/// The webhooks' queues, which the observer offers events to.
#[derive(Clone, Default)]
pub struct Hooks {
    hooks: Vec<(Arc<Webhook>, mpsc::Sender<Delivery>)>,
}

impl Hooks {
    /// Queues `event` for every webhook that wants it; never waits.
    pub fn offer(&self, event: &EventRecord, rollout: Option<&RolloutRecord>) {
        for (hook, queue) in &self.hooks {
            if !hook.wants(&event.kind) {
                continue;
            }
            if event.kind == "webhook.failed"
                && event.message.starts_with(&format!("webhook {} ", hook.idx))
            {
                continue;
            }
            let delivery = Delivery {
                kind: event.kind.clone(),
                app: event.app.clone(),
                host: event.host.clone(),
                body: body(hook.format, event, rollout),
            };
            if queue.try_send(delivery).is_err() {
                tracing::warn!(
                    "webhook {} ({}) is {QUEUE} events behind: dropped the {} event",
                    hook.idx,
                    hook.display_url(),
                    event.kind
                );
            }
        }
    }
}

/// Starts one sender task per webhook; they stop when `stop` turns true.
pub fn spawn(
    webhooks: &[Webhook],
    fleet: Arc<FleetState>,
    stop: watch::Receiver<bool>,
) -> (Hooks, Vec<tokio::task::JoinHandle<()>>) {
    let mut hooks = Hooks::default();
    let mut tasks = Vec::new();
    for webhook in webhooks {
        let hook = Arc::new(webhook.clone());
        let (tx, rx) = mpsc::channel(QUEUE);
        hooks.hooks.push((hook.clone(), tx));
        tasks.push(tokio::spawn(send_all(
            hook,
            rx,
            fleet.clone(),
            stop.clone(),
        )));
    }
    (hooks, tasks)
}

async fn send_all(
    hook: Arc<Webhook>,
    mut queue: mpsc::Receiver<Delivery>,
    fleet: Arc<FleetState>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let delivery = tokio::select! {
            delivery = queue.recv() => match delivery {
                Some(delivery) => delivery,
                None => return,
            },
            _ = stop.wait_for(|stop| *stop) => return,
        };
        let mut last_error = String::new();
        let mut pause = FIRST_BACKOFF;
        let mut delivered = false;
        for attempt in 1..=TRIES {
            let sent = tokio::select! {
                sent = tokio::time::timeout(TRY_TIMEOUT, post(&hook.url, &delivery.body)) => sent,
                _ = stop.wait_for(|stop| *stop) => return,
            };
            match sent {
                Ok(Ok(())) => {
                    delivered = true;
                    break;
                }
                Ok(Err(e)) => last_error = e,
                Err(_) => last_error = format!("no answer within {TRY_TIMEOUT:?}"),
            }
            if attempt < TRIES {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.wait_for(|stop| *stop) => return,
                }
                pause *= 2;
            }
        }
        if !delivered && delivery.kind == "webhook.failed" {
            // Not an event again: two dead receivers would pass their failures back and forth.
            tracing::warn!(
                "webhook {} ({}) did not take a webhook.failed event after {TRIES} tries: {last_error}",
                hook.idx,
                hook.display_url()
            );
        } else if !delivered {
            fleet
                .event(
                    "controller",
                    "webhook.failed",
                    &delivery.app,
                    &delivery.host,
                    format!(
                        "webhook {} ({}) did not take the {} event after {TRIES} tries: {last_error}",
                        hook.idx,
                        hook.display_url(),
                        delivery.kind
                    ),
                )
                .await;
        }
    }
}

/// The TLS client configuration for https webhooks: the Mozilla roots, ring.
fn tls_config() -> Result<Arc<tokio_rustls::rustls::ClientConfig>, String> {
    use tokio_rustls::rustls;
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    if let Some(config) = CONFIG.get() {
        return Ok(config.clone());
    }
    let roots: rustls::RootCertStore = webpki_roots::TLS_SERVER_ROOTS.iter().cloned().collect();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS setup: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(CONFIG.get_or_init(|| Arc::new(config)).clone())
}

/// One POST of `body` to `url`; Ok on a 2xx answer.
async fn post(url: &http::Uri, body: &[u8]) -> Result<(), String> {
    let host = url.host().unwrap_or_default();
    let bare_host = host.trim_start_matches('[').trim_end_matches(']');
    let https = url.scheme_str() == Some("https");
    let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = tokio::net::TcpStream::connect((bare_host, port))
        .await
        .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let path = url
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    let authority = url
        .authority()
        .map(|a| a.as_str())
        .unwrap_or(host)
        .to_string();
    if https {
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from(bare_host.to_string())
            .map_err(|e| format!("{host} is no TLS server name: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(tls_config()?)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {host}: {e}"))?;
        send(tls, &authority, &path, body).await
    } else {
        send(tcp, &authority, &path, body).await
    }
}

async fn send<S>(stream: S, authority: &str, path: &str, body: &[u8]) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
    let connection = tokio::spawn(connection);
    let request = http::Request::post(path)
        .header(http::header::HOST, authority)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(
            http::header::USER_AGENT,
            concat!("fleet-controller/", env!("CARGO_PKG_VERSION")),
        )
        .body(http_body_util::Full::new(Bytes::copy_from_slice(body)))
        .map_err(|e| format!("request: {e}"))?;
    let answer = sender.send_request(request).await;
    connection.abort();
    let answer = answer.map_err(|e| format!("POST: {e}"))?;
    if answer.status().is_success() {
        Ok(())
    } else {
        Err(format!("the receiver answered {}", answer.status()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Batch, RolloutPolicy, RolloutState, Wave, WaveHost, WaveState};

    #[test]
    fn globs() {
        for (glob, text, expect) in [
            ("rollout.*", "rollout.failed", true),
            ("rollout.*", "rollback.started", false),
            ("host.lost", "host.lost", true),
            ("host.lost", "host.lost2", false),
            ("*", "anything", true),
            ("*.failed", "instance.failed", true),
            ("*.failed", "webhook.failed", true),
            ("r*.*ed", "rollout.started", true),
            ("r*.*ed", "rollout.paused", true),
            ("r*.*ed", "release.pruned", true),
            ("r*.*ed", "host.lost", false),
            ("ab*ba", "aba", false),
        ] {
            assert_eq!(glob_matches(glob, text), expect, "{glob} {text}");
        }
    }

    fn file(url: &str, events: &[&str]) -> WebhookFile {
        WebhookFile {
            url: url.to_string(),
            events: events.iter().map(|e| e.to_string()).collect(),
            format: Format::Slack,
        }
    }

    #[test]
    fn bad_webhooks_say_what_to_do() {
        for (url, events, expect) in [
            ("not a url", vec!["rollout.*"], "is not a URL"),
            (
                "ftp://example.com/x",
                vec!["rollout.*"],
                "is not http:// or https://",
            ),
            (
                "/just/a/path",
                vec!["rollout.*"],
                "is not http:// or https://",
            ),
            ("http://127.0.0.1:9/", vec![], "events is empty"),
            (
                "http://127.0.0.1:9/",
                vec!["rollouts.*"],
                "matches no event kind",
            ),
            (
                "http://127.0.0.1:9/",
                vec!["host.lost", "hots.*"],
                "\"hots.*\" matches no event kind",
            ),
        ] {
            let error = Webhook::check(2, &file(url, &events)).unwrap_err();
            assert!(
                error.contains(expect) && error.starts_with("webhook 2"),
                "{url}: {error}"
            );
        }
        let hook = Webhook::check(
            1,
            &file("https://hooks.example.com/services/SECRET", &["*"]),
        )
        .unwrap();
        assert_eq!(hook.display_url(), "https://hooks.example.com/…");
    }

    #[test]
    fn every_event_kind_the_controller_records_is_known() {
        // The kinds the code passes to `FleetState::event` as literals, found in the source:
        // a new kind must be added to EVENT_KINDS, or no glob could name it.
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = vec![src.clone()];
        let mut found = std::collections::BTreeSet::new();
        while let Some(path) = files.pop() {
            if path.is_dir() {
                for entry in std::fs::read_dir(&path).unwrap() {
                    files.push(entry.unwrap().path());
                }
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let lines: Vec<&str> = text.lines().collect();
            for (idx, line) in lines.iter().enumerate() {
                if !line.contains(".event(") && !line.contains("let kind =") {
                    continue;
                }
                for next in &lines[idx..(idx + 8).min(lines.len())] {
                    let trimmed = next.trim().trim_end_matches(',');
                    let Some(kind) = trimmed.strip_prefix('"').and_then(|t| t.strip_suffix('"'))
                    else {
                        continue;
                    };
                    let mut parts = kind.split('.');
                    let ok = |p: Option<&str>| {
                        p.is_some_and(|p| {
                            !p.is_empty() && p.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                        })
                    };
                    if ok(parts.next()) && ok(parts.next()) && parts.next().is_none() {
                        found.insert(kind.to_string());
                    }
                }
            }
        }
        assert!(found.len() > 20, "found only {found:?}");
        for kind in &found {
            assert!(
                EVENT_KINDS.contains(&kind.as_str()),
                "event kind {kind} is missing from EVENT_KINDS"
            );
        }
        for state in [
            RolloutState::Succeeded,
            RolloutState::Failed,
            RolloutState::RolledBack,
            RolloutState::Aborted,
        ] {
            let kind = format!("rollout.{}", state.as_str());
            assert!(EVENT_KINDS.contains(&kind.as_str()), "{kind}");
        }
    }

    fn rollout(state: RolloutState, failed: Option<(&str, &str)>) -> RolloutRecord {
        let mut hosts = vec![WaveHost {
            host: "h1".into(),
            previous_version: None,
            previous_deployment: None,
            result: HostResult::Passed,
            message: String::new(),
            rollback: None,
        }];
        if let Some((host, why)) = failed {
            hosts.push(WaveHost {
                host: host.into(),
                previous_version: Some("1.0".into()),
                previous_deployment: None,
                result: HostResult::Failed,
                message: why.into(),
                rollback: None,
            });
        }
        RolloutRecord {
            id: "r7".into(),
            app: "web".into(),
            version: "2.0".into(),
            state,
            started_by: "ann".into(),
            started_unix_ms: 1_000,
            finished_unix_ms: 91_000,
            waves: vec![Wave {
                hosts,
                state: WaveState::Passed,
            }],
            current_wave: 0,
            message: "3 hosts on 2.0".into(),
            policy: RolloutPolicy {
                selector: Default::default(),
                canary: 1,
                batch: Batch::Hosts(1),
                pause_after_canary_ms: 0,
                smoke_timeout_ms: 0,
                auto_rollback: true,
                skip_lost: false,
                min_healthy_ms: None,
                max_unavailable: None,
            },
            is_rollback: false,
            seq: 7,
            hold_until_unix_ms: 0,
            max_unavailable: 1,
            unavailable_at_start: Vec::new(),
        }
    }

    fn event(kind: &str) -> EventRecord {
        EventRecord {
            seq: 9,
            unix_ms: 0,
            actor: "ann".into(),
            kind: kind.into(),
            app: "web".into(),
            host: String::new(),
            message: "something happened".into(),
        }
    }

    #[test]
    fn slack_text_says_app_release_result_who_how_long_and_the_failed_host() {
        for (kind, record, expect) in [
            (
                "rollout.succeeded",
                Some(rollout(RolloutState::Succeeded, None)),
                "[fleet] web@2.0 rollout r7 succeeded (started by ann, took 1m30s): 3 hosts on 2.0",
            ),
            (
                "rollout.rolled_back",
                Some(rollout(RolloutState::RolledBack, Some(("h2", "smoke check #1 failed")))),
                "[fleet] web@2.0 rollout r7 rolled_back (started by ann, took 1m30s): h2 failed: smoke check #1 failed",
            ),
            (
                "rollout.started",
                Some(rollout(RolloutState::Running, None)),
                "[fleet] web@2.0 rollout r7 started by ann: something happened",
            ),
            ("host.lost", None, "[fleet] host.lost: something happened"),
        ] {
            assert_eq!(text(&event(kind), record.as_ref()), expect, "{kind}");
            let slack: serde_json::Value =
                serde_json::from_slice(&body(Format::Slack, &event(kind), record.as_ref())).unwrap();
            assert_eq!(slack["text"], expect);
            let json: serde_json::Value =
                serde_json::from_slice(&body(Format::Json, &event(kind), record.as_ref())).unwrap();
            assert_eq!(json["kind"], kind);
        }
    }
}
