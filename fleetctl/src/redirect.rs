//! A call a controller answers with the redirect to its leader (`fleet_proto::leader`) is sent
//! once more, to the leader it names, and never further: [`RedirectChannel`] sits under
//! `FleetServiceClient`, so every verb follows redirects without knowing of them. Only a
//! request whose body ended within [`REPLAYABLE_BYTES`] can be sent twice (every unary and
//! server-streaming call; an artifact upload is not, and its redirect is answered as it came).
//! Following a redirect is safe because the leader is verified, like every controller, against
//! the fleet CA as `fleet-controller`, whatever address it is at.

use bytes::Bytes;
use fleet_proto::leader;
use http_body::Frame;
use http_body_util::BodyExt;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tonic::body::Body;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// The largest request body kept to be sent again to the leader.
pub const REPLAYABLE_BYTES: usize = 256 * 1024;
/// How long a connection to the leader a redirect named may take.
const LEADER_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A channel to one controller that follows its redirect to the leader once per call.
#[derive(Clone)]
pub struct RedirectChannel {
    inner: Channel,
    tls: ClientTlsConfig,
    /// Channels to the leaders redirects named, by URL: a second redirect reuses the first's.
    leaders: Arc<Mutex<HashMap<String, Channel>>>,
}

impl RedirectChannel {
    /// Wraps the channel to a controller; `tls` is what a connection to its leader uses.
    pub fn new(inner: Channel, tls: ClientTlsConfig) -> RedirectChannel {
        RedirectChannel {
            inner,
            tls,
            leaders: Arc::default(),
        }
    }

    async fn leader_channel(&self, url: &str) -> Result<Channel, String> {
        if let Some(channel) = self.leaders.lock().expect("leaders lock").get(url) {
            return Ok(channel.clone());
        }
        let endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| e.to_string())?
            .tls_config(self.tls.clone())
            .map_err(|e| e.to_string())?
            .connect_timeout(LEADER_CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        let channel = match tokio::time::timeout(LEADER_CONNECT_TIMEOUT, endpoint.connect()).await {
            Ok(Ok(channel)) => channel,
            Ok(Err(e)) => return Err(fleet_proto::error_text::with_sources(&e)),
            Err(_) => {
                return Err(format!(
                    "no answer within {}s",
                    LEADER_CONNECT_TIMEOUT.as_secs()
                ))
            }
        };
        self.leaders
            .lock()
            .expect("leaders lock")
            .insert(url.to_string(), channel.clone());
        Ok(channel)
    }
}

/// A request body read up to [`REPLAYABLE_BYTES`]: whole (it can be sent again), or the frames
/// read so far followed by the rest.
enum Read {
    Whole(Vec<Frame<Bytes>>),
    Partial(Body),
}

async fn read_replayable(mut body: Body) -> Result<Read, tonic::Status> {
    let mut frames = Vec::new();
    let mut n_bytes = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        n_bytes += frame.data_ref().map_or(0, Bytes::len);
        frames.push(frame);
        if n_bytes > REPLAYABLE_BYTES {
            let read = futures::stream::iter(frames.into_iter().map(Ok::<_, tonic::Status>));
            let rest = http_body_util::BodyStream::new(body);
            let joined = http_body_util::StreamBody::new(futures::StreamExt::chain(read, rest));
            return Ok(Read::Partial(Body::new(joined)));
        }
    }
    Ok(Read::Whole(frames))
}

fn replay(frames: &[Frame<Bytes>]) -> Body {
    let copies: Vec<Result<Frame<Bytes>, tonic::Status>> = frames
        .iter()
        .filter_map(|frame| {
            frame
                .data_ref()
                .map(|data| Frame::data(data.clone()))
                .or_else(|| frame.trailers_ref().map(|t| Frame::trailers(t.clone())))
                .map(Ok)
        })
        .collect();
    Body::new(http_body_util::StreamBody::new(futures::stream::iter(
        copies,
    )))
}

fn request_like(parts: &http::request::Parts, body: Body) -> http::Request<Body> {
    let mut request = http::Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    request
}

