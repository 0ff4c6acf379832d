//! How often one host may open a session: a token bucket per host name, checked before the
//! session touches the store (every session that opens writes its host's record, fsynced, under
//! the lock that writes desired state). A host that reconnects in a tight loop (a broken agent,
//! a flapping link, a stolen certificate used as a hammer) is told to wait, and costs the
//! controller one map lookup per try instead of a store commit; every other host keeps being
//! served. A real agent reconnects at most every 200 ms and backs off to 5 s, well inside the
//! limit. [`admit`] decides (pure: the time comes in as a value); [`Reconnects`] keeps the
//! buckets.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Sessions a host may open in a burst.
pub const BURST: f64 = 10.0;
/// Sessions per second a host may open once its burst is spent.
pub const PER_SECOND: f64 = 2.0;
/// Buckets untouched this long are full again and are dropped when the map is swept.
const IDLE_FORGET: Duration = Duration::from_secs(60);
/// The map is swept when it grows past this many hosts since the last sweep (and at most
/// once per [`IDLE_FORGET`]).
const SWEEP_AT: usize = 1024;

/// One host's bucket: tokens left, when it was last filled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    pub tokens: f64,
    pub at: Instant,
}

/// Whether a host whose bucket is `bucket` (None: not seen lately, a full bucket) may open a
/// session at `now`; the bucket after the try. Pure.
pub fn admit(bucket: Option<Bucket>, now: Instant) -> (bool, Bucket) {
    let mut bucket = bucket.unwrap_or(Bucket {
        tokens: BURST,
        at: now,
    });
    let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
    bucket.tokens = (bucket.tokens + elapsed * PER_SECOND).min(BURST);
    bucket.at = now;
    if bucket.tokens >= 1.0 {
        bucket.tokens -= 1.0;
        (true, bucket)
    } else {
        (false, bucket)
    }
}

/// The buckets of the hosts that opened sessions lately.
#[derive(Default)]
pub struct Reconnects {
    state: Mutex<(HashMap<String, Bucket>, Option<Instant>)>,
}

impl Reconnects {
    /// Whether `host` may open a session now (and counts the try).
    pub fn admit(&self, host: &str) -> bool {
        let now = Instant::now();
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (buckets, last_sweep) = &mut *guard;
        let (admitted, bucket) = admit(buckets.get(host).copied(), now);
        buckets.insert(host.to_string(), bucket);
        let sweep_due = last_sweep.is_none_or(|at| now.duration_since(at) >= IDLE_FORGET);
        if buckets.len() >= SWEEP_AT && sweep_due {
            buckets.retain(|_, b| now.saturating_duration_since(b.at) < IDLE_FORGET);
            *last_sweep = Some(now);
        }
        admitted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_gets_its_burst_then_the_rate() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        // (time of the try in ms, admitted?)
        let table: &[(u64, bool)] = &[
            // The burst: ten tries at once pass, the eleventh waits.
            (0, true),
            (0, true),
            (0, true),
            (0, true),
            (0, true),
            (0, true),
            (0, true),
            (0, true),
            (0, true),
            (0, true),
            (0, false),
            // 100 tries a second: one in five passes (2 a second).
            (10, false),
            (100, false),
            (490, false),
            (500, true),
            (510, false),
            (1000, true),
            // Quiet for a minute: the whole burst again.
            (61_000, true),
        ];
        let mut bucket = None;
        for (i, &(at, expected)) in table.iter().enumerate() {
            let (admitted, after) = admit(bucket, ms(at));
            assert_eq!(admitted, expected, "try {i} at {at} ms");
            bucket = Some(after);
        }
    }

    #[test]
    fn an_agent_reconnecting_with_its_backoff_always_passes() {
        // The agent's backoff while refused: 200 ms doubling to 5 s, over and over; and a
        // session welcomed then lost every half second, for 500 s.
        let t0 = Instant::now();
        let mut at = t0;
        let mut bucket = None;
        for round in 0..20 {
            let mut backoff = Duration::from_millis(200);
            for i in 0..8 {
                let (admitted, after) = admit(bucket, at);
                assert!(admitted, "round {round}, try {i}");
                bucket = Some(after);
                at += backoff;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        for i in 0..1000u64 {
            let (admitted, after) = admit(bucket, at + Duration::from_millis(i * 500));
            assert!(admitted, "steady try {i}");
            bucket = Some(after);
        }
    }

    #[test]
    fn hosts_are_counted_apart() {
        let reconnects = Reconnects::default();
        for _ in 0..10 {
            assert!(reconnects.admit("a"));
        }
        assert!(!reconnects.admit("a"));
        assert!(reconnects.admit("b"));
    }
}
