//! The controller's network edge, before any handler runs: the TLS handshake (mutual TLS, a
//! client certificate optional at the handshake so that a new host can `Join`), and the limits
//! that keep a client from costing the controller more than a bounded amount of memory.
//!
//! - A connection without a client certificate may call `AgentService.Join` and nothing else:
//!   any other call is refused before a byte of its body is read. Its request may be at most
//!   [`Limits::anonymous_request_bytes`], the whole call must finish within
//!   [`Limits::anonymous_call`], and the connection lives at most
//!   [`Limits::anonymous_lifetime`]. At most [`Limits::anonymous_connections_per_source`] such
//!   connections may be open from one source (an IPv4 address, an IPv6 /64) and
//!   [`Limits::anonymous_connections`] in all; more are closed after the handshake.
//! - A client certificate that was revoked, or that cannot be read, is refused before its
//!   request's body is read; an agent's certificate may call `AgentService` only.
//! - At most [`Limits::handshakes`] TLS handshakes run at once, on the clients' lane (a peer
//!   is not known before it); a connection is then served on the agents' lane when it
//!   presented an agent certificate, on the clients' otherwise ([`lane_of`], `crate::lanes`).
//! - On every connection, a gRPC message that was begun must be finished within
//!   [`Limits::message_deadline`] (a stalled half-sent message holds its buffer), and at most
//!   [`Limits::streams_per_connection`] streams may be open at once (set on the server).
//!
//! - A connection whose TLS handshake fails (garbage instead of a hello) is closed at once; one
//!   that has not finished its handshake within [`Limits::handshake`] (a hello and then
//!   nothing) is closed then. Each is logged once, with the peer's address.
//! - A connection that leaves an answer unread (it asked for an artifact, or follows events, and
//!   stopped reading: HTTP/2 flow control, or TCP, then stalls the controller's sends) is
//!   closed once it took nothing of what was waiting for it for [`Limits::write_stall`], and
//!   logged once with the peer's address, who it is and what it asked for. A response body
//!   owes the peer data from the moment it handed hyper a frame until hyper asks for the next
//!   one (which it does only once flow control and the socket took the last); a body with
//!   nothing to send owes nothing, so an idle session or `events --follow` is never cut.
//!
//! Sessions, `events --follow` and the watchers of a paused rollout are idle *between*
//! messages by design and keep working: only a message left half-sent, or an answer left
//! unread, is cut.

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
    /// TLS handshakes under way at once.
    pub handshakes: usize,
    /// Open connections without a client certificate, per source (IPv4 address, IPv6 /64).
    pub anonymous_connections_per_source: usize,
    /// Open connections without a client certificate, in all.
    pub anonymous_connections: usize,
    /// How long a connection without a client certificate may stay open.
    pub anonymous_lifetime: Duration,
    /// The request body of a call without a client certificate (a `Join` needs kilobytes).
    pub anonymous_request_bytes: u64,
    /// How long a call without a client certificate may take, all of it.
    pub anonymous_call: Duration,
    /// How long a gRPC message may stay half-sent, on any connection.
    pub message_deadline: Duration,
    /// Concurrent streams per connection (HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub streams_per_connection: u32,
    /// How long an answer may wait for its peer to take any of it (no write progress while
    /// something is to be sent) before the connection is closed.
    pub write_stall: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            handshake: Duration::from_secs(10),
            handshakes: 256,
            anonymous_connections_per_source: 32,
            anonymous_connections: 256,
            anonymous_lifetime: Duration::from_secs(30),
            anonymous_request_bytes: 32 * 1024,
            anonymous_call: Duration::from_secs(10),
            message_deadline: Duration::from_secs(60),
            streams_per_connection: 64,
            write_stall: Duration::from_secs(60),
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

/// The source a connection is counted under: an IPv4 address, or the /64 of an IPv6 one (one
/// host usually holds a whole /64).
fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !((1u128 << 64) - 1),
            )),
        },
    }
}

/// Counts the open connections without a client certificate, per source and in all.
#[derive(Default)]
struct AnonymousConnections {
    counts: Mutex<(HashMap<IpAddr, usize>, usize)>,
}

