//! User stories of the operators' HTTP listener and webhooks, against a real controller:
//! Prometheus scrapes `/metrics` and sees the hosts, instances and a rollout that ended;
//! `/healthz` and `/readyz` answer; the listener refuses writes, bodies and half-sent heads;
//! webhooks reach a Slack-compatible receiver while a hanging one and one that answers 500
//! never slow the rollout, and their final failures are events; and bad configuration (a URL
//! that does not parse, a glob that matches no event, a taken or public address) is refused at
//! start with a message that says what to do.

use fleet_tests::bins::Bins;
use fleet_tests::fleet::Fleet;
use fleet_tests::{http, process, wait_for, wait_until, web_manifest};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `GET path` from the controller's HTTP listener.
fn get(addr: &str, path: &str) -> (u16, String) {
    let (host, port) = addr.rsplit_once(':').expect("IP:PORT");
    http::get(host, port.parse().expect("a port"), path)
        .unwrap_or_else(|e| panic!("GET {path} from {addr}: {e}"))
}

/// The value of the sample `series` (name and labels exactly as exposed), if present.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?.strip_prefix(' ')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

#[test]
fn prometheus_sees_hosts_instances_and_rollouts_and_the_listener_stays_read_only() {
    let fleet = Fleet::start(2);
    let addr = fleet.http_addr();
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    assert_eq!(get(&addr, "/healthz"), (200, "ok\n".to_string()));
    assert_eq!(get(&addr, "/readyz"), (200, "ready\n".to_string()));

    fleet.create_web_releases(&["1.0.0"]);
    fleet
        .ctl(&["rollout", "web", "1.0.0", "--canary", "1", "--batch", "1"])
        .expect_code(0);
    fleet.wait_all_serve("1.0.0", Duration::from_secs(20));

    // What a scrape shows once the rollout ended (its counts arrive through the event log).
    let metrics = wait_for(
        Duration::from_secs(20),
        "/metrics to count the rollout",
        || {
            let (status, body) = get(&addr, "/metrics");
            assert_eq!(status, 200, "{body}");
            (sample(
                &body,
                r#"fleet_rollouts_total{app="web",result="succeeded"}"#,
            ) == Some(1.0))
            .then_some(body)
        },
    );
    for (series, expect) in [
        (r#"fleet_hosts{state="ready"}"#, 2.0),
        (r#"fleet_hosts{state="lost"}"#, 0.0),
        ("fleet_agents_connected", 2.0),
        (
            r#"fleet_instances{app="web",release="1.0.0",state="running"}"#,
            2.0,
        ),
        (r#"fleet_rollout_in_progress{app="web"}"#, 0.0),
        (r#"fleet_rollout_duration_seconds_count{app="web"}"#, 1.0),
        (r#"fleet_wave_duration_seconds_count{app="web"}"#, 2.0),
        (r#"fleet_instance_restarts_total{app="web",host="h1"}"#, 0.0),
    ] {
        assert_eq!(
            sample(&metrics, series),
            Some(expect),
            "{series}:\n{metrics}"
        );
    }
    let sent = sample(&metrics, "fleet_artifact_bytes_sent_total").expect("bytes sent");
    assert!(sent > 0.0, "{metrics}");

    // Read-only, bodiless, and a 404 that says where to look.
    let (status, body) = raw(
        &addr,
        "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    );
    assert!(status.contains(" 405 "), "{status}{body}");
    let (status, _) = raw(
        &addr,
        "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    );
    assert!(status.contains(" 413 "), "{status}");
    let (status, body) = get(&addr, "/nope");
    assert_eq!(status, 404);
    assert!(body.contains("/metrics"), "{body}");

    // A head that never ends is cut off at the head timeout, not held forever.
    let mut slow = TcpStream::connect(&addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let _ = slow.read_to_end(&mut rest);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "a half-sent head was held {:?}",
        started.elapsed()
    );

    // More connections than the limit: the ones over it are closed at once, and the listener
    // answers again once they are gone.
    let mut idle: Vec<TcpStream> = (0..70)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    let mut refused = 0;
    for stream in idle.iter_mut().rev().take(6) {
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut byte = [0u8; 1];
        if matches!(stream.read(&mut byte), Ok(0)) {
            refused += 1;
        }
    }
    assert!(
        refused >= 5,
        "connections over the limit of 64 were kept: {refused} of 6 closed"
    );
    drop(idle);
    wait_until(Duration::from_secs(10), "/healthz to answer again", || {
        let (host, port) = addr.rsplit_once(':').unwrap();
        matches!(
            http::get(host, port.parse().unwrap(), "/healthz"),
            Ok((200, _))
        )
    });
}

/// Sends `request` as is and reads the answer: (status line, the rest).
fn raw(addr: &str, request: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    // Until the head and a bit of body are in, or the server closes.
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
        if answer.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    let (status, rest) = text.split_once("\r\n").unwrap_or((&text, ""));
    (status.to_string(), rest.to_string())
}

/// How a test receiver answers.
#[derive(Clone, Copy)]
enum Behaviour {
    Ok,
    Hang,
    Error500,
}

/// A tiny hyper server on loopback that records every body it is sent.
struct Receiver {
    addr: std::net::SocketAddr,
    bodies: Arc<Mutex<Vec<String>>>,
}

impl Receiver {
    fn start(runtime: &tokio::runtime::Runtime, behaviour: Behaviour) -> Receiver {
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let seen = bodies.clone();
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let seen = seen.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |request: hyper::Request<hyper::body::Incoming>| {
                            let seen = seen.clone();
                            async move {
                                use http_body_util::BodyExt;
                                let body = request.into_body().collect().await?.to_bytes();
                                seen.lock()
                                    .unwrap()
                                    .push(String::from_utf8_lossy(&body).into_owned());
                                let status = match behaviour {
                                    Behaviour::Ok => 200,
                                    Behaviour::Error500 => 500,
                                    Behaviour::Hang => {
                                        tokio::time::sleep(Duration::from_secs(600)).await;
                                        200
                                    }
                                };
                                let mut answer = hyper::Response::new(http_body_util::Full::new(
                                    bytes::Bytes::from_static(b"ok"),
                                ));
                                *answer.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                                Ok::<_, hyper::Error>(answer)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Receiver { addr, bodies }
    }

    fn bodies(&self) -> Vec<String> {
        self.bodies.lock().unwrap().clone()
    }

    fn url(&self) -> String {
        format!("http://{}/hooks/secret-part", self.addr)
    }
}

/// A rollout of three hosts, one at a time; how long `fleetctl rollout` took.
fn timed_rollout(fleet: &Fleet, version: &str, expect_code: i32) -> Duration {
    let started = Instant::now();
    fleet
        .ctl(&[
            "rollout",
            "web",
            version,
            "--canary",
            "1",
            "--batch",
            "1",
            "--smoke-timeout",
            "5s",
        ])
        .expect_code(expect_code);
    started.elapsed()
}

#[test]
fn webhooks_reach_a_slack_receiver_and_a_hanging_or_failing_one_never_slows_a_rollout() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let slack = Receiver::start(&runtime, Behaviour::Ok);
    let hanging = Receiver::start(&runtime, Behaviour::Hang);
    let failing = Receiver::start(&runtime, Behaviour::Error500);
    let audit = Receiver::start(&runtime, Behaviour::Ok);

    let mut fleet = Fleet::start(3);
    let manifest = web_manifest("5s");
    fleet
        .create_web_release("1.0.0", &manifest, &[])
        .expect_code(0);
    fleet
        .create_web_release("2.0.0", &manifest, &[])
        .expect_code(0);
    fleet
        .create_web_release("2.1.0", &manifest, &["WEB_BROKEN=1"])
        .expect_code(0);
    // The baseline: a rollout with no webhooks, on this machine, now.
    let baseline = timed_rollout(&fleet, "1.0.0", 0);

    let path = fleet.config_dir().join("controller.toml");
    let mut config = std::fs::read_to_string(&path).unwrap();
    config.push_str(&format!(
        "\n[[webhook]]\nurl = \"{}\"\nevents = [\"rollout.*\"]\nformat = \"slack\"\n\
         \n[[webhook]]\nurl = \"{}\"\nevents = [\"rollout.*\", \"host.*\"]\nformat = \"json\"\n\
         \n[[webhook]]\nurl = \"{}\"\nevents = [\"rollout.*\"]\nformat = \"slack\"\n\
         \n[[webhook]]\nurl = \"{}\"\nevents = [\"webhook.failed\"]\nformat = \"json\"\n",
        slack.url(),
        hanging.url(),
        failing.url(),
        audit.url()
    ));
    std::fs::write(&path, config).unwrap();
    fleet.restart_controller();
    fleet.wait_hosts_ready(3);

    let with_hooks = timed_rollout(&fleet, "2.0.0", 0);
    assert!(
        with_hooks < baseline * 2 + Duration::from_secs(5),
        "the rollout took {with_hooks:?} with a hanging and a failing webhook, {baseline:?} without"
    );
    timed_rollout(&fleet, "2.1.0", 1);

    // The Slack-compatible receiver got a `text` for each: app, release, result, who, how long,
    // and for the broken release the failed host and why.
    let texts = wait_for(
        Duration::from_secs(30),
        "the slack receiver to get both ends",
        || {
            let texts: Vec<String> = slack
                .bodies()
                .iter()
                .map(|b| {
                    let v: serde_json::Value = serde_json::from_str(b).expect("JSON");
                    v["text"].as_str().expect("a text").to_string()
                })
                .collect();
            (texts
                .iter()
                .any(|t| t.contains("web@2.0.0 rollout") && t.contains("succeeded"))
                && texts
                    .iter()
                    .any(|t| t.contains("web@2.1.0 rollout") && t.contains("rolled_back")))
            .then_some(texts)
        },
    );
    let succeeded = texts
        .iter()
        .find(|t| t.contains("web@2.0.0") && t.contains("succeeded"))
        .unwrap();
    assert!(
        succeeded.contains("started by admin") && succeeded.contains("took "),
        "{succeeded}"
    );
    let rolled_back = texts
        .iter()
        .find(|t| t.contains("web@2.1.0") && t.contains("rolled_back"))
        .unwrap();
    assert!(
        rolled_back.contains("failed: h"),
        "no failed host in: {rolled_back}"
    );
    assert!(
        rolled_back.contains("smoke check"),
        "no reason in: {rolled_back}"
    );

    // The one that answers 500 was tried three times per event; the hanging one got its tries
    // too. Each final failure is an event, sent to the webhook that wants those, with the URL
    // but not its secret path.
    wait_until(
        Duration::from_secs(60),
        "webhook.failed events for both bad receivers",
        || {
            let bodies = audit.bodies();
            ["webhook 2 ", "webhook 3 "]
                .iter()
                .all(|hook| bodies.iter().any(|b| b.contains(hook)))
        },
    );
    let started_bodies = failing
        .bodies()
        .iter()
        .filter(|b| b.contains("web@2.0.0 rollout") && b.contains(" started by "))
        .count();
    assert_eq!(
        started_bodies, 3,
        "tries of the first event at the 500 receiver"
    );
    let events = fleet
        .ctl(&["events", "--limit", "200"])
        .expect_code(0)
        .stdout;
    assert!(events.contains("webhook.failed"), "{events}");
    assert!(
        !events.contains("secret-part"),
        "a webhook's path was shown: {events}"
    );
    assert!(
        events.contains(&format!("http://{}/", failing.addr)),
        "{events}"
    );
    fleet.kill_controller();
}

/// `fleetctl init` into `dir`, then `extra` appended to its controller.toml.
fn init_with(bins: &Bins, dir: &Path, extra: &str) -> std::path::PathBuf {
    let mut init = Command::new(&bins.fleetctl);
    init.args([
        "init",
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--dir",
    ])
    .arg(dir)
    .env("HOME", dir);
    let out = process::run_with_deadline(init, Duration::from_secs(30));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let path = dir.join("controller.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{text}\n{extra}\n")).unwrap();
    path
}

fn start_controller(bins: &Bins, config: &Path, args: &[&str]) -> process::Finished {
    let mut command = Command::new(&bins.controller);
    command.arg("--config").arg(config).args(args);
    // Each of these must refuse to start; a controller that starts is killed at the deadline
    // and fails the test.
    process::run_with_deadline(command, Duration::from_secs(20))
}

#[test]
fn bad_webhooks_and_listen_addresses_are_refused_at_start_with_what_to_do() {
    let bins = Bins::locate();
    let tmp = tempfile::tempdir().unwrap();
    for (idx, (extra, says)) in [
        (
            "[[webhook]]\nurl = \"hooks.example.com/x\"\nevents = [\"rollout.*\"]",
            "webhook 1: url \"hooks.example.com/x\" is not a URL: write it like https://",
        ),
        (
            "[[webhook]]\nurl = \"http://127.0.0.1:9/\"\nevents = [\"rolout.*\"]",
            "events glob \"rolout.*\" matches no event kind",
        ),
        (
            "[[webhook]]\nurl = \"http://127.0.0.1:9/\"\nevents = [\"host.lost\"]\nformat = \"teams\"",
            "format",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let config = init_with(&bins, &tmp.path().join(format!("c{idx}")), extra);
        let out = start_controller(&bins, &config, &[]);
        assert_eq!(out.code, 2, "{extra}: {}", out.stderr);
        assert!(out.stderr.contains(says), "{extra}: {}", out.stderr);
    }

    // A public address needs http_allow_remote, and says so.
    let config = init_with(&bins, &tmp.path().join("public"), "");
    let out = start_controller(&bins, &config, &["--http-listen", "0.0.0.0:7701"]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("http_allow_remote = true"),
        "{}",
        out.stderr
    );
    let mut init = Command::new(&bins.fleetctl);
    init.args(["init", "--http-listen", "0.0.0.0:7701", "--dir"])
        .arg(tmp.path().join("public-init"));
    let out = process::run_with_deadline(init, Duration::from_secs(30));
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("not a loopback address"),
        "{}",
        out.stderr
    );

    // An address another program holds.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let out = start_controller(&bins, &config, &["--http-listen", &taken_addr]);
    assert_ne!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!(
            "cannot listen for HTTP (metrics, status page) on {taken_addr}"
        )) && out.stderr.contains("--http-listen"),
        "{}",
        out.stderr
    );
}
