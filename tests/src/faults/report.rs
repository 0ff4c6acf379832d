//! What the fault runner says: one line per fault ("K of K held", or what broke with the seed
//! and try that replay it), and the table it writes into RELIABILITY.md between two marker
//! lines, with the machine and the date.

use super::{Fault, FaultReport};
use std::path::Path;

pub const BEGIN_MARKER: &str = "<!-- fleet-faults: begin (written by `fleet-faults --write`) -->";
pub const END_MARKER: &str = "<!-- fleet-faults: end -->";

/// The replay command of one try.
pub fn replay(report: &FaultReport, try_idx: u32) -> String {
    format!(
        "fleet-faults --seed {} --only {} --try {try_idx}",
        report.seed,
        report.fault.name()
    )
}

/// One line: `controller-kill: 20 of 20 held`, or what broke.
pub fn line(report: &FaultReport) -> String {
    if let Some(why) = &report.skipped {
        return format!("{}: skipped: {why}", report.fault.name());
    }
    let mut text = format!(
        "{}: {} of {} held",
        report.fault.name(),
        report.held(),
        report.tries.len()
    );
    for broken in report.tries.iter().filter(|t| !t.broken.is_empty()) {
        text.push_str(&format!(
            "\n  try {} ({}): {}\n    replay: {}",
            broken.try_idx,
            broken.phase.name(),
            broken.broken.join("; "),
            replay(report, broken.try_idx)
        ));
    }
    text
}

/// `uname -m`, the number of cores, and the kernel, e.g. `x86_64, 2 cores, Linux 6.1`.
pub fn machine() -> String {
    let arch = std::process::Command::new("uname")
        .arg("-m")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    format!("{arch}, {cores} cores, Linux {kernel}")
}

/// Today's date (UTC) as `YYYY-MM-DD`.
pub fn today() -> String {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400) as i64;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// The table of a run, with how it was made.
pub fn table(reports: &[FaultReport], command: &str, build: &str) -> String {
    let mut text = format!(
        "Run on {} ({}), {build} build, with `{command}`.\n\n\
         | fault | tries | held | broken tries (phase: what broke) |\n| --- | --- | --- | --- |\n",
        today(),
        machine()
    );
    for report in reports {
        let broken: Vec<String> = report
            .tries
            .iter()
            .filter(|t| !t.broken.is_empty())
            .map(|t| {
                format!(
                    "try {} ({}): {}",
                    t.try_idx,
                    t.phase.name(),
                    t.broken.join("; ").replace('|', "/")
                )
            })
            .collect();
        let held = match &report.skipped {
            Some(why) => format!("skipped: {why}"),
            None => report.held().to_string(),
        };
        text.push_str(&format!(
            "| {} ({}) | {} | {held} | {} |\n",
            report.fault.name(),
            report.fault.describe(),
            report.tries.len(),
            if broken.is_empty() {
                "none".to_string()
            } else {
                broken.join("<br>")
            }
        ));
    }
    let ends: Vec<String> = reports
        .iter()
        .map(|r| {
            let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
            for t in &r.tries {
                *counts
                    .entry(if t.end.is_empty() { "no end" } else { &t.end })
                    .or_default() += 1;
            }
            let missed = r.tries.iter().filter(|t| !t.in_phase).count();
            format!(
                "{}: {}{}",
                r.fault.name(),
                counts
                    .iter()
                    .map(|(end, n)| format!("{n} {end}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                if missed > 0 {
                    format!(" ({missed} injected after their phase had passed)")
                } else {
                    String::new()
                }
            )
        })
        .collect();
    text.push_str(&format!("\nHow the rollouts ended: {}.\n", ends.join("; ")));
    text
}

/// Replaces the text between the markers of `path` (appending markers when it has none).
pub fn write_into(path: &Path, table: &str) -> std::io::Result<()> {
    write_between(path, BEGIN_MARKER, END_MARKER, table)
}

/// Replaces the text between the lines `begin_marker` and `end_marker` of `path` (appending
/// both with the text when it has none).
pub fn write_between(
    path: &Path,
    begin_marker: &str,
    end_marker: &str,
    text: &str,
) -> std::io::Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let block = format!("{begin_marker}\n{text}{end_marker}\n");
    let new = match (old.find(begin_marker), old.find(end_marker)) {
        (Some(begin), Some(end)) if end > begin => format!(
            "{}{block}{}",
            &old[..begin],
            old[end + end_marker.len()..].trim_start_matches('\n')
        ),
        _ => format!("{old}\n{block}"),
    };
    std::fs::write(path, new)
}

/// Names of every fault, for help texts.
pub fn fault_names() -> String {
    Fault::ALL.map(Fault::name).join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_replaces_only_what_is_between_the_markers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("R.md");
        std::fs::write(
            &path,
            format!("head\n{BEGIN_MARKER}\nold\n{END_MARKER}\ntail\n"),
        )
        .unwrap();
        write_into(&path, "new\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("head\n{BEGIN_MARKER}\nnew\n{END_MARKER}\ntail\n")
        );
        assert_eq!(today().len(), 10);
    }
}