/// One counted connection; gives its place back when dropped.
struct AnonymousSlot {
    counts: Arc<AnonymousConnections>,
    source: IpAddr,
}

impl AnonymousConnections {
    fn take(
        self: &Arc<Self>,
        ip: IpAddr,
        per_source: usize,
        total: usize,
    ) -> Result<AnonymousSlot, String> {
        let source = source_of(ip);
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let (by_source, all) = &mut *counts;
        if *all >= total {
            return Err(format!(
                "{total} connections without a client certificate are open in all"
            ));
        }
        let count = by_source.entry(source).or_default();
        if *count >= per_source {
            return Err(format!(
                "{per_source} connections without a client certificate are open from {source} already"
            ));
        }
        *count += 1;
        *all += 1;
        Ok(AnonymousSlot {
            counts: self.clone(),
            source,
        })
    }
}

impl Drop for AnonymousSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.counts.lock().unwrap_or_else(|p| p.into_inner());
        let (by_source, all) = &mut *counts;
        *all -= 1;
        if let Some(count) = by_source.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                by_source.remove(&self.source);
            }
        }
    }
}

/// A TCP connection as the server sees it. Without a client certificate it holds its place
/// among the anonymous connections of its source, and reads end (the connection closes) once
/// its lifetime is over.
pub struct EdgeTcp {
    tcp: TcpStream,
    _slot: Option<AnonymousSlot>,
    end_of_life: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Closes the connection from outside (a stalled answer), once it is handed over.
    guard: Option<Registered>,
}

impl EdgeTcp {
    /// The error every read and write returns once the connection was closed from outside.
    fn closed_error(&mut self, cx: &Context<'_>) -> Option<std::io::Error> {
        let guard = &self.guard.as_ref()?.guard;
        guard.park(cx);
        guard.is_closed().then(|| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "closed by the controller: an answer stayed unread",
            )
        })
    }
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
        if let Some(end) = self.end_of_life.as_mut() {
            if end.as_mut().poll(cx).is_ready() {
                // End of file: the server side closes the connection.
                return Poll::Ready(Ok(()));
            }
        }
        if let Some(e) = self.closed_error(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for EdgeTcp {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(e) = self.closed_error(cx) {
            return Poll::Ready(Err(e));
        }
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
        if let Some(e) = self.closed_error(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
}

/// One connection handed over to the server, as the request layer finds it (by its peer's
/// address) to close it from outside.
pub struct ConnectionGuard {
    peer: std::net::SocketAddr,
    closed: std::sync::atomic::AtomicBool,
    /// The connection task's waker, from its last read or write: woken to see it is closed.
    waker: Mutex<Option<std::task::Waker>>,
}

impl ConnectionGuard {
    fn new(peer: std::net::SocketAddr) -> ConnectionGuard {
        ConnectionGuard {
            peer,
            closed: std::sync::atomic::AtomicBool::new(false),
            waker: Mutex::new(None),
        }
    }

    fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Keeps the waker of the task that polls the connection.
    fn park(&self, cx: &Context<'_>) {
        let mut waker = self.waker.lock().unwrap_or_else(|p| p.into_inner());
        if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *waker = Some(cx.waker().clone());
        }
    }

    /// Closes the connection (its next read or write fails) and logs why, once.
    fn close(&self, why: &str) {
        if self.closed.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        tracing::warn!("closed the connection from {}: {why}", self.peer);
        let waker = self.waker.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// The connections handed over to the server, by their peer's address.
#[derive(Default)]
pub struct Connections {
    by_peer: Mutex<HashMap<std::net::SocketAddr, Arc<ConnectionGuard>>>,
}

impl Connections {
    fn register(self: &Arc<Self>, peer: std::net::SocketAddr) -> Registered {
        let guard = Arc::new(ConnectionGuard::new(peer));
        self.by_peer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer, guard.clone());
        Registered {
            connections: self.clone(),
            guard,
        }
    }

    fn get(&self, peer: std::net::SocketAddr) -> Option<Arc<ConnectionGuard>> {
        self.by_peer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&peer)
            .cloned()
    }
}

/// A connection's place in [`Connections`]; gives it back when the connection is dropped.
struct Registered {
    connections: Arc<Connections>,
    guard: Arc<ConnectionGuard>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut by_peer = self
            .connections
            .by_peer
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if by_peer
            .get(&self.guard.peer)
            .is_some_and(|g| Arc::ptr_eq(g, &self.guard))
        {
            by_peer.remove(&self.guard.peer);
        }
    }
}

