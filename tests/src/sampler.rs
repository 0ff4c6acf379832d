//! A sampler of hosts' health: one thread per host asks its `/healthz` every few milliseconds
//! until stopped and keeps the spans in which it found the app down; the most hosts down at
//! once is the most of those spans that overlap in time. The budget tests and the fault runner
//! check with it what a user would: how many hosts had no healthy instance at the same time.
//!
//! A host is down when its app refuses the connection or answers anything but 200. A probe
//! that times out (a starved machine, not an app that is gone: a stopped app refuses at once on
//! loopback) says nothing either way. Each host has its own thread and each span carries the
//! times of its probes, so two hosts down one after the other are not counted as down together
//! because one sweep over the hosts took longer than the gap between them.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long one probe may take before it counts as saying nothing.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the sampler saw.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// The most hosts down at the same moment.
    pub most_down: usize,
    /// Which they were, and when (ms since the Unix epoch).
    pub which: String,
    /// Probes made, over all hosts.
    pub samples: usize,
}

/// Samples `/healthz` on every host until [`Sampler::finish`].
pub struct Sampler {
    stop: Arc<AtomicBool>,
    threads: Vec<(String, JoinHandle<HostRecord>)>,
    started: Instant,
}

/// One host's probes: how many, and the spans (from the start of the first probe that found it
/// down to the end of the last one before it was up again) in which it was down.
#[derive(Default)]
struct HostRecord {
    samples: usize,
    down: Vec<(Duration, Duration)>,
}

enum Probe {
    Up,
    Down,
    Unknown,
}

impl Sampler {
    /// Samples the example app at each of `addrs` (an app's `HOST` address, as agents advertise
    /// it) every 5 ms; hosts are named by their address.
    pub fn start(addrs: Vec<String>) -> Sampler {
        Sampler::named(
            addrs.into_iter().map(|a| (a.clone(), a)).collect(),
            Duration::from_millis(5),
        )
    }

    /// Samples `(name, address)` pairs every `interval`.
    pub fn named(hosts: Vec<(String, String)>, interval: Duration) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let threads = hosts
            .into_iter()
            .map(|(name, addr)| {
                let stop = stop.clone();
                let thread =
                    std::thread::spawn(move || sample_host(&addr, interval, started, &stop));
                (name, thread)
            })
            .collect();
        Sampler {
            stop,
            threads,
            started,
        }
    }

    /// Stops it; what it saw.
    pub fn finish(mut self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        let mut samples = 0;
        let mut spans = Vec::new();
        for (name, thread) in self.threads.drain(..) {
            let record = thread.join().expect("a sampler thread");
            samples += record.samples;
            spans.extend(
                record
                    .down
                    .into_iter()
                    .map(|(from, to)| (name.clone(), from, to)),
            );
        }
        let (most_down, names, at) = most_overlapping(&spans);
        let at_ms = fleet_proto::now_unix_ms()
            .saturating_sub(self.started.elapsed().saturating_sub(at).as_millis() as i64);
        Seen {
            most_down,
            which: if most_down == 0 {
                String::new()
            } else {
                format!("{} at {at_ms} ms", names.join(", "))
            },
            samples,
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for (_, thread) in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn sample_host(addr: &str, interval: Duration, started: Instant, stop: &AtomicBool) -> HostRecord {
    let mut record = HostRecord::default();
    let mut open: Option<(Duration, Duration)> = None;
    // Bounded by the stop flag, which the caller sets, and by a count.
    for _ in 0..1_000_000 {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let from = started.elapsed();
        let probe = probe(addr);
        let to = started.elapsed();
        record.samples += 1;
        match probe {
            Probe::Down => {
                open = Some(match open {
                    Some((first, _)) => (first, to),
                    None => (from, to),
                })
            }
            Probe::Up => record.down.extend(open.take()),
            Probe::Unknown => {}
        }
        std::thread::sleep(interval);
    }
    record.down.extend(open);
    record
}

/// One `GET /healthz` on the example app's port.
fn probe(host: &str) -> Probe {
    let Some(addr) = (host, crate::WEB_PORT)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
    else {
        return Probe::Unknown;
    };
    let timed_out =
        |e: &std::io::Error| matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock);
    let answer = (|| -> std::io::Result<Vec<u8>> {
        let mut stream = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)?;
        stream.set_read_timeout(Some(PROBE_TIMEOUT))?;
        stream.set_write_timeout(Some(PROBE_TIMEOUT))?;
        stream.write_all(
            format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )?;
        let mut raw = Vec::new();
        stream.take(64 * 1024).read_to_end(&mut raw)?;
        Ok(raw)
    })();
    match answer {
        Ok(raw) if raw.starts_with(b"HTTP/1.1 200 ") || raw.starts_with(b"HTTP/1.0 200 ") => {
            Probe::Up
        }
        Ok(_) => Probe::Down,
        Err(e) if timed_out(&e) => Probe::Unknown,
        Err(_) => Probe::Down,
    }
}

/// A host's name and a span in which it was down.
type Span = (String, Duration, Duration);

/// The most spans that overlap at one moment, whose they are and that moment. Spans that only
/// touch (one ends as the other starts) do not overlap.
fn most_overlapping(spans: &[Span]) -> (usize, Vec<String>, Duration) {
    // Ends sort before starts at the same time.
    let mut edges: Vec<(Duration, bool, usize)> = Vec::with_capacity(spans.len() * 2);
    for (i, (_, from, to)) in spans.iter().enumerate() {
        edges.push((*from, true, i));
        edges.push((*to, false, i));
    }
    edges.sort_by_key(|&(at, is_start, _)| (at, is_start));
    let mut now_down: Vec<usize> = Vec::new();
    let mut best = (0, Vec::new(), Duration::ZERO);
    for (at, is_start, i) in edges {
        if is_start {
            now_down.push(i);
            if now_down.len() > best.0 {
                let mut names: Vec<String> = now_down.iter().map(|&j| spans[j].0.clone()).collect();
                names.sort();
                names.dedup();
                best = (now_down.len(), names, at);
            }
        } else {
            now_down.retain(|&j| j != i);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn overlap_counts_only_spans_down_at_the_same_moment() {
        let span = |h: &str, a, b| (h.to_string(), ms(a), ms(b));
        let cases: Vec<(Vec<Span>, usize)> = vec![
            (vec![], 0),
            (vec![span("a", 0, 10)], 1),
            // One after the other: never two at once.
            (vec![span("a", 0, 10), span("b", 20, 30)], 1),
            // Touching is not overlapping.
            (vec![span("a", 0, 10), span("b", 10, 30)], 1),
            (vec![span("a", 0, 10), span("b", 5, 30)], 2),
            (
                vec![
                    span("a", 0, 100),
                    span("b", 5, 10),
                    span("c", 20, 30),
                    span("d", 25, 26),
                ],
                3,
            ),
        ];
        for (spans, want) in cases {
            assert_eq!(most_overlapping(&spans).0, want, "{spans:?}");
        }
        let (_, names, at) = most_overlapping(&[span("b", 5, 30), span("a", 0, 10)]);
        assert_eq!((names, at), (vec!["a".to_string(), "b".to_string()], ms(5)));
    }
}
