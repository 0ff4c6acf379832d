//! Where a wave's time goes: the breakdown `fleet-bench pace` and `rollout` print, read from
//! the timestamps the controller and the agents already log (their clocks are this machine's).
//!
//! The controller logs, at debug under the target `fleet::timing` ([`TIMING_LOG`]), when a
//! wave begins, when a look at it saw hosts pass and when it settled, and at info the hosts
//! each wave deploys to; every agent logs when it received its desired state and every
//! transition it reports. For each wave the *critical host* (the one whose `running` came
//! last) is followed from the controller's start of the wave to the controller's decision:
//!
//! | phase | from | to |
//! | --- | --- | --- |
//! | ctl: before | the previous wave settled (for the first: `fleetctl rollout` ran) | the wave begins |
//! | ctl: commit+send | the wave begins | the host received its desired state |
//! | agent: assign | received | `fetching` reported |
//! | agent: fetch | `fetching` | `unpacking` |
//! | agent: unpack | `unpacking` | `stopping` (or `starting` when nothing ran) |
//! | agent: stop | `stopping` | `stopped` |
//! | agent: start | `stopped` | `checking` (state.json, origin copy, spawn) |
//! | agent: smoke | `checking` | `running` |
//! | report | `running` | the controller saw the last pass |
//! | ctl: save pass | saw it | the wave settled (the pass committed) |
//!
//! The row after the last wave holds what follows it: the rollout's end committed, fleetctl
//! told and exited. The phases of a row add up to its wall time.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What `RUST_LOG` the fleet's processes need for the breakdown.
pub const TIMING_LOG: &str = "info,fleet::timing=debug";

/// Sets `RUST_LOG` for the processes this benchmark starts next (unless the caller set one).
/// Call it before any thread is started.
pub fn enable_timing_logs() {
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", TIMING_LOG);
    }
}

/// The columns of the breakdown, in order.
pub const PHASES: [&str; 10] = [
    "ctl: before",
    "ctl: commit+send",
    "agent: assign",
    "agent: fetch",
    "agent: unpack",
    "agent: stop",
    "agent: start",
    "agent: smoke",
    "report",
    "ctl: save pass",
];

/// One rollout as the benchmark ran it: its id and when `fleetctl rollout` began and returned.
pub struct RolloutRun {
    pub id: String,
    pub began: SystemTime,
    pub ended: SystemTime,
}

/// One row: a wave (1-based; `None` for what follows the last wave) and its phases in ms.
#[derive(Debug, Clone)]
pub struct Row {
    pub wave: Option<usize>,
    pub phases_ms: [f64; PHASES.len()],
}

impl Row {
    pub fn total_ms(&self) -> f64 {
        self.phases_ms.iter().sum()
    }
}

/// A line of a log: its time (seconds since the epoch) and its text.
struct Line<'a> {
    at: f64,
    text: &'a str,
}

fn lines(text: &str) -> Vec<Line<'_>> {
    text.lines()
        .filter_map(|text| {
            Some(Line {
                at: unix_seconds(text.split_whitespace().next()?)?,
                text,
            })
        })
        .collect()
}

/// `2026-12-01T06:10:00.123456Z` as seconds since the epoch.
pub fn unix_seconds(stamp: &str) -> Option<f64> {
    let stamp = stamp.strip_suffix('Z')?;
    let (date, clock) = stamp.split_once('T')?;
    let mut date = date.split('-').map(|p| p.parse::<i64>().ok());
    let (year, month, day) = (date.next()??, date.next()??, date.next()??);
    let mut clock = clock.split(':');
    let hours: f64 = clock.next()?.parse().ok()?;
    let minutes: f64 = clock.next()?.parse().ok()?;
    let seconds: f64 = clock.next()?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + hours * 3600.0 + minutes * 60.0 + seconds)
}

fn seconds_of(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64()
}

/// Whether `text` holds the field `key=value` exactly (quoted or not).
fn has_field(text: &str, key: &str, value: &str) -> bool {
    text.split_whitespace().any(|token| {
        token
            .strip_prefix(key)
            .and_then(|rest| rest.strip_prefix('='))
            .is_some_and(|v| v.trim_matches('"') == value)
    })
}

