//! How fleetctl prints: aligned text tables for people, the proto response as JSON for scripts
//! (`--output json`), and the small formatters both share: "3m ago", UTC timestamps, sizes and
//! short digests. Results go to stdout; progress goes to stderr: a bar when both are a
//! terminal, else one timestamped line per step (`ProgressPrinter`).

use fleet_proto::instance_state::InstanceState;
use fleet_proto::pb;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

pub use crate::args::OutputFormat;

/// Prints a value as pretty JSON on stdout.
pub fn print_json<T: serde::Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("error: cannot write the answer as JSON: {e}"),
    }
}

/// Prints a value as one line of JSON on stdout (for streams such as `events`).
pub fn print_json_line<T: serde::Serialize>(value: &T) {
    match serde_json::to_string(value) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("error: cannot write the answer as JSON: {e}"),
    }
}

/// A text table: a header row and rows, columns padded to their widest cell.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles.
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells print empty, empty cells print as "-".
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// True when no row was added.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as text, each line ending in a newline.
    pub fn render(&self) -> String {
        let n_columns = self.header.len();
        let cell = |row: &Vec<String>, idx: usize| -> String {
            match row.get(idx) {
                Some(text) if !text.is_empty() => text.clone(),
                _ => "-".to_string(),
            }
        };
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (idx, width) in widths.iter_mut().enumerate() {
                *width = (*width).max(cell(row, idx).chars().count());
            }
        }
        let mut text = String::new();
        let mut write_line = |cells: Vec<String>| {
            let mut line = String::new();
            for (idx, value) in cells.iter().enumerate() {
                if idx + 1 == n_columns {
                    line.push_str(value);
                } else {
                    let _ = write!(line, "{value:<width$}  ", width = widths[idx]);
                }
            }
            text.push_str(line.trim_end());
            text.push('\n');
        };
        write_line(self.header.clone());
        for row in &self.rows {
            write_line((0..n_columns).map(|idx| cell(row, idx)).collect());
        }
        text
    }

    /// Prints the table on stdout.
    pub fn print(&self) {
        print!("{}", self.render());
    }
}

/// How long ago `unix_ms` was, for people: "just now", "42s ago", "3m ago", "5h ago", "2d ago".
/// Zero (unknown) prints as "-".
pub fn ago(unix_ms: i64, now_unix_ms: i64) -> String {
    if unix_ms <= 0 {
        return "-".to_string();
    }
    let seconds = (now_unix_ms - unix_ms) / 1000;
    if seconds < 1 {
        "just now".to_string()
    } else if seconds < 60 {
        format!("{seconds}s ago")
    } else if seconds < 3600 {
        format!("{}m ago", seconds / 60)
    } else if seconds < 86_400 {
        format!("{}h ago", seconds / 3600)
    } else {
        format!("{}d ago", seconds / 86_400)
    }
}

/// How long until `unix_ms`, for people: "in 42s", "in 3m", "in 5h", "in 2d", or "expired"
/// once it passed. Zero (unknown) prints as "-".
pub fn until(unix_ms: i64, now_unix_ms: i64) -> String {
    if unix_ms <= 0 {
        return "-".to_string();
    }
    let seconds = (unix_ms - now_unix_ms) / 1000;
    if unix_ms <= now_unix_ms {
        "expired".to_string()
    } else if seconds < 60 {
        format!("in {seconds}s")
    } else if seconds < 3600 {
        format!("in {}m", seconds / 60)
    } else if seconds < 86_400 {
        format!("in {}h", seconds / 3600)
    } else {
        format!("in {}d", seconds / 86_400)
    }
}

/// How long something took between two Unix-ms times ("-" when either is unknown).
pub fn took(start_unix_ms: i64, end_unix_ms: i64) -> String {
    if start_unix_ms <= 0 || end_unix_ms <= 0 || end_unix_ms < start_unix_ms {
        return "-".to_string();
    }
    fleet_proto::duration::format_duration(Duration::from_millis(
        (end_unix_ms - start_unix_ms) as u64,
    ))
}

/// A Unix-ms time as `YYYY-MM-DD HH:MM:SSZ` (UTC).
pub fn utc_time(unix_ms: i64) -> String {
    let seconds = unix_ms.div_euclid(1000);
    let days = seconds.div_euclid(86_400);
    let second_of_day = seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z",
        second_of_day / 3600,
        (second_of_day % 3600) / 60,
        second_of_day % 60
    )
}

/// Days since 1970-01-01 to a (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A byte count for people: "512 B", "1.4 MiB".
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// `sha256:` and the first 12 hex digits, enough to tell artifacts apart in a table.
pub fn short_digest(digest: &str) -> String {
    match digest.strip_prefix("sha256:") {
        Some(hex) if hex.len() > 12 => format!("sha256:{}", &hex[..12]),
        _ => digest.to_string(),
    }
}

/// Labels as `k=v,k2=v2`, sorted by key so the output is stable.
pub fn labels<'a>(pairs: impl IntoIterator<Item = (&'a String, &'a String)>) -> String {
    fleet_proto::names::format_labels(pairs)
}

/// The state an instance report names, `None` when it names none this build knows.
pub fn instance_state(report: &pb::InstanceReport) -> Option<InstanceState> {
    InstanceState::from_report(report)
}

/// The name of an instance's state for tables and messages (`unknown` for a state this build
/// does not know).
pub fn instance_state_name(report: &pb::InstanceReport) -> &'static str {
    instance_state(report).map_or("unknown", InstanceState::as_str)
}