/// A log line at most once a second: [`OncePerSecond::say`] answers whether to write it, and
/// how many were left unwritten since the last one.
#[derive(Default)]
struct OncePerSecond {
    state: Mutex<(Option<std::time::Instant>, u64)>,
}

impl OncePerSecond {
    fn say(&self, now: std::time::Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (last, unsaid) = &mut *state;
        if last.is_some_and(|at| now.saturating_duration_since(at) < Duration::from_secs(1)) {
            *unsaid += 1;
            return None;
        }
        *last = Some(now);
        Some(std::mem::take(unsaid))
    }
}

/// The TLS server config a connection accepted now is handshaken with (it changes when the
/// fleet CA is rotated, see `crate::ca_trust`).
pub type CurrentTls = Arc<dyn Fn() -> Arc<rustls::ServerConfig> + Send + Sync>;

/// Which lane a connection is served on (see `crate::lanes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// An agent's session: served first.
    Agents,
    /// Everything else (`fleetctl`, CI, joins): served with what the agents leave.
    Clients,
}

/// The lane of a connection that presented `certificate` (DER, verified against the fleet CA
/// by the handshake), or none. Only the role is read: whether the certificate is revoked, or
/// may make the call it makes, is checked on each request ([`EdgeLayer`]) whatever its lane.
pub fn lane_of(certificate: Option<&[u8]>) -> Lane {
    match certificate.map(fleet_pki::Identity::from_der) {
        Some(Ok(identity)) if identity.role == fleet_pki::Role::Agent => Lane::Agents,
        _ => Lane::Clients,
    }
}

/// The connections [`incoming`] hands over, by lane.
pub struct Lanes {
    pub agents: tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsStream<EdgeTcp>>>,
    pub clients: tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsStream<EdgeTcp>>>,
}

/// Accepts connections on `listener` and hands over those whose TLS handshake completed within
/// the limits, each to its [`Lane`]. Connections are accepted (and their sockets registered)
/// on the calling runtime; handshakes run concurrently on `handshakes_on` (the clients' lane:
/// a peer is not known before it), so a slow one holds up nobody. Ends when both receivers
/// are dropped.
pub fn incoming(
    listener: TcpListener,
    tls: CurrentTls,
    limits: Limits,
    connections: Arc<Connections>,
    handshakes_on: tokio::runtime::Handle,
) -> Lanes {
    let (agents_tx, agents_rx) = mpsc::channel(64);
    let (clients_tx, clients_rx) = mpsc::channel(64);
    let anonymous = Arc::new(AnonymousConnections::default());
    let handshakes = Arc::new(tokio::sync::Semaphore::new(limits.handshakes));
    let refusals_said = Arc::new(OncePerSecond::default());
    tokio::spawn(async move {
        let both_closed = {
            let (agents_tx, clients_tx) = (agents_tx.clone(), clients_tx.clone());
            async move {
                agents_tx.closed().await;
                clients_tx.closed().await;
            }
        };
        tokio::pin!(both_closed);
        loop {
            // Past the limit, connections wait in the kernel's backlog.
            let Ok(handshake) = handshakes.clone().acquire_owned().await else {
                return;
            };
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
                () = &mut both_closed => return,
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(tls());
            let (agents_tx, clients_tx, anonymous, connections, refusals_said) = (
                agents_tx.clone(),
                clients_tx.clone(),
                anonymous.clone(),
                connections.clone(),
                refusals_said.clone(),
            );
            handshakes_on.spawn(async move {
                let stream = EdgeTcp {
                    tcp,
                    _slot: None,
                    end_of_life: None,
                    guard: None,
                };
                let mut tls = match tokio::time::timeout(limits.handshake, acceptor.accept(stream))
                    .await
                {
                    Ok(Ok(tls)) => tls,
                    // Closed before it said anything: a port probe, nothing to report.
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        tracing::debug!("TLS handshake with {peer} failed: {e}");
                        return;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(
                                "closed a connection from {peer}: its TLS handshake failed ({e}); it did not speak TLS, or not with this controller's CA"
                            );
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(
                                "closed a connection from {peer}: it did not finish its TLS handshake within {:?}",
                                limits.handshake
                            );
                        return;
                    }
                };
                drop(handshake);
                let (io, session) = tls.get_mut();
                let leaf = session
                    .peer_certificates()
                    .and_then(|certs| certs.first())
                    .map(|leaf| leaf.as_ref());
                let lane = lane_of(leaf);
                if leaf.is_none() {
                    match anonymous.take(
                        peer.ip(),
                        limits.anonymous_connections_per_source,
                        limits.anonymous_connections,
                    ) {
                        Ok(slot) => {
                            io._slot = Some(slot);
                            io.end_of_life =
                                Some(Box::pin(tokio::time::sleep(limits.anonymous_lifetime)));
                        }
                        Err(why) => {
                            // A crowd of joins meets this thousands of times a second: one
                            // line a second says it, with how many were not written.
                            if let Some(unsaid) = refusals_said.say(std::time::Instant::now()) {
                                tracing::warn!(
                                    "closed a connection from {peer}: {why} (and {unsaid} more since the last such line: hosts retry)"
                                );
                            }
                            return;
                        }
                    }
                }
                tls.get_mut().0.guard = Some(connections.register(peer));
                let tx = match lane {
                    Lane::Agents => agents_tx,
                    Lane::Clients => clients_tx,
                };
                let _ = tx.send(Ok(tls)).await;
            });
        }
    });
    Lanes {
        agents: tokio_stream::wrappers::ReceiverStream::new(agents_rx),
        clients: tokio_stream::wrappers::ReceiverStream::new(clients_rx),
    }
}

