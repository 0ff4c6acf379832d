//! The controller's network edge, before any handler runs: the TLS handshake (mutual TLS, a
//! client certificate optional at the handshake so that a new host can `Join`), and the limits
//! that keep a client from costing the controller more than a bounded amount of memory.
//!
//! - A connection without a client certificate may call `AgentService.Join` and nothing else:
//!   any other call is refused before a byte of its body is read. Its request may be at most
//!   [`Limits::anonymous_request_bytes`], and the whole call must finish within
//!   [`Limits::anonymous_call`]. At most [`Limits::anonymous_connections_per_ip`] such
//!   connections may be open from one source address; more are closed after the handshake.
//! - On every connection, a gRPC message that was begun must be finished within
//!   [`Limits::message_deadline`] (a stalled half-sent message holds its buffer), and at most
//!   [`Limits::streams_per_connection`] streams may be open at once (set on the server).
//!
//! Sessions, `events --follow` and the watchers of a paused rollout are idle *between*
//! messages by design and keep working: only a message left half-sent is cut.

use bytes::{Buf, Bytes};
use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::rustls;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};

/// The one call a connection without a client certificate may make.
pub const JOIN_PATH: &str = "/fleet.v1.AgentService/Join";

/// The edge's limits; [`Limits::default`] holds the values `SECURITY.md` states.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// How long a TLS handshake may take.
    pub handshake: Duration,
    /// Open connections without a client certificate, per source address.
    pub anonymous_connections_per_ip: usize,
    /// The request body of a call without a client certificate (a `Join` needs kilobytes).
    pub anonymous_request_bytes: u64,
    /// How long a call without a client certificate may take, all of it.
    pub anonymous_call: Duration,
    /// How long a gRPC message may stay half-sent, on any connection.
    pub message_deadline: Duration,
    /// Concurrent streams per connection (HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub streams_per_connection: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            handshake: Duration::from_secs(10),
            anonymous_connections_per_ip: 32,
            anonymous_request_bytes: 32 * 1024,
            anonymous_call: Duration::from_secs(10),
            message_deadline: Duration::from_secs(60),
            streams_per_connection: 64,
        }
    }
}

/// The rustls server side: the controller's certificate, client certificates verified against
/// the fleet CA but optional at the handshake, HTTP/2 only.
pub fn server_tls(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| format!("the fleet CA cannot be read: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("the fleet CA is not usable: {e}"))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| format!("cannot verify clients against the fleet CA: {e}"))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("the controller's certificate cannot be read: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| format!("the controller's key cannot be read: {e}"))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| format!("the controller's certificate and key do not go together: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Counts the open connections without a client certificate per source address.
#[derive(Default)]
struct AnonymousConnections {
    by_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// One counted connection; gives its place back when dropped.
struct AnonymousSlot {
    counts: Arc<AnonymousConnections>,
    ip: IpAddr,
}

impl AnonymousConnections {
    fn take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<AnonymousSlot> {
        let mut by_ip = self.by_ip.lock().unwrap_or_else(|p| p.into_inner());
        let count = by_ip.entry(ip).or_default();
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(AnonymousSlot {
            counts: self.clone(),
            ip,
        })
    }
}

impl Drop for AnonymousSlot {
    fn drop(&mut self) {
        let mut by_ip = self.counts.by_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = by_ip.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                by_ip.remove(&self.ip);
            }
        }
    }
}

/// A TCP connection as the server sees it, holding its place among the anonymous
/// connections of its address when it presented no client certificate.
pub struct EdgeTcp {
    tcp: TcpStream,
    _slot: Option<AnonymousSlot>,
}

impl Connected for EdgeTcp {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.tcp.connect_info()
    }
}

