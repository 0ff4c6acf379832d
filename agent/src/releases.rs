//! Unpacked releases: `DATA/releases/<app>/<version>-<first 12 hex of digest>/`. An artifact is
//! unpacked by `fleet_proto::artifact::read_artifact` (which refuses anything unsafe) into a
//! temporary `.unpack-*` directory beside it and renamed into place only when complete, so a
//! release directory either is whole or does not exist. Once renamed it is never written again:
//! instances run from a copy of it.
//!
//! Pruning keeps, per app, the [`KEEP_RELEASES`] most recently used releases (the current one
//! and the one before, so a rollback needs no download) plus whatever is assigned, and deletes
//! the artifacts of the releases it removes (unless another release still uses the same
//! bytes). A release's directory mtime is its "last used" time.

use crate::model::{digest_hex, release_dir_name, DataLayout};
use fleet_proto::artifact::{read_artifact, ArtifactError, Limits};
use fleet_proto::manifest::{Manifest, ManifestError, MANIFEST_FILE};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::SystemTime;
use thiserror::Error;

/// Releases kept per app beyond the assigned one.
pub const KEEP_RELEASES: usize = 2;
const UNPACK_PREFIX: &str = ".unpack-";

#[derive(Debug, Error)]
pub enum ReleaseError {
    #[error("cannot unpack the release: {0}")]
    Artifact(#[from] ArtifactError),
    #[error("release {path} has a bad fleet.toml: {source}")]
    Manifest {
        path: PathBuf,
        source: ManifestError,
    },
    #[error("cannot prepare the release directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// An unpacked release ready to be copied into an instance directory.
#[derive(Debug, Clone)]
pub struct Release {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

/// Returns the release directory for `(app, version, digest)`, unpacking `artifact` first when
/// it is not there yet. Blocking: call it from `spawn_blocking`.
pub fn ensure_unpacked(
    layout: &DataLayout,
    app: &str,
    version: &str,
    digest: &str,
    artifact: &Path,
) -> Result<Release, ReleaseError> {
    ensure_unpacked_from(layout, app, version, digest, || {
        crate::direct_io::ArtifactReader::open(artifact).map_err(|source| ReleaseError::Io {
            path: artifact.to_path_buf(),
            source,
        })
    })
}

/// [`ensure_unpacked`] from the artifact's bytes as `open` gives them: the verified file, or a
/// download as it runs ([`crate::follow`]). Blocking.
pub fn ensure_unpacked_from<R: std::io::Read>(
    layout: &DataLayout,
    app: &str,
    version: &str,
    digest: &str,
    open: impl FnOnce() -> Result<R, ReleaseError>,
) -> Result<Release, ReleaseError> {
    let hex = digest_hex(digest);
    let dir = layout.release_dir(app, version, hex);
    if dir.is_dir() {
        return load(&dir);
    }
    let app_dir = layout.app_releases_dir(app);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ReleaseError::Io { path, source }
    };
    std::fs::create_dir_all(&app_dir).map_err(io(&app_dir))?;
    let tmp = app_dir.join(format!(
        "{UNPACK_PREFIX}{}-{}",
        release_dir_name(version, hex),
        &crate::state::new_token()[..8]
    ));
    let _active = Active::claim(&tmp);
    remove_stale_unpacks(&app_dir);
    let result = open().and_then(|bytes| Ok(read_artifact(bytes, Some(&tmp), Limits::default())?));
    let manifest = match result {
        Ok(manifest) => manifest,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, &dir).map_err(io(&dir))?;
    Ok(Release { dir, manifest })
}

/// Reads the manifest of an already unpacked release.
pub fn load(dir: &Path) -> Result<Release, ReleaseError> {
    let path = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).map_err(|source| ReleaseError::Io {
        path: path.clone(),
        source,
    })?;
    let manifest = Manifest::parse(&text).map_err(|source| ReleaseError::Manifest {
        path: dir.to_path_buf(),
        source,
    })?;
    Ok(Release {
        dir: dir.to_path_buf(),
        manifest,
    })
}

/// Marks a release as just used (its directory's mtime), for pruning.
pub fn touch(dir: &Path) {
    if let Ok(file) = std::fs::File::open(dir) {
        let _ = file.set_modified(SystemTime::now());
    }
}

/// Unpack directories being written by this process now: an unpack that outlived its deploy
/// (one that followed a download, which ends on its own when the download does) may still
/// write while the next deploy of the app starts, and must not lose its directory to it.
static ACTIVE: std::sync::Mutex<BTreeSet<PathBuf>> = std::sync::Mutex::new(BTreeSet::new());

/// An unpack directory claimed in [`ACTIVE`] until dropped.
struct Active(PathBuf);

impl Active {
    fn claim(dir: &Path) -> Active {
        let mut active = ACTIVE.lock().unwrap_or_else(|e| e.into_inner());
        active.insert(dir.to_path_buf());
        Active(dir.to_path_buf())
    }