/// The prefix of every `AgentService` call: all an agent certificate may call.
const AGENT_SERVICE_PREFIX: &str = "/fleet.v1.AgentService/";

/// Who a request comes from, as far as the edge needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// No client certificate.
    Anonymous,
    /// An agent certificate, not revoked, and who it names.
    Agent(fleet_pki::Identity),
    /// An operator's or CI's certificate, not revoked.
    Client(fleet_pki::Identity),
    /// A certificate that cannot be read (or not checked), and why.
    Refused(String),
    /// A revoked certificate: answered with the explicit revoked refusal
    /// (`fleet_proto::refusal`), which tells a removed host's agent to end (and to purge).
    Revoked { why: String, purge: bool },
}

/// Tells who presents a (DER) client certificate, already verified against the fleet CA.
pub type Classify = Arc<dyn Fn(&[u8]) -> Caller + Send + Sync>;

/// The leaf certificate the connection presented, if any.
fn client_certificate<B>(request: &http::Request<B>) -> Option<Vec<u8>> {
    let certs = request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|info| info.peer_certs())?;
    certs.first().map(|leaf| leaf.as_ref().to_vec())
}

/// The address of the peer a request came from.
fn peer_of<B>(request: &http::Request<B>) -> Option<std::net::SocketAddr> {
    request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|info| info.get_ref().remote_addr())
}

/// The tower layer that applies the per-request limits.
#[derive(Clone)]
pub struct EdgeLayer {
    pub limits: Limits,
    pub classify: Classify,
    /// The connections `incoming` handed over, to close one whose answer stays unread.
    pub connections: Arc<Connections>,
    /// This controller's role: a follower sends what only the leader serves to the leader
    /// (`crate::follower`).
    pub role: tokio::sync::watch::Receiver<crate::leader::Role>,
}

impl<S> tower::Layer<S> for EdgeLayer {
    type Service = EdgeService<S>;

    fn layer(&self, inner: S) -> EdgeService<S> {
        EdgeService {
            inner,
            limits: self.limits,
            classify: self.classify.clone(),
            connections: self.connections.clone(),
            role: self.role.clone(),
        }
    }
}

