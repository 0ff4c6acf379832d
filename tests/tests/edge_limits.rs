//! User story: an attacker with no certificate opens TLS connections to the controller and
//! tries to exhaust it before it authenticates anyone: many HTTP/2 streams per connection,
//! each announcing a 4 MiB gRPC message and sending all of it but the last byte, held open; and
//! many connections from one address. The controller's memory stays within the bound
//! `SECURITY.md` states, and `fleetctl hosts` keeps answering meanwhile.

use bytes::Bytes;
use fleet_tests::fleet::Fleet;
use fleet_tests::process;
use http_body_util::StreamBody;
use hyper::body::Frame;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

/// The stated bound on what one source address without a certificate can make the controller
/// hold: 32 connections x 64 streams x 32 KiB; this test uses one connection, so far less.
const GROWTH_BOUND_KIB: u64 = 64 * 1024;
const STREAMS: usize = 100;
const ANNOUNCED: u32 = 4 << 20;

/// A TLS connection to the controller that presents no client certificate.
async fn anonymous_tls(fleet: &Fleet) -> tokio_rustls::client::TlsStream<TcpStream> {
    use rustls::pki_types::pem::PemObject;
    let ca = std::fs::read(fleet.config_dir().join("ca.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let addr = fleet
        .controller_url()
        .trim_start_matches("https://")
        .to_string();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("fleet-controller").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("a TLS handshake without a client certificate succeeds")
}

type Body = StreamBody<
    tokio_stream::wrappers::ReceiverStream<Result<Frame<Bytes>, std::convert::Infallible>>,
>;

async fn h2(fleet: &Fleet) -> Result<hyper::client::conn::http2::SendRequest<Body>, hyper::Error> {
    let tls = anonymous_tls(fleet).await;
    let (send, connection) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(tls))
            .await?;
    tokio::spawn(connection);
    Ok(send)
}

#[test]
fn half_sent_messages_without_a_certificate_cost_a_bounded_amount() {
    let fleet = Fleet::start(1);
    let pid = fleet.controller_pid();
    let peak_before = process::peak_rss_kib(pid).expect("the controller's VmHWM");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // The senders stay alive until the end: every stream is left half-sent.
    let mut held = Vec::new();
    runtime.block_on(async {
        let mut send = h2(&fleet).await.expect("an HTTP/2 connection");
        let mut responses = Vec::new();
        let chunk = Bytes::from(vec![7u8; 64 * 1024]);
        for i in 0..STREAMS {
            let path = if i % 2 == 0 {
                "/fleet.v1.FleetService/ListHosts"
            } else {
                "/fleet.v1.AgentService/Join"
            };
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let request = http::Request::post(format!("https://fleet-controller{path}"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(StreamBody::new(
                    tokio_stream::wrappers::ReceiverStream::new(rx),
                ))
                .unwrap();
            let Ok(()) = std::future::poll_fn(|cx| send.poll_ready(cx)).await else {
                break;
            };
            responses.push(tokio::spawn(send.send_request(request)));
            let chunk = chunk.clone();
            let feeder = tokio::spawn(async move {
                let mut header = vec![0u8];
                header.extend_from_slice(&ANNOUNCED.to_be_bytes());
                if tx.send(Ok(Frame::data(Bytes::from(header)))).await.is_err() {
                    return tx;
                }
                let mut left = ANNOUNCED as usize - 1;
                while left > 0 {
                    let n = left.min(chunk.len());
                    if tx.send(Ok(Frame::data(chunk.slice(..n)))).await.is_err() {
                        break;
                    }
                    left -= n;
                }
                tx
            });
            held.push(feeder);
        }
        // Every stream is answered (refused) instead of being read to the end.
        for response in responses {
            let answered = tokio::time::timeout(Duration::from_secs(30), response).await;
            assert!(
                answered.is_ok(),
                "a stream was neither answered nor reset in 30 s"
            );
        }
    });

    // Other clients are served meanwhile.
    let started = Instant::now();
    fleet.ctl(&["hosts"]).expect_code(0);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "fleetctl hosts took {:?} during the attack",
        started.elapsed()
    );
    let peak_after = process::peak_rss_kib(pid).expect("the controller's VmHWM");
    let growth = peak_after.saturating_sub(peak_before);
    eprintln!("controller peak memory: {peak_before} KiB before, {peak_after} KiB after ({growth} KiB more)");
    assert!(
        growth < GROWTH_BOUND_KIB,
        "the controller's peak memory grew by {growth} KiB ({peak_before} -> {peak_after}) for {STREAMS} half-sent 4 MiB messages"
    );
    drop(held);
}

#[test]
fn one_address_holds_a_bounded_number_of_connections_without_a_certificate() {
    let fleet = Fleet::start(1);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (open, refused) = runtime.block_on(async {
        let mut open = Vec::new();
        let mut refused = 0;
        for _ in 0..40 {
            // Alive means answered: a call without a certificate gets its refusal.
            let answered = match h2(&fleet).await {
                Ok(mut send) => {
                    let (tx, rx) = tokio::sync::mpsc::channel(1);
                    drop(tx);
                    let request = http::Request::post(
                        "https://fleet-controller/fleet.v1.FleetService/ListHosts",
                    )
                    .header("content-type", "application/grpc")
                    .body(StreamBody::new(
                        tokio_stream::wrappers::ReceiverStream::new(rx),
                    ))
                    .unwrap();
                    let answer =
                        tokio::time::timeout(Duration::from_secs(10), send.send_request(request))
                            .await;
                    matches!(answer, Ok(Ok(_))).then_some(send)
                }
                Err(_) => None,
            };
            match answered {
                Some(send) => open.push(send),
                None => refused += 1,
            }
        }
        (open, refused)
    });
    assert_eq!(open.len(), 32, "{refused} refused");
    // Clients with a certificate are not counted against the address.
    fleet.ctl(&["hosts"]).expect_code(0);
    drop(open);
}
