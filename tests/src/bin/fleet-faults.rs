//! `fleet-faults`: the fault runner. Starts a real fleet on loopback for each fault (a
//! controller, three agents each behind a fault proxy, the example web app), repeats the fault
//! K times at random moments of a rollout, the phases taken in turn, checks the invariants after
//! every try, and prints one line per fault. With `--write` it also writes the table into
//! RELIABILITY.md (between its marker lines) with the machine and the date.
//!
//! ```text
//! fleet-faults [--repeat K] [--seed S] [--only FAULT[,FAULT]] [--try N] [--jobs J] [--write [PATH]] [--quiet]
//! fleet-faults --soak DUR [--seed S] [--write [PATH]]
//! fleet-faults --load [--seed S] [--write [PATH]]
//! ```
//!
//! `--jobs J` tries J faults at once, each on a fleet of its own. `--soak DUR` runs rollouts and
//! rollbacks back to back on 10 hosts for DUR (`30m`) with a random fault every few seconds
//! (`faults::soak`); `--load` measures the controller under 200 concurrent reads and 20 uploads
//! from a CPU-limited load generator (`faults::load`; `--load-worker` is that generator, not
//! for people). Exits 1 when any invariant broke. The logic is `fleet_tests::faults`; this is
//! flags only.
#![forbid(unsafe_code)]

use anyhow::{bail, Context, Result};
use fleet_tests::faults::{self, report, Fault, Options};
use std::path::PathBuf;

const USAGE: &str = "usage: fleet-faults [--repeat K] [--seed S] [--only FAULT[,FAULT...]] [--try N] [--jobs J] [--write [PATH]] [--quiet]\n       fleet-faults --soak DUR [--seed S] [--write [PATH]]\n       fleet-faults --load [--seed S] [--write [PATH]]";

/// The markers of the soak's and the load run's figures in RELIABILITY.md.
const SOAK_BEGIN: &str =
    "<!-- fleet-faults soak: begin (written by `fleet-faults --soak DUR --write`) -->";
const SOAK_END: &str = "<!-- fleet-faults soak: end -->";
const LOAD_BEGIN: &str =
    "<!-- fleet-faults load: begin (written by `fleet-faults --load --write`) -->";
const LOAD_END: &str = "<!-- fleet-faults load: end -->";

fn main() -> Result<()> {
    let mut options = Options {
        repeat: 20,
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs()),
        faults: Fault::ALL.to_vec(),
        only_try: None,
        verbose: true,
        jobs: 1,
    };
    let mut write: Option<PathBuf> = None;
    let mut soak: Option<std::time::Duration> = None;
    let mut load = false;
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--load-worker") {
        let spec = args.get(1).context("--load-worker needs its spec")?;
        return faults::load::worker_main(spec);
    }
    let mut idx = 0;
    while idx < args.len() {
        let value = |idx: usize| -> Result<&String> {
            args.get(idx + 1)
                .with_context(|| format!("{} needs a value\n{USAGE}", args[idx]))
        };
        match args[idx].as_str() {
            "--repeat" => {
                options.repeat = value(idx)?.parse().context("--repeat takes a number")?;
                idx += 1;
            }
            "--seed" => {
                options.seed = value(idx)?.parse().context("--seed takes a number")?;
                idx += 1;
            }
            "--try" => {
                options.only_try = Some(value(idx)?.parse().context("--try takes a number")?);
                idx += 1;
            }
            "--only" => {
                let names = value(idx)?;
                options.faults = names
                    .split(',')
                    .map(|name| {
                        Fault::from_name(name).with_context(|| {
                            format!(
                                "no fault {name:?}; the faults are {}",
                                report::fault_names()
                            )
                        })
                    })
                    .collect::<Result<_>>()?;
                idx += 1;
            }
            "--write" => match args.get(idx + 1).filter(|a| !a.starts_with("--")) {
                Some(path) => {
                    write = Some(PathBuf::from(path));
                    idx += 1;
                }
                None => write = Some(PathBuf::from("RELIABILITY.md")),
            },
            "--jobs" => {
                options.jobs = value(idx)?.parse().context("--jobs takes a number")?;
                idx += 1;
            }
            "--quiet" => options.verbose = false,
            "--soak" => {
                let text = value(idx)?;
                let duration = fleet_proto::duration::parse_duration(text)
                    .map_err(|e| anyhow::anyhow!("--soak {text}: {e} (like 30m)"))?;
                soak = Some(duration);
                idx += 1;
            }
            "--load" => load = true,
            "-h" | "--help" => {
                println!(
                    "{USAGE}\nfaults: {} (and none: the same rollouts without a fault)",
                    report::fault_names()
                );
                return Ok(());
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
        idx += 1;
    }
    let build = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let command = format!("fleet-faults {}", args.join(" "));
    if let Some(duration) = soak {
        println!("fleet-faults: soak for {duration:?}, seed {}", options.seed);
        let soak_report = faults::soak::run(duration, options.seed, options.verbose);
        println!("{}", faults::soak::summary(&soak_report));
        if let Some(path) = &write {
            let table = faults::soak::table(&soak_report, &command, build);
            report::write_between(path, SOAK_BEGIN, SOAK_END, &table)
                .with_context(|| format!("write {}", path.display()))?;
            println!("wrote the soak's figures into {}", path.display());
        }
        if soak_report.failed_to_start.is_some() || !soak_report.broken.is_empty() {
            std::process::exit(1);
        }
        return Ok(());
    }
    if load {
        println!("fleet-faults: load, seed {}", options.seed);
        let load_report = faults::load::run(options.seed, options.verbose);
        println!("{}", faults::load::summary(&load_report));
        if let Some(path) = &write {
            let table = faults::load::table(&load_report, &command, build);
            report::write_between(path, LOAD_BEGIN, LOAD_END, &table)
                .with_context(|| format!("write {}", path.display()))?;
            println!("wrote the load run's figures into {}", path.display());
        }
        if !load_report.broken.is_empty() {
            std::process::exit(1);
        }
        return Ok(());
    }
    println!(
        "fleet-faults: seed {}, {} tries per fault",
        options.seed,
        options.only_try.map_or(options.repeat, |_| 1)
    );
    let reports = faults::run(&options);
    for fault_report in &reports {
        println!("{}", report::line(fault_report));
    }
    if let Some(path) = write {
        let table = report::table(&reports, &command, build);
        report::write_into(&path, &table).with_context(|| format!("write {}", path.display()))?;
        println!("wrote the table into {}", path.display());
    }
    if reports.iter().any(|r| r.held() < r.tries.len()) {
        std::process::exit(1);
    }
    Ok(())
}