/// How a followed rollout's progress is shown on stderr: on a terminal (stdout and stderr
/// both), a bar of the hosts done with the current wave beside it and each progress line
/// printed above it; elsewhere (a pipe, a file, CI, tests) today's lines alone,
/// `[   1.2s] line`, with no escape codes.
pub enum ProgressPrinter {
    Lines { started: Instant },
    Bar { started: Instant, bar: ProgressBar },
}

impl ProgressPrinter {
    /// A bar when stdout and stderr are a terminal, else lines.
    pub fn new(started: Instant) -> ProgressPrinter {
        use std::io::IsTerminal;
        if std::io::stdout().is_terminal() && std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} hosts  {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            ProgressPrinter::Bar { started, bar }
        } else {
            ProgressPrinter::Lines { started }
        }
    }

    /// One progress line from the controller.
    pub fn line(&self, text: &str) {
        match self {
            ProgressPrinter::Lines { started } => eprintln!("{}", progress_line(*started, text)),
            ProgressPrinter::Bar { started, bar } => bar.println(progress_line(*started, text)),
        }
    }

    /// The rollout as it stands: the bar counts its hosts done.
    pub fn update(&self, rollout: &pb::Rollout) {
        if let ProgressPrinter::Bar { bar, .. } = self {
            let (done, total) = hosts_done(rollout);
            bar.set_length(total);
            bar.set_position(done);
            bar.set_message(wave_text(rollout));
        }
    }

    /// Takes the bar off the terminal, leaving the lines printed above it.
    pub fn finish(self) {
        if let ProgressPrinter::Bar { bar, .. } = self {
            bar.finish_and_clear();
        }
    }
}

/// `[   1.2s] text`: a progress line with the time since the command started.
pub fn progress_line(started: Instant, text: &str) -> String {
    format!("[{:>6.1}s] {text}", started.elapsed().as_secs_f64())
}

/// How many hosts of a rollout are done (a result other than pending or deploying), of all
/// its hosts.
pub fn hosts_done(rollout: &pb::Rollout) -> (u64, u64) {
    let hosts = rollout.waves.iter().flat_map(|wave| wave.hosts.iter());
    let total = hosts.clone().count() as u64;
    let done = hosts
        .filter(|host| !matches!(host.result.as_str(), "pending" | "deploying"))
        .count() as u64;
    (done, total)
}

/// `wave 2/5 running`: where a rollout stands, beside its bar.
fn wave_text(rollout: &pb::Rollout) -> String {
    if rollout.waves.is_empty() {
        return rollout.state.clone();
    }
    format!(
        "wave {}/{} {}",
        (rollout.current_wave as usize + 1).min(rollout.waves.len()),
        rollout.waves.len(),
        rollout.state
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn hosts_done_counts_every_result_but_pending_and_deploying() {
        let host = |result: &str| pb::WaveHost {
            host: "h".into(),
            result: result.into(),
            ..Default::default()
        };
        let rollout = pb::Rollout {
            state: "running".into(),
            current_wave: 1,
            waves: vec![
                pb::Wave {
                    state: "passed".into(),
                    hosts: vec![host("passed")],
                },
                pb::Wave {
                    state: "running".into(),
                    hosts: vec![host("passed"), host("deploying"), host("failed")],
                },
                pb::Wave {
                    state: "pending".into(),
                    hosts: vec![host("pending"), host("skipped")],
                },
            ],
            ..Default::default()
        };
        assert_eq!(hosts_done(&rollout), (4, 6));
        assert_eq!(wave_text(&rollout), "wave 2/3 running");
        assert!(progress_line(Instant::now(), "wave 1 passed").ends_with("s] wave 1 passed"));
    }

    use super::*;

    #[test]
    fn ago_reads_like_a_person() {
        let now = 1_000_000_000_000;
        for (then, expect) in [
            (0, "-"),
            (now, "just now"),
            (now + 5000, "just now"),
            (now - 42_000, "42s ago"),
            (now - 180_000, "3m ago"),
            (now - 5 * 3_600_000, "5h ago"),
            (now - 2 * 86_400_000, "2d ago"),
        ] {
            assert_eq!(ago(then, now), expect, "{then}");
        }
    }

    #[test]
    fn until_reads_like_a_person() {
        let now = 1_000_000_000_000;
        for (then, expect) in [
            (0, "-"),
            (now - 1, "expired"),
            (now, "expired"),
            (now + 42_000, "in 42s"),
            (now + 180_000, "in 3m"),
            (now + 5 * 3_600_000, "in 5h"),
            (now + 20 * 86_400_000, "in 20d"),
        ] {
            assert_eq!(until(then, now), expect, "{then}");
        }
    }

    #[test]
    fn utc_times() {
        assert_eq!(utc_time(0), "1970-01-01 00:00:00Z");
        assert_eq!(utc_time(951_782_400_000), "2000-02-29 00:00:00Z");
        assert_eq!(utc_time(1_764_081_302_000), "2025-11-25 14:35:02Z");
    }

    #[test]
    fn sizes_and_digests() {
        assert_eq!(size(512), "512 B");
        assert_eq!(size(1536), "1.5 KiB");
        assert_eq!(size(3 * 1024 * 1024), "3.0 MiB");
        assert_eq!(
            short_digest(&format!("sha256:{}", "ab".repeat(32))),
            "sha256:abababababab"
        );
        assert_eq!(took(1000, 43_000), "42.0s");
        assert_eq!(took(0, 43_000), "-");
    }

    #[test]
    fn tables_align() {
        let mut table = Table::new(&["HOST", "STATE", "APPS"]);
        table.row(vec!["demo-1".into(), "ready".into(), "web@1.0.0".into()]);
        table.row(vec!["h".into(), "".into()]);
        assert_eq!(
            table.render(),
            "HOST    STATE  APPS\ndemo-1  ready  web@1.0.0\nh       -      -\n"
        );
    }
}
