//! Release creation, as rollouts are in `rollout`: a release's name, version and environment
//! checked, its uploaded artifact checked (the same reader the agent unpacks with) and kept in
//! the artifact store, and the record `APP@VERSION -> sha256:...` written. Releases are
//! immutable: a version that exists with other bytes or other config is refused, and the
//! refused bytes are not kept; the same bytes and config again is a no-op. With several
//! controllers (state in etcd) a release is recorded, and so acknowledged, only once its
//! artifact is stored on another controller too (`crate::replicas`); with only one up it is
//! refused before any byte is taken.
//!
//! The gRPC handler only decodes the stream, authorizes, and calls [`begin`], [`Upload::write`]
//! and [`create`].

use crate::artifacts::{self, ArtifactStoreError};
use crate::fleet_state::FleetState;
use crate::model::ReleaseRecord;
use crate::store::{ReleaseInsert, StoreError};
use fleet_proto::names;
use fleet_proto::secrets::Secrets;
use std::collections::BTreeMap;
use thiserror::Error;

/// The longest value of one environment variable of a release.
pub const MAX_ENV_VALUE_BYTES: usize = 4096;
/// The longest value of one secret (a key file or a certificate fits).
pub const MAX_SECRET_VALUE_BYTES: usize = 64 * 1024;
/// A release's environment and secrets together, names and values: they travel in every
/// desired state of its hosts and end up in an `execve`, which refuses a few MiB.
pub const MAX_CONFIG_BYTES: usize = 256 * 1024;

#[derive(Debug, Error)]
pub enum ReleaseError {
    #[error("{0}")]
    Invalid(String),
    #[error("{}@{} already exists with {}{}: a version is immutable, create a new version instead",
        existing.app, existing.version, existing.artifact_digest,
        if *same_bytes { " and other config" } else { "" })]
    Immutable {
        existing: Box<ReleaseRecord>,
        same_bytes: bool,
    },
    #[error("the artifact store failed: {0}")]
    Artifacts(ArtifactStoreError),
    #[error("{0}")]
    Internal(String),
    /// The controller cannot take this upload now (too many under way, disk short of space).
    #[error("{0}")]
    Exhausted(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No other controller is up to keep a copy of the artifact.
    #[error("{0}")]
    OneController(String),
    /// The other controllers up did not store a copy.
    #[error("{0}")]
    NotReplicated(String),
}

impl From<crate::replicas::ReplicaError> for ReleaseError {
    fn from(e: crate::replicas::ReplicaError) -> ReleaseError {
        use crate::replicas::ReplicaError;
        match e {
            e @ ReplicaError::OnlyOneController => ReleaseError::OneController(e.to_string()),
            ReplicaError::Store(e) => e.into(),
            e @ ReplicaError::Internal(_) => ReleaseError::Internal(e.to_string()),
            e => ReleaseError::NotReplicated(e.to_string()),
        }
    }
}

impl From<ArtifactStoreError> for ReleaseError {
    fn from(e: ArtifactStoreError) -> ReleaseError {
        match e {
            ArtifactStoreError::Invalid(e) => ReleaseError::Invalid(e.to_string()),
            e @ ArtifactStoreError::TooLarge { .. } => ReleaseError::Invalid(e.to_string()),
            e @ (ArtifactStoreError::Busy(_) | ArtifactStoreError::DiskFull { .. }) => {
                ReleaseError::Exhausted(e.to_string())
            }
            other => ReleaseError::Artifacts(other),
        }
    }
}

/// Refuses a variable whose name is not letters, digits and '_' or whose value holds a NUL or
/// is over `max` bytes. The value is never quoted (it may be a secret).
fn check_variable(what: &str, key: &str, value: &str, max: usize) -> Result<(), ReleaseError> {
    if names::check_env_key(key) && !value.contains('\0') && value.len() <= max {
        return Ok(());
    }
    Err(ReleaseError::Invalid(format!(
        "{what} {} is invalid: names are letters, digits and '_', values at most {max} bytes without NUL",
        names::quoted(key)
    )))
}

/// What a release is to be, checked.
#[derive(Debug, Clone)]
pub struct NewRelease {
    pub app: String,
    pub version: String,
    pub env: BTreeMap<String, String>,
    pub secrets: Secrets,
}

