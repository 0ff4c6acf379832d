//! Who an app's processes run as, and the app's lasting directory (`FLEET_STATE_DIR`) owned by
//! that user.
//!
//! An agent that runs as root never runs an app as root: the app runs as the host user its
//! manifest names (`user` in `[process]`), or else as a user of its own, a numeric uid and gid
//! from a reserved range with no passwd entry (the agent's unit has a read-only file system,
//! and app names may be longer than user names). An app keeps its uid for as long as its
//! lasting directory exists: the owner of `DATA/app-state/<app>` *is* the record of which uid
//! the app was given, so nothing else needs to be stored, and `remove --purge` frees it.
//!
//! An agent that does not run as root runs every app as itself (it cannot do otherwise), and
//! refuses a manifest that names another user.

use crate::model::DataLayout;
use nix::unistd::{Uid, User};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The first uid (and gid) of the range apps are given when their manifest names no user.
/// Below 2^31 (some tools read uids as signed), above the ranges that Debian, systemd's
/// dynamic users and container user namespaces hand out.
pub const RESERVED_FIRST: u32 = 0x7FFE_0000;
/// How many apps one host can run, each with a uid of its own.
pub const RESERVED_COUNT: u32 = 4096;

/// The user an app's instance, release hook and exec checks run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunAs {
    /// The agent's own user (an agent that is not root).
    Agent,
    /// Another user: the agent drops to it when it starts the process.
    User {
        uid: u32,
        gid: u32,
        /// `HOME` for the process: the passwd entry's for a named user, the app's lasting
        /// directory for a reserved uid.
        home: PathBuf,
    },
}

impl RunAs {
    /// The uid and gid to drop to, if any.
    pub fn ids(&self) -> Option<(u32, u32)> {
        match self {
            RunAs::Agent => None,
            RunAs::User { uid, gid, .. } => Some((*uid, *gid)),
        }
    }

    /// Sets up `command` to run as this user.
    pub fn apply(&self, command: &mut tokio::process::Command) {
        if let RunAs::User { uid, gid, home } = self {
            command.uid(*uid).gid(*gid).env("HOME", home);
        }
    }
}

/// Serialises reserved-uid choices: two apps set up at once must not pick the same one.
static CHOOSING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Decides who `app` runs as (`user` is its manifest's `[process] user`) and makes its lasting
/// directory, owned by that user (0700). Blocking (it may walk the lasting directory once, to
/// hand it to a new owner).
pub fn prepare(layout: &DataLayout, app: &str, user: Option<&str>) -> Result<RunAs, String> {
    let state_dir = std::path::absolute(layout.app_state_dir(app))
        .unwrap_or_else(|_| layout.app_state_dir(app));
    if !Uid::effective().is_root() {
        if let Some(name) = user {
            let me = User::from_uid(Uid::effective()).ok().flatten();
            if me.as_ref().map(|u| u.name.as_str()) != Some(name) {
                return Err(format!(
                    "the manifest says user = {}, but the agent does not run as root and can run apps only as itself (uid {}): run the agent as root, or remove `user` from [process]",
                    fleet_proto::names::quoted(name),
                    Uid::effective()
                ));
            }
        }
        make_dir(&state_dir, None)?;
        return Ok(RunAs::Agent);
    }
    let run_as = match user {
        Some(name) => {
            let entry = User::from_name(name)
                .map_err(|e| format!("cannot look up user {name:?}: {e}"))?
                .ok_or_else(|| {
                    format!(
                        "the manifest says user = {}, and this host has no such user: create it (useradd --system {name}), or remove `user` from [process] to run the app as a user of its own",
                        fleet_proto::names::quoted(name)
                    )
                })?;
            RunAs::User {
                uid: entry.uid.as_raw(),
                gid: entry.gid.as_raw(),
                home: entry.dir,
            }
        }
        None => {
            let _choosing = CHOOSING.lock().unwrap_or_else(|e| e.into_inner());
            let uid = reserved_uid(&state_dir)?;
            RunAs::User {
                uid,
                gid: uid,
                home: state_dir.clone(),
            }
        }
    };
    make_dir(&state_dir, run_as.ids())?;
    Ok(run_as)
}

/// The reserved uid of the app whose lasting directory is `state_dir`: the directory's owner
/// when it is in the range, else the lowest one no other app's lasting directory holds.
fn reserved_uid(state_dir: &Path) -> Result<u32, String> {
    let in_range = |uid: u32| (RESERVED_FIRST..RESERVED_FIRST + RESERVED_COUNT).contains(&uid);
    if let Ok(meta) = std::fs::symlink_metadata(state_dir) {
        if meta.is_dir() && in_range(meta.uid()) {
            return Ok(meta.uid());
        }
    }
    let parent = state_dir.parent().unwrap_or(Path::new("."));
    let taken: std::collections::BTreeSet<u32> = std::fs::read_dir(parent)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.uid())
                .filter(|uid| in_range(*uid))
                .collect()
        })
        .unwrap_or_default();
    (RESERVED_FIRST..RESERVED_FIRST + RESERVED_COUNT)
        .find(|uid| !taken.contains(uid))
        .ok_or_else(|| {
            format!(
                "all {RESERVED_COUNT} reserved app uids of this host are taken: remove apps this host no longer runs (fleetctl remove --purge), or name a user in [process]"
            )
        })
}