impl AsyncRead for EdgeTcp {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for EdgeTcp {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
}

/// Accepts connections on `listener` and hands over those whose TLS handshake completed within
/// the limits. Handshakes run concurrently, so a slow one holds up nobody. Ends when the
/// receiver is dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    limits: Limits,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsStream<EdgeTcp>>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let anonymous = Arc::new(AnonymousConnections::default());
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: pause rather than spin.
                        tracing::warn!("cannot accept a connection: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx, anonymous) = (acceptor.clone(), tx.clone(), anonymous.clone());
            tokio::spawn(async move {
                let stream = EdgeTcp { tcp, _slot: None };
                let mut tls =
                    match tokio::time::timeout(limits.handshake, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            tracing::debug!("TLS handshake with {peer} failed: {e}");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!("TLS handshake with {peer} took too long");
                            return;
                        }
                    };
                let (io, session) = tls.get_mut();
                let has_certificate = session
                    .peer_certificates()
                    .is_some_and(|certs| !certs.is_empty());
                if !has_certificate {
                    match anonymous.take(peer.ip(), limits.anonymous_connections_per_ip) {
                        Some(slot) => io._slot = Some(slot),
                        None => {
                            tracing::warn!(
                                "closed a connection from {peer}: {} connections without a client certificate are open from {} already",
                                limits.anonymous_connections_per_ip,
                                peer.ip()
                            );
                            return;
                        }
                    }
                }
                let _ = tx.send(Ok(tls)).await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Whether a request came over a connection that presented a client certificate (verified
/// against the fleet CA by rustls during the handshake).
fn has_client_certificate<B>(request: &http::Request<B>) -> bool {
    request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|info| info.peer_certs())
        .is_some_and(|certs| !certs.is_empty())
}

/// The tower layer that applies the per-request limits.
#[derive(Debug, Clone, Copy)]
pub struct EdgeLayer {
    pub limits: Limits,
}

impl<S> tower::Layer<S> for EdgeLayer {
    type Service = EdgeService<S>;

    fn layer(&self, inner: S) -> EdgeService<S> {
        EdgeService {
            inner,
            limits: self.limits,
        }
    }
}

#[derive(Debug, Clone)]
pub struct EdgeService<S> {
    inner: S,
    limits: Limits,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ResBody> tower::Service<http::Request<tonic::body::Body>> for EdgeService<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let limits = self.limits;
        let authenticated = has_client_certificate(&request);
        if !authenticated && request.uri().path() != JOIN_PATH {
            // Refused before a byte of the body is read.
            let status = tonic::Status::unauthenticated(
                "this call needs a client certificate from the fleet's CA: use the directory written by `fleetctl init` or `fleetctl credentials create` (--config-dir DIR)",
            );
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let cap = (!authenticated).then_some(limits.anonymous_request_bytes);
        let request = request.map(|body| {
            tonic::body::Body::new(GuardedBody::new(body, limits.message_deadline, cap))
        });
        // The service that was polled ready handles this call; a clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let call = inner.call(request);
        if authenticated {
            return Box::pin(call);
        }
        Box::pin(async move {
            match tokio::time::timeout(limits.anonymous_call, call).await {
                Ok(result) => result,
                Err(_) => Ok(tonic::Status::deadline_exceeded(format!(
                    "a call without a client certificate must finish within {:?}",
                    limits.anonymous_call
                ))
                .into_http()),
            }
        })
    }
}

/// Where a stream of gRPC messages (a 5-byte header: flag and big-endian length, then the
/// message) stands: inside a message or between two.
#[derive(Debug, Default, Clone, PartialEq)]
struct Framing {
    header: [u8; 5],
    header_len: usize,
    remaining: u64,
}

impl Framing {
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = (self.remaining.min(data.len() as u64)) as usize;
                self.remaining -= n as u64;
                data = &data[n..];
                continue;
            }
            self.header[self.header_len] = data[0];
            self.header_len += 1;
            data = &data[1..];
            if self.header_len == 5 {
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]);
                self.remaining = u64::from(len);
                self.header_len = 0;
            }
        }
    }

    fn inside_a_message(&self) -> bool {
        self.header_len > 0 || self.remaining > 0
    }
}

/// A request body cut off (with an error, which resets the stream and frees what was
/// buffered) when a message stays half-sent past its deadline, or when it grows past `cap`.
struct GuardedBody {
    inner: tonic::body::Body,
    framing: Framing,
    deadline: Duration,
    /// Runs while a message is half-sent.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    cap: Option<u64>,
    seen: u64,
}