impl NewRelease {
    /// Checks the app name, the version, every environment variable and every secret (a
    /// secret's name may not also be an environment variable's).
    pub fn check(
        app: String,
        version: String,
        env: impl IntoIterator<Item = (String, String)>,
        secrets: impl IntoIterator<Item = (String, String)>,
    ) -> Result<NewRelease, ReleaseError> {
        names::check_app(&app).map_err(|e| ReleaseError::Invalid(e.to_string()))?;
        names::check_version(&version).map_err(|e| ReleaseError::Invalid(e.to_string()))?;
        let mut checked = BTreeMap::new();
        for (key, value) in env {
            check_variable("environment variable", &key, &value, MAX_ENV_VALUE_BYTES)?;
            checked.insert(key, value);
        }
        let mut checked_secrets = Secrets::default();
        for (key, value) in secrets {
            check_variable("secret", &key, &value, MAX_SECRET_VALUE_BYTES)?;
            if checked.contains_key(&key) {
                return Err(ReleaseError::Invalid(format!(
                    "{} is both an environment variable and a secret: give it once",
                    names::quoted(&key)
                )));
            }
            checked_secrets.0.insert(key, value);
        }
        let total: usize = checked
            .iter()
            .chain(checked_secrets.0.iter())
            .map(|(k, v)| k.len() + v.len())
            .sum();
        if total > MAX_CONFIG_BYTES {
            return Err(ReleaseError::Invalid(format!(
                "the release's environment and secrets take {total} bytes, over the {MAX_CONFIG_BYTES} a release may carry: put large configuration in the artifact"
            )));
        }
        Ok(NewRelease {
            app,
            version,
            env: checked,
            secrets: checked_secrets,
        })
    }
}

/// An artifact being uploaded into the artifact store's temporary area; dropped, it leaves
/// nothing behind.
pub struct Upload {
    inner: artifacts::Upload,
}

impl Upload {
    /// Appends bytes (hashed as they come; refused past the artifact size limit). The write
    /// may block on the disk, so it tells the runtime first.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), ReleaseError> {
        tokio::task::block_in_place(|| self.inner.write(bytes)).map_err(ReleaseError::from)
    }
}

/// Starts an upload; with several controllers, only when another one is up to keep a copy.
pub async fn begin(fleet: &FleetState) -> Result<Upload, ReleaseError> {
    if let Some(replicas) = fleet.replicas() {
        replicas.require_another_controller().await?;
    }
    Ok(Upload {
        inner: fleet.artifacts().begin_upload()?,
    })
}

/// What [`create`] did.
#[derive(Debug)]
pub struct Created {
    pub record: ReleaseRecord,
    /// False when the same release existed already (a no-op).
    pub created: bool,
}

/// Checks the uploaded artifact, keeps it, and records the release `new` by `actor`.
pub async fn create(
    fleet: &FleetState,
    new: NewRelease,
    upload: Upload,
    actor: &str,
) -> Result<Created, ReleaseError> {
    let artifacts = fleet.artifacts().clone();
    let checker = artifacts.clone();
    let checked = tokio::task::spawn_blocking(move || checker.check_upload(upload.inner))
        .await
        .map_err(|e| ReleaseError::Internal(format!("checking the artifact crashed: {e}")))??;
    // A version taken by other bytes is refused before the bytes are kept: a refused upload
    // leaves nothing behind (dropping `checked` deletes it).
    if let Some(existing) = fleet.release(&new.app, &new.version)? {
        if existing.artifact_digest != checked.stored.digest {
            return Err(ReleaseError::Immutable {
                existing: Box::new(existing),
                same_bytes: false,
            });
        }
    }
    let stored = tokio::task::spawn_blocking(move || artifacts.keep(checked))
        .await
        .map_err(|e| ReleaseError::Internal(format!("keeping the artifact crashed: {e}")))??;
    // Stored on another controller before the release is recorded: a release anyone can see
    // is never held by one controller only. (A retry of the same release pushes again; a
    // controller that holds it answers at once.)
    if let Some(replicas) = fleet.replicas() {
        let peer = replicas.replicate(&stored.digest).await?;
        tracing::info!(digest = %stored.digest, "artifact of {}@{} stored on {peer} too", new.app, new.version);
    }

    let record = ReleaseRecord {
        app: new.app,
        version: new.version,
        artifact_digest: stored.digest.clone(),
        artifact_size: stored.size,
        env: new.env,
        created_unix_ms: fleet_proto::now_unix_ms(),
        created_by: actor.to_string(),
        smoke_timeouts_ms: stored
            .manifest
            .smoke
            .iter()
            .map(|check| check.timeout.as_millis() as u64)
            .collect(),
        has_release_hook: stored.manifest.release_hook.is_some(),
        min_healthy_ms: stored.manifest.process.min_healthy.as_millis() as u64,
        unpacked_size: stored.unpacked_size,
        secrets_sha256: crate::model::secrets_sha256(&new.secrets),
        secrets: new.secrets,
    };
    match fleet.insert_release(&record).await? {
        ReleaseInsert::Created => {
            fleet
                .event(
                    actor,
                    "release.created",
                    &record.app,
                    "",
                    format!(
                        "release {}@{} created by {actor}: {}",
                        record.app, record.version, record.artifact_digest
                    ),
                )
                .await;
            Ok(Created {
                record,
                created: true,
            })
        }
        ReleaseInsert::Exists(existing)
            if existing.artifact_digest == record.artifact_digest
                && existing.env == record.env
                && existing.secrets_sha256 == record.secrets_sha256 =>
        {
            Ok(Created {
                record: *existing,
                created: false,
            })
        }
        ReleaseInsert::Exists(existing) => {
            let same_bytes = existing.artifact_digest == record.artifact_digest;
            Err(ReleaseError::Immutable {
                existing,
                same_bytes,
            })
        }
    }
}

