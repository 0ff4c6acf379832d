//! The end-to-end harness: starts real `fleet-controller`, `fleet-agent` and example-app
//! processes on loopback, drives them with `fleetctl --output json`, and cleans every process up
//! by its pid when a test ends (or panics).
//!
//! The pieces: [`bins`] finds the built binaries, [`net`] gives each test its own loopback
//! addresses, [`process`] owns child processes and signals, [`http`] is a tiny HTTP GET to read
//! what an app instance serves, [`fleet`] ties them into a whole local fleet, [`grpc`] talks to its controller
//! directly, and
//! [`wait_until`] / [`wait_for`] await conditions with a deadline instead of sleeping.
//! [`proxy`] is a TCP proxy whose link the fault runner ([`faults`], `fleet-faults`) cuts and
//! corrupts.
//!
//! **How tests keep out of each other's way.** Tests run in parallel and every app instance
//! binds port [`WEB_PORT`] on the address its host advertises. Each [`fleet::Fleet`] therefore
//! takes a loopback /24 of its own, `127.A.B.0/24`, derived from the process id and a
//! per-process counter and confirmed free by a bind probe before it is used (see [`net`]).
//! Hosts advertise `127.A.B.2`, `127.A.B.3`, … inside it; the controller listens on
//! `127.0.0.1:0` (a port the kernel picks).
#![forbid(unsafe_code)]

pub mod agent_deb;
pub mod bench;
pub mod bins;
pub mod cgroup;
pub mod disposable_root;
pub mod etcd;
pub mod etcd_fleet;
pub mod faults;
pub mod fleet;
pub mod grpc;
pub mod http;
pub mod net;
pub mod netns;
pub mod process;
pub mod proxy;
pub mod sampler;
pub mod sshd;
pub mod tmpfs;

use std::time::{Duration, Instant};

/// The port the example app listens on, on its host's advertise address.
pub const WEB_PORT: u16 = 8080;

/// How often conditions are polled while waiting.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Polls `condition` until it returns true; panics with `what` when `deadline` passes first.
pub fn wait_until(deadline: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    wait_for(deadline, what, || condition().then_some(()))
}

/// Polls `probe` until it returns `Some`; panics with `what` when `deadline` passes first.
pub fn wait_for<T>(deadline: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = probe() {
            return value;
        }
        if start.elapsed() >= deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Fills `len` bytes that gzip cannot shrink (xorshift64*, seeded).
pub fn incompressible_bytes(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The `fleet.toml` of the example web app as the tests deploy it: it listens on
/// `${FLEET_ADDR}:8080` and one HTTP smoke check on `/healthz` must answer 200 within
/// `smoke_timeout` (like `"10s"`).
pub fn web_manifest(smoke_timeout: &str) -> String {
    format!(
        r#"[process]
command = ["bin/web", "--listen", "${{FLEET_ADDR}}:{WEB_PORT}"]
stop_signal = "TERM"
stop_timeout = "5s"

[[smoke]]
http = "http://${{FLEET_ADDR}}:{WEB_PORT}/healthz"
expect_status = 200
timeout = "{smoke_timeout}"
"#
    )
}

#[cfg(test)]
mod tests {
    use fleet_proto::manifest::Manifest;

    #[test]
    fn the_test_manifest_and_the_example_manifest_agree() {
        let example = Manifest::parse(include_str!("../../ansible-free-examples/web/fleet.toml"))
            .expect("the example's fleet.toml parses");
        let tested = Manifest::parse(&super::web_manifest("10s")).expect("web_manifest parses");
        assert_eq!(example, tested);
    }

    #[test]
    fn random_bytes_do_not_compress() {
        let bytes = super::incompressible_bytes(1 << 16);
        let packed = fleet_proto::artifact::build_artifact(&[("blob", &bytes, 0o644)]).unwrap();
        assert!(
            packed.len() > bytes.len(),
            "{} <= {}",
            packed.len(),
            bytes.len()
        );
    }
}
