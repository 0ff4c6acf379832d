//! The files of the credential in fleetctl's `--config-dir` (`client.key`, `client.pem`,
//! `ca.pem`): read under a shared `flock` on the directory, so that a renewal by another
//! fleetctl (which holds it exclusively while it replaces the pair, see `renewal`) is never
//! seen half done; a replacement a crash cut short completed first; and whether the files can
//! be replaced in place at all.

use nix::fcntl::{Flock, FlockArg};
use std::path::Path;
use std::time::{Duration, Instant};

/// The files fleetctl reads from its config directory for mutual TLS.
pub const CA_FILE: &str = "ca.pem";
pub const CLIENT_CERT_FILE: &str = "client.pem";
pub const CLIENT_KEY_FILE: &str = "client.key";

/// How long reading the credential waits for another fleetctl's renewal to end.
const SHARED_LOCK_WAIT: Duration = Duration::from_secs(20);

/// Why the credential files in `dir` cannot be replaced in place, if they cannot: the
/// directory (a rename needs it) or a file is read-only, by its mode (respected even by root)
/// or for this user or file system.
pub fn writable(dir: &Path) -> Result<(), String> {
    use nix::unistd::{access, AccessFlags};
    use std::os::unix::fs::PermissionsExt;
    for path in [
        dir.to_path_buf(),
        dir.join(CLIENT_KEY_FILE),
        dir.join(CLIENT_CERT_FILE),
    ] {
        let mode = std::fs::metadata(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?
            .permissions()
            .mode();
        if mode & 0o222 == 0 {
            return Err(format!(
                "{} is read-only (mode {:o})",
                path.display(),
                mode & 0o7777
            ));
        }
        access(&path, AccessFlags::W_OK)
            .map_err(|e| format!("{} is not writable ({e})", path.display()))?;
    }
    Ok(())
}

/// Locks `dir` (shared or exclusive) for fleetctl processes that share it; `None` when it
/// cannot be opened or the lock is not had within `wait` (then the caller goes on without it).
pub fn lock_dir(dir: &Path, exclusive: bool, wait: Duration) -> Option<Flock<std::fs::File>> {
    let arg = if exclusive {
        FlockArg::LockExclusiveNonblock
    } else {
        FlockArg::LockSharedNonblock
    };
    let mut file = std::fs::File::open(dir).ok()?;
    let started = Instant::now();
    // Bounded: at most `wait`, in steps of 10 ms.
    for _ in 0..=wait.as_millis() / 10 {
        match Flock::lock(file, arg) {
            Ok(lock) => return Some(lock),
            Err((back, _)) => file = back,
        }
        if started.elapsed() >= wait {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// Reads the credential of `dir` (key and certificate PEM) under the shared lock, after
/// completing a replacement a crash cut short; `None` when there is none.
pub fn read_credential(dir: &Path) -> std::io::Result<Option<(String, String)>> {
    let (key_path, cert_path) = (dir.join(CLIENT_KEY_FILE), dir.join(CLIENT_CERT_FILE));
    if fleet_pki::files::replacement_pending(&key_path, &cert_path) && writable(dir).is_ok() {
        let _lock = lock_dir(dir, true, SHARED_LOCK_WAIT);
        fleet_pki::files::finish_key_and_certificate(&key_path, &cert_path)?;
    }
    let _lock = lock_dir(dir, false, SHARED_LOCK_WAIT);
    let cert = match std::fs::read_to_string(&cert_path) {
        Ok(cert) => cert,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(Some((cert, std::fs::read_to_string(&key_path)?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_only_directory_or_file_cannot_be_renewed_in() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        for file in [CLIENT_KEY_FILE, CLIENT_CERT_FILE] {
            std::fs::write(dir.path().join(file), "x").unwrap();
        }
        assert_eq!(writable(dir.path()), Ok(()));
        let set_mode = |path: &Path, mode: u32| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        set_mode(&dir.path().join(CLIENT_CERT_FILE), 0o444);
        assert!(writable(dir.path())
            .unwrap_err()
            .contains("client.pem is read-only"));
        set_mode(&dir.path().join(CLIENT_CERT_FILE), 0o644);
        set_mode(dir.path(), 0o555);
        let why = writable(dir.path()).unwrap_err();
        set_mode(dir.path(), 0o755);
        assert!(why.contains("is read-only (mode 555)"), "{why}");
    }
}
