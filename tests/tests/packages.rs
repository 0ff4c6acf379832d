//! `bash scripts/package.sh --debug` builds the three .deb packages (once, for every check
//! here), and they hold what docs/operations.md says: each binary in /usr/bin, the units (which
//! pass `systemd-analyze verify` once unpacked), the controller's system user and state
//! directory made by its postinst, fleetctl's completions and manual pages. Read with
//! `dpkg-deb -c` (contents), `-I` (control fields, maintainer scripts) and `-x` (unpacked).
//! Skipped, saying why, only where cargo-deb cannot be installed (the script exits 3) or dpkg-deb
//! is missing.

use fleet_tests::process;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Installing cargo-deb the first time takes minutes on a loaded machine.
const PACKAGE_DEADLINE: Duration = Duration::from_secs(1800);
const DPKG_DEADLINE: Duration = Duration::from_secs(60);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

fn dpkg_deb(args: &[&str], deb: &Path) -> String {
    let mut command = Command::new("dpkg-deb");
    command.args(args).arg(deb);
    let out = process::run_with_deadline(command, DPKG_DEADLINE);
    assert_eq!(
        out.code,
        0,
        "dpkg-deb {args:?} {}: {}",
        deb.display(),
        out.stderr
    );
    out.stdout
}

/// The one .deb of `package` in `dir`.
fn deb_of(dir: &Path, package: &str) -> PathBuf {
    let prefix = format!("{package}_");
    let found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            let name = path.file_name().unwrap().to_string_lossy();
            name.starts_with(&prefix) && name.ends_with(".deb")
        })
        .collect();
    assert_eq!(found.len(), 1, "{package}: {found:?}");
    found.into_iter().next().unwrap()
}

