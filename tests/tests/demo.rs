//! README's first command, as a new user runs it: `fleetctl demo` starts a local fleet, rolls
//! out two releases canary-first, then a third whose smoke check fails and which halts at the
//! canary, shows every host still serving the second, exits 0 and leaves no process and no file
//! behind. `fleetctl demo --keep` leaves the fleet running for the commands it prints, and
//! `fleetctl demo --stop DIR` stops it.

use fleet_tests::bins::Bins;
use fleet_tests::process;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Every demo's hosts advertise 127.0.0.2, ... with the app on port 8080: one demo at a time.
static ONE_DEMO_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The pids of processes whose command line names something under `dir` (the demo gives its
/// controller and agents their data directories there; `process::pids_inside` catches what
/// runs in it).
fn pids_naming(dir: &Path) -> Vec<u32> {
    let needle = dir.display().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(&needle))
        })
        .collect()
}

#[test]
fn the_demo_rolls_out_two_releases_and_leaves_nothing_behind() {
    let _one_demo = ONE_DEMO_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    // The demo's temporary directory goes under one of this test's own.
    let tmp = tempfile::tempdir().unwrap();
    let mut command = Command::new(Bins::locate().fleetctl);
    command
        .args(["demo", "--hosts", "2"])
        .env("TMPDIR", tmp.path())
        .env_remove("FLEET_CONFIG_DIR")
        .env_remove("FLEET_CONTROLLER");
    let out = process::run_with_deadline(command, Duration::from_secs(120));
    let leftovers: Vec<u32> = process::pids_inside(tmp.path())
        .into_iter()
        .chain(pids_naming(tmp.path()))
        .collect();
    for pid in &leftovers {
        process::signal_pid(*pid, nix::sys::signal::Signal::SIGKILL);
    }

    assert_eq!(
        out.code, 0,
        "stdout:\n{}\nstderr:\n{}",
        out.stdout, out.stderr
    );
    for host in [
        "demo-1  127.0.0.2:8080  web 1.1.0 on demo-1",
        "demo-2  127.0.0.3:8080  web 1.1.0 on demo-2",
    ] {
        assert!(out.stdout.contains(host), "no `{host}` in:\n{}", out.stdout);
    }
    assert!(
        out.stdout.contains("rollout r2 succeeded") || out.stderr.contains("rollout r2 succeeded"),
        "stdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
    // The third release failed its smoke check on the canary and went no further; the lines
    // above show every host still serving 1.1.0 after it.
    assert!(
        out.stdout.contains("r3  web@1.2.0  rolled_back"),
        "the third rollout did not roll back:\n{}",
        out.stdout
    );
    assert!(
        out.stdout.contains(
            "web@1.2.0 failed its smoke check on the canary (demo-1), so rollout r3 halted there"
        ),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("fleetctl history web --config-dir "));
    assert!(
        leftovers.is_empty(),
        "the demo left processes {leftovers:?} running"
    );
    let files: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(files.is_empty(), "the demo left {files:?} behind");
}

#[test]
fn the_demo_keeps_its_fleet_running_with_keep_and_stops_it_with_stop() {
    let _one_demo = ONE_DEMO_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let fleetctl = Bins::locate().fleetctl;
    let demo_command = |args: &[&str]| {
        let mut command = Command::new(&fleetctl);
        command
            .args(args)
            .env("TMPDIR", tmp.path())
            .env_remove("FLEET_CONFIG_DIR")
            .env_remove("FLEET_CONTROLLER");
        command
    };
    let out = process::run_with_deadline(
        demo_command(&["demo", "--hosts", "1", "--keep"]),
        Duration::from_secs(120),
    );
    // Whatever happens below, every process the demo started is killed by its pid at the end.
    let started: Vec<u32> = process::pids_inside(tmp.path())
        .into_iter()
        .chain(pids_naming(tmp.path()))
        .collect();
    let check = || -> Result<(), String> {
        if out.code != 0 {
            return Err(format!("demo --keep exited {}", out.code));
        }
        let stop_line = out
            .stdout
            .lines()
            .find_map(|line| line.strip_prefix("stop it all: fleetctl demo --stop "))
            .ok_or("no `stop it all` line")?;
        let dir = stop_line.split_whitespace().next().ok_or("no directory")?;
        let pids: Vec<u32> = std::fs::read_to_string(Path::new(dir).join("demo.pids"))
            .map_err(|e| format!("no demo.pids: {e}"))?
            .lines()
            .filter_map(|line| line.split_whitespace().next()?.parse().ok())
            .collect();
        if pids.len() != 2 || !pids.iter().all(|pid| process::pid_is_alive(*pid)) {
            return Err(format!("not a controller and an agent running: {pids:?}"));
        }
        for verb in [
            "status web",
            "history web",
            "hosts",
            "drain demo-1",
            "rollback web",
        ] {
            let hint = format!("fleetctl {verb} --config-dir {dir}");
            if !out.stdout.contains(&hint) {
                return Err(format!("no `{hint}`"));
            }
        }
        // The printed command works against the fleet that stayed up.
        let history = process::run_with_deadline(
            demo_command(&["history", "web", "--config-dir", dir]),
            Duration::from_secs(30),
        );
        if history.code != 0 || !history.stdout.contains("web@1.2.0") {
            return Err(format!(
                "history: {}\n{}{}",
                history.code, history.stdout, history.stderr
            ));
        }
        let stop = process::run_with_deadline(
            demo_command(&["demo", "--stop", dir]),
            Duration::from_secs(60),
        );
        if stop.code != 0 {
            return Err(format!("demo --stop: {}\n{}", stop.code, stop.stderr));
        }
        if let Some(pid) = pids.iter().find(|pid| process::pid_is_alive(**pid)) {
            return Err(format!("pid {pid} still runs after demo --stop"));
        }
        if Path::new(dir).exists() {
            return Err(format!("{dir} is still there after demo --stop"));
        }
        Ok(())
    };
    let result = check();
    for pid in started
        .iter()
        .chain(process::pids_inside(tmp.path()).iter())
        .chain(pids_naming(tmp.path()).iter())
    {
        process::signal_pid(*pid, nix::sys::signal::Signal::SIGKILL);
    }
    if let Err(why) = result {
        panic!("{why}\nstdout:\n{}\nstderr:\n{}", out.stdout, out.stderr);
    }
}
