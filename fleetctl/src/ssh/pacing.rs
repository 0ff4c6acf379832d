//! Pacing of an upload on an SSH channel: keeps the bytes the remote command has not consumed
//! yet under a cap, instead of filling the server's whole channel window (2 MiB for OpenSSH)
//! at once.
//!
//! A flooded OpenSSH server holds the excess in buffers it grows, copies and zeroes as they
//! grow; with ten hosts bootstrapped from one machine onto one test box that was nine tenths of
//! all CPU (README "Speed": sshd 190 ms of CPU per host flooded, 35 ms paced).
//!
//! The server tells what its command consumed through window adjustments: the window left
//! after one, against the largest window seen, is what is still in flight. A server that sends
//! no adjustment while we hold back (some adjust only at half the window) turns pacing off for
//! the rest of the upload, so nothing can stall: the channel window alone limits it then.

use std::time::Duration;

/// Bytes in flight (sent, not yet reported consumed) at most: a few of OpenSSH's adjustment
/// steps (3 packets of 32 KiB). Enough for 100 MB/s up to 2.5 ms of round trip; a 100 ms link
/// gets 2.5 MB/s (3 s for the agent binary), the price of not flooding nearby servers. (Sizing
/// it from a measured round trip failed: on a loaded machine the measure grows with the load
/// and the floods return.)
pub const IN_FLIGHT_CAP: u64 = 256 << 10;
/// The size of one write.
pub const PIECE: usize = 64 << 10;
/// Held back this long without an adjustment, pacing gives up for this upload.
pub const STALL: Duration = Duration::from_millis(200);

/// What the server last said about the channel window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WindowNews {
    /// Adjustments received so far.
    pub adjustments: u64,
    /// The window left after the latest one.
    pub window: u32,
}

/// The sender's side of the pacing.
#[derive(Debug)]
pub struct Pacer {
    enabled: bool,
    seen: u64,
    largest_window: u64,
    window_at_news: u64,
    sent_total: u64,
    sent_since_news: u64,
}

impl Default for Pacer {
    fn default() -> Pacer {
        Pacer {
            enabled: true,
            seen: 0,
            largest_window: 0,
            window_at_news: 0,
            sent_total: 0,
            sent_since_news: 0,
        }
    }
}

impl Pacer {
    /// Takes in the server's latest word on the window.
    pub fn update(&mut self, news: WindowNews) {
        if news.adjustments != self.seen {
            self.seen = news.adjustments;
            self.window_at_news = u64::from(news.window);
            self.largest_window = self.largest_window.max(self.window_at_news);
            self.sent_since_news = 0;
        }
    }

    /// Bytes sent that the server has not reported consumed (an upper bound).
    pub fn in_flight(&self) -> u64 {
        if self.seen == 0 {
            return self.sent_total;
        }
        let window_now = self.window_at_news.saturating_sub(self.sent_since_news);
        self.largest_window.saturating_sub(window_now)
    }

    /// Whether `len` more bytes may go now.
    pub fn may_send(&self, len: usize) -> bool {
        !self.enabled || self.in_flight() + len as u64 <= IN_FLIGHT_CAP
    }

    pub fn sent(&mut self, len: usize) {
        self.sent_total += len as u64;
        self.sent_since_news += len as u64;
    }

    /// The server stayed silent while we held back: send at the channel window's pace.
    pub fn give_up(&mut self) {
        self.enabled = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_at_the_cap_until_the_server_reports_consumption() {
        let mut pacer = Pacer::default();
        let mut sent = 0;
        while pacer.may_send(PIECE) {
            pacer.sent(PIECE);
            sent += PIECE as u64;
        }
        assert_eq!(
            sent, IN_FLIGHT_CAP,
            "the first cap goes out before any adjustment"
        );
        // The server (a 2 MiB window) consumed 768 KiB of the 1 MiB: 256 KiB still in flight.
        let window = 2 * IN_FLIGHT_CAP - IN_FLIGHT_CAP + 768 * 1024;
        pacer.update(WindowNews {
            adjustments: 1,
            window: window as u32,
        });
        // The largest window seen so far is this one: in flight reads 0 until a later one.
        assert!(pacer.may_send(PIECE));
        pacer.sent(PIECE);
        assert_eq!(pacer.in_flight(), PIECE as u64);
        // The same news again changes nothing.
        pacer.update(WindowNews {
            adjustments: 1,
            window: window as u32,
        });
        assert_eq!(pacer.in_flight(), PIECE as u64);
    }

    #[test]
    fn in_flight_follows_the_window_against_the_largest_seen() {
        let mut pacer = Pacer::default();
        pacer.update(WindowNews {
            adjustments: 1,
            window: 2 << 20,
        });
        pacer.sent(200 << 10);
        assert_eq!(pacer.in_flight(), 200 << 10);
        assert!(!pacer.may_send(PIECE));
        // Half of it consumed: the window grows back by that.
        pacer.update(WindowNews {
            adjustments: 2,
            window: (2 << 20) - (100 << 10),
        });
        assert_eq!(pacer.in_flight(), 100 << 10);
        assert!(pacer.may_send(PIECE));
    }

    #[test]
    fn giving_up_lets_everything_through() {
        let mut pacer = Pacer::default();
        pacer.sent(IN_FLIGHT_CAP as usize);
        assert!(!pacer.may_send(1));
        pacer.give_up();
        assert!(pacer.may_send(usize::MAX >> 1));
    }
}
