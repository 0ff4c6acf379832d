//! Smoke checks: `http` (GET must answer `expect_status`; hyper 1 over a tokio `TcpStream`,
//! `http://` only), `tcp` (a connection must open) and `exec` (must exit 0; runs in the
//! instance directory with the instance environment). `${VAR}` in a check is replaced from the
//! instance environment. Each check is tried at once, then again after pauses of a tenth of how
//! long it has run so far, from [`FIRST_RETRY`] (1 ms) to [`FAST_RETRY_CAP`] (10 ms), for its
//! first [`FAST_PHASE`] (most apps are up within it, and a try that comes too early costs the
//! rollout up to one pause: so at most a tenth of the app's own start, and a failed try is a
//! refused connection on this host, microseconds), then doubling to [`RETRY_INTERVAL`]
//! ([`retry_pause`]), until its timeout, capped by the assignment's smoke timeout when that is
//! non-zero and smaller; the checks run in order and the first that runs out of time fails the
//! lot, naming itself and its last error.
//!
//! Whether the instance exits meanwhile is the supervisor's business: it races these checks
//! against the process.

use bytes::Bytes;
use fleet_proto::manifest::{substitute, Probe, SmokeCheck};
use http_body_util::Empty;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The shortest pause between two tries of one check.
pub const FIRST_RETRY: Duration = Duration::from_millis(1);
/// The longest pause between two tries of one check while it is young.
pub const FAST_RETRY_CAP: Duration = Duration::from_millis(10);
/// How long a check is retried at most [`FAST_RETRY_CAP`] apart.
pub const FAST_PHASE: Duration = Duration::from_secs(2);
/// The longest pause between two tries of one check.
pub const RETRY_INTERVAL: Duration = Duration::from_millis(150);
/// While a check is young, the pause after a failed try is this fraction of how long it ran.
const FAST_PAUSE_DIVISOR: u32 = 10;

/// The pause after a failed try, given the one before and how long the check has run: a tenth
/// of `running_for` within [`FIRST_RETRY`]..=[`FAST_RETRY_CAP`] while it is young, then
/// doubling to [`RETRY_INTERVAL`]. Pure.
pub fn retry_pause(previous: Duration, running_for: Duration) -> Duration {
    if running_for < FAST_PHASE {
        (running_for / FAST_PAUSE_DIVISOR).clamp(FIRST_RETRY, FAST_RETRY_CAP)
    } else {
        (previous * 2).clamp(FAST_RETRY_CAP, RETRY_INTERVAL)
    }
}
/// One try never takes longer than this (nor past the check's deadline).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// The most of an exec check's output quoted in an error.
const MAX_QUOTED_OUTPUT: usize = 300;

/// Where and with what the checks of one instance run.
#[derive(Debug, Clone)]
pub struct CheckContext {
    pub instance_dir: PathBuf,
    /// The instance environment (for `${VAR}` and for exec checks).
    pub env: BTreeMap<String, String>,
    /// The assignment's cap on every check's timeout; zero means none.
    pub smoke_timeout: Duration,
    /// Who exec checks run as: the app's user.
    pub run_as: crate::app_user::RunAs,
}

/// The timeout of one check: its own, or the assignment's if smaller and non-zero.
pub fn effective_timeout(check: Duration, assignment: Duration) -> Duration {
    if assignment.is_zero() {
        check
    } else {
        check.min(assignment)
    }
}

