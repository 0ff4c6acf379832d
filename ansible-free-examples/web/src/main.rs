//! `fleet-example-web`: the example app that fleet deploys in the examples, the end-to-end tests
//! and the benchmark. A small HTTP/1.1 server (std only, one thread per connection) that says
//! which release it runs, whether it started from origin state, and which process serves:
//!
//! - `GET /`        -> `web <FLEET_VERSION> on <FLEET_HOST>`
//! - `GET /healthz` -> `ok` (200), or 500 when `WEB_BROKEN=1` (a deliberately broken release)
//! - `GET /origin`  -> `fresh` when `scratch.txt` did not exist in the working directory at
//!   start, else `dirty`; at start the app writes `scratch.txt`, so a second start in the same
//!   directory is caught
//! - `GET /pid`     -> the process id
//! - `GET /greeting` -> the value of `WEB_GREETING` (`hello` without it): configuration a
//!   release carries in its `--env`, so a config-only release shows on every host
//! - `GET /starts`  -> how many times the app started with this `FLEET_STATE_DIR` (each start
//!   appends a line to `$FLEET_STATE_DIR/starts`, which outlives origin state); 0 without one
//!
//! `WEB_EXIT_AFTER_MS=N` makes it exit with status 1 N milliseconds after it started: a release
//! that comes up, answers its checks, and then dies.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

/// The file whose presence at start tells a reused working directory from a fresh one.
const SCRATCH_FILE: &str = "scratch.txt";
/// A request head larger than this is answered with 431 and the connection closed.
const MAX_HEAD_BYTES: usize = 8 * 1024;
/// A client that sends nothing for this long is dropped.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the app learned at start and serves for its whole life.
struct AppState {
    version: String,
    host: String,
    broken: bool,
    /// `WEB_GREETING`, or `hello`.
    greeting: String,
    origin_fresh: bool,
    pid: u32,
    /// Starts counted in `$FLEET_STATE_DIR/starts`, this one included.
    starts: usize,
}

fn main() {
    let listen = match parse_listen(std::env::args().skip(1)) {
        Ok(listen) => listen,
        Err(message) => {
            eprintln!("fleet-example-web: {message}");
            eprintln!("usage: fleet-example-web --listen ADDR:PORT");
            std::process::exit(2);
        }
    };
    let origin_fresh = !std::path::Path::new(SCRATCH_FILE).exists();
    if let Err(e) = std::fs::write(
        SCRATCH_FILE,
        format!("written by pid {}\n", std::process::id()),
    ) {
        eprintln!("fleet-example-web: cannot write {SCRATCH_FILE} in the working directory: {e}");
        std::process::exit(1);
    }
    let starts = match std::env::var_os("FLEET_STATE_DIR") {
        Some(dir) => {
            let path = std::path::Path::new(&dir).join("starts");
            let mut text = std::fs::read_to_string(&path).unwrap_or_default();
            text.push_str(&format!("pid {}\n", std::process::id()));
            if let Err(e) = std::fs::write(&path, &text) {
                eprintln!("fleet-example-web: cannot write {}: {e}", path.display());
                std::process::exit(1);
            }
            text.lines().count()
        }
        None => 0,
    };
    let state = Arc::new(AppState {
        version: std::env::var("FLEET_VERSION").unwrap_or_else(|_| "unknown".into()),
        host: std::env::var("FLEET_HOST").unwrap_or_else(|_| "unknown".into()),
        broken: std::env::var("WEB_BROKEN").is_ok_and(|v| v == "1"),
        greeting: std::env::var("WEB_GREETING").unwrap_or_else(|_| "hello".into()),
        origin_fresh,
        pid: std::process::id(),
        starts,
    });
    if let Some(ms) = std::env::var("WEB_EXIT_AFTER_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(ms));
            eprintln!("fleet-example-web: exiting after {ms} ms (WEB_EXIT_AFTER_MS)");
            std::process::exit(1);
        });
    }
    let listener = match TcpListener::bind(&listen) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("fleet-example-web: cannot listen on {listen}: {e}");
            std::process::exit(1);
        }
    };
    eprintln!(
        "fleet-example-web: web {} on {} listening on {listen} (origin {})",
        state.version,
        state.host,
        if origin_fresh { "fresh" } else { "dirty" }
    );
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let state = Arc::clone(&state);
                std::thread::spawn(move || {
                    if let Err(e) = serve_connection(stream, &state) {
                        eprintln!("fleet-example-web: connection: {e}");
                    }
                });
            }
            Err(e) => eprintln!("fleet-example-web: accept: {e}"),
        }
    }
}