/// The breakdown of one rollout, from the controller's log and each agent's
/// (`logs/controller.log`, `logs/agent-NAME.log` under the fleet's directory).
pub fn breakdown(
    fleet_dir: &Path,
    agents: &[String],
    run: &RolloutRun,
) -> Result<Vec<Row>, String> {
    let read = |name: &str| {
        std::fs::read_to_string(fleet_dir.join("logs").join(name))
            .map_err(|e| format!("cannot read logs/{name}: {e}"))
    };
    let controller_text = read("controller.log")?;
    let controller: Vec<Line> = lines(&controller_text)
        .into_iter()
        .filter(|l| has_field(l.text, "rollout", &run.id))
        .collect();
    let mut agent_texts = Vec::new();
    for name in agents {
        agent_texts.push((name.clone(), read(&format!("agent-{name}.log"))?));
    }
    let agent_lines: Vec<(&str, Vec<Line>)> = agent_texts
        .iter()
        .map(|(name, text)| (name.as_str(), lines(text)))
        .collect();
    let (began, ended) = (seconds_of(run.began), seconds_of(run.ended));

    let mut rows = Vec::new();
    let mut previous = began;
    for wave in 1.. {
        let wave_text = wave.to_string();
        let of_wave = |what: &str| {
            controller
                .iter()
                .filter(|l| l.text.contains(what) && has_field(l.text, "wave", &wave_text))
                .map(|l| l.at)
                .collect::<Vec<_>>()
        };
        let Some(&begins) = of_wave("wave begins").first() else {
            break;
        };
        let observed = of_wave("wave observed").last().copied();
        let settled = of_wave("wave settled").first().copied();
        let (Some(observed), Some(settled)) = (observed, settled) else {
            return Err(format!("rollout {}: wave {wave} has no end in the controller's log (is RUST_LOG {TIMING_LOG}?)", run.id));
        };
        let hosts: Vec<String> = controller
            .iter()
            .find(|l| l.at >= begins && l.text.contains(": deploying "))
            .and_then(|l| {
                let list = l.text.split(": deploying ").nth(1)?.split(" to ").nth(1)?;
                let list = list.split(" rollout=").next()?;
                Some(list.split(", ").map(|h| h.trim().to_string()).collect())
            })
            .unwrap_or_default();
        // Each host of the wave: its agent's stamps from the wave's beginning.
        let mut critical: Option<[f64; 8]> = None;
        for host in &hosts {
            let Some((_, lines)) = agent_lines.iter().find(|(name, _)| name == host) else {
                continue;
            };
            let after = |from: f64, what: &dyn Fn(&str) -> bool| {
                lines
                    .iter()
                    .find(|l| l.at >= from && what(l.text))
                    .map(|l| l.at)
            };
            let state = |name: &'static str| move |text: &str| has_field(text, "state", name);
            let Some(received) = after(begins, &|t| t.contains("desired state received")) else {
                continue;
            };
            let fetching = after(received, &state("fetching")).unwrap_or(received);
            let unpacking = after(fetching, &state("unpacking")).unwrap_or(fetching);
            let starting = after(unpacking, &state("starting"));
            let stopping =
                after(unpacking, &state("stopping")).filter(|s| starting.is_none_or(|st| *s <= st));
            let (stop_began, stopped) = match stopping {
                Some(stopping) => (
                    stopping,
                    after(stopping, &state("stopped")).unwrap_or(stopping),
                ),
                None => {
                    let at = starting.unwrap_or(unpacking);
                    (at, at)
                }
            };
            let checking = after(stopped, &state("checking")).unwrap_or(stopped);
            let Some(running) = after(checking, &state("running")) else {
                continue;
            };
            let stamps = [
                received, fetching, unpacking, stop_began, stopped, checking, running, 0.0,
            ];
            if critical.is_none_or(|c| running > c[6]) {
                critical = Some(stamps);
            }
        }
        let Some([received, fetching, unpacking, stop_began, stopped, checking, running, _]) =
            critical
        else {
            return Err(format!(
                "rollout {}: no agent log shows wave {wave} deployed",
                run.id
            ));
        };
        let ms = |from: f64, to: f64| (to - from) * 1000.0;
        rows.push(Row {
            wave: Some(wave),
            phases_ms: [
                ms(previous, begins),
                ms(begins, received),
                ms(received, fetching),
                ms(fetching, unpacking),
                ms(unpacking, stop_began),
                ms(stop_began, stopped),
                ms(stopped, checking),
                ms(checking, running),
                ms(running, observed),
                ms(observed, settled),
            ],
        });
        previous = settled;
    }
    if rows.is_empty() {
        return Err(format!(
            "rollout {}: no wave in the controller's log (is RUST_LOG {TIMING_LOG}?)",
            run.id
        ));
    }
    let mut end = [0.0; PHASES.len()];
    end[0] = (ended - previous) * 1000.0;
    rows.push(Row {
        wave: None,
        phases_ms: end,
    });
    Ok(rows)
}