/// Runs every check in order; `Err` says which failed and why.
pub async fn run_checks(checks: &[SmokeCheck], context: &CheckContext) -> Result<(), String> {
    for (idx, check) in checks.iter().enumerate() {
        let probe = substituted(&check.probe, &context.env);
        let timeout = effective_timeout(check.timeout, context.smoke_timeout);
        let started = Instant::now();
        let deadline = started + timeout;
        let mut tries: u32 = 0;
        let mut pause = FIRST_RETRY;
        loop {
            tries += 1;
            let budget = deadline
                .saturating_duration_since(Instant::now())
                .min(ATTEMPT_TIMEOUT)
                .max(Duration::from_millis(50));
            let result = match tokio::time::timeout(budget, try_probe(&probe, context)).await {
                Ok(result) => result,
                Err(_) => Err(format!(
                    "no answer within {}",
                    fleet_proto::duration::format_duration(budget)
                )),
            };
            match result {
                Ok(()) => break,
                Err(last_error) => {
                    if Instant::now() + pause >= deadline {
                        return Err(format!(
                            "smoke check #{} ({}) failed after {} and {tries} tries: {last_error}",
                            idx + 1,
                            describe(&probe),
                            fleet_proto::duration::format_duration(timeout),
                        ));
                    }
                    tokio::time::sleep(pause).await;
                    pause = retry_pause(pause, started.elapsed());
                }
            }
        }
    }
    Ok(())
}

fn substituted(probe: &Probe, env: &BTreeMap<String, String>) -> Probe {
    match probe {
        Probe::Http { url, expect_status } => Probe::Http {
            url: substitute(url, env),
            expect_status: *expect_status,
        },
        Probe::Tcp { addr } => Probe::Tcp {
            addr: substitute(addr, env),
        },
        Probe::Exec { command } => Probe::Exec {
            command: command.iter().map(|a| substitute(a, env)).collect(),
        },
    }
}

/// A check as a person reads it: `http GET http://…`, `tcp 127.0.0.2:80`, `exec bin/check`.
pub fn describe(probe: &Probe) -> String {
    match probe {
        Probe::Http { url, expect_status } => format!("http GET {url} expecting {expect_status}"),
        Probe::Tcp { addr } => format!("tcp {addr}"),
        Probe::Exec { command } => format!("exec {}", command.join(" ")),
    }
}

async fn try_probe(probe: &Probe, context: &CheckContext) -> Result<(), String> {
    match probe {
        Probe::Http { url, expect_status } => http_get(url, *expect_status).await,
        Probe::Tcp { addr } => TcpStream::connect(addr.as_str())
            .await
            .map(drop)
            .map_err(|e| format!("cannot connect: {e}")),
        Probe::Exec { command } => exec(command, context).await,
    }
}

/// Splits `http://host:port/path?q` into the authority (with a default port) and the path.
pub fn split_http_url(url: &str) -> Result<(String, String, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url:?} is not an http:// URL"))?;
    let (authority, path) = match rest.find('/') {
        Some(idx) => (&rest[..idx], &rest[idx..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(format!("{url:?} has no usable host"));
    }
    let has_port = match authority.rfind(':') {
        Some(idx) => !authority[idx..].contains(']'),
        None => false,
    };
    let connect_to = if has_port {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Ok((connect_to, authority.to_string(), path.to_string()))
}

async fn http_get(url: &str, expect_status: u16) -> Result<(), String> {
    let (connect_to, host, path) = split_http_url(url)?;
    let stream = TcpStream::connect(connect_to.as_str())
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("http handshake failed: {e}"))?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = hyper::Request::builder()
        .method(hyper::Method::GET)
        .uri(path)
        .header(hyper::header::HOST, host)
        .header(hyper::header::USER_AGENT, "fleet-agent-smoke")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("bad request: {e}"))?;
    let result = sender.send_request(request).await;
    let response = match result {
        Ok(response) => response,
        Err(e) => {
            driver.abort();
            return Err(format!("request failed: {e}"));
        }
    };
    let status = response.status().as_u16();
    if status == expect_status {
        driver.abort();
        return Ok(());
    }
    // The first bytes of the body say why, more often than not (bounded in bytes and time).
    let mut body = response.into_body();
    let mut first = Vec::new();
    let read = async {
        use http_body_util::BodyExt;
        while first.len() < MAX_QUOTED_OUTPUT {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        first.extend_from_slice(&data);
                    }
                }
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), read).await;
    driver.abort();
    let mut text = String::from_utf8_lossy(&first[..first.len().min(MAX_QUOTED_OUTPUT)])
        .trim()
        .to_string();
    if first.len() > MAX_QUOTED_OUTPUT {
        text.push('…');
    }
    if text.is_empty() {
        Err(format!(
            "answered {status}, expected {expect_status} (empty body)"
        ))
    } else {
        Err(format!(
            "answered {status}, expected {expect_status}: {text:?}"
        ))
    }
}