/// Makes `dir` (0700), owned by `owner` when given; a directory that another user owns is
/// handed over whole (its entries too, never following a symlink), so that an app whose user
/// changed keeps its data.
fn make_dir(dir: &Path, owner: Option<(u32, u32)>) -> Result<(), String> {
    let error = |e: std::io::Error| format!("cannot prepare {}: {e}", dir.display());
    std::fs::create_dir_all(dir).map_err(error)?;
    if let Some((uid, gid)) = owner {
        let meta = std::fs::symlink_metadata(dir).map_err(error)?;
        if meta.uid() != uid || meta.gid() != gid {
            chown_tree(dir, uid, gid).map_err(error)?;
        }
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(error)
}

/// Gives `path` and everything under it to `uid:gid`, without following symlinks.
fn chown_tree(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    if std::fs::symlink_metadata(path)?.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// Why a user other than the agent's may not reach `dir`: the first directory on its path that
/// others cannot search (exec needs every one of them). `None` when every one is searchable.
pub fn unreachable_for_others(dir: &Path) -> Option<PathBuf> {
    let dir = std::path::absolute(dir).ok()?;
    dir.ancestors()
        .filter(|d| !d.as_os_str().is_empty())
        .find(|d| {
            std::fs::metadata(d)
                .map(|m| m.permissions().mode() & 0o001 == 0)
                .unwrap_or(false)
        })
        .map(Path::to_path_buf)
}

/// Whether the agent runs apps as other users (it runs as root).
pub fn drops_privileges() -> bool {
    Uid::effective().is_root()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_app_keeps_a_uid_of_its_own() {
        if !drops_privileges() {
            eprintln!("skipped: reserved uids need the test to run as root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let layout = DataLayout::new(dir.path());
        let web = prepare(&layout, "web", None).unwrap();
        let api = prepare(&layout, "api", None).unwrap();
        let (web_uid, _) = web.ids().unwrap();
        let (api_uid, _) = api.ids().unwrap();
        assert!(web_uid >= RESERVED_FIRST && api_uid >= RESERVED_FIRST);
        assert_ne!(web_uid, api_uid);
        assert_eq!(prepare(&layout, "web", None).unwrap(), web, "stable");
        let meta = std::fs::metadata(layout.app_state_dir("web")).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (web_uid, web_uid));
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);

        // A named user takes the directory over, with what is in it.
        std::fs::write(layout.app_state_dir("web").join("db"), "x").unwrap();
        let nobody = prepare(&layout, "web", Some("nobody")).unwrap();
        let (uid, _) = nobody.ids().unwrap();
        let file = std::fs::metadata(layout.app_state_dir("web").join("db")).unwrap();
        assert_eq!(file.uid(), uid);

        let error = prepare(&layout, "web", Some("no-such-user-here")).unwrap_err();
        assert!(error.contains("no such user"), "{error}");
    }

    #[test]
    fn finds_the_directory_others_cannot_search() {
        let dir = tempfile::tempdir().unwrap();
        let (a, inner) = (dir.path().join("a"), dir.path().join("a/b"));
        std::fs::create_dir_all(&inner).unwrap();
        for d in [dir.path(), &a, &inner] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711)).unwrap();
        }
        // Only meaningful where the temp directory's own parents are searchable (/tmp is).
        if unreachable_for_others(dir.path()).is_none() {
            assert_eq!(unreachable_for_others(&inner), None);
            std::fs::set_permissions(&a, std::fs::Permissions::from_mode(0o700)).unwrap();
            assert_eq!(unreachable_for_others(&inner), Some(a));
        }
    }
}
