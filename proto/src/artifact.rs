//! The artifact format: a gzip tarball with `fleet.toml` at its root. One function reads it
//! and either only checks it (the controller, at `release create`) or checks it and writes it
//! out (the agent, at unpack), so both edges refuse exactly the same things: paths that are
//! absolute or climb out with `..`, links that lead outside the release, hard links, devices
//! and FIFOs, entries or totals over the size limits, and a missing or invalid manifest.

use crate::manifest::{Manifest, ManifestError, MANIFEST_FILE, MAX_MANIFEST_BYTES};
use flate2::read::GzDecoder;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};
use thiserror::Error;

/// Limits that stop a decompression bomb before it fills a disk.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_entry_bytes: u64,
    pub max_total_bytes: u64,
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_entry_bytes: 2 << 30,
            max_total_bytes: 4 << 30,
            max_entries: 100_000,
        }
    }
}

#[derive(Debug, Error)]
pub enum ArtifactError {
    #[error("artifact is not a gzip tarball or is truncated: {0}")]
    Format(String),
    #[error("artifact entry {path:?} is refused: {why}")]
    Entry { path: String, why: &'static str },
    #[error("artifact is too large unpacked: {0}")]
    TooLarge(String),
    #[error("artifact has no fleet.toml at its root: add one that says how to run the app")]
    NoManifest,
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("cannot write the unpacked release to {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// Reads the gzip tarball from `reader`, checks every entry, and when `dest` is given writes the
/// release there (`dest` must not exist yet; it is created). Returns the parsed manifest.
pub fn read_artifact(
    reader: impl Read,
    dest: Option<&Path>,
    limits: Limits,
) -> Result<Manifest, ArtifactError> {
    let mut archive = tar::Archive::new(GzDecoder::new(reader));
    let format = |e: io::Error| ArtifactError::Format(e.to_string());
    if let Some(dest) = dest {
        std::fs::create_dir(dest).map_err(|source| ArtifactError::Write {
            path: dest.to_path_buf(),
            source,
        })?;
    }
    let mut manifest_text: Option<String> = None;
    let mut total: u64 = 0;
    let mut n_entries: u64 = 0;
    for entry in archive.entries().map_err(format)? {
        let mut entry = entry.map_err(format)?;
        n_entries += 1;
        if n_entries > limits.max_entries {
            return Err(ArtifactError::TooLarge(format!(
                "more than {} entries",
                limits.max_entries
            )));
        }
        let raw_path = entry.path().map_err(format)?.into_owned();
        let shown = raw_path.display().to_string();
        let refuse = |why| ArtifactError::Entry {
            path: shown.clone(),
            why,
        };
        let rel = clean_relative(&raw_path).ok_or_else(|| {
            refuse("absolute paths and '..' are not allowed; paths must stay inside the release")
        })?;
        let size = entry.header().size().map_err(format)?;
        if size > limits.max_entry_bytes {
            return Err(ArtifactError::TooLarge(format!(
                "{shown} is {size} bytes, over the {} byte limit for one entry",
                limits.max_entry_bytes
            )));
        }
        total += size;
        if total > limits.max_total_bytes {
            return Err(ArtifactError::TooLarge(format!(
                "over {} bytes in all",
                limits.max_total_bytes
            )));
        }
        let kind = entry.header().entry_type();
        let is_manifest = rel == Path::new(MANIFEST_FILE);
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if rel.as_os_str().is_empty() {
                    return Err(refuse("a file entry needs a name"));
                }
                if is_manifest {
                    if size > MAX_MANIFEST_BYTES {
                        return Err(refuse("fleet.toml is over 64 KiB"));
                    }
                    let mut text = String::new();
                    (&mut entry)
                        .take(MAX_MANIFEST_BYTES)
                        .read_to_string(&mut text)
                        .map_err(|_| refuse("fleet.toml is not UTF-8 text or is truncated"))?;
                    if let Some(dest) = dest {
                        write_file(dest, &rel, text.as_bytes(), 0o644)?;
                    }
                    manifest_text = Some(text);
                } else if let Some(dest) = dest {
                    let mode = entry.header().mode().unwrap_or(0o644) & 0o755;
                    let path = prepare_parent(dest, &rel)?;
                    let mut file = create_file(&path, mode)?;
                    let copied =
                        io::copy(&mut (&mut entry).take(size), &mut file).map_err(format)?;
                    if copied != size {
                        return Err(ArtifactError::Format(format!("{shown} is truncated")));
                    }
                } else {
                    // Read through so a truncated body is found at `release create` too.
                    let copied =
                        io::copy(&mut (&mut entry).take(size), &mut io::sink()).map_err(format)?;
                    if copied != size {
                        return Err(ArtifactError::Format(format!("{shown} is truncated")));
                    }
                }
            }
            tar::EntryType::Directory => {
                if let Some(dest) = dest {
                    let path = dest.join(&rel);
                    std::fs::create_dir_all(&path)
                        .map_err(|source| ArtifactError::Write { path, source })?;
                }
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(format)?
                    .ok_or_else(|| refuse("a symlink without a target"))?
                    .into_owned();
                if !link_stays_inside(&rel, &target) {
                    return Err(refuse("symlinks must point inside the release"));
                }
                if let Some(dest) = dest {
                    let path = prepare_parent(dest, &rel)?;
                    std::os::unix::fs::symlink(&target, &path)
                        .map_err(|source| ArtifactError::Write { path, source })?;
                }
            }
            tar::EntryType::Link => return Err(refuse("hard links are not allowed")),
            tar::EntryType::Char | tar::EntryType::Block => {
                return Err(refuse("device files are not allowed"))
            }
            tar::EntryType::Fifo => return Err(refuse("FIFOs are not allowed")),
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => {}
            tar::EntryType::GNULongName | tar::EntryType::GNULongLink => {}
            _ => return Err(refuse("only files, directories and symlinks are allowed")),
        }
    }
    // The gzip stream must end cleanly; trailing garbage or a cut stream is an error.
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(format)?;
    let text = manifest_text.ok_or(ArtifactError::NoManifest)?;
    Ok(Manifest::parse(&text)?)
}

/// Normalises an entry path to a relative path with no `..`, `/` or prefix, or refuses it.
fn clean_relative(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Whether a symlink at `link` (relative to the release root) pointing to `target` resolves to
/// a place inside the release, judged on the path alone.
fn link_stays_inside(link: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    let mut depth: i64 = link.components().count() as i64 - 1;
    for component in target.components() {
        match component {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

/// Creates the parent directories of `rel` under `dest` and refuses to write through a symlink
/// an earlier entry planted there.
fn prepare_parent(dest: &Path, rel: &Path) -> Result<PathBuf, ArtifactError> {
    let mut dir = dest.to_path_buf();
    if let Some(parent) = rel.parent() {
        for part in parent.components() {
            dir.push(part);
            match std::fs::symlink_metadata(&dir) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    return Err(ArtifactError::Entry {
                        path: rel.display().to_string(),
                        why: "an entry may not be written through a symlink",
                    })
                }
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => {
                    return Err(ArtifactError::Entry {
                        path: rel.display().to_string(),
                        why: "its parent is a file",
                    })
                }
                Err(_) => std::fs::create_dir(&dir).map_err(|source| ArtifactError::Write {
                    path: dir.clone(),
                    source,
                })?,
            }
        }
    }
    let path = dest.join(rel);
    if std::fs::symlink_metadata(&path).is_ok() {
        return Err(ArtifactError::Entry {
            path: rel.display().to_string(),
            why: "the same path appears twice",
        });
    }
    Ok(path)
}

fn create_file(path: &Path, mode: u32) -> Result<std::fs::File, ArtifactError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode | 0o600)
        .open(path)
        .map_err(|source| ArtifactError::Write {
            path: path.to_path_buf(),
            source,
        })
}

fn write_file(dest: &Path, rel: &Path, bytes: &[u8], mode: u32) -> Result<(), ArtifactError> {
    use std::io::Write;
    let path = prepare_parent(dest, rel)?;
    let mut file = create_file(&path, mode)?;
    file.write_all(bytes)
        .map_err(|source| ArtifactError::Write { path, source })
}

/// Builds a gzip tarball from `(path, bytes, mode)` entries; used by tests, the demo and the
/// examples to make artifacts without shelling out to `tar`.
pub fn build_artifact(entries: &[(&str, &[u8], u32)]) -> io::Result<Vec<u8>> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut builder = tar::Builder::new(gz);
    for (path, bytes, mode) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(*mode);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, path, *bytes)?;
    }
    builder.into_inner()?.finish()
}

