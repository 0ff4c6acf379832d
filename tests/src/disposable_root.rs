//! A disposable root for a peer that must write where a real host's programs write (`dpkg -i`
//! into /usr, /etc and /var) without touching this machine. The peer runs under `unshare`
//! (util-linux, started as the real peer process) in new mount and pid namespaces, with an
//! overlayfs over /usr, /etc and /var whose upper dirs lie in the test's dir, and a tmpfs over
//! /run (so no systemd is seen there). Whatever the peer and its children write to those trees
//! lands in the upper dirs and goes with the test's dir; the mounts go with the namespace, and
//! every process in it dies with its pid 1 when the test kills `unshare` by its pid
//! (`--kill-child`). The network is this machine's: loopback reaches the test's controller.
//!
//! [`DisposableRoot::new`] returns None (after printing why) where this machine cannot make the
//! namespaces (no util-linux, not root, a container that forbids it), so a test can skip.

use crate::process::{self, Finished};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// util-linux's `unshare` and `nsenter` (Debian's util-linux, installed by scripts/test.sh).
pub const UNSHARE_PATH: &str = "/usr/bin/unshare";
pub const NSENTER_PATH: &str = "/usr/bin/nsenter";
/// The trees a peer in the root may write, each an overlay.
const OVERLAID: [&str; 3] = ["usr", "etc", "var"];
/// How long the probe and each command run inside the root may take.
const COMMAND_DEADLINE: Duration = Duration::from_secs(60);

/// Mounts the overlays and the tmpfs, then execs the peer. Arguments: the root's dir, then the
/// program and its arguments (positional, so no path needs quoting).
const MOUNT_AND_EXEC: &str = "set -e; root=$1; shift; \
    for tree in usr etc var; do \
      mount -t overlay overlay -o lowerdir=/$tree,upperdir=$root/$tree/upper,workdir=$root/$tree/work /$tree; \
    done; \
    mount -t tmpfs -o mode=0755 tmpfs /run; mkdir -p /run/sshd; \
    exec \"$@\"";

/// The directories of one disposable root: `DIR/{usr,etc,var}/{upper,work}`.
#[derive(Debug, Clone)]
pub struct DisposableRoot {
    dir: PathBuf,
}

impl DisposableRoot {
    /// Makes the root's dirs under `dir`; None (printing why) when namespaces cannot be made.
    pub fn new(dir: &Path) -> Option<DisposableRoot> {
        if !Path::new(UNSHARE_PATH).is_file() || !Path::new(NSENTER_PATH).is_file() {
            eprintln!(
                "skipping: {UNSHARE_PATH} or {NSENTER_PATH} is missing (install util-linux; scripts/test.sh does)"
            );
            return None;
        }
        let mut probe = Command::new(UNSHARE_PATH);
        probe.args(["--mount", "--pid", "--fork", "--mount-proc", "true"]);
        let probed = process::run_with_deadline(probe, COMMAND_DEADLINE);
        if probed.code != 0 {
            eprintln!(
                "skipping: this machine cannot make mount and pid namespaces \
                 (`unshare -m -p -f --mount-proc true` exited {}: {}); run the test as root \
                 where namespaces are allowed",
                probed.code,
                probed.stderr.trim()
            );
            return None;
        }
        for tree in OVERLAID {
            for part in ["upper", "work"] {
                std::fs::create_dir_all(dir.join(tree).join(part)).expect("the root's dirs");
            }
        }
        Some(DisposableRoot {
            dir: dir.to_path_buf(),
        })
    }

    /// `program args...`, to be started inside a fresh root; its pid is `unshare`'s, and
    /// killing that pid ends the root.
    pub fn command(&self, program: &Path, args: &[&OsStr]) -> Command {
        let mut command = Command::new(UNSHARE_PATH);
        command
            .args([
                "--mount",
                "--pid",
                "--fork",
                "--kill-child",
                "--mount-proc",
                "--propagation",
                "private",
                "--",
                "/bin/sh",
                "-c",
                MOUNT_AND_EXEC,
                "sh",
            ])
            .arg(&self.dir)
            .arg(program)
            .args(args);
        command
    }

    /// Hides `path` (absolute, under /usr, /etc or /var) from the root, as if this machine had
    /// no such file: an overlayfs whiteout (a character device 0:0) in the upper dir. Call it
    /// before the root's peer starts.
    pub fn hide(&self, path: &Path) {
        use nix::sys::stat::{mknod, Mode, SFlag};
        let whiteout = self.written(path);
        std::fs::create_dir_all(whiteout.parent().expect("a parent")).expect("the whiteout's dir");
        mknod(
            &whiteout,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o000),
            0,
        )
        .unwrap_or_else(|e| panic!("mknod {} (a whiteout): {e}", whiteout.display()));
    }

    /// Where what the root wrote to `path` (absolute, under /usr, /etc or /var) is kept.
    pub fn written(&self, path: &Path) -> PathBuf {
        let relative = path.strip_prefix("/").expect("an absolute path");
        let mut parts = relative.components();
        let tree = parts.next().expect("a path under /usr, /etc or /var");
        self.dir
            .join(tree.as_os_str())
            .join("upper")
            .join(parts.as_path())
    }

    /// Runs `args` inside the root whose `unshare` has pid `unshare_pid` (in its mount and pid
    /// namespaces, through util-linux's nsenter), to completion.
    pub fn run_inside(unshare_pid: u32, args: &[&str]) -> Finished {
        let init = namespace_init(unshare_pid)
            .unwrap_or_else(|| panic!("unshare {unshare_pid} has no child: the root is gone"));
        let mut command = Command::new(NSENTER_PATH);
        command
            .arg("--target")
            .arg(init.to_string())
            .args(["--mount", "--pid", "--"])
            .args(args);
        process::run_with_deadline(command, COMMAND_DEADLINE)
    }
}

/// The pid (in this machine's namespace) of the root's pid 1: `unshare`'s child.
fn namespace_init(unshare_pid: u32) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    let (_, rest) = stat.rsplit_once(')')?;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(unshare_pid)
        })
}