#[test]
fn the_packages_hold_binaries_units_user_completions_and_manual_pages() {
    if on_path("dpkg-deb").is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "dpkg-deb is missing under CI (Debian's dpkg)"
        );
        eprintln!("skipping: dpkg-deb is not installed on this machine");
        return;
    }
    let root = workspace();
    let mut command = Command::new("bash");
    command
        .arg(root.join("scripts/package.sh"))
        .arg("--debug")
        .current_dir(&root);
    let built = process::run_with_deadline(command, PACKAGE_DEADLINE);
    if built.code == 3 {
        eprintln!(
            "skipping: cargo-deb cannot be installed here:\n{}",
            built.stderr
        );
        return;
    }
    assert_eq!(
        built.code, 0,
        "scripts/package.sh --debug failed:\n{}\n{}",
        built.stdout, built.stderr
    );
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let debs = target.join("debian");

    // Contents.
    let controller = deb_of(&debs, "fleet-controller");
    let agent = deb_of(&debs, "fleet-agent");
    let fleetctl = deb_of(&debs, "fleetctl");
    for (deb, paths) in [
        (
            &controller,
            &[
                "./usr/bin/fleet-controller",
                "./lib/systemd/system/fleet-controller.service",
            ][..],
        ),
        (
            &agent,
            &[
                "./usr/bin/fleet-agent",
                "./lib/systemd/system/fleet-agent.service",
            ][..],
        ),
        (
            &fleetctl,
            &[
                "./usr/bin/fleetctl",
                "./usr/share/bash-completion/completions/fleetctl",
                "./usr/share/zsh/vendor-completions/_fleetctl",
                "./usr/share/fish/vendor_completions.d/fleetctl.fish",
                "./usr/share/man/man1/fleetctl.1.gz",
                "./usr/share/man/man1/fleetctl-rollout.1.gz",
                "./usr/share/man/man1/fleetctl-bootstrap.1.gz",
            ][..],
        ),
    ] {
        let listing = dpkg_deb(&["-c"], deb);
        for path in paths {
            assert!(
                listing.lines().any(|line| line.ends_with(path)),
                "{} lacks {path}:\n{listing}",
                deb.display()
            );
        }
    }

    // Control fields and the maintainer scripts: the controller's user and directories.
    let info = dpkg_deb(&["-I"], &controller);
    assert!(info.contains("Package: fleet-controller"), "{info}");
    assert!(info.contains("adduser"), "depends on adduser:\n{info}");
    assert!(info.contains("postinst"), "{info}");
    let unpacked = tempfile::tempdir().unwrap();
    let control_dir = unpacked.path().join("control");
    std::fs::create_dir_all(&control_dir).unwrap();
    let mut extract = Command::new("dpkg-deb");
    extract.arg("-e").arg(&controller).arg(&control_dir);
    assert_eq!(process::run_with_deadline(extract, DPKG_DEADLINE).code, 0);
    let postinst = std::fs::read_to_string(control_dir.join("postinst")).unwrap();
    assert!(
        postinst.contains("adduser --system") && postinst.contains("fleet-controller"),
        "{postinst}"
    );
    assert!(postinst.contains("/var/lib/fleet-controller"), "{postinst}");
    let agent_info = dpkg_deb(&["-I"], &agent);
    assert!(agent_info.contains("Package: fleet-agent"), "{agent_info}");
    let agent_control = unpacked.path().join("agent-control");
    std::fs::create_dir_all(&agent_control).unwrap();
    let mut extract = Command::new("dpkg-deb");
    extract.arg("-e").arg(&agent).arg(&agent_control);
    assert_eq!(process::run_with_deadline(extract, DPKG_DEADLINE).code, 0);
    let agent_postinst = std::fs::read_to_string(agent_control.join("postinst")).unwrap();
    assert!(
        agent_postinst.contains("/var/lib/fleet-agent"),
        "{agent_postinst}"
    );

    // Unpacked: the binaries run, the completion loads, the units verify.
    let files = unpacked.path().join("root");
    for deb in [&controller, &agent, &fleetctl] {
        let mut extract = Command::new("dpkg-deb");
        extract.arg("-x").arg(deb).arg(&files);
        assert_eq!(process::run_with_deadline(extract, DPKG_DEADLINE).code, 0);
    }
    for binary in ["fleet-controller", "fleet-agent", "fleetctl"] {
        let mut version = Command::new(files.join("usr/bin").join(binary));
        version.arg("--version");
        let out = process::run_with_deadline(version, DPKG_DEADLINE);
        assert_eq!(out.code, 0, "{binary} --version: {}", out.stderr);
    }
    let mut bash = Command::new("bash");
    bash.arg("-c").arg(format!(
        "source '{}'; complete -p fleetctl",
        files
            .join("usr/share/bash-completion/completions/fleetctl")
            .display()
    ));
    let loaded = process::run_with_deadline(bash, DPKG_DEADLINE);
    assert!(
        loaded.code == 0 && loaded.stdout.contains("fleetctl"),
        "{}",
        loaded.stderr
    );

    let controller_unit =
        std::fs::read_to_string(files.join("lib/systemd/system/fleet-controller.service")).unwrap();
    let agent_unit =
        std::fs::read_to_string(files.join("lib/systemd/system/fleet-agent.service")).unwrap();
    for (unit, lines) in [
        (
            &controller_unit,
            &[
                "ExecStart=/usr/bin/fleet-controller --config /var/lib/fleet-controller/controller.toml",
                "User=fleet-controller",
                "StateDirectory=fleet-controller",
                "Type=notify",
            ][..],
        ),
        (
            &agent_unit,
            &[
                "ExecStart=/usr/bin/fleet-agent --config /var/lib/fleet-agent/agent.toml",
                "ReadWritePaths=/var/lib/fleet-agent",
                "Type=notify",
            ][..],
        ),
    ] {
        for line in lines {
            assert!(unit.lines().any(|l| l == *line), "lacks {line}:\n{unit}");
        }
    }
    let Some(analyze) = on_path("systemd-analyze") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "systemd-analyze is missing under CI: scripts/test.sh installs systemd"
        );
        eprintln!("skipping the units' verification: systemd-analyze is not installed");
        return;
    };
    // Verified with the binaries where they were unpacked (they are not installed here).
    let units = unpacked.path().join("units");
    std::fs::create_dir_all(&units).unwrap();
    let controller_path = units.join("fleet-controller.service");
    let agent_path = units.join("fleet-agent.service");
    std::fs::write(
        &controller_path,
        controller_unit.replace(
            "/usr/bin/fleet-controller",
            &files.join("usr/bin/fleet-controller").display().to_string(),
        ),
    )
    .unwrap();
    std::fs::write(
        &agent_path,
        agent_unit.replace(
            "/usr/bin/fleet-agent",
            &files.join("usr/bin/fleet-agent").display().to_string(),
        ),
    )
    .unwrap();
    let mut verify = Command::new(analyze);
    verify.arg("verify").arg(&agent_path).arg(&controller_path);
    let verified = process::run_with_deadline(verify, DPKG_DEADLINE);
    let about_ours: Vec<&str> = verified
        .stderr
        .lines()
        .filter(|line| line.contains("fleet-agent") || line.contains("fleet-controller"))
        .collect();
    assert!(
        verified.code == 0 && about_ours.is_empty(),
        "systemd-analyze verify refused the packaged units (exit {}):\n{}",
        verified.code,
        verified.stderr
    );
}
