//! A small tmpfs mounted over a directory for as long as the guard lives (root only): a disk
//! that fills up on demand. [`Tmpfs::fill`] writes a filler file until the filesystem is full;
//! [`Tmpfs::free`] removes it.

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The name of the file that fills the filesystem.
const FILLER: &str = "fleet-faults-filler";
/// At most this many 1 MiB writes fill it (bounds the loop; the tmpfs is smaller).
const MAX_FILL_MIB: usize = 4096;

/// A mounted tmpfs, unmounted (lazily) when dropped.
#[derive(Debug)]
pub struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `mib` MiB at `dir` (created if missing), mode 0700; fails unless root.
    pub fn mount(dir: &Path, mib: u64) -> Result<Tmpfs, String> {
        Tmpfs::mount_with_mode(dir, mib, 0o700)
    }

    /// Like [`Tmpfs::mount`] with the root directory's `mode` (0711 for an agent's data
    /// directory, which apps running as users of their own pass through).
    pub fn mount_with_mode(dir: &Path, mib: u64, mode: u32) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(format!("size={mib}m,mode={mode:04o}").as_str()),
        )
        .map_err(|e| format!("mount a tmpfs at {} (needs root): {e}", dir.display()))?;
        Ok(Tmpfs {
            dir: dir.to_path_buf(),
        })
    }

    /// Whether this process may mount (it runs as root).
    pub fn can_mount() -> bool {
        nix::unistd::geteuid().is_root()
    }

    /// Writes a filler file until the filesystem is full; the bytes written.
    pub fn fill(&self) -> u64 {
        let Ok(mut file) = std::fs::File::create(self.dir.join(FILLER)) else {
            return 0;
        };
        let block = vec![0u8; 1 << 20];
        let mut written = 0;
        for _ in 0..MAX_FILL_MIB {
            match file.write(&block) {
                Ok(0) | Err(_) => break,
                Ok(n) => written += n as u64,
            }
        }
        // Whatever a partial block left.
        for _ in 0..(1 << 12) {
            match file.write(&block[..256]) {
                Ok(0) | Err(_) => break,
                Ok(n) => written += n as u64,
            }
        }
        written
    }

    /// The bytes free on the filesystem now.
    pub fn free_bytes(&self) -> u64 {
        nix::sys::statvfs::statvfs(&self.dir)
            .map(|s| s.blocks_available() * s.fragment_size())
            .unwrap_or(0)
    }

    /// Removes the filler file.
    pub fn free(&self) {
        let _ = std::fs::remove_file(self.dir.join(FILLER));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = umount2(&self.dir, MntFlags::MNT_DETACH);
    }
}
