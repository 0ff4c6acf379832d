//! The fault runner's random numbers: SplitMix64, small, seeded and the same on every machine,
//! so a seed replays the same moments and choices. Not for anything secret.

/// A seeded SplitMix64 generator.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    /// The seed of try `try_idx` of fault `fault_idx` in a run seeded with `run_seed`: every try
    /// has its own stream, so one try replays alone (`--only FAULT --try N`).
    pub fn try_seed(run_seed: u64, fault_idx: usize, try_idx: u32) -> u64 {
        let mut rng = Rng::new(run_seed ^ ((fault_idx as u64) << 32) ^ u64::from(try_idx));
        rng.next_u64()
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `low..=high`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        if high <= low {
            return low;
        }
        low + self.next_u64() % (high - low + 1)
    }

    /// `low..=high` milliseconds.
    pub fn millis(&mut self, low: u64, high: u64) -> std::time::Duration {
        std::time::Duration::from_millis(self.between(low, high))
    }

    /// One of `items` (which must not be empty).
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.between(0, items.len() as u64 - 1) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_replays_and_ranges_hold() {
        let mut a = Rng::new(42);
        let mut b = Rng::new(42);
        for _ in 0..100 {
            let x = a.between(3, 9);
            assert_eq!(x, b.between(3, 9));
            assert!((3..=9).contains(&x));
        }
        assert_ne!(Rng::try_seed(1, 0, 0), Rng::try_seed(1, 0, 1));
        assert_ne!(Rng::try_seed(1, 0, 0), Rng::try_seed(1, 1, 0));
        assert_eq!(Rng::new(5).between(7, 7), 7);
    }
}