impl tower::Service<http::Request<Body>> for RedirectChannel {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        tower::Service::poll_ready(&mut self.inner, cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The channel that was polled ready takes the call; the clone left behind is fresh.
        let clone = self.clone();
        let mut this = std::mem::replace(self, clone);
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let frames = match read_replayable(body).await? {
                Read::Partial(body) => {
                    let response = this.inner.call(request_like(&parts, body)).await?;
                    return Ok(match leader_named(&response) {
                        Some(leader_url) => answer(
                            format!(
                                "this controller is not the leader; the leader is at {leader_url}, and fleetctl sends a request this large only once: run the command again with --controller {leader_url}"
                            ),
                            &leader_url,
                        ),
                        None => response,
                    });
                }
                Read::Whole(frames) => frames,
            };
            let response = this
                .inner
                .call(request_like(&parts, replay(&frames)))
                .await?;
            let Some(leader_url) = leader_named(&response) else {
                return Ok(response);
            };
            let mut leader = match this.leader_channel(&leader_url).await {
                Ok(channel) => channel,
                Err(why) => {
                    return Ok(answer(
                        format!(
                            "this controller is not the leader, and the leader it named, {leader_url}, cannot be reached: {why}"
                        ),
                        &leader_url,
                    ))
                }
            };
            std::future::poll_fn(|cx| tower::Service::poll_ready(&mut leader, cx)).await?;
            let response = leader.call(request_like(&parts, replay(&frames))).await?;
            // One hop per call: a leader that redirects again is not followed.
            Ok(match leader_named(&response) {
                Some(named_next) => answer(
                    format!(
                        "this controller is not the leader, and the leader it named, {leader_url}, answered that it is not the leader either (it names {named_next}): an election may be under way; try again in a few seconds"
                    ),
                    &leader_url,
                ),
                None => response,
            })
        })
    }
}

/// The leader a response redirects to, when it is the redirect (a trailers-only answer).
fn leader_named(response: &http::Response<Body>) -> Option<String> {
    tonic::Status::from_header_map(response.headers())
        .as_ref()
        .and_then(leader::leader_of)
}

/// An answer made here about a redirect: `UNAVAILABLE` with `message`, naming `leader_url`.
fn answer(message: String, leader_url: &str) -> http::Response<Body> {
    let mut status = tonic::Status::unavailable(message);
    if let Ok(value) = leader_url.parse() {
        status.metadata_mut().insert(leader::LEADER_HEADER, value);
    }
    status.into_http()
}

#[cfg(test)]
mod tests {
    //! Small TLS gRPC servers on loopback that answer every call with one fixed status, signed
    //! by a CA made here: a follower that redirects, a leader that answers.
    use super::*;
    use crate::client::{connect_any, CliError};
    use fleet_proto::pb;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tonic::transport::{Identity, Server, ServerTlsConfig};

    /// Answers every call with `status`, counting the calls.
    #[derive(Clone)]
    struct Answer {
        status: Arc<Mutex<tonic::Status>>,
        calls: Arc<AtomicUsize>,
    }

    impl tonic::server::NamedService for Answer {
        const NAME: &'static str = "fleet.v1.FleetService";
    }

