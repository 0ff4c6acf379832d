//! Loopback address ranges, one per fleet, so tests running side by side never bind the same
//! `ADDR:PORT`.
//!
//! A fleet takes `127.A.B.0/24`. `A.B` comes from a number unique to this fleet in this
//! machine's current processes: the process id times 64 plus a per-process counter. The second
//! octet is never 0, so `127.0.0.1` (where controllers listen) stays out of every range. Before a
//! range is used, every host address in it that the fleet may use is bound once on the app's
//! port as a probe; a range with any address taken is skipped for the next one.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// How many host addresses a range offers (`.2` up to `.2 + MAX_HOSTS - 1`).
pub const MAX_HOSTS: usize = 64;
/// How many ranges are tried before giving up.
const MAX_ATTEMPTS: u32 = 256;

static NEXT_RANGE: AtomicU32 = AtomicU32::new(0);

/// One fleet's own loopback range, `127.A.B.0/24`.
#[derive(Debug, Clone)]
pub struct AddressRange {
    prefix: String,
}

impl AddressRange {
    /// Takes a free range whose first `n_hosts` addresses can bind `port`.
    pub fn allocate(n_hosts: usize, port: u16) -> AddressRange {
        assert!(
            n_hosts <= MAX_HOSTS,
            "a fleet has at most {MAX_HOSTS} hosts"
        );
        for _ in 0..MAX_ATTEMPTS {
            let counter = NEXT_RANGE.fetch_add(1, Ordering::Relaxed);
            let unique = std::process::id().wrapping_mul(64).wrapping_add(counter);
            let range = AddressRange::from_unique(unique);
            let all_free = (0..n_hosts)
                .all(|idx| TcpListener::bind((range.host_addr(idx).as_str(), port)).is_ok());
            if all_free {
                return range;
            }
        }
        panic!("found no free loopback range 127.A.B.0/24 for port {port} in {MAX_ATTEMPTS} tries")
    }

    fn from_unique(unique: u32) -> AddressRange {
        let second = 1 + (unique / 256) % 254;
        let third = unique % 256;
        AddressRange {
            prefix: format!("127.{second}.{third}"),
        }
    }

    /// The advertise address of the fleet's `idx`-th host (0-based): `127.A.B.(idx + 2)`.
    pub fn host_addr(&self, idx: usize) -> String {
        assert!(idx < MAX_HOSTS, "host index {idx} is out of the range");
        format!("{}.{}", self.prefix, idx + 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_stay_off_127_0() {
        for unique in [0, 1, 255, 256, 65_023, 65_024, u32::MAX] {
            let range = AddressRange::from_unique(unique);
            assert!(!range.host_addr(0).starts_with("127.0."), "{range:?}");
            let octets: Vec<u32> = range
                .host_addr(MAX_HOSTS - 1)
                .split('.')
                .map(|o| o.parse().unwrap())
                .collect();
            assert!(octets.iter().all(|o| *o <= 255), "{octets:?}");
        }
    }

    #[test]
    fn two_allocations_differ() {
        let a = AddressRange::allocate(3, crate::WEB_PORT);
        let b = AddressRange::allocate(3, crate::WEB_PORT);
        assert_ne!(a.host_addr(0), b.host_addr(0));
    }
}
