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
    /// `path` is already [`crate::names::quoted`].
    #[error("artifact entry {path} is refused: {why}")]
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

/// Bytes of tar metadata (GNU long names, PAX records, padding, headers) allowed between two
/// entries' data: a long-name header claiming gigabytes is refused before it is buffered.
pub const MAX_METADATA_BYTES: u64 = 1 << 20;
/// Decompressed bytes allowed after the archive's end-of-archive marker (tar pads to 10 KiB).
pub const MAX_TRAILING_BYTES: u64 = 1 << 20;
/// The longest entry path accepted, in bytes.
pub const MAX_PATH_BYTES: usize = 4096;
/// How many symlinks one path may pass through before it counts as a loop.
const MAX_LINK_HOPS: usize = 40;

/// How many decompressed bytes the reader may still hand out; the loop raises the limit by
/// what each step is allowed to read, so no part of the stream (an entry, the metadata before
/// it, what follows the end) can make the reader decompress or buffer more than its share.
#[derive(Default)]
struct Budget {
    position: std::cell::Cell<u64>,
    limit: std::cell::Cell<u64>,
    exceeded: std::cell::Cell<bool>,
}

impl Budget {
    fn allow(&self, n_bytes: u64) {
        self.limit.set(self.position.get().saturating_add(n_bytes));
    }
}

struct BudgetedReader<R> {
    inner: R,
    budget: std::rc::Rc<Budget>,
}

impl<R: Read> Read for BudgetedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let position = self.budget.position.get();
        let left = self.budget.limit.get().saturating_sub(position);
        if left == 0 {
            // At the limit: fine if the stream ends here, refused if it goes on.
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => {
                    self.budget.exceeded.set(true);
                    Err(io::Error::other(
                        "the artifact holds more than its entries say",
                    ))
                }
            };
        }
        let max = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..max])?;
        self.budget.position.set(position + n as u64);
        Ok(n)
    }
}

/// What earlier entries made of each path, to refuse a later entry that would clash with it
/// or be written through a symlink, in check mode exactly as at unpack.
#[derive(Default)]
struct Seen {
    /// Regular files and symlinks.
    leaves: std::collections::HashSet<PathBuf>,
    /// Directories, given or implied by a deeper entry.
    dirs: std::collections::HashSet<PathBuf>,
    /// Every symlink and its target, judged together at the end.
    links: std::collections::HashMap<PathBuf, PathBuf>,
}

impl Seen {
    /// Records `rel`, refusing a path already taken or one below a file or symlink.
    fn claim(&mut self, rel: &Path, is_dir: bool) -> Result<(), &'static str> {
        for ancestor in rel.ancestors().skip(1) {
            if ancestor.as_os_str().is_empty() {
                break;
            }
            if self.leaves.contains(ancestor) {
                return Err("an entry may not be written below a file or through a symlink");
            }
        }
        if self.leaves.contains(rel) {
            return Err("the same path appears twice");
        }
        if is_dir {
            self.dirs.insert(rel.to_path_buf());
        } else {
            if self.dirs.contains(rel) {
                return Err("the same path appears twice");
            }
            self.leaves.insert(rel.to_path_buf());
        }
        for ancestor in rel.ancestors().skip(1) {
            if ancestor.as_os_str().is_empty() || !self.dirs.insert(ancestor.to_path_buf()) {
                break;
            }
        }
        Ok(())
    }
}

/// Reads the gzip tarball from `reader`, checks every entry, and when `dest` is given writes the
/// release there (`dest` must not exist yet; it is created). Returns the parsed manifest.
///
/// Refused: anything that is not a complete gzip tarball; absolute paths and `..`; paths over
/// 4096 bytes; the same path twice; an entry below a file or a symlink; symlinks that resolve
/// (through other symlinks too) outside the release, or loop; hard links, devices, FIFOs and
/// every other special entry; more than `limits.max_entries` entries, an entry over
/// `limits.max_entry_bytes`, more than `limits.max_total_bytes` in all; metadata over 1 MiB
/// between entries or data over 1 MiB after the end; a missing, oversized or invalid
/// `fleet.toml`. Nothing is ever written outside `dest`.
pub fn read_artifact(
    reader: impl Read,
    dest: Option<&Path>,
    limits: Limits,
) -> Result<Manifest, ArtifactError> {
    read_artifact_sized(reader, dest, limits).map(|(manifest, _)| manifest)
}

