//! Private files (keys, certificates, CA bundles) written so that a reader, or a crash, never
//! sees half of one: a temporary file beside it, mode 0600 from its creation, synced, then
//! renamed over the old one. A key and its certificate are replaced as a pair
//! ([`replace_key_and_certificate`]): both written complete beside the old ones first, then
//! renamed into place, the key first; a crash between the two renames is completed by
//! [`finish_key_and_certificate`].

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Replaces `path` with `text`, mode 0600, atomically (see the module doc).
pub fn write_private_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".writing");
    let tmp = path.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The name a renewed file has beside the one it replaces until it is renamed into place.
fn renewed(path: &Path) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".renewed");
    path.with_file_name(name)
}

/// Replaces the key `key_path` and its certificate `cert_path` together (see the module doc):
/// a reader sees the old pair or the new one, and a crash leaves one of them or a state
/// [`finish_key_and_certificate`] completes.
pub fn replace_key_and_certificate(
    key_path: &Path,
    cert_path: &Path,
    key_pem: &str,
    cert_pem: &str,
) -> std::io::Result<()> {
    write_private_atomically(&renewed(key_path), key_pem)?;
    write_private_atomically(&renewed(cert_path), cert_pem)?;
    finish_key_and_certificate(key_path, cert_path)
}

/// Completes a replacement a crash cut short: a complete renewed certificate goes into place
/// (after its key, when that was not moved yet); a renewed key without its certificate is
/// dropped. Nothing to do (the usual case) costs two `stat` calls.
pub fn finish_key_and_certificate(key_path: &Path, cert_path: &Path) -> std::io::Result<()> {
    let (renewed_key, renewed_cert) = (renewed(key_path), renewed(cert_path));
    if renewed_cert.is_file() {
        if renewed_key.is_file() {
            std::fs::rename(&renewed_key, key_path)?;
        }
        std::fs::rename(&renewed_cert, cert_path)?;
    } else if renewed_key.is_file() {
        std::fs::remove_file(&renewed_key)?;
    }
    Ok(())
}

/// Whether a replacement of `key_path` and `cert_path` was cut short (see
/// [`finish_key_and_certificate`]).
pub fn replacement_pending(key_path: &Path, cert_path: &Path) -> bool {
    renewed(key_path).exists() || renewed(cert_path).exists()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_a_file_whole_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.key");
        std::fs::write(&path, "old").unwrap();
        write_private_atomically(&path, "new").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp left"
        );
    }

    #[test]
    fn a_key_and_its_certificate_are_replaced_together_even_across_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let (key, cert) = (dir.path().join("client.key"), dir.path().join("client.pem"));
        std::fs::write(&key, "old key").unwrap();
        std::fs::write(&cert, "old cert").unwrap();
        replace_key_and_certificate(&key, &cert, "new key", "new cert").unwrap();
        assert_eq!(std::fs::read_to_string(&key).unwrap(), "new key");
        assert_eq!(std::fs::read_to_string(&cert).unwrap(), "new cert");
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!replacement_pending(&key, &cert));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);

        // Crashed after the key moved: the certificate follows.
        std::fs::write(&key, "key 3").unwrap();
        std::fs::write(renewed(&cert), "cert 3").unwrap();
        assert!(replacement_pending(&key, &cert));
        finish_key_and_certificate(&key, &cert).unwrap();
        assert_eq!(std::fs::read_to_string(&cert).unwrap(), "cert 3");
        // Crashed before the certificate was complete: the old pair stays.
        std::fs::write(renewed(&key), "key 4").unwrap();
        finish_key_and_certificate(&key, &cert).unwrap();
        assert_eq!(std::fs::read_to_string(&key).unwrap(), "key 3");
        assert!(!replacement_pending(&key, &cert));
    }
}
