//! README's first command, as a new user runs it: `fleetctl demo` starts a local fleet, rolls
//! out two releases canary-first, shows every host serving the second, exits 0 and leaves no
//! process and no file behind.

use fleet_tests::bins::Bins;
use fleet_tests::process;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

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