impl GuardedBody {
    fn new(inner: tonic::body::Body, deadline: Duration, cap: Option<u64>) -> GuardedBody {
        GuardedBody {
            inner,
            framing: Framing::default(),
            deadline,
            timer: None,
            cap,
            seen: 0,
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl http_body::Body for GuardedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.remaining() as u64;
                    if let Some(cap) = this.cap.filter(|cap| this.seen > *cap) {
                        return Poll::Ready(Some(Err(format!(
                            "a request without a client certificate may carry at most {cap} bytes"
                        )
                        .into())));
                    }
                    this.framing.feed(data.chunk());
                    if !this.framing.inside_a_message() {
                        this.timer = None;
                    } else if this.timer.is_none() {
                        this.timer = Some(Box::pin(tokio::time::sleep(this.deadline)));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let expired = this
                    .timer
                    .as_mut()
                    .is_some_and(|timer| timer.as_mut().poll(cx).is_ready());
                if expired {
                    return Poll::Ready(Some(Err(format!(
                        "a message was begun and not finished within {:?}",
                        this.deadline
                    )
                    .into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(len: u32) -> Vec<u8> {
        let mut h = vec![0u8];
        h.extend_from_slice(&len.to_be_bytes());
        h
    }

    #[test]
    fn framing_knows_when_a_message_is_half_sent() {
        let mut framing = Framing::default();
        assert!(!framing.inside_a_message());
        // A header cut in two, then the message in two pieces.
        let h = header(10);
        framing.feed(&h[..2]);
        assert!(framing.inside_a_message());
        framing.feed(&h[2..]);
        assert!(framing.inside_a_message());
        framing.feed(&[1; 4]);
        assert!(framing.inside_a_message());
        framing.feed(&[1; 6]);
        assert!(!framing.inside_a_message());
        // Two whole messages and the start of a third in one frame.
        let mut frame = header(3);
        frame.extend_from_slice(&[7; 3]);
        frame.extend(header(0));
        frame.extend(header(4));
        frame.push(9);
        framing.feed(&frame);
        assert!(framing.inside_a_message());
        framing.feed(&[9; 3]);
        assert!(!framing.inside_a_message());
    }

    /// A body fed by hand: what the client has sent so far.
    fn body_fed_by_hand() -> (
        tokio::sync::mpsc::Sender<Result<http_body::Frame<Bytes>, BoxError>>,
        tonic::body::Body,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let body = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        (tx, tonic::body::Body::new(body))
    }

    async fn next(body: &mut GuardedBody) -> Option<Result<http_body::Frame<Bytes>, BoxError>> {
        std::future::poll_fn(|cx| http_body::Body::poll_frame(Pin::new(&mut *body), cx)).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_half_sent_message_is_cut_at_its_deadline_and_idle_streams_are_not() {
        let deadline = Duration::from_secs(60);
        let (tx, inner) = body_fed_by_hand();
        let mut body = GuardedBody::new(inner, deadline, None);
        // A whole message, then silence past the deadline: between messages, nothing is cut.
        let mut whole = header(2);
        whole.extend_from_slice(&[1, 2]);
        tx.send(Ok(http_body::Frame::data(Bytes::from(whole))))
            .await
            .unwrap();
        assert!(next(&mut body).await.unwrap().is_ok());
        let idle = tokio::time::timeout(deadline * 2, next(&mut body)).await;
        assert!(
            idle.is_err(),
            "an idle stream between messages must be left alone"
        );
        // Half a message, then silence: cut at the deadline.
        let mut half = header(100);
        half.extend_from_slice(&[0; 50]);
        tx.send(Ok(http_body::Frame::data(Bytes::from(half))))
            .await
            .unwrap();
        assert!(next(&mut body).await.unwrap().is_ok());
        let started = tokio::time::Instant::now();
        let cut = next(&mut body).await.unwrap();
        assert!(cut.is_err());
        assert_eq!(started.elapsed(), deadline);
    }

    #[tokio::test]
    async fn a_request_without_a_certificate_is_cut_past_its_cap() {
        let (tx, inner) = body_fed_by_hand();
        let mut body = GuardedBody::new(inner, Duration::from_secs(60), Some(1000));
        tx.send(Ok(http_body::Frame::data(Bytes::from(vec![0u8; 600]))))
            .await
            .unwrap();
        assert!(next(&mut body).await.unwrap().is_ok());
        tx.send(Ok(http_body::Frame::data(Bytes::from(vec![0u8; 600]))))
            .await
            .unwrap();
        let cut = next(&mut body).await.unwrap().unwrap_err();
        assert!(cut.to_string().contains("at most 1000 bytes"), "{cut}");
    }

    #[test]
    fn anonymous_connections_are_counted_per_address() {
        let counts = Arc::new(AnonymousConnections::default());
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let first = counts.take(a, 2).unwrap();
        let _second = counts.take(a, 2).unwrap();
        assert!(counts.take(a, 2).is_none());
        let _other = counts.take(b, 2).unwrap();
        drop(first);
        assert!(counts.take(a, 2).is_some());
    }
}