/// [`read_artifact`], and the artifact's unpacked size: the bytes of all its entries.
pub fn read_artifact_sized(
    reader: impl Read,
    dest: Option<&Path>,
    limits: Limits,
) -> Result<(Manifest, u64), ArtifactError> {
    let budget = std::rc::Rc::new(Budget::default());
    let guarded = BudgetedReader {
        inner: GzDecoder::new(reader),
        budget: budget.clone(),
    };
    let archive = tar::Archive::new(guarded);
    let result = read_entries(archive, &budget, dest, limits);
    match result {
        Err(_) if budget.exceeded.get() => Err(ArtifactError::TooLarge(
            "it holds more bytes than its entries account for (over 1 MiB of tar metadata before an entry, or after the end of the archive)".to_string(),
        )),
        other => other,
    }
}

fn read_entries<R: Read>(
    mut archive: tar::Archive<BudgetedReader<R>>,
    budget: &Budget,
    dest: Option<&Path>,
    limits: Limits,
) -> Result<(Manifest, u64), ArtifactError> {
    let format = |e: io::Error| ArtifactError::Format(e.to_string());
    let mut block: Option<Vec<u8>> = None;
    if let Some(dest) = dest {
        std::fs::create_dir(dest).map_err(|source| ArtifactError::Write {
            path: dest.to_path_buf(),
            source,
        })?;
    }
    let mut manifest_text: Option<String> = None;
    let mut total: u64 = 0;
    let mut n_entries: u64 = 0;
    let mut seen = Seen::default();
    budget.allow(MAX_METADATA_BYTES);
    let mut entries = archive.entries().map_err(format)?;
    loop {
        budget.allow(MAX_METADATA_BYTES);
        let Some(entry) = entries.next() else { break };
        let mut entry = entry.map_err(format)?;
        n_entries += 1;
        if n_entries > limits.max_entries {
            return Err(ArtifactError::TooLarge(format!(
                "more than {} entries",
                limits.max_entries
            )));
        }
        let raw_path = entry.path().map_err(format)?.into_owned();
        let shown = crate::names::quoted(&raw_path.display().to_string());
        let refuse = |why| ArtifactError::Entry {
            path: shown.clone(),
            why,
        };
        if raw_path.as_os_str().len() > MAX_PATH_BYTES
            || raw_path.iter().any(|part| part.len() > 255)
        {
            return Err(refuse(
                "paths are at most 4096 bytes, each name in them at most 255",
            ));
        }
        let rel = clean_relative(&raw_path).ok_or_else(|| {
            refuse("absolute paths and '..' are not allowed; paths must stay inside the release")
        })?;
        let size = entry.size();
        if size > limits.max_entry_bytes {
            return Err(ArtifactError::TooLarge(format!(
                "{shown} is {size} bytes, over the {} byte limit for one entry",
                limits.max_entry_bytes
            )));
        }
        total = total.saturating_add(size);
        if total > limits.max_total_bytes {
            return Err(ArtifactError::TooLarge(format!(
                "over {} bytes in all",
                limits.max_total_bytes
            )));
        }
        // This entry's data may be read, and nothing more.
        budget.allow(size);
        let kind = entry.header().entry_type();
        let is_manifest = rel == Path::new(MANIFEST_FILE);
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if rel.as_os_str().is_empty() {
                    return Err(refuse("a file entry needs a name"));
                }
                seen.claim(&rel, false).map_err(refuse)?;
                if is_manifest {
                    if size > MAX_MANIFEST_BYTES {
                        return Err(refuse("fleet.toml is over 64 KiB"));
                    }
                    let mut text = String::new();
                    (&mut entry)
                        .take(MAX_MANIFEST_BYTES)
                        .read_to_string(&mut text)
                        .map_err(|_| refuse("fleet.toml is not UTF-8 text or is truncated"))?;
                    if text.len() as u64 != size {
                        return Err(ArtifactError::Format(format!("{shown} is truncated")));
                    }
                    if let Some(dest) = dest {
                        write_file(dest, &rel, text.as_bytes(), 0o644)?;
                    }
                    manifest_text = Some(text);
                } else if let Some(dest) = dest {
                    let mode = entry.header().mode().unwrap_or(0o644) & 0o755;
                    let path = prepare_parent(dest, &rel)?;
                    let mut file = create_file(&path, mode)?;
                    // A full disk is the host's problem, not the artifact's: say so.
                    let block = block.get_or_insert_with(|| vec![0u8; WRITE_BLOCK]);
                    let copied = copy_in_blocks(&mut (&mut entry).take(size), &mut file, block)
                        .map_err(|e| {
                            if matches!(
                                e.kind(),
                                io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
                            ) {
                                ArtifactError::Write {
                                    path: path.clone(),
                                    source: e,
                                }
                            } else {
                                format(e)
                            }
                        })?;
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
                if rel.as_os_str().is_empty() {
                    continue; // "./": the release root itself
                }
                seen.claim(&rel, true).map_err(refuse)?;
                if let Some(dest) = dest {
                    create_dirs(dest, &rel)?;
                }
            }
            tar::EntryType::Symlink => {
                if rel.as_os_str().is_empty() {
                    return Err(refuse("a symlink entry needs a name"));
                }
                let target = entry
                    .link_name()
                    .map_err(format)?
                    .ok_or_else(|| refuse("a symlink without a target"))?
                    .into_owned();
                if target.as_os_str().is_empty()
                    || target.as_os_str().len() > MAX_PATH_BYTES
                    || !link_stays_inside(&rel, &target)
                {
                    return Err(refuse("symlinks must point inside the release"));
                }
                seen.claim(&rel, false).map_err(refuse)?;
                seen.links.insert(rel.clone(), target.clone());
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
    // Symlinks are judged again with every other symlink known: one that passes through
    // another may not end up outside the release.
    for (link, target) in &seen.links {
        if !link_resolves_inside(&seen.links, link, target) {
            return Err(ArtifactError::Entry {
                path: crate::names::quoted(&link.display().to_string()),
                why: "symlinks must point inside the release (this one leaves it through another symlink, or loops)",
            });
        }
    }
    // The gzip stream must end cleanly; trailing garbage or a cut stream is an error, and at
    // most a little padding may follow the end of the archive.
    budget.allow(MAX_TRAILING_BYTES);
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(format)?;
    let text = manifest_text.ok_or(ArtifactError::NoManifest)?;
    Ok((Manifest::parse(&text)?, total))
}

/// Whether the symlink at `link` pointing to `target` resolves inside the release when every
/// symlink of the artifact is followed (lexically, as the kernel would), in at most
/// `MAX_LINK_HOPS` hops.
fn link_resolves_inside(
    links: &std::collections::HashMap<PathBuf, PathBuf>,
    link: &Path,
    target: &Path,
) -> bool {
    let mut resolved: Vec<std::ffi::OsString> = link
        .parent()
        .map(|p| p.iter().map(|c| c.to_os_string()).collect())
        .unwrap_or_default();
    let mut pending: std::collections::VecDeque<std::ffi::OsString> = Default::default();
    let push_front =
        |pending: &mut std::collections::VecDeque<std::ffi::OsString>, path: &Path| -> bool {
            let mut parts = Vec::new();
            for component in path.components() {
                match component {
                    Component::Normal(part) => parts.push(part.to_os_string()),
                    Component::ParentDir => parts.push("..".into()),
                    Component::CurDir => {}
                    Component::RootDir | Component::Prefix(_) => return false,
                }
            }
            for part in parts.into_iter().rev() {
                pending.push_front(part);
            }
            true
        };
    if !push_front(&mut pending, target) {
        return false;
    }
    let mut hops = 0;
    while let Some(part) = pending.pop_front() {
        if part == ".." {
            if resolved.pop().is_none() {
                return false;
            }
            continue;
        }
        resolved.push(part);
        let here: PathBuf = resolved.iter().collect();
        if let Some(next) = links.get(&here) {
            hops += 1;
            if hops > MAX_LINK_HOPS {
                return false;
            }
            resolved.pop();
            if !push_front(&mut pending, next) {
                return false;
            }
        }
    }
    true
}

/// Creates the directory `rel` under `dest`, each missing component in turn, refusing to pass
/// through a symlink or a file.
fn create_dirs(dest: &Path, rel: &Path) -> Result<(), ArtifactError> {
    let mut dir = dest.to_path_buf();
    for part in rel.components() {
        dir.push(part);
        match std::fs::symlink_metadata(&dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(ArtifactError::Entry {
                    path: crate::names::quoted(&rel.display().to_string()),
                    why: "a directory may not replace a file or a symlink",
                })
            }
            Err(_) => std::fs::create_dir(&dir).map_err(|source| ArtifactError::Write {
                path: dir.clone(),
                source,
            })?,
        }
    }
    Ok(())
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
                        path: crate::names::quoted(&rel.display().to_string()),
                        why: "an entry may not be written through a symlink",
                    })
                }
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => {
                    return Err(ArtifactError::Entry {
                        path: crate::names::quoted(&rel.display().to_string()),
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
            path: crate::names::quoted(&rel.display().to_string()),
            why: "the same path appears twice",
        });
    }
    Ok(path)
}