    impl tower::Service<http::Request<Body>> for Answer {
        type Response = http::Response<Body>;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<Body>) -> Self::Future {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let status = self.status.lock().unwrap().clone();
            std::future::ready(Ok(status.into_http()))
        }
    }

    struct TestServer {
        url: String,
        answer: Answer,
        task: tokio::task::JoinHandle<()>,
    }

    impl TestServer {
        fn calls(&self) -> usize {
            self.answer.calls.load(Ordering::SeqCst)
        }
        fn answer_with(&self, status: tonic::Status) {
            *self.answer.status.lock().unwrap() = status;
        }
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    /// A config dir holding the CA, and a way to start servers with its certificate.
    struct Pki {
        dir: tempfile::TempDir,
        cert_pem: String,
        key_pem: String,
    }

    fn pki() -> Pki {
        let (ca_pem, ca_key_pem) = fleet_pki::ca::generate_ca().unwrap();
        let authority = fleet_pki::ca::Authority::load(&ca_pem, &ca_key_pem).unwrap();
        let issued = authority
            .issue_controller(&["127.0.0.1".to_string()])
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(crate::client::CA_FILE), &ca_pem).unwrap();
        Pki {
            dir,
            cert_pem: issued.cert_pem,
            key_pem: issued.key_pem.unwrap(),
        }
    }

    async fn serve(pki: &Pki, status: tonic::Status) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let answer = Answer {
            status: Arc::new(Mutex::new(status)),
            calls: Arc::default(),
        };
        let tls = ServerTlsConfig::new().identity(Identity::from_pem(&pki.cert_pem, &pki.key_pem));
        let router = Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(answer.clone());
        let task = tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = router.serve_with_incoming(incoming).await;
        });
        TestServer { url, answer, task }
    }

    async fn list_hosts(urls: &[String], pki: &Pki) -> Result<(), CliError> {
        let connection = connect_any(urls, pki.dir.path()).await?;
        let mut client = connection.client.clone();
        match tokio::time::timeout(
            Duration::from_secs(20),
            client.list_hosts(pb::ListHostsRequest::default()),
        )
        .await
        .expect("the call ends")
        {
            Ok(_) => Ok(()),
            Err(status) => Err(connection.error(status)),
        }
    }

    #[tokio::test]
    async fn a_redirect_is_followed_once_to_the_leader() {
        let pki = pki();
        let leader = serve(&pki, tonic::Status::not_found("the leader answered")).await;
        let follower = serve(&pki, leader::not_leader_status(Some(&leader.url))).await;

        let answered = list_hosts(std::slice::from_ref(&follower.url), &pki)
            .await
            .unwrap_err();
        assert!(
            answered.to_string().contains("the leader answered"),
            "{answered}"
        );
        assert_eq!((follower.calls(), leader.calls()), (1, 1));

        // A leader that redirects again (to the follower) is not followed: one hop per call.
        leader.answer_with(leader::not_leader_status(Some(&follower.url)));
        let answered = list_hosts(std::slice::from_ref(&follower.url), &pki)
            .await
            .unwrap_err();
        assert_eq!((follower.calls(), leader.calls()), (2, 2));
        assert!(matches!(answered, CliError::Unreachable(_)), "{answered}");
        assert!(
            answered
                .to_string()
                .contains("answered that it is not the leader either"),
            "{answered}"
        );

        // A big upload is not sent twice: the answer names the leader to run it against.
        follower.answer_with(leader::not_leader_status(Some(&leader.url)));
        let connection = connect_any(std::slice::from_ref(&follower.url), pki.dir.path())
            .await
            .unwrap();
        let chunks = (0..3).map(|_| pb::CreateReleaseRequest {
            body: Some(pb::create_release_request::Body::Chunk(
                vec![7; 200 * 1024].into(),
            )),
        });
        let status = connection
            .client
            .clone()
            .create_release(tokio_stream::iter(chunks))
            .await
            .unwrap_err();
        let answered = connection.error(status).to_string();
        assert!(
            answered.contains(&format!(
                "run the command again with --controller {}",
                leader.url
            )),
            "{answered}"
        );
        assert_eq!((follower.calls(), leader.calls()), (3, 2));
        follower.answer_with(leader::not_leader_status(Some(&leader.url)));

        // No leader known: the follower's answer, which says to try again.
        follower.answer_with(leader::not_leader_status(None));
        let answered = list_hosts(std::slice::from_ref(&follower.url), &pki)
            .await
            .unwrap_err();
        assert_eq!((follower.calls(), leader.calls()), (4, 2));
        assert!(
            answered.to_string().contains("no leader elected yet"),
            "{answered}"
        );

        // A leader that cannot be reached: said so, naming it.
        let closed = closed_port_url().await;
        follower.answer_with(leader::not_leader_status(Some(&closed)));
        let answered = list_hosts(std::slice::from_ref(&follower.url), &pki)
            .await
            .unwrap_err();
        assert!(answered.to_string().contains(&closed), "{answered}");
        assert_eq!((follower.calls(), leader.calls()), (5, 2));
    }

    /// A loopback URL nothing listens on (a port bound, then freed).
    async fn closed_port_url() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        drop(listener);
        url
    }

    #[tokio::test]
    async fn urls_are_tried_in_order_and_every_failure_is_named() {
        let pki = pki();
        let controller = serve(&pki, tonic::Status::not_found("the controller answered")).await;
        let closed = closed_port_url().await;
        // A plain TCP listener that accepts and never speaks TLS.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent_url = format!("https://{}", silent.local_addr().unwrap());
        // A TLS server of another CA (another fleet's controller).
        let other_fleet = pki_server_of_another_fleet().await;

        let answered = list_hosts(&[closed.clone(), controller.url.clone()], &pki)
            .await
            .unwrap_err();
        assert!(
            answered.to_string().contains("the controller answered"),
            "{answered}"
        );

        let refused = list_hosts(
            &[closed.clone(), silent_url.clone(), other_fleet.url.clone()],
            &pki,
        )
        .await
        .unwrap_err();
        let text = refused.to_string();
        assert!(matches!(refused, CliError::Unreachable(_)), "{text}");
        for url in [&closed, &silent_url, &other_fleet.url] {
            assert!(text.contains(url.as_str()), "{url} not named in: {text}");
        }
        assert!(text.contains("no answer within"), "{text}");
        assert_eq!(other_fleet.calls(), 0);

        // An entry that is not an https URL is refused before anything is dialled, named.
        let bad = list_hosts(
            &[controller.url.clone(), "http://127.0.0.1:7700".to_string()],
            &pki,
        )
        .await
        .unwrap_err();
        assert!(matches!(bad, CliError::Usage(_)), "{bad}");
        assert!(
            bad.to_string().contains("\"http://127.0.0.1:7700\""),
            "{bad}"
        );
    }

    async fn pki_server_of_another_fleet() -> TestServer {
        let other = pki();
        serve(&other, tonic::Status::not_found("another fleet")).await
    }
}