/// The median of each phase of each row over several rollouts of the same shape.
pub fn median_rows(runs: &[Vec<Row>]) -> Vec<Row> {
    let Some(first) = runs.first() else {
        return Vec::new();
    };
    first
        .iter()
        .enumerate()
        .map(|(idx, row)| {
            let mut phases_ms = [0.0; PHASES.len()];
            for (phase, slot) in phases_ms.iter_mut().enumerate() {
                let mut values: Vec<f64> = runs
                    .iter()
                    .filter_map(|run| run.get(idx).map(|r| r.phases_ms[phase]))
                    .collect();
                values.sort_by(f64::total_cmp);
                *slot = values.get(values.len() / 2).copied().unwrap_or_default();
            }
            Row {
                wave: row.wave,
                phases_ms,
            }
        })
        .collect()
}

/// The table, as markdown (it goes into docs/benchmarks.md as printed).
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from("| wave |");
    for phase in PHASES {
        out.push_str(&format!(" {phase} |"));
    }
    out.push_str(" total |\n|---|");
    for _ in PHASES {
        out.push_str("---:|");
    }
    out.push_str("---:|\n");
    for row in rows {
        let label = row.wave.map_or("end".to_string(), |w| w.to_string());
        out.push_str(&format!("| {label} |"));
        for value in row.phases_ms {
            out.push_str(&format!(" {value:.1} |"));
        }
        out.push_str(&format!(" {:.1} |\n", row.total_ms()));
    }
    out
}

/// The breakdown as JSON: one object per row, phase names as keys (ms).
pub fn json(rows: &[Row]) -> serde_json::Value {
    serde_json::Value::Array(
        rows.iter()
            .map(|row| {
                let mut object = serde_json::Map::new();
                object.insert(
                    "wave".into(),
                    row.wave
                        .map_or(serde_json::Value::from("end"), serde_json::Value::from),
                );
                for (phase, value) in PHASES.iter().zip(row.phases_ms) {
                    object.insert(
                        (*phase).into(),
                        serde_json::Value::from((value * 10.0).round() / 10.0),
                    );
                }
                object.insert(
                    "total".into(),
                    serde_json::Value::from((row.total_ms() * 10.0).round() / 10.0),
                );
                serde_json::Value::Object(object)
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_log_stamp_as_unix_time() {
        assert_eq!(unix_seconds("1970-01-01T00:00:01.5Z"), Some(1.5));
        assert_eq!(
            unix_seconds("2026-12-01T00:00:00.000000Z"),
            Some(1_796_083_200.0)
        );
        assert_eq!(unix_seconds("INFO"), None);
    }

    #[test]
    fn matches_fields_exactly() {
        let line = "2026-12-01T00:00:00Z DEBUG fleet::timing: wave begins rollout=r-1 wave=12";
        assert!(has_field(line, "rollout", "r-1"));
        assert!(!has_field(line, "rollout", "r-12"));
        assert!(has_field(line, "wave", "12"));
        assert!(has_field("x state=\"running\"", "state", "running"));
    }
}