/// Bytes a file is written in at unpack: large writes, each a whole buffer, cost the kernel
/// less than the 8 KiB ones `io::copy` makes (fewer calls, and fewer page-cache pages zeroed
/// ahead of a short write).
const WRITE_BLOCK: usize = 1 << 20;

/// Copies `reader` to `writer` a full `block` at a time (the last one short).
fn copy_in_blocks(
    reader: &mut impl Read,
    writer: &mut impl io::Write,
    block: &mut [u8],
) -> io::Result<u64> {
    let mut copied = 0u64;
    loop {
        let mut filled = 0;
        while filled < block.len() {
            match reader.read(&mut block[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if filled == 0 {
            return Ok(copied);
        }
        writer.write_all(&block[..filled])?;
        copied += filled as u64;
        if filled < block.len() {
            return Ok(copied);
        }
    }
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

    /// A gzip tarball of raw entries: (name, type, link target, data), names written into the
    /// header bytes as given.
    fn raw_tgz(entries: &[(&str, tar::EntryType, &str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, kind, link, data) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(*kind);
            header.set_mode(0o644);
            header.set_size(data.len() as u64);
            header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
            header.set_cksum();
            out.extend_from_slice(header.as_bytes());
            out.extend_from_slice(data);
            out.extend(std::iter::repeat_n(0u8, (512 - data.len() % 512) % 512));
        }
        out.extend(std::iter::repeat_n(0u8, 1024));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &out).unwrap();
        gz.finish().unwrap()
    }

    #[test]
    fn check_and_unpack_refuse_the_same_tricks() {
        use tar::EntryType::*;
        let m = ("fleet.toml", Regular, "", MANIFEST);
        for (name, bytes, needle) in [
            (
                "chain",
                raw_tgz(&[
                    m,
                    ("a/s", Symlink, "..", b""),
                    ("t", Symlink, "a/s/..", b""),
                ]),
                "leaves it",
            ),
            (
                "loop",
                raw_tgz(&[m, ("a", Symlink, "b", b""), ("b", Symlink, "a", b"")]),
                "loops",
            ),
            (
                "through",
                raw_tgz(&[m, ("d", Symlink, ".", b""), ("d/x", Regular, "", b"x")]),
                "through a symlink",
            ),
            (
                "dir-through",
                raw_tgz(&[m, ("d", Symlink, ".", b""), ("d/x", Directory, "", b"")]),
                "through a symlink",
            ),
            (
                "twice",
                raw_tgz(&[
                    m,
                    (
                        "./fleet.toml",
                        Regular,
                        "",
                        b"[process]\ncommand = [\"x\"]\n",
                    ),
                ]),
                "twice",
            ),
            (
                "file-then-dir",
                raw_tgz(&[m, ("x", Regular, "", b"x"), ("x", Directory, "", b"")]),
                "twice",
            ),
            ("dotdot", raw_tgz(&[m, ("../x", Regular, "", b"x")]), "'..'"),
        ] {
            let checked = read_artifact(&bytes[..], None, Limits::default()).unwrap_err();
            assert!(checked.to_string().contains(needle), "{name}: {checked}");
            let dir = tempfile::tempdir().unwrap();
            let dest = dir.path().join("r");
            let unpacked = read_artifact(&bytes[..], Some(&dest), Limits::default()).unwrap_err();
            assert!(unpacked.to_string().contains(needle), "{name}: {unpacked}");
            let outside: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
            assert_eq!(outside.len(), 1, "{name}: wrote beside the release");
        }
        // Links that stay inside, through other links too, are fine.
        let fine = raw_tgz(&[
            m,
            ("lib/x", Regular, "", b"x"),
            ("cur", Symlink, "lib", b""),
            ("bin/y", Symlink, "../cur/x", b""),
        ]);
        read_artifact(&fine[..], None, Limits::default()).unwrap();
    }

    #[test]
    fn metadata_and_trailing_bombs_are_cut_off() {
        // A GNU long name claiming 4 MiB: refused after 1 MiB, never buffered whole.
        let mut tar = Vec::new();
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::GNULongName);
        header.set_size(4 << 20);
        header.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
        header.set_cksum();
        tar.extend_from_slice(header.as_bytes());
        tar.extend(std::iter::repeat_n(b'a', 4 << 20));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &tar).unwrap();
        let bomb = gz.finish().unwrap();
        let error = read_artifact(&bomb[..], None, Limits::default()).unwrap_err();
        assert!(matches!(error, ArtifactError::TooLarge(_)), "{error}");

        // 4 MiB of zeros after the end of the archive.
        let good = build_artifact(&[("fleet.toml", MANIFEST, 0o644)]).unwrap();
        let mut plain = Vec::new();
        flate2::read::GzDecoder::new(&good[..])
            .read_to_end(&mut plain)
            .unwrap();
        plain.extend(std::iter::repeat_n(0u8, 4 << 20));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &plain).unwrap();
        let padded = gz.finish().unwrap();
        let error = read_artifact(&padded[..], None, Limits::default()).unwrap_err();
        assert!(matches!(error, ArtifactError::TooLarge(_)), "{error}");
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
