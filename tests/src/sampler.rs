//! A sampler of hosts' health: a thread that asks every host's `/healthz` every few
//! milliseconds until stopped, and keeps the most hosts it saw down at once. The budget tests
//! check with it what a user would: how many hosts had no healthy instance at the same time.

use crate::http;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Samples `/healthz` on every address until [`Sampler::finish`].
pub struct Sampler {
    stop: Arc<AtomicBool>,
    worst: Arc<AtomicUsize>,
    samples: Arc<AtomicUsize>,
    thread: std::thread::JoinHandle<()>,
}

impl Sampler {
    /// Starts sampling `addrs` (each an app's `HOST` address, as agents advertise it).
    pub fn start(addrs: Vec<String>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let worst = Arc::new(AtomicUsize::new(0));
        let samples = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (stop, worst, samples) = (stop.clone(), worst.clone(), samples.clone());
            std::thread::spawn(move || {
                // Bounded by the stop flag, which the test sets, and by a count.
                for _ in 0..200_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let down = addrs
                        .iter()
                        .filter(|addr| http::get_ok(addr, "/healthz").is_none())
                        .count();
                    worst.fetch_max(down, Ordering::Relaxed);
                    samples.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        Sampler {
            stop,
            worst,
            samples,
            thread,
        }
    }

    /// Stops it; (the most hosts seen down at once, how many samples were taken).
    pub fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the sampler");
        (
            self.worst.load(Ordering::Relaxed),
            self.samples.load(Ordering::Relaxed),
        )
    }
}