/// Reads `--listen ADDR:PORT` (or `--listen=ADDR:PORT`) from the arguments.
fn parse_listen(mut args: impl Iterator<Item = String>) -> Result<String, String> {
    let mut listen = None;
    while let Some(arg) = args.next() {
        if arg == "--listen" {
            listen = Some(args.next().ok_or("--listen needs ADDR:PORT")?);
        } else if let Some(value) = arg.strip_prefix("--listen=") {
            listen = Some(value.to_string());
        } else {
            return Err(format!("unknown argument {arg:?}"));
        }
    }
    listen.ok_or_else(|| "--listen ADDR:PORT is required".to_string())
}

/// Answers one request and closes the connection.
fn serve_connection(stream: TcpStream, state: &AppState) -> std::io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut head_bytes = request_line.len();
    // Read the headers through to the blank line; their content does not matter here.
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line)?;
        head_bytes += n;
        if n == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if head_bytes > MAX_HEAD_BYTES {
            return respond(&stream, 431, "request head too large\n");
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" {
        return respond(&stream, 405, "only GET is served\n");
    }
    let (status, body) = route(path, state);
    // One line per request on stderr, as a web server's access log (`fleetctl logs web`).
    eprintln!("fleet-example-web: GET {path} {status}");
    respond(&stream, status, &body)
}

/// Maps a path to a status and body.
fn route(path: &str, state: &AppState) -> (u16, String) {
    match path {
        "/" => (200, format!("web {} on {}\n", state.version, state.host)),
        "/healthz" if state.broken => (500, "broken: WEB_BROKEN=1\n".into()),
        "/healthz" => (200, "ok\n".into()),
        "/origin" if state.origin_fresh => (200, "fresh\n".into()),
        "/origin" => (200, "dirty\n".into()),
        "/pid" => (200, format!("{}\n", state.pid)),
        "/greeting" => (200, format!("{}\n", state.greeting)),
        "/starts" => (200, format!("{}\n", state.starts)),
        _ => (404, "not found\n".into()),
    }
}

fn respond(mut stream: &TcpStream, status: u16, body: &str) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Internal Server Error",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(broken: bool, origin_fresh: bool) -> AppState {
        AppState {
            version: "1.2.3".into(),
            host: "h1".into(),
            broken,
            greeting: "hello".into(),
            origin_fresh,
            pid: 42,
            starts: 3,
        }
    }

    #[test]
    fn routes_answer_what_the_tests_rely_on() {
        let good = state(false, true);
        assert_eq!(route("/", &good), (200, "web 1.2.3 on h1\n".into()));
        assert_eq!(route("/healthz", &good), (200, "ok\n".into()));
        assert_eq!(route("/origin", &good), (200, "fresh\n".into()));
        assert_eq!(route("/pid", &good), (200, "42\n".into()));
        assert_eq!(route("/starts", &good), (200, "3\n".into()));
        assert_eq!(route("/greeting", &good), (200, "hello\n".into()));
        assert_eq!(route("/nope", &good).0, 404);
        let bad = state(true, false);
        assert_eq!(route("/healthz", &bad).0, 500);
        assert_eq!(route("/origin", &bad), (200, "dirty\n".into()));
    }

    #[test]
    fn parses_the_listen_flag() {
        let args = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            parse_listen(args(&["--listen", "127.0.0.2:8080"]).into_iter()),
            Ok("127.0.0.2:8080".into())
        );
        assert_eq!(
            parse_listen(args(&["--listen=127.0.0.2:8080"]).into_iter()),
            Ok("127.0.0.2:8080".into())
        );
        assert!(parse_listen(args(&[]).into_iter()).is_err());
        assert!(parse_listen(args(&["--port", "1"]).into_iter()).is_err());
    }
}
