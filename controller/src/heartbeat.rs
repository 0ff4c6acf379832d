//! How often agents heartbeat and how long a silent host has before it counts as lost, as the
//! fleet grows. Every heartbeat wakes the controller, so with a fixed interval its idle CPU
//! grows with the fleet (10,000 hosts every 5 s are 2,000 wake-ups a second). As Nomad's
//! servers stretch their clients' heartbeat TTL, the interval here stretches with the number
//! of hosts so that the controller takes about [`Policy::per_second`] heartbeats a second at
//! most, never below the configured interval and never above [`MAX_INTERVAL_MS`]; the time
//! after which a silent host is lost stretches with it, so a host may miss as many heartbeats
//! as the configuration allows at any size. A small fleet (up to `per_second` times the
//! configured interval, 500 hosts by default) keeps the configured figures exactly.
//!
//! [`cadence`] decides (pure: the number of hosts comes in as a value). The controller tells
//! each agent its interval in `Welcome`, when its session opens and again in answer to each
//! heartbeat, so a change reaches every host within one of its own intervals, with no message
//! of its own.

/// The longest interval an agent is ever told: under the HTTP/2 keepalive interval of both
/// ends (75 s), so a heartbeat and its answer always come before a keepalive would be sent.
pub const MAX_INTERVAL_MS: u64 = 60_000;
/// The HTTP/2 keepalive interval of the controller's connections (and the agent's, which has
/// its own copy): a ping goes only after this long without a frame from the peer.
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(75);
// A heartbeat and its answer come well before a keepalive ping would.
const _: () = assert!(MAX_INTERVAL_MS + 10_000 <= KEEPALIVE_INTERVAL.as_millis() as u64);
/// The longest `lost_after` a stretched interval leads to, unless the configuration asks for
/// more.
pub const MAX_LOST_AFTER_MS: u64 = 600_000;
/// Heartbeats a second the controller aims to take at most, unless configured.
pub const DEFAULT_PER_SECOND: u64 = 100;

/// What the configuration says: the figures for a small fleet, and the rate to keep to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// The configured heartbeat interval: the shortest an agent is told.
    pub interval_ms: u64,
    /// The configured time after which a host heartbeating at `interval_ms` is lost.
    pub lost_after_ms: u64,
    /// Heartbeats a second the controller aims to take at most.
    pub per_second: u64,
}

/// The heartbeat interval agents are told, and the silence after which a host is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cadence {
    pub interval_ms: u64,
    pub lost_after_ms: u64,
}

/// The cadence for a fleet of `hosts`: the configured interval, or the smallest whole multiple
/// of it at which `hosts` heartbeats come at most `per_second` a second (coarse steps, so the
/// interval moves seldom as hosts come and go), at most [`MAX_INTERVAL_MS`]; `lost_after`
/// scaled by the same factor, at most [`MAX_LOST_AFTER_MS`] (or the configured one, if more).
pub fn cadence(policy: &Policy, hosts: usize) -> Cadence {
    let base = policy.interval_ms.max(1);
    let needed_ms = (hosts as u64).saturating_mul(1000) / policy.per_second.max(1);
    let steps = needed_ms.div_ceil(base).max(1);
    let interval_ms = steps.saturating_mul(base).min(MAX_INTERVAL_MS.max(base));
    let scaled =
        (policy.lost_after_ms as u128 * interval_ms as u128 / base as u128).min(u64::MAX as u128);
    let lost_after_ms = (scaled as u64).min(MAX_LOST_AFTER_MS.max(policy.lost_after_ms));
    Cadence {
        interval_ms,
        lost_after_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: Policy = Policy {
        interval_ms: 5_000,
        lost_after_ms: 15_000,
        per_second: DEFAULT_PER_SECOND,
    };

    #[test]
    fn the_interval_grows_with_the_fleet_in_steps_of_the_configured_one() {
        // (policy, hosts) -> (interval, lost_after)
        let fast = Policy {
            interval_ms: 200,
            lost_after_ms: 1_500,
            per_second: 100,
        };
        let slow_lost = Policy {
            lost_after_ms: 300_000,
            ..DEFAULT
        };
        let eager = Policy {
            per_second: 1_000,
            ..DEFAULT
        };
        let table: &[(Policy, usize, u64, u64)] = &[
            // A small fleet keeps the configuration exactly.
            (DEFAULT, 0, 5_000, 15_000),
            (DEFAULT, 1, 5_000, 15_000),
            (DEFAULT, 20, 5_000, 15_000),
            (DEFAULT, 500, 5_000, 15_000),
            // Past 500 hosts (100 a second at 5 s), whole multiples of 5 s.
            (DEFAULT, 501, 10_000, 30_000),
            (DEFAULT, 1_000, 10_000, 30_000),
            (DEFAULT, 1_001, 15_000, 45_000),
            (DEFAULT, 2_000, 20_000, 60_000),
            (DEFAULT, 5_500, 55_000, 165_000),
            // At most a minute: 10,000 hosts send 167 a second.
            (DEFAULT, 6_000, 60_000, 180_000),
            (DEFAULT, 10_000, 60_000, 180_000),
            (DEFAULT, 1_000_000, 60_000, 180_000),
            // The tests' fast figures: the same until 20 hosts, then 200 ms steps.
            (fast, 3, 200, 1_500),
            (fast, 20, 200, 1_500),
            (fast, 21, 400, 3_000),
            // A long configured lost_after scales, up to ten minutes.
            (slow_lost, 10, 5_000, 300_000),
            (slow_lost, 1_000, 10_000, 600_000),
            (slow_lost, 10_000, 60_000, 600_000),
            // A controller told it can take more heartbeats stretches later.
            (eager, 5_000, 5_000, 15_000),
            (eager, 10_000, 10_000, 30_000),
        ];
        for &(policy, hosts, interval_ms, lost_after_ms) in table {
            assert_eq!(
                cadence(&policy, hosts),
                Cadence {
                    interval_ms,
                    lost_after_ms
                },
                "{policy:?} with {hosts} hosts"
            );
        }
    }

    #[test]
    fn a_configured_interval_above_the_cap_or_lost_after_above_ten_minutes_stays() {
        let long = Policy {
            interval_ms: 90_000,
            lost_after_ms: 900_000,
            per_second: 100,
        };
        assert_eq!(
            cadence(&long, 100_000),
            Cadence {
                interval_ms: 90_000,
                lost_after_ms: 900_000
            }
        );
        let odd = Policy {
            interval_ms: 7_000,
            lost_after_ms: 21_000,
            per_second: 100,
        };
        // 56 s is the last multiple under a minute; above it, the cap itself.
        assert_eq!(cadence(&odd, 5_600).interval_ms, 56_000);
        assert_eq!(cadence(&odd, 5_601).interval_ms, 60_000);
        assert_eq!(cadence(&odd, 5_601).lost_after_ms, 180_000);
    }

    #[test]
    fn the_rate_kept_to_is_at_most_the_target_or_the_cap_is_reached() {
        for hosts in [1usize, 10, 499, 500, 501, 999, 1_234, 4_999, 5_999, 6_000] {
            let c = cadence(&DEFAULT, hosts);
            let per_second = hosts as f64 * 1000.0 / c.interval_ms as f64;
            assert!(per_second <= 100.0, "{hosts} hosts: {per_second}/s");
            assert_eq!(c.lost_after_ms, 3 * c.interval_ms, "{hosts} hosts");
        }
    }
}
