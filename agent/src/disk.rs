//! Disk space before a deploy: what a release needs on this host's data directory (its
//! artifact when not cached, its unpacked tree when not unpacked yet, and the instance's copy
//! of it unless the start links the release's files, plus a margin) against what is free, so a release that does not fit fails at once,
//! with the figures, and writes nothing.

use std::path::Path;

/// Kept free beyond what a release needs: logs, state, the file system's own needs.
pub const MARGIN_BYTES: u64 = 64 << 20;

/// What a deploy will write, by part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    pub artifact: u64,
    pub unpacked: u64,
    pub instance: u64,
}

impl Need {
    /// The bytes a deploy needs: the artifact unless `cached`, the unpacked release unless
    /// already `unpacked`, and the instance's copy, each of the sizes given.
    pub fn of(artifact_size: u64, unpacked_size: u64, cached: bool, unpacked: bool) -> Need {
        Need {
            artifact: if cached { 0 } else { artifact_size },
            unpacked: if unpacked { 0 } else { unpacked_size },
            instance: unpacked_size,
        }
    }

    /// The same, when the start links the release's files (an agent that runs as root, see
    /// [`crate::app_user`]) rather than copying them: the instance then writes no release byte.
    pub fn linking(mut self) -> Need {
        self.instance = 0;
        self
    }

    /// The same, when starting the instance first removes one that takes `bytes` now.
    pub fn replacing(mut self, bytes: u64) -> Need {
        self.instance = self.instance.saturating_sub(bytes);
        self
    }

    pub fn total(&self) -> u64 {
        self.artifact + self.unpacked + self.instance + MARGIN_BYTES
    }
}

/// The bytes of the regular files under `dir` (0 when it does not exist).
pub fn tree_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut total = 0;
    for entry in entries.flatten() {
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            total += tree_bytes(&entry.path());
        } else if kind.is_file() {
            total += entry.metadata().map(|m| m.len()).unwrap_or(0);
        }
    }
    total
}

/// The bytes an unprivileged user may still write on the file system holding `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let stat = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    Ok(stat.blocks_available() as u64 * stat.fragment_size() as u64)
}

/// `None` when `need` fits in `free`; otherwise why not, for the host's report.
pub fn shortfall(host: &str, dir: &Path, need: &Need, free: u64) -> Option<String> {
    if need.total() <= free {
        return None;
    }
    let mib = |bytes: u64| bytes.div_ceil(1 << 20);
    Some(format!(
        "host {host} needs {} MiB free in {} (artifact {} MiB, unpacked {} MiB, the instance's copy {} MiB, margin {} MiB) and has {} MiB: free space there or grow the disk; nothing was written",
        mib(need.total()),
        dir.display(),
        mib(need.artifact),
        mib(need.unpacked),
        mib(need.instance),
        mib(MARGIN_BYTES),
        mib(free)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_release_needs_what_it_will_write() {
        let mib = 1 << 20;
        // (artifact, unpacked, cached, already unpacked) -> bytes needed besides the margin
        for (artifact, unpacked, cached, done, expect) in [
            (30 * mib, 40 * mib, false, false, 110 * mib),
            (30 * mib, 40 * mib, true, false, 80 * mib),
            (30 * mib, 40 * mib, true, true, 40 * mib),
            (30 * mib, 0, false, false, 30 * mib),
        ] {
            let need = Need::of(artifact, unpacked, cached, done);
            assert_eq!(need.total() - MARGIN_BYTES, expect, "{need:?}");
        }
        // The instance it replaces is removed first: its bytes come back.
        let need = Need::of(30 * mib, 40 * mib, true, true).replacing(25 * mib);
        assert_eq!(need.total() - MARGIN_BYTES, 15 * mib);
        // A start that links copies nothing.
        let need = Need::of(30 * mib, 40 * mib, true, true).linking();
        assert_eq!(need.total() - MARGIN_BYTES, 0);
        let need = Need::of(30 * mib, 40 * mib, false, false);
        assert!(shortfall("h1", Path::new("/d"), &need, need.total()).is_none());
        let why = shortfall("h1", Path::new("/d"), &need, 100 * mib).unwrap();
        assert!(why.contains("host h1 needs 174 MiB free in /d"), "{why}");
        assert!(why.contains("and has 100 MiB"), "{why}");
    }
}