#[derive(Clone)]
pub struct EdgeService<S> {
    inner: S,
    limits: Limits,
    classify: Classify,
    connections: Arc<Connections>,
    role: tokio::sync::watch::Receiver<crate::leader::Role>,
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
    ResBody: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let limits = self.limits;
        let caller = match client_certificate(&request) {
            None => Caller::Anonymous,
            Some(der) => (self.classify)(&der),
        };
        let path = request.uri().path();
        // Refused before a byte of the body is read.
        let refusal = match &caller {
            Caller::Anonymous if path != JOIN_PATH => Some(tonic::Status::unauthenticated(
                "this call needs a client certificate from the fleet's CA: use the directory written by `fleetctl init` or `fleetctl credentials create` (--config-dir DIR)",
            )),
            Caller::Refused(why) => Some(tonic::Status::unauthenticated(why.clone())),
            Caller::Revoked { why, purge } => {
                Some(fleet_proto::refusal::revoked_status(why.clone(), *purge))
            }
            Caller::Agent(identity) if !path.starts_with(AGENT_SERVICE_PREFIX) => {
                Some(tonic::Status::permission_denied(format!(
                    "this call needs the admin or deployer role; your credential `{}` has role agent, which may call the agent service only",
                    identity.name
                )))
            }
            _ => crate::follower::refusal(&self.role.borrow(), path),
        };
        if let Some(status) = refusal {
            return Box::pin(async move { Ok(status.into_http()) });
        }
        // What a stalled answer is logged with: who asked for what.
        let stall = peer_of(&request)
            .and_then(|peer| self.connections.get(peer))
            .map(|guard| {
                let who = match &caller {
                    Caller::Agent(identity) | Caller::Client(identity) => {
                        format!("`{}`", identity.name)
                    }
                    _ => "a client without a certificate".to_string(),
                };
                let why = format!(
                    "{who} asked for {path} and took nothing of the answer for {:?}: it stopped reading",
                    limits.write_stall
                );
                (guard, why)
            });
        let authenticated = caller != Caller::Anonymous;
        let cap = (!authenticated).then_some(limits.anonymous_request_bytes);
        let mut request = request;
        // Read and checked once: `auth::require` takes the identity from here.
        if let Caller::Agent(identity) | Caller::Client(identity) = caller {
            request.extensions_mut().insert(identity);
        }
        let request = request.map(|body| {
            tonic::body::Body::new(GuardedBody::new(body, limits.message_deadline, cap))
        });
        // The service that was polled ready handles this call; a clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let call = inner.call(request);
        let watched = move |response: http::Response<ResBody>| {
            response.map(|body| match stall {
                Some((guard, why)) => {
                    tonic::body::Body::new(WatchedBody::new(body, guard, why, limits.write_stall))
                }
                None => tonic::body::Body::new(body),
            })
        };
        if authenticated {
            return Box::pin(async move { call.await.map(watched) });
        }
        Box::pin(async move {
            match tokio::time::timeout(limits.anonymous_call, call).await {
                Ok(result) => result.map(watched),
                Err(_) => Ok(tonic::Status::deadline_exceeded(format!(
                    "a call without a client certificate must finish within {:?}: send the whole request at once (a join is a few kilobytes)",
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
    /// Takes the next bytes of the stream; returns whether a message began in them (its first
    /// header byte), so its deadline can start from there.
    fn feed(&mut self, mut data: &[u8]) -> bool {
        let mut began = false;
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = (self.remaining.min(data.len() as u64)) as usize;
                self.remaining -= n as u64;
                data = &data[n..];
                continue;
            }
            began |= self.header_len == 0;
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
        began
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
                    let began = this.framing.feed(data.chunk());
                    if !this.framing.inside_a_message() {
                        this.timer = None;
                    } else if began || this.timer.is_none() {
                        // The deadline runs from the first byte of the message now half-sent.
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

/// Whether a response body owes its peer data, and since when: from the frame it handed
/// hyper until hyper asks for the next one.
#[derive(Default)]
struct Owed {
    since: Mutex<Option<tokio::time::Instant>>,
    /// Wakes the watchdog when the body starts owing, or ends.
    changed: tokio::sync::Notify,
    ended: std::sync::atomic::AtomicBool,
}

/// A response body watched for an answer left unread: once it has owed its peer data for
/// `stall` without hyper asking for more, its connection is closed ([`ConnectionGuard::close`]).
struct WatchedBody<B> {
    inner: B,
    owed: Arc<Owed>,
    /// Taken when the watchdog starts, with the body's first frame.
    watchdog: Option<(Arc<ConnectionGuard>, String, Duration)>,
}

impl<B> WatchedBody<B> {
    fn new(inner: B, guard: Arc<ConnectionGuard>, why: String, stall: Duration) -> Self {
        WatchedBody {
            inner,
            owed: Arc::new(Owed::default()),
            watchdog: Some((guard, why, stall)),
        }
    }
}

/// Closes the connection once `owed` has owed data for `stall`; ends with the body.
async fn watch_owed(owed: Arc<Owed>, guard: Arc<ConnectionGuard>, why: String, stall: Duration) {
    use std::sync::atomic::Ordering;
    while !owed.ended.load(Ordering::Acquire) && !guard.is_closed() {
        let since = *owed.since.lock().unwrap_or_else(|p| p.into_inner());
        match since {
            None => owed.changed.notified().await,
            Some(since) if since.elapsed() >= stall => {
                guard.close(&why);
                return;
            }
            Some(since) => {
                tokio::select! {
                    () = tokio::time::sleep_until(since + stall) => {}
                    () = owed.changed.notified() => {}
                }
            }
        }
    }
}

impl<B> Drop for WatchedBody<B> {
    fn drop(&mut self) {
        self.owed
            .ended
            .store(true, std::sync::atomic::Ordering::Release);
        self.owed.changed.notify_one();
    }
}

impl<B> http_body::Body for WatchedBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        // Asked for more: whatever was owed was taken.
        *this.owed.since.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if frame.data_ref().is_some_and(|d| d.has_remaining()) {
                *this.owed.since.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(tokio::time::Instant::now());
                if let Some((guard, why, stall)) = this.watchdog.take() {
                    tokio::spawn(watch_owed(this.owed.clone(), guard, why, stall));
                }
                this.owed.changed.notify_one();
            }
        }
        polled.map(|frame| frame.map(|frame| frame.map_err(Into::into)))
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

    #[test]
    fn a_refusal_is_logged_at_most_once_a_second_with_the_count_left_out() {
        let said = OncePerSecond::default();
        let t0 = std::time::Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        assert_eq!(said.say(ms(0)), Some(0));
        assert_eq!(said.say(ms(10)), None);
        assert_eq!(said.say(ms(999)), None);
        assert_eq!(said.say(ms(1000)), Some(2));
        assert_eq!(said.say(ms(5000)), Some(0));
    }

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
        assert!(framing.feed(&h[..2]), "a message began");
        assert!(framing.inside_a_message());
        assert!(!framing.feed(&h[2..]), "the same message goes on");
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

    #[tokio::test(start_paused = true)]
    async fn the_deadline_runs_from_the_start_of_the_message_now_half_sent() {
        let deadline = Duration::from_secs(60);
        let (tx, inner) = body_fed_by_hand();
        let mut body = GuardedBody::new(inner, deadline, None);
        let mut first = header(10);
        first.extend_from_slice(&[0; 5]);
        tx.send(Ok(http_body::Frame::data(Bytes::from(first))))
            .await
            .unwrap();
        assert!(next(&mut body).await.unwrap().is_ok());
        tokio::time::advance(Duration::from_secs(50)).await;
        // One frame ends the first message and begins the second (as gRPC clients coalesce).
        let mut both = vec![0u8; 5];
        both.extend(header(10));
        both.push(0);
        tx.send(Ok(http_body::Frame::data(Bytes::from(both))))
            .await
            .unwrap();
        assert!(next(&mut body).await.unwrap().is_ok());
        let started = tokio::time::Instant::now();
        assert!(next(&mut body).await.unwrap().is_err());
        assert_eq!(
            started.elapsed(),
            deadline,
            "the second message gets its own 60 s"
        );
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

    async fn next_watched(
        body: &mut WatchedBody<tonic::body::Body>,
    ) -> Option<Result<http_body::Frame<Bytes>, BoxError>> {
        std::future::poll_fn(|cx| http_body::Body::poll_frame(Pin::new(&mut *body), cx)).await
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_left_unread_closes_its_connection_and_an_idle_stream_does_not() {
        let stall = Duration::from_secs(60);
        let peer: std::net::SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let data = || Ok(http_body::Frame::data(Bytes::from_static(b"abc")));
        // Nothing to send (an idle session, events with no events): never cut.
        let idle_guard = Arc::new(ConnectionGuard::new(peer));
        let (_idle_tx, inner) = body_fed_by_hand();
        let mut idle = WatchedBody::new(inner, idle_guard.clone(), "idle".into(), stall);
        assert!(tokio::time::timeout(stall * 3, next_watched(&mut idle))
            .await
            .is_err());
        assert!(!idle_guard.is_closed());

        // An answer taken (hyper asks for more) within the stall, then nothing to send.
        let guard = Arc::new(ConnectionGuard::new(peer));
        let (tx, inner) = body_fed_by_hand();
        let mut body = WatchedBody::new(inner, guard.clone(), "stalled".into(), stall);
        tx.send(data()).await.unwrap();
        assert!(next_watched(&mut body).await.unwrap().is_ok());
        tokio::time::sleep(stall / 2).await;
        let asked = tokio::time::timeout(Duration::from_millis(1), next_watched(&mut body)).await;
        assert!(asked.is_err(), "nothing more to send yet");
        tokio::time::sleep(stall * 2).await;
        assert!(!guard.is_closed(), "taken, then nothing owed: kept");

        // An answer handed over and never taken: closed at the stall, not before.
        tx.send(data()).await.unwrap();
        assert!(next_watched(&mut body).await.unwrap().is_ok());
        tokio::time::sleep(stall - Duration::from_secs(1)).await;
        assert!(!guard.is_closed(), "closed before the stall deadline");
        tokio::time::sleep(Duration::from_secs(2)).await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(guard.is_closed(), "an answer left unread past the stall");
    }

    #[test]
    fn only_an_agent_certificate_is_served_on_the_agents_lane() {
        use fleet_pki::Role;
        use rustls::pki_types::pem::PemObject;
        let (ca_pem, ca_key_pem) = fleet_pki::ca::generate_ca().unwrap();
        let ca = fleet_pki::ca::Authority::load(&ca_pem, &ca_key_pem).unwrap();
        let der = |role: Role| {
            let issued = ca
                .issue_client("someone", role, Duration::from_secs(3600))
                .unwrap();
            rustls::pki_types::CertificateDer::from_pem_slice(issued.cert_pem.as_bytes())
                .unwrap()
                .to_vec()
        };
        for (what, certificate, lane) in [
            ("an agent", Some(der(Role::Agent)), Lane::Agents),
            ("an admin", Some(der(Role::Admin)), Lane::Clients),
            ("a deployer", Some(der(Role::Deployer)), Lane::Clients),
            ("no certificate (a join)", None, Lane::Clients),
            (
                "an unreadable certificate",
                Some(vec![0x30, 0x03, 1, 2, 3]),
                Lane::Clients,
            ),
        ] {
            assert_eq!(lane_of(certificate.as_deref()), lane, "{what}");
        }
    }

    #[test]
    fn anonymous_connections_are_counted_per_address() {
        let counts = Arc::new(AnonymousConnections::default());
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let first = counts.take(a, 2, 3).unwrap();
        let _second = counts.take(a, 2, 3).unwrap();
        assert!(counts.take(a, 2, 3).is_err());
        let _other = counts.take(b, 2, 3).unwrap();
        // Three in all: a fourth source is refused too.
        assert!(counts.take("127.0.0.3".parse().unwrap(), 2, 3).is_err());
        drop(first);
        assert!(counts.take(a, 2, 3).is_ok());
        // An IPv6 /64 is one source.
        let v6 = |text: &str| text.parse::<IpAddr>().unwrap();
        let _x = counts.take(v6("2001:db8::1"), 1, 10).unwrap();
        assert!(counts.take(v6("2001:db8::ffff"), 1, 10).is_err());
        assert!(counts.take(v6("2001:db8:0:1::1"), 1, 10).is_ok());
    }
}
