//! Real etcd servers for tests: [`Etcd::single`] (one member, for the store's tests) and
//! [`Etcd::cluster`] (several members, for end-to-end tests), on loopback with free ports, data
//! on tmpfs (`/dev/shm`) when there is one, heartbeat and election timeout raised so that busy
//! cores do not cause spurious elections. Every member is killed by its pid when the [`Etcd`]
//! is dropped.
//!
//! The binary is Debian's `etcd-server` (`/usr/bin/etcd`), or `$FLEET_ETCD`. When it is missing
//! a test skips with a line saying so ([`Etcd::single`] returns `None`), unless
//! `FLEET_REQUIRE_ETCD=1` is set (as `scripts/test.sh` does): then it fails.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a cluster may take to answer `/health` after its start.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// Running etcd members.
pub struct Etcd {
    members: Vec<Member>,
    _data: tempfile::TempDir,
}

struct Member {
    child: Child,
    client: SocketAddr,
}

/// The etcd binary, if there is one.
pub fn binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("FLEET_ETCD") {
        return Some(PathBuf::from(path)).filter(|path| path.is_file());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("etcd"))
        .find(|candidate| candidate.is_file())
}

/// Whether the tests must have etcd (`FLEET_REQUIRE_ETCD=1`).
pub fn required() -> bool {
    std::env::var("FLEET_REQUIRE_ETCD").is_ok_and(|v| v == "1")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// Whether the member at `client` answers `{"health":"true"}` on `/health`.
fn healthy(client: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&client, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.contains("\"health\":\"true\"")
}

impl Etcd {
    /// One member; `None` (after printing why) when etcd is not installed and not required.
    pub fn single() -> Option<Etcd> {
        Etcd::cluster(1)
    }

    /// `n` members, every one answering `/health` before this returns; `None` (after printing
    /// why) when etcd is not installed and not required.
    pub fn cluster(n: usize) -> Option<Etcd> {
        let Some(binary) = binary() else {
            assert!(
                !required(),
                "FLEET_REQUIRE_ETCD=1 but there is no etcd on the PATH: apt-get install etcd-server"
            );
            eprintln!("skipped: no etcd on the PATH (apt-get install etcd-server)");
            return None;
        };
        let data = match tempfile::tempdir_in("/dev/shm") {
            Ok(dir) => dir,
            Err(_) => tempfile::tempdir().expect("a temporary directory"),
        };
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let initial_cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!("fleet-test-{}-{}", std::process::id(), ports[0].0);
        let mut members = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let dir = data.path().join(format!("m{i}"));
            let log = std::fs::File::create(data.path().join(format!("m{i}.log")))
                .expect("an etcd log file");
            let child = Command::new(&binary)
                .arg("--name")
                .arg(format!("m{i}"))
                .arg("--data-dir")
                .arg(&dir)
                .arg("--listen-client-urls")
                .arg(format!("http://127.0.0.1:{client}"))
                .arg("--advertise-client-urls")
                .arg(format!("http://127.0.0.1:{client}"))
                .arg("--listen-peer-urls")
                .arg(format!("http://127.0.0.1:{peer}"))
                .arg("--initial-advertise-peer-urls")
                .arg(format!("http://127.0.0.1:{peer}"))
                .arg("--initial-cluster")
                .arg(&initial_cluster)
                .arg("--initial-cluster-state")
                .arg("new")
                .arg("--initial-cluster-token")
                .arg(&token)
                // Two busy cores: no elections because a heartbeat came late.
                .arg("--heartbeat-interval")
                .arg("200")
                .arg("--election-timeout")
                .arg(if n == 1 { "1000" } else { "3000" })
                // A wave's hosts are one transaction.
                .arg("--max-txn-ops")
                .arg("10000")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("the log file"))
                .stderr(log)
                .spawn()
                .expect("etcd starts");
            members.push(Member {
                child,
                client: SocketAddr::from(([127, 0, 0, 1], *client)),
            });
        }
        let etcd = Etcd {
            members,
            _data: data,
        };
        let deadline = Instant::now() + START_DEADLINE;
        for member in &etcd.members {
            while !healthy(member.client) {
                assert!(
                    Instant::now() < deadline,
                    "etcd did not become healthy within {START_DEADLINE:?}: see {}",
                    etcd._data.path().display()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Some(etcd)
    }

    /// The client URLs of every member.
    pub fn urls(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://{}", m.client))
            .collect()
    }

    /// The pid of member `i`, to kill or stop it in a test.
    pub fn pid(&self, i: usize) -> u32 {
        self.members[i].child.id()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for member in &mut self.members {
            let pid = nix::unistd::Pid::from_raw(member.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = member.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alive(pid: u32) -> bool {
        // A zombie is reaped by the drop; kill(0) tells whether the pid is still there.
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
    }

    #[test]
    fn a_three_member_cluster_answers_on_every_member_and_is_killed_when_dropped() {
        let Some(etcd) = Etcd::cluster(3) else {
            return;
        };
        let urls = etcd.urls();
        assert_eq!(urls.len(), 3);
        for member in &etcd.members {
            assert!(healthy(member.client), "{}", member.client);
        }
        let pids: Vec<u32> = (0..3).map(|i| etcd.pid(i)).collect();
        drop(etcd);
        for pid in pids {
            assert!(!alive(pid), "member {pid} still runs");
        }
    }
}