    fn is_claimed(dir: &Path) -> bool {
        let active = ACTIVE.lock().unwrap_or_else(|e| e.into_inner());
        active.contains(dir)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        let mut active = ACTIVE.lock().unwrap_or_else(|e| e.into_inner());
        active.remove(&self.0);
    }
}

/// Removes what unpacks cut short (the agent stopped mid-way) left, but none still running.
fn remove_stale_unpacks(app_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(app_dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(UNPACK_PREFIX)
            && !Active::is_claimed(&entry.path())
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Which release directories to delete: all but the `keep_n` most recently used and the
/// `assigned` ones. Pure, so it is tested with plain values.
pub fn choose_prunable(
    releases: &[(String, SystemTime)],
    assigned: &BTreeSet<String>,
    keep_n: usize,
) -> Vec<String> {
    let mut by_recent: Vec<&(String, SystemTime)> = releases.iter().collect();
    by_recent.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
    by_recent
        .into_iter()
        .skip(keep_n)
        .filter(|(name, _)| !assigned.contains(name))
        .map(|(name, _)| name.clone())
        .collect()
}

/// The 12-hex digest prefix at the end of a release directory name.
fn dir_hex12(name: &str) -> Option<&str> {
    let (_, hex12) = name.rsplit_once('-')?;
    (hex12.len() == 12 && hex12.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hex12)
}

/// Prunes an app's old releases and their artifacts; returns the directory names removed.
/// Blocking: call it from `spawn_blocking`.
pub fn prune(layout: &DataLayout, app: &str, assigned: &BTreeSet<String>) -> Vec<String> {
    let app_dir = layout.app_releases_dir(app);
    let releases: Vec<(String, SystemTime)> = list_releases(&app_dir);
    let doomed = choose_prunable(&releases, assigned, KEEP_RELEASES);
    for name in &doomed {
        let path = app_dir.join(name);
        if let Err(e) = std::fs::remove_dir_all(&path) {
            tracing::warn!(path = %path.display(), "cannot prune release: {e}");
        }
    }
    // An artifact goes with its release unless a release of any app still uses its bytes.
    let mut still_used: BTreeSet<String> = BTreeSet::new();
    if let Ok(apps) = std::fs::read_dir(layout.root().join("releases")) {
        for app_entry in apps.flatten() {
            for (name, _) in list_releases(&app_entry.path()) {
                if let Some(hex12) = dir_hex12(&name) {
                    still_used.insert(hex12.to_string());
                }
            }
        }
    }
    let doomed_hex: BTreeSet<&str> = doomed
        .iter()
        .filter_map(|n| dir_hex12(n))
        .filter(|h| !still_used.contains(*h))
        .collect();
    if !doomed_hex.is_empty() {
        if let Ok(entries) = std::fs::read_dir(layout.artifacts_dir()) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.ends_with(".tar.gz") && doomed_hex.iter().any(|h| name.starts_with(h)) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    }
    doomed
}

fn list_releases(app_dir: &Path) -> Vec<(String, SystemTime)> {
    let Ok(entries) = std::fs::read_dir(app_dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                return None;
            }
            let modified = entry.metadata().ok()?.modified().ok()?;
            Some((name, modified))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn prunes_all_but_the_recent_and_the_assigned() {
        let t = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let releases: Vec<(String, SystemTime)> =
            [("a", 1), ("b", 2), ("c", 3), ("d", 4), ("e", 5)]
                .into_iter()
                .map(|(n, s)| (n.to_string(), t(s)))
                .collect();
        for (assigned, expect) in [
            (vec![], vec!["b", "a"]),
            (vec!["e"], vec!["b", "a"]),
            (vec!["a"], vec!["b"]),
            (vec!["a", "b"], vec![]),
        ] {
            let assigned: BTreeSet<String> = assigned.into_iter().map(String::from).collect();
            assert_eq!(
                choose_prunable(&releases, &assigned, 3),
                expect,
                "assigned {assigned:?}"
            );
        }
        assert!(choose_prunable(&releases[..2], &BTreeSet::new(), 3).is_empty());
    }

    #[test]
    fn unpacks_once_and_prunes_with_artifacts() {
        let dir = tempfile::tempdir().unwrap();
        let layout = DataLayout::new(dir.path());
        layout.create_all().unwrap();
        let mut names = Vec::new();
        for idx in 0..5u64 {
            let manifest = format!("[process]\ncommand = [\"bin/app{idx}\"]\n");
            let bytes = fleet_proto::artifact::build_artifact(&[(
                "fleet.toml",
                manifest.as_bytes(),
                0o644,
            )])
            .unwrap();
            let digest = fleet_proto::artifact::digest_of(&bytes);
            let artifact = layout.artifact_file(digest_hex(&digest));
            std::fs::write(&artifact, &bytes).unwrap();
            let version = format!("1.{idx}");
            let release = ensure_unpacked(&layout, "web", &version, &digest, &artifact).unwrap();
            assert_eq!(release.manifest.process.command[0], format!("bin/app{idx}"));
            // Already unpacked: read back, not unpacked again.
            let again = ensure_unpacked(&layout, "web", &version, &digest, &artifact).unwrap();
            assert_eq!(again.dir, release.dir);
            let name = release
                .dir
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            assert_eq!(name, format!("1.{idx}-{}", &digest_hex(&digest)[..12]));
            let when = SystemTime::UNIX_EPOCH + Duration::from_secs(1000 + idx);
            std::fs::File::open(&release.dir)
                .unwrap()
                .set_modified(when)
                .unwrap();
            names.push((name, artifact));
        }
        let assigned = BTreeSet::from([names[0].0.clone()]);
        let removed = prune(&layout, "web", &assigned);
        // The two most recently used (1.4, 1.3) and the assigned one (1.0) stay.
        assert_eq!(removed, vec![names[2].0.clone(), names[1].0.clone()]);
        for idx in [1, 2] {
            assert!(!layout.app_releases_dir("web").join(&names[idx].0).exists());
            assert!(
                !names[idx].1.exists(),
                "the pruned release's artifact goes too"
            );
        }
        for idx in [0, 3, 4] {
            assert!(layout.app_releases_dir("web").join(&names[idx].0).is_dir());
            assert!(names[idx].1.exists());
        }
    }

    #[test]
    fn a_bad_artifact_leaves_no_release_dir() {
        let dir = tempfile::tempdir().unwrap();
        let layout = DataLayout::new(dir.path());
        layout.create_all().unwrap();
        let bytes = fleet_proto::artifact::build_artifact(&[("bin/x", b"x", 0o755)]).unwrap();
        let digest = fleet_proto::artifact::digest_of(&bytes);
        let artifact = layout.artifact_file(digest_hex(&digest));
        std::fs::write(&artifact, &bytes).unwrap();
        assert!(ensure_unpacked(&layout, "web", "1", &digest, &artifact).is_err());
        let left: Vec<_> = std::fs::read_dir(layout.app_releases_dir("web"))
            .unwrap()
            .collect();
        assert!(left.is_empty());
    }
}
