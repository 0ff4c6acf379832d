//! App logs relayed from the agents (`fleetctl logs`): which session of a host takes log
//! requests, which requests are open and for whom, and their answers routed back to the caller.
//!
//! The controller keeps no log: a request goes down the host's session
//! (`api::agent_service` sends it), the agent answers with lines under the request's id, and
//! [`LogRelay::deliver`] hands them to the waiting call, but only from the host asked (an agent
//! speaks only for its own requests). Dropping a [`LogStream`] (the client went away) cancels
//! the request at the agent; a session that ends ends its host's requests. Answers never block
//! a session: a caller that falls [`QUEUE`] messages behind loses its request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// How many answers may wait for a slow caller before its request is dropped.
pub const QUEUE: usize = 256;

/// What a session sends its agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogCommand {
    Request {
        request_id: String,
        app: String,
        lines: u32,
        follow: bool,
    },
    Cancel {
        request_id: String,
    },
}

/// Lines an agent sent for a request; `done` ends it, `error` says why it failed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogChunk {
    pub lines: Vec<String>,
    pub done: bool,
    pub error: Option<String>,
}

struct Pending {
    host: String,
    tx: mpsc::Sender<LogChunk>,
}

#[derive(Default)]
struct Inner {
    /// The session of each host that takes log requests (the newest).
    sessions: HashMap<String, (u64, mpsc::UnboundedSender<LogCommand>)>,
    pending: HashMap<String, Pending>,
    next_id: u64,
}

#[derive(Default)]
pub struct LogRelay {
    inner: Mutex<Inner>,
}

/// An open request: its answers arrive on `rx`; dropping it cancels the request.
pub struct LogStream {
    pub host: String,
    pub rx: mpsc::Receiver<LogChunk>,
    request_id: String,
    relay: Arc<LogRelay>,
}

impl Drop for LogStream {
    fn drop(&mut self) {
        self.relay.close(&self.request_id);
    }
}

impl LogRelay {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A session of `host` opened: log requests for the host go to it from now on.
    pub fn attach(&self, host: &str, session: u64) -> mpsc::UnboundedReceiver<LogCommand> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut inner = self.inner();
        inner.sessions.insert(host.to_string(), (session, tx));
        // What the older session was asked dies with it.
        inner.pending.retain(|_, pending| pending.host != host);
        rx
    }

    /// The session ended: its host's open requests end with it (their callers see the end).
    pub fn detach(&self, host: &str, session: u64) {
        let mut inner = self.inner();
        if inner
            .sessions
            .get(host)
            .is_some_and(|(id, _)| *id == session)
        {
            inner.sessions.remove(host);
            inner.pending.retain(|_, pending| pending.host != host);
        }
    }

    /// Sends a request to `host`'s agent; `None` when the host has no session.
    pub fn open(
        self: &Arc<Self>,
        host: &str,
        app: &str,
        lines: u32,
        follow: bool,
    ) -> Option<LogStream> {
        let mut inner = self.inner();
        inner.next_id += 1;
        let request_id = format!("log-{}", inner.next_id);
        let (_, session) = inner.sessions.get(host)?;
        session
            .send(LogCommand::Request {
                request_id: request_id.clone(),
                app: app.to_string(),
                lines,
                follow,
            })
            .ok()?;
        let (tx, rx) = mpsc::channel(QUEUE);
        inner.pending.insert(
            request_id.clone(),
            Pending {
                host: host.to_string(),
                tx,
            },
        );
        Some(LogStream {
            host: host.to_string(),
            rx,
            request_id,
            relay: self.clone(),
        })
    }

    /// An agent's answer: handed to the caller if `host` was asked under `request_id`.
    pub fn deliver(&self, host: &str, request_id: &str, chunk: LogChunk) {
        let mut inner = self.inner();
        let Some(pending) = inner.pending.get(request_id) else {
            return;
        };
        if pending.host != host {
            tracing::warn!("host {host} answered a log request sent to another host: ignored");
            return;
        }
        let done = chunk.done;
        let gone = pending.tx.try_send(chunk).is_err();
        if done || gone {
            inner.pending.remove(request_id);
            if gone && !done {
                if let Some((_, session)) = inner.sessions.get(host) {
                    let _ = session.send(LogCommand::Cancel {
                        request_id: request_id.to_string(),
                    });
                }
            }
        }
    }

    fn close(&self, request_id: &str) {
        let mut inner = self.inner();
        if let Some(pending) = inner.pending.remove(request_id) {
            if let Some((_, session)) = inner.sessions.get(&pending.host) {
                let _ = session.send(LogCommand::Cancel {
                    request_id: request_id.to_string(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn routes_answers_to_their_caller_and_cancels_when_it_goes() {
        let relay = Arc::new(LogRelay::default());
        assert!(relay.open("h1", "web", 5, false).is_none(), "no session");
        let mut commands = relay.attach("h1", 1);
        let mut stream = relay.open("h1", "web", 5, true).unwrap();
        let Some(LogCommand::Request { request_id, .. }) = commands.recv().await else {
            panic!("no request sent");
        };
        let chunk = LogChunk {
            lines: vec!["hello".into()],
            ..Default::default()
        };
        relay.deliver("h2", &request_id, chunk.clone());
        relay.deliver("h1", &request_id, chunk.clone());
        assert_eq!(stream.rx.recv().await.unwrap(), chunk);
        assert!(
            stream.rx.try_recv().is_err(),
            "another host's answer is dropped"
        );
        drop(stream);
        assert_eq!(
            commands.recv().await.unwrap(),
            LogCommand::Cancel { request_id }
        );

        // A session that ends ends its requests; an older session's end changes nothing.
        let mut stream = relay.open("h1", "web", 5, true).unwrap();
        let _newer = relay.attach("h1", 2);
        assert!(stream.rx.recv().await.is_none(), "ended with its session");
        let mut stream = relay.open("h1", "web", 5, true).unwrap();
        relay.detach("h1", 1);
        assert!(
            stream.rx.try_recv().is_err(),
            "an older session's end changes nothing"
        );
        relay.detach("h1", 2);
        assert!(stream.rx.recv().await.is_none(), "ended with its session");
    }
}