async fn exec(command: &[String], context: &CheckContext) -> Result<(), String> {
    let program = crate::instance::resolve_program(&command[0], &context.instance_dir);
    let mut output = tokio::process::Command::new(&program);
    context.run_as.apply(&mut output);
    let output = output
        .args(&command[1..])
        .current_dir(&context.instance_dir)
        .env_clear()
        .envs(crate::instance::inherited_env())
        .envs(&context.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
    if output.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&output.stderr).trim().to_string();
    if text.is_empty() {
        text = String::from_utf8_lossy(&output.stdout).trim().to_string();
    }
    if text.len() > MAX_QUOTED_OUTPUT {
        let mut cut = text.len() - MAX_QUOTED_OUTPUT;
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        text = format!("…{}", &text[cut..]);
    }
    let status = crate::instance::describe_exit(&output.status);
    if text.is_empty() {
        Err(status)
    } else {
        Err(format!("{status}: {text}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn context(dir: &Path, cap_ms: u64) -> CheckContext {
        CheckContext {
            instance_dir: dir.to_path_buf(),
            env: BTreeMap::from([("FLEET_ADDR".to_string(), "127.0.0.1".to_string())]),
            smoke_timeout: Duration::from_millis(cap_ms),
            run_as: crate::app_user::RunAs::Agent,
        }
    }

    fn check(probe: Probe, timeout_ms: u64) -> SmokeCheck {
        SmokeCheck {
            probe,
            timeout: Duration::from_millis(timeout_ms),
        }
    }

    #[test]
    fn splits_urls_and_caps_timeouts() {
        assert_eq!(
            split_http_url("http://127.0.0.2:8080/healthz?x=1").unwrap(),
            (
                "127.0.0.2:8080".into(),
                "127.0.0.2:8080".into(),
                "/healthz?x=1".into()
            )
        );
        assert_eq!(
            split_http_url("http://127.0.0.2").unwrap(),
            ("127.0.0.2:80".into(), "127.0.0.2".into(), "/".into())
        );
        assert_eq!(split_http_url("http://[::1]").unwrap().0, "[::1]:80");
        assert!(split_http_url("https://x").is_err());
        let s = Duration::from_secs;
        assert_eq!(effective_timeout(s(20), s(0)), s(20));
        assert_eq!(effective_timeout(s(20), s(5)), s(5));
        assert_eq!(effective_timeout(s(2), s(5)), s(2));
    }

    /// A tiny HTTP server answering every request with `status`, once per connection.
    async fn serve_status(status: u16) -> (u16, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            for _ in 0..100 {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                let _ = socket.read(&mut buf).await;
                let answer = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
                let _ = socket.write_all(answer.as_bytes()).await;
            }
        });
        (port, task)
    }

    #[test]
    fn retries_come_fast_while_the_check_is_young() {
        let ms = Duration::from_millis;
        let us = Duration::from_micros;
        for (previous, running_for, expect) in [
            // Young: a tenth of the time run so far, at least 1 ms, at most 10 ms.
            (ms(1), us(0), ms(1)),
            (ms(1), us(1500), ms(1)),
            (ms(1), ms(9), ms(1)),
            (ms(1), ms(15), us(1500)),
            (ms(3), ms(40), ms(4)),
            (ms(8), ms(80), ms(8)),
            (ms(10), ms(150), ms(10)),
            (ms(10), ms(1999), ms(10)),
            // Then doubling to 150 ms.
            (ms(10), ms(2000), ms(20)),
            (ms(40), ms(2500), ms(80)),
            (ms(80), ms(3000), ms(150)),
            (ms(150), ms(9000), ms(150)),
            // A check that went past the young phase on its first pause doubles from 10 ms.
            (ms(1), ms(2100), ms(10)),
        ] {
            assert_eq!(
                retry_pause(previous, running_for),
                expect,
                "{previous:?} after {running_for:?}"
            );
        }
    }

    #[test]
    fn a_young_check_is_never_late_by_more_than_a_tenth_of_its_run() {
        // Simulated tries: the app is up at `up`; the check's first passing try comes at
        // most a pause after it, and a pause is at most max(1 ms, a tenth of the run).
        let ms = Duration::from_millis;
        for up in [
            ms(0),
            ms(1),
            ms(3),
            ms(7),
            ms(25),
            ms(80),
            ms(300),
            ms(1900),
        ] {
            let (mut at, mut pause, mut tries) = (Duration::ZERO, FIRST_RETRY, 0u32);
            while at < up {
                at += pause;
                pause = retry_pause(pause, at);
                tries += 1;
            }
            let late = at - up;
            assert!(
                late <= (up / 10).max(FIRST_RETRY) + FIRST_RETRY,
                "app up at {up:?}: passed at {at:?}"
            );
            assert!(tries <= 250, "app up at {up:?}: {tries} tries");
        }
    }

    #[tokio::test]
    async fn http_checks_compare_the_status() {
        let dir = tempfile::tempdir().unwrap();
        let (port, server) = serve_status(204).await;
        let ok = check(
            Probe::Http {
                url: format!("http://${{FLEET_ADDR}}:{port}/healthz"),
                expect_status: 204,
            },
            2000,
        );
        run_checks(&[ok], &context(dir.path(), 0)).await.unwrap();
        let wrong = check(
            Probe::Http {
                url: format!("http://127.0.0.1:{port}/"),
                expect_status: 200,
            },
            5000,
        );
        let started = Instant::now();
        let err = run_checks(&[wrong], &context(dir.path(), 400))
            .await
            .unwrap_err();
        assert!(err.contains("smoke check #1 (http GET"), "{err}");
        assert!(err.contains("answered 204, expected 200"), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "capped by the assignment"
        );
        server.abort();
    }

    #[tokio::test]
    async fn tcp_checks_retry_until_the_port_opens() {
        let dir = tempfile::tempdir().unwrap();
        // Find a free port, then open it only after a few failed tries.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let opener = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(400)).await;
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                .await
                .unwrap();
            let _ = listener.accept().await;
        });
        let probe = Probe::Tcp {
            addr: format!("127.0.0.1:{port}"),
        };
        run_checks(&[check(probe, 5000)], &context(dir.path(), 0))
            .await
            .unwrap();
        opener.abort();

        let closed = Probe::Tcp {
            addr: format!("127.0.0.1:{port}"),
        };
        let err = run_checks(&[check(closed, 300)], &context(dir.path(), 0))
            .await
            .unwrap_err();
        assert!(err.contains("tcp 127.0.0.1"), "{err}");
    }

    #[tokio::test]
    async fn exec_checks_run_in_the_instance_dir_with_its_env() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("marker"), "x").unwrap();
        let good = Probe::Exec {
            command: vec![
                "/bin/sh".into(),
                "-c".into(),
                "test -f marker && test \"$FLEET_ADDR\" = 127.0.0.1".into(),
            ],
        };
        run_checks(&[check(good, 2000)], &context(dir.path(), 0))
            .await
            .unwrap();
        let bad = Probe::Exec {
            command: vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo broken >&2; exit 3".into(),
            ],
        };
        let err = run_checks(&[check(bad, 300)], &context(dir.path(), 0))
            .await
            .unwrap_err();
        assert!(err.contains("exited with status 3: broken"), "{err}");
    }
}
