//! User story: an operator starts the controller and an agent by hand from a shell with umask
//! 022 (not through the shipped units, which set one). A release whose environment holds a
//! secret is rolled out. No file of the controller's data directory or the agent's may be
//! readable by another local user: the controller's data directory is 0700; the agent's is
//! 0711, so that apps (which run as users of their own) can pass through to their directories,
//! and every file in it is private, including those made before fleet started (the harness
//! makes the agent's data directory 0755 up front). A release's files are readable by the
//! app's group only.

use fleet_tests::fleet::Fleet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Every file and directory under `dir`.
fn everything_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        out.push(path.clone());
        if is_dir {
            everything_under(&path, out);
        }
    }
}

#[test]
fn data_directories_are_private_under_umask_022() {
    // This test binary runs this one test: the umask is the whole process's.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let fleet = Fleet::start(1);
    let agent_dir = fleet.agent("h1").data_dir.clone();
    fleet
        .create_web_release(
            "1.0.0",
            &fleet_tests::web_manifest("10s"),
            &["API_KEY=s3cret"],
        )
        .expect_code(0);
    fleet.ctl(&["rollout", "web", "1.0.0"]).expect_code(0);
    fleet.wait_all_serve("1.0.0", Duration::from_secs(10));

    let controller_dir = fleet.config_dir().join("data");
    assert_eq!(mode(&controller_dir), 0o700);
    assert_eq!(mode(&agent_dir), 0o711, "others may pass through, not list");
    for passage in ["instances", "hooks", "app-state"] {
        assert_eq!(mode(&agent_dir.join(passage)), 0o711, "{passage}");
    }
    assert_eq!(mode(&controller_dir.join("fleet.redb")) & 0o077, 0);
    // The files that hold the secret, and the rest, are private; a release's files, and the
    // app's own directories, are for the app's user and group, never for others.
    let mut checked = 0;
    for root in [&controller_dir, &agent_dir] {
        let mut paths = Vec::new();
        everything_under(root, &mut paths);
        for path in paths {
            let rel = path.strip_prefix(&agent_dir).ok();
            if rel.is_some_and(|rel| rel.components().count() == 1 && mode(&path) == 0o711) {
                continue;
            }
            let the_apps = rel.is_some_and(|rel| {
                rel.starts_with("releases")
                    || rel.starts_with("instances")
                    || rel.starts_with("app-state")
            });
            if the_apps {
                assert_eq!(
                    mode(&path) & 0o007,
                    0,
                    "{} is readable by others",
                    path.display()
                );
            } else {
                assert_eq!(
                    mode(&path) & 0o077,
                    0,
                    "{} is readable by others",
                    path.display()
                );
                checked += 1;
            }
        }
    }
    assert!(agent_dir.join("state.json").is_file());
    assert!(checked >= 6, "only {checked} files checked");
}