/// One release [`prune`] removed, and what became of its artifact.
#[derive(Debug, Clone, PartialEq)]
pub struct Removed {
    pub record: ReleaseRecord,
    /// Deleted with it: no other release uses the same digest.
    pub artifact_deleted: bool,
}

/// What [`prune`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct Pruned {
    pub removed: Vec<Removed>,
    /// The releases that stay, oldest first, each with why.
    pub kept: Vec<(ReleaseRecord, String)>,
}

/// `fleetctl release prune APP --keep N` by `actor`: deletes all but the newest `keep`
/// releases of `app`, never one in use (see [`crate::prune`]), then the artifacts no release
/// shares any more. An artifact is deleted only after its last release is gone from the store,
/// so a crash in between leaves a file without a release, never a release without its file.
pub async fn prune(
    fleet: &FleetState,
    app: &str,
    keep: u32,
    actor: &str,
) -> Result<Pruned, ReleaseError> {
    names::check_app(app).map_err(|e| ReleaseError::Invalid(e.to_string()))?;
    if keep == 0 {
        return Err(ReleaseError::Invalid(
            "--keep 0 would delete every release of the app: keep at least 1 (the release a rollback goes back to is kept anyway while a host runs it)".into(),
        ));
    }
    let outcome = fleet.prune_releases(app, keep as usize).await?;
    let mut removed = Vec::new();
    for record in outcome.plan.removed {
        let artifact_deleted = outcome.orphaned_digests.contains(&record.artifact_digest);
        removed.push(Removed {
            record,
            artifact_deleted,
        });
    }
    let artifacts = fleet.artifacts().clone();
    let orphaned = outcome.orphaned_digests.clone();
    tokio::task::spawn_blocking(move || {
        orphaned
            .iter()
            .try_for_each(|digest| artifacts.delete(digest))
    })
    .await
    .map_err(|e| ReleaseError::Internal(format!("deleting artifacts crashed: {e}")))??;
    if !removed.is_empty() {
        let versions: Vec<&str> = removed.iter().map(|r| r.record.version.as_str()).collect();
        fleet
            .event(
                actor,
                "release.pruned",
                app,
                "",
                format!(
                    "{} release(s) of {app} pruned by {actor}: {}; {} artifact(s) deleted",
                    removed.len(),
                    versions.join(", "),
                    outcome.orphaned_digests.len()
                ),
            )
            .await;
    }
    Ok(Pruned {
        removed,
        kept: outcome.plan.kept,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_release_is_checked_before_any_byte_is_taken() {
        let ok = NewRelease::check(
            "web".into(),
            "1.4.2".into(),
            [("GREETING".to_string(), "hi".to_string())],
            [("API_KEY".to_string(), "s3cret".to_string())],
        )
        .unwrap();
        assert_eq!(ok.secrets.0["API_KEY"], "s3cret");
        let both = NewRelease::check(
            "web".into(),
            "1".into(),
            [("K".to_string(), "a".to_string())],
            [("K".to_string(), "b".to_string())],
        );
        assert!(matches!(both, Err(ReleaseError::Invalid(_))));
        let bad_secret = NewRelease::check(
            "web".into(),
            "1".into(),
            [],
            [("1BAD".to_string(), "hunter2".to_string())],
        )
        .unwrap_err();
        assert!(!bad_secret.to_string().contains("hunter2"), "{bad_secret}");
        assert_eq!(ok.env["GREETING"], "hi");
        for (app, version, key, value) in [
            ("Web", "1.0.0", "K", "v"),
            ("web", "", "K", "v"),
            ("web", "1.0.0", "1BAD", "v"),
            ("web", "1.0.0", "K", "nul\0"),
        ] {
            let result = NewRelease::check(
                app.into(),
                version.into(),
                [(key.to_string(), value.to_string())],
                [],
            );
            assert!(
                matches!(result, Err(ReleaseError::Invalid(_))),
                "{app} {version} {key}"
            );
        }
        let big: Vec<(String, String)> = (0..5)
            .map(|i| (format!("S{i}"), "x".repeat(MAX_SECRET_VALUE_BYTES)))
            .collect();
        assert!(NewRelease::check("web".into(), "1".into(), [], big).is_err());
        let long = "x".repeat(MAX_ENV_VALUE_BYTES + 1);
        assert!(
            NewRelease::check("web".into(), "1".into(), [("K".to_string(), long)], []).is_err()
        );
    }
}
