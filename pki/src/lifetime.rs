//! How long the leaf certificates the fleet CA signs (hosts' and clients') are valid, and when
//! their holder renews one: the bounds of a lifetime (`certificate_ttl` in `controller.toml`,
//! `fleetctl init --certificate-ttl`, `fleetctl credentials create --ttl`), the two-thirds
//! rule ([`renew_due`]) that agents and fleetctl share, and the lifetime read back from a
//! certificate (what a renewal keeps).
//!
//! A certificate's lifetime counts from its issue, not from its `not_before`, which is set
//! [`BACKDATE_SECS`] earlier against clock skew: a 1-minute certificate is renewed 40 s after
//! its issue, not at once.

use std::time::Duration;

/// How far back a certificate's `not_before` is set from its issue (clock skew), in seconds:
/// every certificate `crate::ca` makes, the CA's included, is valid from 5 minutes before it
/// was made, so that a host or a client whose clock is a few minutes behind accepts it.
pub const BACKDATE_SECS: i64 = 300;

/// What a certificate is valid for when nothing says otherwise.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(30 * 86_400);
/// The shortest lifetime: long enough for a renewal round trip after two thirds of it.
pub const MIN_LIFETIME: Duration = Duration::from_secs(60);
/// The longest lifetime.
pub const MAX_LIFETIME: Duration = Duration::from_secs(365 * 86_400);

/// Checks a lifetime against [`MIN_LIFETIME`] and [`MAX_LIFETIME`]; the error says the bounds
/// (the caller names the setting).
pub fn check_lifetime(lifetime: Duration) -> Result<Duration, String> {
    if (MIN_LIFETIME..=MAX_LIFETIME).contains(&lifetime) {
        Ok(lifetime)
    } else {
        Err(format!(
            "{} is not between 1m and 365d: write a duration like 30d, 12h or 5m",
            format_lifetime(lifetime)
        ))
    }
}

/// When a certificate valid from `not_before` to `not_after` (unix seconds) was issued: its
/// `not_before` plus the back-dating, unless it is too short to have been back-dated that much
/// (one issued before the back-dating grew): then its whole validity counts.
fn issued_at(not_before: i64, not_after: i64) -> i64 {
    if not_after - not_before > BACKDATE_SECS {
        not_before + BACKDATE_SECS
    } else {
        not_before
    }
}

/// When the holder of a certificate valid from `not_before` to `not_after` (unix seconds)
/// renews it: once two thirds of its lifetime passed; `None` when its validity makes no sense
/// (then at once).
pub fn renew_at(not_before: i64, not_after: i64) -> Option<i64> {
    if not_after <= not_before {
        return None;
    }
    let issued = issued_at(not_before, not_after);
    let lifetime = not_after - issued;
    Some(not_after - lifetime / 3)
}

/// Whether a certificate valid from `not_before` to `not_after` (unix seconds) is due for
/// renewal at `now`: two thirds of its lifetime passed (also when it expired, or its validity
/// makes no sense).
pub fn renew_due(not_before: i64, not_after: i64, now: i64) -> bool {
    renew_at(not_before, not_after).is_none_or(|at| now >= at)
}

/// The lifetime a certificate valid from `not_before` to `not_after` (unix seconds) was issued
/// with, within [`MIN_LIFETIME`] and [`MAX_LIFETIME`]: what its renewal is valid for.
pub fn lifetime_of(not_before: i64, not_after: i64) -> Duration {
    let secs = (not_after - issued_at(not_before, not_after)).max(0) as u64;
    Duration::from_secs(secs).clamp(MIN_LIFETIME, MAX_LIFETIME)
}

/// A lifetime as `--ttl` reads it, exactly: `30d`, `12h`, `5m` or `90s`.
pub fn format_lifetime(lifetime: Duration) -> String {
    let secs = lifetime.as_secs();
    match secs {
        0 => "0s".to_string(),
        _ if secs.is_multiple_of(86_400) => format!("{}d", secs / 86_400),
        _ if secs.is_multiple_of(3600) => format!("{}h", secs / 3600),
        _ if secs.is_multiple_of(60) => format!("{}m", secs / 60),
        _ => format!("{secs}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_once_two_thirds_of_the_lifetime_passed() {
        let b = BACKDATE_SECS;
        let day = 86_400;
        for (not_before, not_after, now, due) in [
            // A 1-minute certificate issued at 1000 (back-dated): due from 1040 on.
            (1000 - b, 1060, 1000, false),
            (1000 - b, 1060, 1039, false),
            (1000 - b, 1060, 1040, true),
            (1000 - b, 1060, 1059, true),
            (1000 - b, 1060, 5000, true), // expired: due (the controller decides)
            // 30 days issued at 0: due after 20.
            (-b, 30 * day, 20 * day - 1, false),
            (-b, 30 * day, 20 * day, true),
            // 90 seconds, back-dated less than the back-dating (an older certificate): its
            // whole validity counts, due from second 60 on.
            (0, 90, 59, false),
            (0, 90, 60, true),
            // Not yet valid (clock behind): not due.
            (3600, 4 * 3600, 0, false),
            // Nonsense validity: due.
            (10, 10, 0, true),
            (10, 5, 0, true),
        ] {
            assert_eq!(
                renew_due(not_before, not_after, now),
                due,
                "{not_before}..{not_after} at {now}"
            );
        }
    }

    #[test]
    fn the_lifetime_read_back_is_the_one_issued_within_bounds() {
        let b = BACKDATE_SECS;
        for (not_before, not_after, lifetime) in [
            (-b, 60, 60),
            (-b, 7 * 86_400, 7 * 86_400),
            (-b, 400 * 86_400, 365 * 86_400),
            (0, 30, 60),
        ] {
            assert_eq!(
                lifetime_of(not_before, not_after),
                Duration::from_secs(lifetime),
                "{not_before}..{not_after}"
            );
        }
    }

    #[test]
    fn lifetimes_are_checked_and_written_exactly() {
        for (secs, ok, text) in [
            (59, false, "59s"),
            (60, true, "1m"),
            (90, true, "90s"),
            (7200, true, "2h"),
            (30 * 86_400, true, "30d"),
            (365 * 86_400, true, "365d"),
            (366 * 86_400, false, "366d"),
        ] {
            let lifetime = Duration::from_secs(secs);
            assert_eq!(check_lifetime(lifetime).is_ok(), ok, "{secs}");
            assert_eq!(format_lifetime(lifetime), text);
        }
        assert!(check_lifetime(Duration::from_secs(1))
            .unwrap_err()
            .contains("between 1m and 365d"));
    }
}
