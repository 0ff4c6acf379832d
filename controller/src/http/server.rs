//! The operators' HTTP listener: HTTP/1.1 with hyper, unauthenticated and read-only, so it is
//! held to the limits an unauthenticated caller gets at the gRPC edge: at most
//! [`Limits::max_connections`] connections at once (more are closed at once), request heads
//! of at most [`Limits::max_head_bytes`] that must arrive within [`Limits::head_timeout`], no
//! request bodies, and no connection older than [`Limits::max_connection_age`].
//!
//! Routes: `/healthz` (the process answers), `/readyz` (the store answers), `/metrics`
//! (Prometheus), `/` (the status page), `/status.js` and `/status.css` (its script and style)
//! and `/api/status` (what the page shows, as JSON). Only GET and HEAD.

use crate::fleet_state::FleetState;
use crate::http::metrics::{self, Metrics};
use crate::http::status_page;
use crate::http::InProgress;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// What bounds the cost of the listener's callers.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub max_head_bytes: usize,
    pub head_timeout: Duration,
    pub max_connection_age: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 64,
            max_head_bytes: 16 * 1024,
            head_timeout: Duration::from_secs(5),
            max_connection_age: Duration::from_secs(120),
        }
    }
}

/// What the handlers read.
pub struct AppState {
    pub fleet: Arc<FleetState>,
    pub metrics: Arc<Metrics>,
    pub in_progress: Arc<InProgress>,
}

/// Accepts connections until `stop` turns true; open connections end with it.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|stop| *stop) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, say: wait a moment rather than spin.
                tracing::warn!("http listener: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(
                "http listener: {peer} refused: {} connections open",
                limits.max_connections
            );
            drop(stream);
            continue;
        };
        let state = state.clone();
        connections.spawn(async move {
            let _slot = slot;
            let connection =
                hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(limits.head_timeout)
                    .max_buf_size(limits.max_head_bytes)
                    .serve_connection(
                        hyper_util::rt::TokioIo::new(stream),
                        hyper::service::service_fn(move |request| {
                            let state = state.clone();
                            async move {
                                Ok::<_, std::convert::Infallible>(handle(&state, request).await)
                            }
                        }),
                    );
            let _ = tokio::time::timeout(limits.max_connection_age, connection).await;
        });
    }
    connections.shutdown().await;
}

fn answer(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_str(content_type)
            .unwrap_or(header::HeaderValue::from_static("text/plain")),
    );
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    // Nothing inline, nothing from elsewhere, never in a frame.
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; frame-ancestors 'none'",
        ),
    );
    response
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    answer(status, "text/plain; charset=utf-8", body.into())
}

async fn handle<B>(state: &Arc<AppState>, request: Request<B>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET: this listener is read-only\n",
        );
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let has_body = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .is_some_and(|v| v != "0")
        || request.headers().contains_key(header::TRANSFER_ENCODING);
    if has_body {
        return text(
            StatusCode::PAYLOAD_TOO_LARGE,
            "requests carry no body here\n",
        );
    }
    match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        // Ready when the store answers. With several controllers (etcd, a later issue) this
        // also says whether this one leads.
        "/readyz" => {
            let fleet = state.fleet.clone();
            match tokio::task::spawn_blocking(move || fleet.deployments(None)).await {
                Ok(Ok(_)) => text(StatusCode::OK, "ready\n"),
                Ok(Err(e)) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: the store does not answer: {e}\n"),
                ),
                Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")),
            }
        }
        "/metrics" => {
            let metrics = state.metrics.clone();
            match tokio::task::spawn_blocking(move || metrics.encode()).await {
                Ok(Ok(body)) => answer(StatusCode::OK, metrics::CONTENT_TYPE, body),
                _ => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "cannot encode the metrics\n",
                ),
            }
        }
        "/api/status" => {
            let (fleet, in_progress) = (state.fleet.clone(), state.in_progress.clone());
            match tokio::task::spawn_blocking(move || status_page::snapshot(&fleet, &in_progress))
                .await
            {
                Ok(Ok(view)) => answer(
                    StatusCode::OK,
                    "application/json",
                    serde_json::to_vec(&view).unwrap_or_default(),
                ),
                Ok(Err(e)) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the store does not answer: {e}\n"),
                ),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
            }
        }
        "/" => {
            let (fleet, in_progress) = (state.fleet.clone(), state.in_progress.clone());
            match tokio::task::spawn_blocking(move || status_page::snapshot(&fleet, &in_progress))
                .await
            {
                Ok(Ok(view)) => answer(
                    StatusCode::OK,
                    "text/html; charset=utf-8",
                    status_page::render(&view),
                ),
                Ok(Err(e)) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the store does not answer: {e}\n"),
                ),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
            }
        }
        "/status.js" => answer(
            StatusCode::OK,
            "text/javascript; charset=utf-8",
            status_page::SCRIPT,
        ),
        "/status.css" => answer(
            StatusCode::OK,
            "text/css; charset=utf-8",
            status_page::STYLE,
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /, /metrics, /healthz or /readyz\n",
        ),
    }
}
