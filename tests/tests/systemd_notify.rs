//! Under systemd both services are `Type=notify`: the controller sends READY=1 once its
//! listener is up, the agent once its session with the controller is up (not before: with the
//! controller away it keeps trying and stays unready). The test binds the NOTIFY_SOCKET itself
//! and reads the datagrams, as systemd would. With stderr the journal (JOURNAL_STREAM names
//! it), log lines carry no timestamp of their own; elsewhere they do.

use fleet_tests::bins::Bins;
use fleet_tests::fleet::Fleet;
use fleet_tests::process::{self, ChildGuard};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const READY_DEADLINE: Duration = Duration::from_secs(60);

/// A NOTIFY_SOCKET bound at `path`, as systemd binds one for a Type=notify service.
fn notify_socket(path: &Path) -> UnixDatagram {
    let socket = UnixDatagram::bind(path).expect("bind the notify socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(250)))
        .unwrap();
    socket
}

/// The datagrams that arrive within `within`, until one holds `READY=1`.
fn wait_ready(socket: &UnixDatagram, within: Duration) -> Option<String> {
    let start = Instant::now();
    let mut buffer = [0u8; 4096];
    while start.elapsed() < within {
        if let Ok(n) = socket.recv(&mut buffer) {
            let text = String::from_utf8_lossy(&buffer[..n]).to_string();
            if text.lines().any(|line| line == "READY=1") {
                return Some(text);
            }
        }
    }
    None
}

/// `JOURNAL_STREAM` for a service whose stderr is the file at `path`.
fn journal_stream_of(path: &Path) -> String {
    let metadata = std::fs::metadata(path).expect("the log file");
    format!("{}:{}", metadata.dev(), metadata.ino())
}

/// Whether a log line starts with a timestamp (`2026-...`).
fn stamped(line: &str) -> bool {
    line.trim_start().starts_with(|c: char| c.is_ascii_digit())
}

#[test]
fn the_controller_is_ready_once_it_listens_and_logs_to_the_journal_unstamped() {
    let bins = Bins::locate();
    let dir = tempfile::tempdir().unwrap();
    let config_dir = dir.path().join("config");
    let mut init = Command::new(&bins.fleetctl);
    init.args(["init", "--dir"])
        .arg(&config_dir)
        .args(["--listen", "127.0.0.1:0"])
        .env("HOME", dir.path());
    let init = process::run_with_deadline(init, Duration::from_secs(60));
    assert_eq!(init.code, 0, "{}", init.stderr);
    std::fs::create_dir_all(config_dir.join("data")).unwrap();

    let socket_path = dir.path().join("notify.sock");
    let socket = notify_socket(&socket_path);
    let log = dir.path().join("controller.log");
    std::fs::write(&log, "").unwrap();
    let mut command = Command::new(&bins.controller);
    command
        .arg("--config")
        .arg(config_dir.join("controller.toml"))
        .current_dir(dir.path())
        .env("NOTIFY_SOCKET", &socket_path)
        .env("JOURNAL_STREAM", journal_stream_of(&log));
    let mut controller = ChildGuard::spawn("fleet-controller", command, &log);

    let ready = wait_ready(&socket, READY_DEADLINE);
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(
        ready.is_some(),
        "no READY=1 from the controller; its log:\n{log_text}"
    );
    // Ready means listening: its address is written and it accepts connections.
    let addr = std::fs::read_to_string(config_dir.join("controller.addr")).unwrap();
    std::net::TcpStream::connect_timeout(&addr.trim().parse().unwrap(), Duration::from_secs(5))
        .expect("the ready controller accepts connections");
    let listening = log_text
        .lines()
        .find(|line| line.contains("listening on"))
        .unwrap_or_else(|| panic!("no `listening on` line:\n{log_text}"));
    assert!(
        !stamped(listening) && !listening.contains('\x1b'),
        "a journal line with a timestamp or colours: {listening:?}"
    );
    controller.kill_now();
}

#[test]
fn an_agent_is_ready_once_its_session_is_up_not_before() {
    let mut fleet = Fleet::start(1);
    // Outside the journal, the lines are stamped (the baseline for the check below).
    let controller_log = fleet.controller_log();
    let listening = controller_log
        .lines()
        .find(|line| line.contains("listening on"))
        .expect("the controller logged its address");
    assert!(stamped(listening), "{listening:?}");

    let socket_path = fleet.dir().join("agent-notify.sock");
    let socket = notify_socket(&socket_path);
    let agent_log = fleet.dir().join("logs/agent-h1.log");
    fleet.set_agent_env("h1", "NOTIFY_SOCKET", &socket_path.display().to_string());
    fleet.set_agent_env("h1", "JOURNAL_STREAM", &journal_stream_of(&agent_log));

    // The controller away: the agent runs, keeps dialing, and is not ready.
    fleet.kill_controller();
    fleet.restart_agent("h1");
    assert_eq!(
        wait_ready(&socket, Duration::from_secs(3)),
        None,
        "the agent said READY=1 without a session"
    );

    // The controller back: the session comes up, and with it READY=1.
    fleet.restart_controller();
    let ready = wait_ready(&socket, READY_DEADLINE);
    assert!(
        ready.is_some(),
        "no READY=1 from the agent; its log:\n{}",
        process::tail(&agent_log, 40)
    );
    fleet.wait_hosts_ready(1);
    let log_text = std::fs::read_to_string(&agent_log).unwrap();
    let connected = log_text
        .lines()
        .rev()
        .find(|line| line.contains("connected to the controller"))
        .expect("the agent logged its session");
    assert!(
        !stamped(connected) && !connected.contains('\x1b'),
        "a journal line with a timestamp or colours: {connected:?}"
    );
}
