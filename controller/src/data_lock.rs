//! The data directory's lock: a controller holds an exclusive `flock` on `controller.lock` in
//! its data directory for as long as it runs, so a second controller started on the same
//! directory (two controllers sharing one config directory and forgetting `--data-dir`) is
//! refused with a message that says what to do, whatever its store backend (redb locks its own
//! file; etcd does not). The lock goes with the process, also when it is killed.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The lock file's name inside the data directory.
pub const LOCK_FILE: &str = "controller.lock";

/// The held lock; released when dropped (or when the process ends).
pub struct DataLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// Takes the lock of `data_dir`, or says who holds it and what to do.
pub fn lock(data_dir: &Path) -> Result<DataLock, String> {
    let path: PathBuf = data_dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut lock = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
    {
        Ok(lock) => lock,
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            let holder = holder.trim();
            let by = if holder.is_empty() {
                String::new()
            } else {
                format!(" (pid {holder})")
            };
            return Err(format!(
                    "the data directory {} is in use by another fleet-controller{by}: give each controller its own data directory (--data-dir DIR), or stop the other one first",
                    data_dir.display()
                ));
        }
        Err((_, e)) => return Err(format!("cannot lock {}: {e}", path.display())),
    };
    let _ = lock.set_len(0);
    let _ = writeln!(&mut *lock, "{}", std::process::id());
    Ok(DataLock { _lock: lock })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_directory_is_locked_by_one_holder_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock(dir.path()).unwrap();
        let refused = lock(dir.path()).err().unwrap();
        assert!(
            refused.contains(&format!(
                "is in use by another fleet-controller (pid {})",
                std::process::id()
            )),
            "{refused}"
        );
        assert!(refused.contains("--data-dir DIR"), "{refused}");
        drop(held);
        assert!(lock(dir.path()).is_ok(), "free again once released");
    }
}