/// The `sha256:<hex>` digest of some bytes.
pub fn digest_of(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// Checks a digest string is `sha256:` and 64 lowercase hex digits.
pub fn check_digest(digest: &str) -> bool {
    digest.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &[u8] = b"[process]\ncommand = [\"bin/app\"]\n";

    #[test]
    fn unpacks_a_good_artifact() {
        let bytes = build_artifact(&[
            ("fleet.toml", MANIFEST, 0o644),
            ("bin/app", b"#!/bin/sh\n", 0o755),
        ])
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("r");
        let manifest = read_artifact(&bytes[..], Some(&dest), Limits::default()).unwrap();
        assert_eq!(manifest.process.command, vec!["bin/app"]);
        assert_eq!(std::fs::read(dest.join("bin/app")).unwrap(), b"#!/bin/sh\n");
    }

    #[test]
    fn refuses_what_is_not_a_release() {
        let no_manifest = build_artifact(&[("bin/app", b"x", 0o755)]).unwrap();
        assert!(matches!(
            read_artifact(&no_manifest[..], None, Limits::default()),
            Err(ArtifactError::NoManifest)
        ));
        assert!(matches!(
            read_artifact(&b"plain text"[..], None, Limits::default()),
            Err(ArtifactError::Format(_))
        ));
        let good = build_artifact(&[("fleet.toml", MANIFEST, 0o644)]).unwrap();
        let cut = &good[..good.len() / 2];
        assert!(matches!(
            read_artifact(cut, None, Limits::default()),
            Err(ArtifactError::Format(_))
        ));
        let big = build_artifact(&[
            ("fleet.toml", MANIFEST, 0o644),
            ("big", &[0u8; 4096], 0o644),
        ])
        .unwrap();
        let limits = Limits {
            max_entry_bytes: 1024,
            ..Limits::default()
        };
        assert!(matches!(
            read_artifact(&big[..], None, limits),
            Err(ArtifactError::TooLarge(_))
        ));
    }

    #[test]
    fn judges_links_and_paths() {
        assert!(clean_relative(Path::new("a/./b")).is_some());
        assert!(clean_relative(Path::new("/etc/passwd")).is_none());
        assert!(clean_relative(Path::new("a/../../b")).is_none());
        assert!(link_stays_inside(
            Path::new("bin/app"),
            Path::new("../lib/x")
        ));
        assert!(!link_stays_inside(
            Path::new("bin/app"),
            Path::new("../../x")
        ));
        assert!(!link_stays_inside(
            Path::new("app"),
            Path::new("/etc/passwd")
        ));
    }
}
