//! The embedded store: hosts, releases, rollouts, deployments, convergences and the event log
//! in one redb file in the data directory. Every write is a transaction that is fsynced before
//! it returns, so a controller killed at any moment restarts with every record it acknowledged.
//!
//! This is the one narrow interface to state: a deployment that outgrows one controller can put
//! another implementation (etcd) behind the same methods. Records are stored as JSON so the
//! file stays readable with any redb tool and survives added fields.
//!
//! ## Export and import (backup and restore)
//!
//! [`Store::export`] writes every record of every table, read in one read transaction (a
//! consistent snapshot, taken while writers go on), as a *store dump*: JSON lines, backend
//! neutral, so a dump of this store can be imported into another backend (etcd) and back.
//! The first line is the header `{"fleet_store_dump":1}`; each further line is one record,
//! `{"table":"hosts","key":"web-1","value":"<the record's JSON, as stored>"}`. Keys of the
//! `events` table and values of the `counters` and `credential_uses` tables (numbers) are
//! written in decimal. [`Store::import`] makes a new store from a dump in one transaction and refuses a
//! data directory that holds a store already, a table it does not know and a newer dump.

use crate::model::{
    ConvergenceRecord, DeploymentRecord, EventRecord, HostRecord, ReleaseRecord, RolloutRecord,
};
use redb::{Database, ReadableTable, TableDefinition, TableHandle};
use serde::{de::DeserializeOwned, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use thiserror::Error;

const HOSTS: TableDefinition<&str, &[u8]> = TableDefinition::new("hosts");
const RELEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("releases");
const ROLLOUTS: TableDefinition<&str, &[u8]> = TableDefinition::new("rollouts");
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
/// Join tokens by the sha256 of the token (the token itself is never stored).
const JOIN_TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("join_tokens");
/// Every certificate the controller signed, by serial (hex): who it names and its role.
const CERTIFICATES: TableDefinition<&str, &[u8]> = TableDefinition::new("certificates");
/// Revoked certificates by serial (hex); auth refuses them on every call.
const REVOKED: TableDefinition<&str, &[u8]> = TableDefinition::new("revoked");
/// When each operator or CI credential was last used, by serial (unix ms): written in batches
/// by `FleetState::flush_credential_uses`, never once per call.
const CREDENTIAL_USES: TableDefinition<&str, i64> = TableDefinition::new("credential_uses");
/// Standing deployments by `app/selector` (see `DeploymentRecord::key`).
const DEPLOYMENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("deployments");
/// Hosts moved between rollouts (by the converger or `replace`), by `converge<seq>/app`.
const CONVERGENCES: TableDefinition<&str, &[u8]> = TableDefinition::new("convergences");

/// The file name of the store inside the data directory.
pub const STORE_FILE: &str = "fleet.redb";

/// The version of the store dump [`Store::export`] writes; [`Store::import`] reads it and
/// every older one.
pub const DUMP_VERSION: u32 = 1;

/// The tables whose keys and values are both text (records as JSON), by name.
const TEXT_TABLES: [TableDefinition<&str, &[u8]>; 8] = [
    HOSTS,
    RELEASES,
    ROLLOUTS,
    JOIN_TOKENS,
    CERTIFICATES,
    REVOKED,
    DEPLOYMENTS,
    CONVERGENCES,
];

/// The header line of a store dump.
#[derive(Debug, Serialize, serde::Deserialize)]
struct DumpHeader {
    fleet_store_dump: u32,
}

/// One record of a store dump (see the module doc).
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct DumpRecord {
    pub table: String,
    pub key: String,
    pub value: String,
}

/// What [`Store::export`] wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportSummary {
    pub records: u64,
    /// The artifact digests (`sha256:…`) that the exported releases refer to: what a backup
    /// must hold beside the dump.
    pub artifact_digests: std::collections::BTreeSet<String>,
}

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("the store dump cannot be read: {0}")]
    Dump(String),
    #[error("{path} holds a store already: import fills only a data directory without one")]
    Exists { path: std::path::PathBuf },
    #[error("store: {0}")]
    Db(Box<redb::Error>),
    #[error("store record {key} is corrupt: {source}")]
    Corrupt {
        key: String,
        source: serde_json::Error,
    },
    #[error("store: a write did not finish: {0}")]
    Interrupted(String),
}

macro_rules! from_redb {
    ($($error:ty),*) => {$(
        impl From<$error> for StoreError {
            fn from(e: $error) -> StoreError {
                StoreError::Db(Box::new(e.into()))
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

fn db_err<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Db(Box::new(e.into()))
}

/// What `insert_release` found.
#[derive(Debug, PartialEq)]
pub enum ReleaseInsert {
    Created,
    /// The same version already exists; the caller compares it with what it tried to create.
    Exists(Box<ReleaseRecord>),
}

/// A handle on the store; clones share one database, so a write can be handed to the
/// blocking pool (see `FleetState`), never run on a runtime worker.
#[derive(Clone)]
pub struct Store {
    /// The open database; `None` while it is being reopened after an I/O error (see
    /// [`Store::reopen_after_io_error`]).
    db: std::sync::Arc<std::sync::Mutex<Option<std::sync::Arc<Database>>>>,
    /// The database file, to reopen it.
    path: std::path::PathBuf,
    /// How many events the log keeps at least (`max_events` in controller.toml); older ones
    /// are deleted in batches as new ones are written.
    max_events: u64,
}

/// How many events the log keeps by default.
pub const DEFAULT_MAX_EVENTS: u64 = 10_000;

/// What `prune_releases` did: the plan, and the artifacts no release uses any more.
#[derive(Debug, Clone, PartialEq)]
pub struct PruneOutcome {
    pub plan: crate::prune::PrunePlan,
    /// Digests of removed releases that no remaining release (of any app) shares.
    pub orphaned_digests: Vec<String>,
}

/// A join token as stored: only its hash, when it expires, and whether it was spent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct JoinTokenRecord {
    pub expires_unix_ms: i64,
    pub created_by: String,
    /// Set once the token was spent.
    #[serde(default)]
    pub used_unix_ms: Option<i64>,
    #[serde(default)]
    pub used_by_host: Option<String>,
    /// The sha256 (hex) of the public key the token was spent for: the same host asking again
    /// with the same key (its answer was lost) gets its certificate again.
    #[serde(default)]
    pub used_with_key: Option<String>,
    /// The certificate (PEM) the token was spent for: what a retried join is answered with,
    /// so a retry never mints another one.
    #[serde(default)]
    pub issued_certificate_pem: Option<String>,
    /// Set when the host the token joined was removed (`fleetctl remove`): the token is dead
    /// for good, retries included.
    #[serde(default)]
    pub host_removed_unix_ms: Option<i64>,
    /// The labels the host joining with this token gets (`join-token create --labels`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<std::collections::BTreeMap<String, String>>,
}

/// What `join_with_token` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenUse {
    /// The token was valid and is now spent; the certificate is recorded.
    Spent,
    /// The host holds a live agent certificate already: nothing was spent or recorded.
    HostHasCertificate,
    /// The same host and key asked again with the token it spent (a lost answer): it is
    /// answered with the certificate it was issued then; nothing new is signed or recorded.
    Retried {
        certificate_pem: String,
    },
    /// The token joined a host that was removed since: dead for good.
    HostRemoved {
        host: String,
    },
    Unknown,
    AlreadyUsed {
        by_host: String,
    },
    Expired {
        expired_unix_ms: i64,
    },
}

/// A certificate the controller signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct CertificateRecord {
    pub serial: String,
    pub name: String,
    /// admin | deployer | agent
    pub role: String,
    pub issued_unix_ms: i64,
    pub not_after_unix_ms: i64,
    pub issued_by: String,
    /// For an agent certificate from a join token that named labels: those labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<std::collections::BTreeMap<String, String>>,
}

/// A revoked certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RevokedRecord {
    pub serial: String,
    pub name: String,
    pub revoked_unix_ms: i64,
    /// The host was removed with `--purge`: its agent is told to wipe its data along with the
    /// revoked answer, for as long as the record is kept (the controller cannot know when the
    /// agent heard it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub purge: bool,
}

/// Who `issued_by` names for a credential the controller did not sign itself and learned of
/// at its first use (`fleetctl init`'s admin, or `fleet-controller issue-admin`'s while the
/// controller ran).
pub const ISSUED_OUTSIDE: &str = "the CA key (fleetctl init or fleet-controller issue-admin)";

/// One use of an operator or CI credential, as the controller saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialUse {
    pub serial: String,
    pub name: String,
    /// admin | deployer
    pub role: String,
    pub not_after_unix_ms: i64,
    pub used_unix_ms: i64,
}

/// An operator or CI credential as `credentials list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialView {
    pub certificate: CertificateRecord,
    pub last_used_unix_ms: Option<i64>,
    pub revoked_unix_ms: Option<i64>,
}

/// What `revoke_credential` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialRevocation {
    /// These certificates (every live one of that name) are revoked now.
    Revoked(Vec<CertificateRecord>),
    /// No operator or CI credential has that name.
    Unknown,
    /// The name is a host's: hosts are removed with `fleetctl remove`.
    IsHost,
    /// Every certificate of that name was revoked already.
    AlreadyRevoked,
    /// It holds the last live admin certificates: revoking would lock every admin out.
    LastAdmin,
}

fn release_key(app: &str, version: &str) -> String {
    format!("{app}/{version}")
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records always serialise")
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        key: key.to_string(),
        source,
    })
}

impl Store {
    /// Opens (or creates) the store in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        let path = data_dir.join(STORE_FILE);
        let db = Database::create(&path).map_err(db_err)?;
        let txn = db.begin_write().map_err(db_err)?;
        {
            txn.open_table(HOSTS).map_err(db_err)?;
            txn.open_table(RELEASES).map_err(db_err)?;
            txn.open_table(ROLLOUTS).map_err(db_err)?;
            txn.open_table(EVENTS).map_err(db_err)?;
            txn.open_table(COUNTERS).map_err(db_err)?;
            txn.open_table(JOIN_TOKENS).map_err(db_err)?;
            txn.open_table(CERTIFICATES).map_err(db_err)?;
            txn.open_table(REVOKED).map_err(db_err)?;
            txn.open_table(CREDENTIAL_USES).map_err(db_err)?;
            txn.open_table(DEPLOYMENTS).map_err(db_err)?;
            txn.open_table(CONVERGENCES).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        Ok(Store {
            db: std::sync::Arc::new(std::sync::Mutex::new(Some(std::sync::Arc::new(db)))),
            path,
            max_events: DEFAULT_MAX_EVENTS,
        })
    }

    /// The open database, reopened first if an I/O error closed it.
    fn db(&self) -> Result<std::sync::Arc<Database>, StoreError> {
        let mut slot = self.db.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(db) = slot.as_ref() {
            return Ok(db.clone());
        }
        // redb refuses every transaction after an I/O error until the database is opened
        // again; opening it checks (and if need be repairs) the file. It fails while a
        // transaction of the old handle is still alive, or while the disk is still full: then
        // this call fails and the next one tries again.
        let db = Database::create(&self.path).map_err(|e| {
            StoreError::Db(Box::new(redb::Error::Io(std::io::Error::other(format!(
                "the store is being reopened after an I/O error, and reopening failed: {}",
                redb::Error::from(e)
            )))))
        })?;
        tracing::info!("store reopened after an I/O error");
        let db = std::sync::Arc::new(db);
        *slot = Some(db.clone());
        Ok(db)
    }

    /// After an I/O error (a full disk, say) redb answers every later transaction with
    /// "Previous I/O error occurred": the handle is dropped here so that the next call opens
    /// the database again, and the store works once the cause is gone, without a restart.
    fn reopen_after_io_error(&self, result: &Result<(), StoreError>) {
        let failed_io = matches!(
            result,
            Err(StoreError::Db(e)) if matches!(**e, redb::Error::Io(_) | redb::Error::PreviousIo)
        );
        if failed_io {
            let mut slot = self.db.lock().unwrap_or_else(|e| e.into_inner());
            if slot.take().is_some() {
                tracing::warn!("the store had an I/O error; it is opened again on its next use");
            }
        }
    }

    /// The same store, keeping at least `max_events` events (at least 1).
    pub fn with_max_events(mut self, max_events: u64) -> Store {
        self.max_events = max_events.max(1);
        self
    }

    fn get<T: DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        let txn = self.db()?.begin_read().map_err(db_err)?;
        let table = txn.open_table(table).map_err(db_err)?;
        match table.get(key).map_err(db_err)? {
            Some(value) => Ok(Some(decode(key, value.value())?)),
            None => Ok(None),
        }
    }

    fn all<T: DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<T>, StoreError> {
        let txn = self.db()?.begin_read().map_err(db_err)?;
        let table = txn.open_table(table).map_err(db_err)?;
        let mut out = Vec::new();
        for item in table.iter().map_err(db_err)? {
            let (key, value) = item.map_err(db_err)?;
            out.push(decode(key.value(), value.value())?);
        }
        Ok(out)
    }

    pub fn get_host(&self, name: &str) -> Result<Option<HostRecord>, StoreError> {
        self.get(HOSTS, name)
    }

    /// Every host, ordered by name.
    pub fn list_hosts(&self) -> Result<Vec<HostRecord>, StoreError> {
        self.all(HOSTS)
    }

    pub fn put_host(&self, host: &HostRecord) -> Result<(), StoreError> {
        self.write(|txn| {
            let mut table = txn.open_table(HOSTS)?;
            table.insert(host.name.as_str(), encode(host).as_slice())?;
            Ok(())
        })
    }

    /// Forgets a host.
    pub fn delete_host(&self, name: &str) -> Result<(), StoreError> {
        self.write(|txn| {
            let mut table = txn.open_table(HOSTS)?;
            table.remove(name)?;
            Ok(())
        })
    }

    /// Writes hosts' desired state and the rollout that changed it (if a rollout did) in one
    /// transaction, so the record of a wave and the assignments it made never disagree after a
    /// crash.
    pub fn put_hosts_and_rollout(
        &self,
        hosts: &[HostRecord],
        rollout: Option<&RolloutRecord>,
    ) -> Result<(), StoreError> {
        self.write(|txn| {
            let mut table = txn.open_table(HOSTS)?;
            for host in hosts {
                table.insert(host.name.as_str(), encode(host).as_slice())?;
            }
            drop(table);
            if let Some(rollout) = rollout {
                let mut table = txn.open_table(ROLLOUTS)?;
                table.insert(rollout.id.as_str(), encode(rollout).as_slice())?;
            }
            Ok(())
        })
    }

    /// Writes hosts' desired state and the convergences that changed it in one transaction, so
    /// a host never runs a convergence that `history` does not show.
    pub fn put_hosts_and_convergences(
        &self,
        hosts: &[HostRecord],
        convergences: &[ConvergenceRecord],
    ) -> Result<(), StoreError> {
        self.write(|txn| {
            let mut table = txn.open_table(HOSTS)?;
            for host in hosts {
                table.insert(host.name.as_str(), encode(host).as_slice())?;
            }
            drop(table);
            let mut table = txn.open_table(CONVERGENCES)?;
            for convergence in convergences {
                table.insert(convergence.key().as_str(), encode(convergence).as_slice())?;
            }
            Ok(())
        })
    }

    /// Saves a convergence (its result, once known).
    pub fn put_convergence(&self, convergence: &ConvergenceRecord) -> Result<(), StoreError> {
        self.put_hosts_and_convergences(&[], std::slice::from_ref(convergence))
    }

    /// Every convergence (of one app, when given), newest first.
    pub fn list_convergences(
        &self,
        app: Option<&str>,
    ) -> Result<Vec<ConvergenceRecord>, StoreError> {
        let mut convergences: Vec<ConvergenceRecord> = self
            .all::<ConvergenceRecord>(CONVERGENCES)?
            .into_iter()
            .filter(|c| app.is_none_or(|app| c.app == app))
            .collect();
        convergences.sort_by(|a, b| b.seq.cmp(&a.seq).then_with(|| a.app.cmp(&b.app)));
        Ok(convergences)
    }

    pub fn get_release(
        &self,
        app: &str,
        version: &str,
    ) -> Result<Option<ReleaseRecord>, StoreError> {
        self.get(RELEASES, &release_key(app, version))
    }

    /// The releases of one app, oldest first.
    pub fn list_releases(&self, app: &str) -> Result<Vec<ReleaseRecord>, StoreError> {
        let prefix = format!("{app}/");
        let mut releases: Vec<ReleaseRecord> = self
            .all::<ReleaseRecord>(RELEASES)?
            .into_iter()
            .filter(|r| release_key(&r.app, &r.version).starts_with(&prefix))
            .collect();
        releases.sort_by_key(|r| r.created_unix_ms);
        Ok(releases)
    }

    /// Records a release unless its version exists; check and insert are one transaction, so
    /// two uploads of one version can never both win.
    pub fn insert_release(&self, release: &ReleaseRecord) -> Result<ReleaseInsert, StoreError> {
        let key = release_key(&release.app, &release.version);
        let mut outcome = ReleaseInsert::Created;
        self.write(|txn| {
            let mut table = txn.open_table(RELEASES)?;
            let existing = table.get(key.as_str())?.map(|v| v.value().to_vec());
            match existing {
                Some(bytes) => {
                    outcome = ReleaseInsert::Exists(Box::new(
                        serde_json::from_slice(&bytes)
                            .map_err(|e| redb::Error::Corrupted(format!("release {key}: {e}")))?,
                    ))
                }
                None => {
                    table.insert(key.as_str(), encode(release).as_slice())?;
                }
            }
            Ok(())
        })?;
        Ok(outcome)
    }

    pub fn get_rollout(&self, id: &str) -> Result<Option<RolloutRecord>, StoreError> {
        self.get(ROLLOUTS, id)
    }

    pub fn put_rollout(&self, rollout: &RolloutRecord) -> Result<(), StoreError> {
        self.put_rollout_and_deployment(rollout, None)
    }

    /// Saves a rollout record and, when it completed, the deployment it leaves, in one
    /// transaction: a completed rollout and its deployment never disagree.
    pub fn put_rollout_and_deployment(
        &self,
        rollout: &RolloutRecord,
        deployment: Option<&DeploymentRecord>,
    ) -> Result<(), StoreError> {
        self.write(|txn| {
            let mut table = txn.open_table(ROLLOUTS)?;
            table.insert(rollout.id.as_str(), encode(rollout).as_slice())?;
            if let Some(deployment) = deployment {
                let mut table = txn.open_table(DEPLOYMENTS)?;
                let key = DeploymentRecord::key(&deployment.app, &deployment.selector);
                table.insert(key.as_str(), encode(deployment).as_slice())?;
            }
            Ok(())
        })
    }

    /// The standing deployments (of one app, when given), the most recently updated first.
    pub fn list_deployments(&self, app: Option<&str>) -> Result<Vec<DeploymentRecord>, StoreError> {
        let mut deployments: Vec<DeploymentRecord> = self
            .all(DEPLOYMENTS)?
            .into_iter()
            .filter(|d: &DeploymentRecord| app.is_none_or(|app| d.app == app))
            .collect();
        deployments.sort_by_key(|d| std::cmp::Reverse((d.seq, d.updated_unix_ms)));
        Ok(deployments)
    }

    /// Every rollout (of one app, when given), newest first.
    pub fn list_rollouts(&self, app: Option<&str>) -> Result<Vec<RolloutRecord>, StoreError> {
        let mut rollouts: Vec<RolloutRecord> = self
            .all::<RolloutRecord>(ROLLOUTS)?
            .into_iter()
            .filter(|r| app.is_none_or(|app| r.app == app))
            .collect();
        rollouts.sort_by_key(|r| std::cmp::Reverse(r.seq));
        Ok(rollouts)
    }

    /// The next number of a named counter, starting at 1; durable once returned.
    pub fn next_seq(&self, counter: &str) -> Result<u64, StoreError> {
        let mut next = 0;
        self.write(|txn| {
            let mut table = txn.open_table(COUNTERS)?;
            let current = table.get(counter)?.map(|v| v.value()).unwrap_or(0);
            next = current + 1;
            table.insert(counter, next)?;
            Ok(())
        })?;
        Ok(next)
    }

    /// Appends an event, numbering it; returns it with its number. Once the log holds a tenth
    /// more than `max_events`, the oldest are deleted in the same transaction down to
    /// `max_events`, so the cost of trimming is spread over many writes.
    pub fn append_event(&self, mut event: EventRecord) -> Result<EventRecord, StoreError> {
        let max_events = self.max_events;
        self.write(|txn| {
            let mut table = txn.open_table(EVENTS)?;
            let last = table.last()?.map(|(k, _)| k.value()).unwrap_or(0);
            event.seq = last + 1;
            table.insert(event.seq, encode(&event).as_slice())?;
            // Numbers are consecutive, so the first and the last say how many there are.
            let first = table.first()?.map(|(k, _)| k.value()).unwrap_or(event.seq);
            let n_events = event.seq - first + 1;
            if n_events > max_events + trim_batch(max_events) {
                let keep_from = event.seq - max_events + 1;
                table.retain_in(..keep_from, |_, _| false)?;
            }
            Ok(())
        })?;
        Ok(event)
    }

    /// The newest `limit` events, oldest first.
    pub fn recent_events(&self, limit: usize) -> Result<Vec<EventRecord>, StoreError> {
        let txn = self.db()?.begin_read().map_err(db_err)?;
        let table = txn.open_table(EVENTS).map_err(db_err)?;
        let mut out = Vec::new();
        for item in table.iter().map_err(db_err)?.rev().take(limit) {
            let (key, value) = item.map_err(db_err)?;
            out.push(decode(&key.value().to_string(), value.value())?);
        }
        out.reverse();
        Ok(out)
    }

    /// Stores a new join token by its hash.
    pub fn insert_join_token(
        &self,
        token_hash: &str,
        record: &JoinTokenRecord,
    ) -> Result<(), StoreError> {
        self.write(|txn| {
            let mut table = txn.open_table(JOIN_TOKENS)?;
            table.insert(token_hash, encode(record).as_slice())?;
            Ok(())
        })
    }

    /// Joins `certificate.name` with a join token, in ONE transaction: refused when that host
    /// already holds a live agent certificate, or the token is unknown, used or expired;
    /// otherwise the token is spent and the certificate recorded. Two joins for one host name
    /// (with two tokens) cannot both succeed. The one exception: the host the token was spent
    /// for, asking again before the token expires with the same key (`key_sha256`), is the
    /// same join retried after its answer was lost, and gets the certificate it was issued
    /// then ([`TokenUse::Retried`]) unless that host was removed meanwhile.
    pub fn join_with_token(
        &self,
        token_hash: &str,
        certificate: &CertificateRecord,
        certificate_pem: &str,
        key_sha256: &str,
        now_unix_ms: i64,
    ) -> Result<TokenUse, StoreError> {
        let mut outcome = TokenUse::Unknown;
        self.write(|txn| {
            let mut tokens = txn.open_table(JOIN_TOKENS)?;
            let existing = tokens.get(token_hash)?.map(|v| v.value().to_vec());
            let Some(bytes) = existing else {
                return Ok(());
            };
            let mut record: JoinTokenRecord = decode("join token", &bytes)?;
            let retry = match token_admission(&record, &certificate.name, key_sha256, now_unix_ms) {
                Err(refusal) => {
                    outcome = refusal;
                    return Ok(());
                }
                Ok(retry) => retry,
            };
            if retry {
                if let Some(issued) = &record.issued_certificate_pem {
                    outcome = TokenUse::Retried {
                        certificate_pem: issued.clone(),
                    };
                    return Ok(());
                }
            }
            let mut certificates = txn.open_table(CERTIFICATES)?;
            let revoked = txn.open_table(REVOKED)?;
            let live =
                live_agent_certificate_in(&certificates, &revoked, &certificate.name, now_unix_ms)?;
            drop(revoked);
            if retry && live.is_none() {
                // A token spent before removed hosts' tokens were marked dead: the host's every
                // certificate is revoked, so it was removed.
                outcome = TokenUse::HostRemoved {
                    host: certificate.name.clone(),
                };
                return Ok(());
            }
            if !retry {
                if live.is_some() {
                    outcome = TokenUse::HostHasCertificate;
                    return Ok(());
                }
                record.used_unix_ms = Some(now_unix_ms);
                record.used_by_host = Some(certificate.name.clone());
                record.used_with_key = Some(key_sha256.to_string());
            }
            // A token spent before certificates were kept with it keeps the one it gets now.
            record.issued_certificate_pem = Some(certificate_pem.to_string());
            tokens.insert(token_hash, encode(&record).as_slice())?;
            let certificate = CertificateRecord {
                labels: record.labels.clone(),
                ..certificate.clone()
            };
            certificates.insert(certificate.serial.as_str(), encode(&certificate).as_slice())?;
            outcome = if retry {
                TokenUse::Retried {
                    certificate_pem: certificate_pem.to_string(),
                }
            } else {
                TokenUse::Spent
            };
            Ok(())
        })?;
        Ok(outcome)
    }

    /// What a join with this token would find, read without writing anything: a refusal, or a
    /// retry answered with the certificate kept with the token. `None` when only the write in
    /// [`Store::join_with_token`] can tell (a token to spend). Lets `Join` refuse a bad token
    /// before it signs anything or takes the store's write lock.
    pub fn join_precheck(
        &self,
        token_hash: &str,
        name: &str,
        key_sha256: &str,
        now_unix_ms: i64,
    ) -> Result<Option<TokenUse>, StoreError> {
        let Some(record) = self.get::<JoinTokenRecord>(JOIN_TOKENS, token_hash)? else {
            return Ok(Some(TokenUse::Unknown));
        };
        Ok(
            match token_admission(&record, name, key_sha256, now_unix_ms) {
                Err(refusal) => Some(refusal),
                Ok(true) => record
                    .issued_certificate_pem
                    .map(|certificate_pem| TokenUse::Retried { certificate_pem }),
                Ok(false) => None,
            },
        )
    }

    /// Records a certificate the controller signed.
    pub fn record_certificate(&self, record: &CertificateRecord) -> Result<(), StoreError> {
        self.write(|txn| {
            let mut table = txn.open_table(CERTIFICATES)?;
            table.insert(record.serial.as_str(), encode(record).as_slice())?;
            Ok(())
        })
    }

    /// The certificate the controller signed with `serial` (hex).
    pub fn get_certificate(&self, serial: &str) -> Result<Option<CertificateRecord>, StoreError> {
        self.get(CERTIFICATES, serial)
    }

    /// Every certificate the controller signed.
    pub fn list_certificates(&self) -> Result<Vec<CertificateRecord>, StoreError> {
        self.all(CERTIFICATES)
    }

    /// Whether a certificate serial (hex) is revoked. Called by auth on every call.
    pub fn is_revoked(&self, serial: &str) -> Result<bool, StoreError> {
        let txn = self.db()?.begin_read().map_err(db_err)?;
        let table = txn.open_table(REVOKED).map_err(db_err)?;
        Ok(table.get(serial).map_err(db_err)?.is_some())
    }

    /// The revocation of a certificate serial (hex), if it was revoked.
    pub fn revocation(&self, serial: &str) -> Result<Option<RevokedRecord>, StoreError> {
        self.get(REVOKED, serial)
    }

    /// Records when operator and CI credentials were used, in ONE transaction (called in
    /// batches, never per call). A credential the controller did not sign (the admin of
    /// `fleetctl init`, one from `fleet-controller issue-admin`) is recorded at its first use;
    /// those are returned, for an event.
    pub fn record_credential_uses(
        &self,
        uses: &[CredentialUse],
    ) -> Result<Vec<CertificateRecord>, StoreError> {
        let mut learned = Vec::new();
        self.write(|txn| {
            let mut certificates = txn.open_table(CERTIFICATES)?;
            let mut last_used = txn.open_table(CREDENTIAL_USES)?;
            for seen in uses {
                if certificates.get(seen.serial.as_str())?.is_none() {
                    let record = CertificateRecord {
                        serial: seen.serial.clone(),
                        name: seen.name.clone(),
                        role: seen.role.clone(),
                        issued_unix_ms: seen.used_unix_ms,
                        not_after_unix_ms: seen.not_after_unix_ms,
                        issued_by: ISSUED_OUTSIDE.to_string(),
                        labels: None,
                    };
                    certificates.insert(record.serial.as_str(), encode(&record).as_slice())?;
                    learned.push(record);
                }
                let before = last_used.get(seen.serial.as_str())?.map(|v| v.value());
                if before.is_none_or(|before| before < seen.used_unix_ms) {
                    last_used.insert(seen.serial.as_str(), seen.used_unix_ms)?;
                }
            }
            Ok(())
        })?;
        Ok(learned)
    }

    /// Every operator and CI credential (certificates of role admin or deployer), with when
    /// it was last used and revoked, ordered by name and issue time.
    pub fn list_credentials(&self) -> Result<Vec<CredentialView>, StoreError> {
        let txn = self.db()?.begin_read().map_err(db_err)?;
        let certificates = txn.open_table(CERTIFICATES).map_err(db_err)?;
        let revoked = txn.open_table(REVOKED).map_err(db_err)?;
        let last_used = txn.open_table(CREDENTIAL_USES).map_err(db_err)?;
        let mut out = Vec::new();
        for item in certificates.iter().map_err(db_err)? {
            let (key, value) = item.map_err(db_err)?;
            let certificate: CertificateRecord = decode(key.value(), value.value())?;
            if certificate.role == "agent" {
                continue;
            }
            let revoked_unix_ms = match revoked.get(key.value()).map_err(db_err)? {
                Some(v) => Some(decode::<RevokedRecord>(key.value(), v.value())?.revoked_unix_ms),
                None => None,
            };
            let last_used_unix_ms = last_used
                .get(key.value())
                .map_err(db_err)?
                .map(|v| v.value());
            out.push(CredentialView {
                certificate,
                last_used_unix_ms,
                revoked_unix_ms,
            });
        }
        out.sort_by(|a, b| {
            (&a.certificate.name, a.certificate.issued_unix_ms)
                .cmp(&(&b.certificate.name, b.certificate.issued_unix_ms))
        });
        Ok(out)
    }

    /// Revokes every live certificate of the operator or CI credential `name`, in ONE
    /// transaction that also checks that some other live admin certificate remains (see
    /// [`revocation_refusal`]).
    pub fn revoke_credential(
        &self,
        name: &str,
        now_unix_ms: i64,
    ) -> Result<CredentialRevocation, StoreError> {
        let mut outcome = CredentialRevocation::Unknown;
        self.write(|txn| {
            let certificates = txn.open_table(CERTIFICATES)?;
            let mut revoked = txn.open_table(REVOKED)?;
            let mut all = Vec::new();
            for item in certificates.iter()? {
                let (key, value) = item?;
                let certificate: CertificateRecord = decode(key.value(), value.value())?;
                let is_revoked = revoked.get(key.value())?.is_some();
                all.push((certificate, is_revoked));
            }
            drop(certificates);
            if let Some(refusal) = revocation_refusal(&all, name, now_unix_ms) {
                outcome = refusal;
                return Ok(());
            }
            let mut done = Vec::new();
            for (certificate, is_revoked) in all {
                if certificate.name == name && certificate.role != "agent" && !is_revoked {
                    let record = RevokedRecord {
                        serial: certificate.serial.clone(),
                        name: name.to_string(),
                        revoked_unix_ms: now_unix_ms,
                        purge: false,
                    };
                    revoked.insert(certificate.serial.as_str(), encode(&record).as_slice())?;
                    done.push(certificate);
                }
            }
            outcome = CredentialRevocation::Revoked(done);
            Ok(())
        })?;
        Ok(outcome)
    }

    /// Revokes one certificate by serial (hex); `name` is kept for the record.
    pub fn revoke_certificate(&self, serial: &str, name: &str) -> Result<(), StoreError> {
        let record = RevokedRecord {
            serial: serial.to_string(),
            name: name.to_string(),
            revoked_unix_ms: fleet_proto::now_unix_ms(),
            purge: false,
        };
        self.write(|txn| {
            let mut table = txn.open_table(REVOKED)?;
            table.insert(serial, encode(&record).as_slice())?;
            Ok(())
        })
    }

    /// Revokes every agent certificate ever signed for host `name` (what `fleetctl remove`
    /// calls), and kills every join token it joined with, so not even a retried join brings it
    /// back: from the next call on, that host's agent is refused, and the name may join again
    /// only with a new token. With `purge`, the revocation tells the agent to wipe its data
    /// (also when its certificates were revoked before). Returns how many certificates were
    /// revoked.
    pub fn revoke_host(&self, name: &str, purge: bool) -> Result<usize, StoreError> {
        let now = fleet_proto::now_unix_ms();
        let mut n_revoked = 0;
        self.write(|txn| {
            let certs = txn.open_table(CERTIFICATES)?;
            let mut serials = Vec::new();
            for item in certs.iter()? {
                let (key, value) = item?;
                let record: CertificateRecord = decode(key.value(), value.value())?;
                if record.role == "agent" && record.name == name {
                    serials.push(record.serial);
                }
            }
            drop(certs);
            let mut revoked = txn.open_table(REVOKED)?;
            for serial in serials {
                let before: Option<RevokedRecord> = match revoked.get(serial.as_str())? {
                    Some(v) => Some(decode(&serial, v.value())?),
                    None => None,
                };
                let record = match before {
                    None => {
                        n_revoked += 1;
                        RevokedRecord {
                            serial: serial.clone(),
                            name: name.to_string(),
                            revoked_unix_ms: now,
                            purge,
                        }
                    }
                    Some(before) if purge && !before.purge => RevokedRecord { purge, ..before },
                    Some(_) => continue,
                };
                revoked.insert(serial.as_str(), encode(&record).as_slice())?;
            }
            let mut tokens = txn.open_table(JOIN_TOKENS)?;
            let mut dead = Vec::new();
            for item in tokens.iter()? {
                let (key, value) = item?;
                let mut token: JoinTokenRecord = decode("join token", value.value())?;
                if token.used_by_host.as_deref() == Some(name)
                    && token.host_removed_unix_ms.is_none()
                {
                    token.host_removed_unix_ms = Some(now);
                    dead.push((key.value().to_string(), token));
                }
            }
            for (key, token) in dead {
                tokens.insert(key.as_str(), encode(&token).as_slice())?;
            }
            Ok(())
        })?;
        Ok(n_revoked)
    }

    /// Writes every record, read in one read transaction, as a store dump (see the module
    /// doc). Writers go on meanwhile; the dump is the state of one moment.
    pub fn export(&self, to: impl std::io::Write) -> Result<ExportSummary, StoreError> {
        let mut to = std::io::BufWriter::new(to);
        let io = |e: std::io::Error| StoreError::Dump(format!("cannot write it: {e}"));
        let txn = self.db()?.begin_read().map_err(db_err)?;
        let mut summary = ExportSummary::default();
        let line = |to: &mut std::io::BufWriter<_>, record: DumpRecord| {
            serde_json::to_writer(&mut *to, &record).map_err(|e| io(e.into()))?;
            to.write_all(b"\n").map_err(io)
        };
        use std::io::Write;
        serde_json::to_writer(
            &mut to,
            &DumpHeader {
                fleet_store_dump: DUMP_VERSION,
            },
        )
        .map_err(|e| io(e.into()))?;
        to.write_all(b"\n").map_err(io)?;
        for definition in TEXT_TABLES {
            let table = txn.open_table(definition).map_err(db_err)?;
            for item in table.iter().map_err(db_err)? {
                let (key, value) = item.map_err(db_err)?;
                let value = std::str::from_utf8(value.value()).map_err(|e| {
                    StoreError::Dump(format!(
                        "record {} of {} is not text: {e}",
                        key.value(),
                        definition.name()
                    ))
                })?;
                if definition.name() == RELEASES.name() {
                    let release: ReleaseRecord = decode(key.value(), value.as_bytes())?;
                    summary.artifact_digests.insert(release.artifact_digest);
                }
                line(
                    &mut to,
                    DumpRecord {
                        table: definition.name().to_string(),
                        key: key.value().to_string(),
                        value: value.to_string(),
                    },
                )?;
                summary.records += 1;
            }
        }
        let events = txn.open_table(EVENTS).map_err(db_err)?;
        for item in events.iter().map_err(db_err)? {
            let (key, value) = item.map_err(db_err)?;
            let value = String::from_utf8(value.value().to_vec())
                .map_err(|e| StoreError::Dump(format!("event {} is not text: {e}", key.value())))?;
            line(
                &mut to,
                DumpRecord {
                    table: EVENTS.name().to_string(),
                    key: key.value().to_string(),
                    value,
                },
            )?;
            summary.records += 1;
        }
        let counters = txn.open_table(COUNTERS).map_err(db_err)?;
        for item in counters.iter().map_err(db_err)? {
            let (key, value) = item.map_err(db_err)?;
            line(
                &mut to,
                DumpRecord {
                    table: COUNTERS.name().to_string(),
                    key: key.value().to_string(),
                    value: value.value().to_string(),
                },
            )?;
            summary.records += 1;
        }
        let uses = txn.open_table(CREDENTIAL_USES).map_err(db_err)?;
        for item in uses.iter().map_err(db_err)? {
            let (key, value) = item.map_err(db_err)?;
            line(
                &mut to,
                DumpRecord {
                    table: CREDENTIAL_USES.name().to_string(),
                    key: key.value().to_string(),
                    value: value.value().to_string(),
                },
            )?;
            summary.records += 1;
        }
        to.flush().map_err(io)?;
        Ok(summary)
    }

    /// Makes a new store in `data_dir` from a store dump, in one transaction: either every
    /// record is in, or the store is not there. Refuses a data directory that has a store.
    pub fn import(data_dir: &Path, from: impl std::io::Read) -> Result<Store, StoreError> {
        use std::io::BufRead;
        let path = data_dir.join(STORE_FILE);
        if path.exists() {
            return Err(StoreError::Exists { path });
        }
        let dump = |message: String| StoreError::Dump(message);
        let mut lines = std::io::BufReader::new(from).lines();
        let header = lines
            .next()
            .ok_or_else(|| dump("it is empty".into()))?
            .map_err(|e| dump(e.to_string()))?;
        let header: DumpHeader = serde_json::from_str(&header)
            .map_err(|e| dump(format!("its first line is not a store dump header: {e}")))?;
        if header.fleet_store_dump > DUMP_VERSION {
            return Err(dump(format!(
                "it is of version {}, newer than this controller reads ({DUMP_VERSION}): import it with a newer fleet-controller",
                header.fleet_store_dump
            )));
        }
        let store = Store::open(data_dir)?;
        let imported = store.write(|txn| {
            for (n, line) in lines.enumerate() {
                let line = line.map_err(|e| dump(e.to_string()))?;
                let record: DumpRecord = serde_json::from_str(&line)
                    .map_err(|e| dump(format!("record {} is not a dump record: {e}", n + 1)))?;
                let bad_number =
                    |what: &str| dump(format!("record {} has a {what} that is not a number", n + 1));
                if let Some(definition) = TEXT_TABLES.iter().find(|t| t.name() == record.table) {
                    txn.open_table(*definition)?
                        .insert(record.key.as_str(), record.value.as_bytes())?;
                } else if record.table == EVENTS.name() {
                    let seq: u64 = record.key.parse().map_err(|_| bad_number("key"))?;
                    txn.open_table(EVENTS)?
                        .insert(seq, record.value.as_bytes())?;
                } else if record.table == COUNTERS.name() {
                    let value: u64 = record.value.parse().map_err(|_| bad_number("value"))?;
                    txn.open_table(COUNTERS)?
                        .insert(record.key.as_str(), value)?;
                } else if record.table == CREDENTIAL_USES.name() {
                    let value: i64 = record.value.parse().map_err(|_| bad_number("value"))?;
                    txn.open_table(CREDENTIAL_USES)?
                        .insert(record.key.as_str(), value)?;
                } else {
                    return Err(dump(format!(
                        "record {} is of table {:?}, which this controller does not know: import it with the fleet-controller that made it, or a newer one",
                        n + 1,
                        record.table
                    )));
                }
            }
            Ok(())
        });
        if let Err(e) = imported {
            drop(store);
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok(store)
    }

    /// Deletes the releases of `app` that [`crate::prune::plan`] lets go: all but the newest
    /// `keep`, never one a standing deployment, a host's desired state or a rollout under way
    /// (its release, or one it may roll back to) uses, nor one `running` names (host -> the
    /// version its agent reports running). Reading what uses them and deleting are one
    /// transaction, so no write in between can start using a release that goes.
    pub fn prune_releases(
        &self,
        app: &str,
        keep: usize,
        running: &BTreeMap<String, String>,
    ) -> Result<PruneOutcome, StoreError> {
        let mut outcome = None;
        self.write(|txn| {
            fn all_in<T: DeserializeOwned>(
                table: &impl ReadableTable<&'static str, &'static [u8]>,
            ) -> Result<Vec<T>, StoreError> {
                let mut out = Vec::new();
                for item in table.iter()? {
                    let (key, value) = item?;
                    out.push(decode(key.value(), value.value())?);
                }
                Ok(out)
            }
            let hosts: Vec<HostRecord> = all_in(&txn.open_table(HOSTS)?)?;
            let deployments: Vec<DeploymentRecord> = all_in(&txn.open_table(DEPLOYMENTS)?)?;
            let rollouts: Vec<RolloutRecord> = all_in(&txn.open_table(ROLLOUTS)?)?;
            let mut table = txn.open_table(RELEASES)?;
            let every_release: Vec<ReleaseRecord> = all_in(&table)?;
            let mut releases: Vec<ReleaseRecord> = every_release
                .iter()
                .filter(|r| r.app == app)
                .cloned()
                .collect();
            releases.sort_by_key(|r| r.created_unix_ms);
            let in_use = crate::prune::uses(app, &deployments, &hosts, &rollouts, running);
            let plan = crate::prune::plan(releases, keep, &in_use);
            for release in &plan.removed {
                table.remove(release_key(&release.app, &release.version).as_str())?;
            }
            let still_used: std::collections::BTreeSet<&str> = every_release
                .iter()
                .filter(|r| {
                    !plan
                        .removed
                        .iter()
                        .any(|gone| gone.app == r.app && gone.version == r.version)
                })
                .map(|r| r.artifact_digest.as_str())
                .collect();
            let mut orphaned_digests: Vec<String> = plan
                .removed
                .iter()
                .map(|r| r.artifact_digest.clone())
                .filter(|digest| !still_used.contains(digest.as_str()))
                .collect();
            orphaned_digests.sort();
            orphaned_digests.dedup();
            outcome = Some(PruneOutcome {
                plan,
                orphaned_digests,
            });
            Ok(())
        })?;
        Ok(outcome.expect("the write ran"))
    }

    fn write(
        &self,
        body: impl FnOnce(&redb::WriteTransaction) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let db = self.db()?;
        let result = (|| {
            let txn = db.begin_write().map_err(db_err)?;
            body(&txn)?;
            txn.commit().map_err(db_err)
        })();
        drop(db);
        self.reopen_after_io_error(&result);
        result
    }
}

/// The artifact digests the releases of a store dump refer to, read from the dump itself (for
/// a backup taken over the wire, where the summary of [`Store::export`] stays on the other side).
pub fn dump_artifact_digests(
    from: impl std::io::Read,
) -> Result<std::collections::BTreeSet<String>, StoreError> {
    use std::io::BufRead;
    let mut digests = std::collections::BTreeSet::new();
    for (n, line) in std::io::BufReader::new(from).lines().enumerate().skip(1) {
        let line = line.map_err(|e| StoreError::Dump(e.to_string()))?;
        let record: DumpRecord = serde_json::from_str(&line)
            .map_err(|e| StoreError::Dump(format!("record {n} is not a dump record: {e}")))?;
        if record.table == RELEASES.name() {
            let release: ReleaseRecord = decode(&record.key, record.value.as_bytes())?;
            digests.insert(release.artifact_digest);
        }
    }
    Ok(digests)
}

/// Why the credential `name` may not be revoked, given every certificate the controller knows
/// and whether each is revoked: no such credential, a host's name, all revoked already, or the
/// last live admin certificates (whose revocation would leave nobody to run `remove`,
/// `credentials create` or another revocation). `None`: revoke it. Pure.
pub fn revocation_refusal(
    all: &[(CertificateRecord, bool)],
    name: &str,
    now_unix_ms: i64,
) -> Option<CredentialRevocation> {
    let live = |(certificate, is_revoked): &(CertificateRecord, bool)| {
        !*is_revoked && certificate.not_after_unix_ms > now_unix_ms
    };
    let named: Vec<_> = all.iter().filter(|(c, _)| c.name == name).collect();
    let credentials: Vec<_> = named.iter().filter(|(c, _)| c.role != "agent").collect();
    if credentials.is_empty() {
        return Some(if named.is_empty() {
            CredentialRevocation::Unknown
        } else {
            CredentialRevocation::IsHost
        });
    }
    if credentials.iter().all(|(_, is_revoked)| *is_revoked) {
        return Some(CredentialRevocation::AlreadyRevoked);
    }
    let other_live_admins = all
        .iter()
        .filter(|entry| live(entry))
        .filter(|(c, _)| c.role == "admin" && c.name != name)
        .count();
    let revokes_a_live_admin = credentials
        .iter()
        .any(|entry| live(entry) && entry.0.role == "admin");
    if revokes_a_live_admin && other_live_admins == 0 {
        return Some(CredentialRevocation::LastAdmin);
    }
    None
}

/// How many events beyond `max_events` the log may hold before the oldest are trimmed: a
/// tenth, at least 1.
fn trim_batch(max_events: u64) -> u64 {
    (max_events / 10).max(1)
}

/// Whether a join token admits host `name` with the key `key_sha256` now: `Ok(false)` to
/// spend it, `Ok(true)` for the same join retried (same host, same key, still valid), or the
/// refusal: the host it joined was removed, it was spent by another host or key, it expired.
fn token_admission(
    record: &JoinTokenRecord,
    name: &str,
    key_sha256: &str,
    now_unix_ms: i64,
) -> Result<bool, TokenUse> {
    if record.host_removed_unix_ms.is_some() {
        return Err(TokenUse::HostRemoved {
            host: record.used_by_host.clone().unwrap_or_default(),
        });
    }
    let retry = record.used_by_host.as_deref() == Some(name)
        && record.used_with_key.as_deref() == Some(key_sha256)
        && now_unix_ms < record.expires_unix_ms;
    if record.used_unix_ms.is_some() && !retry {
        return Err(TokenUse::AlreadyUsed {
            by_host: record.used_by_host.clone().unwrap_or_default(),
        });
    }
    if now_unix_ms >= record.expires_unix_ms {
        return Err(TokenUse::Expired {
            expired_unix_ms: record.expires_unix_ms,
        });
    }
    Ok(retry)
}

/// The live (unexpired, unrevoked) agent certificate of host `name`, read in whatever
/// transaction the tables come from.
fn live_agent_certificate_in(
    certificates: &impl ReadableTable<&'static str, &'static [u8]>,
    revoked: &impl ReadableTable<&'static str, &'static [u8]>,
    name: &str,
    now_unix_ms: i64,
) -> Result<Option<CertificateRecord>, StoreError> {
    for item in certificates.iter()? {
        let (key, value) = item?;
        let record: CertificateRecord = decode(key.value(), value.value())?;
        if record.role == "agent"
            && record.name == name
            && record.not_after_unix_ms > now_unix_ms
            && revoked.get(record.serial.as_str())?.is_none()
        {
            return Ok(Some(record));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn release(version: &str, digest: &str) -> ReleaseRecord {
        ReleaseRecord {
            app: "web".into(),
            version: version.into(),
            artifact_digest: digest.into(),
            artifact_size: 1,
            env: BTreeMap::new(),
            created_unix_ms: 1,
            created_by: "test".into(),
            smoke_timeouts_ms: Vec::new(),
            has_release_hook: false,
            min_healthy_ms: 0,
            unpacked_size: 0,
            secrets: Default::default(),
            secrets_sha256: String::new(),
        }
    }

    fn event(n: u64) -> EventRecord {
        EventRecord {
            seq: 0,
            unix_ms: n as i64,
            actor: "test".into(),
            kind: "test".into(),
            app: String::new(),
            host: String::new(),
            message: format!("event {n}"),
        }
    }

    #[test]
    fn the_event_log_keeps_the_newest_max_events_trimmed_in_batches() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap().with_max_events(20);
        // Up to max_events plus a tenth, nothing goes.
        for n in 1..=22 {
            assert_eq!(store.append_event(event(n)).unwrap().seq, n);
        }
        assert_eq!(store.recent_events(1000).unwrap().len(), 22);
        // The next write trims to the newest 20, numbers unchanged.
        store.append_event(event(23)).unwrap();
        let events = store.recent_events(1000).unwrap();
        assert_eq!(events.len(), 20);
        assert_eq!(events.first().unwrap().seq, 4);
        assert_eq!(events.last().unwrap().message, "event 23");
        for n in 24..=100 {
            store.append_event(event(n)).unwrap();
        }
        let events = store.recent_events(1000).unwrap();
        assert!((20..=22).contains(&events.len()), "{}", events.len());
        assert_eq!(events.last().unwrap().seq, 100);
        // Numbering goes on after a reopen with the default retention.
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.append_event(event(101)).unwrap().seq, 101);
    }

    #[test]
    fn prune_deletes_old_unused_releases_and_names_the_artifacts_no_one_shares() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // 1.0 and 1.1 share an artifact (other config); 1.2 is desired on h1; 1.3 runs on h2.
        for (idx, (version, digest)) in [
            ("1.0", "sha256:a"),
            ("1.1", "sha256:a"),
            ("1.2", "sha256:b"),
            ("1.3", "sha256:c"),
            ("1.4", "sha256:d"),
            ("1.5", "sha256:e"),
        ]
        .into_iter()
        .enumerate()
        {
            let mut record = release(version, digest);
            record.created_unix_ms = idx as i64;
            store.insert_release(&record).unwrap();
        }
        let mut other_app = release("9.9", "sha256:d");
        other_app.app = "api".into();
        store.insert_release(&other_app).unwrap();
        let host = HostRecord {
            name: "h1".into(),
            labels: BTreeMap::new(),
            advertise_addr: "127.0.0.2".into(),
            registered_unix_ms: 0,
            last_seen_unix_ms: 0,
            desired: BTreeMap::from([(
                "web".to_string(),
                crate::model::Desired {
                    version: "1.2".into(),
                    rollout_id: "r1".into(),
                    generation: 1,
                    smoke_timeout_ms: 0,
                    run_release_hook: false,
                    min_healthy_ms: None,
                    deployment: None,
                },
            )]),
            drain: None,
            agent: Default::default(),
        };
        store.put_host(&host).unwrap();
        let running = BTreeMap::from([("h2".to_string(), "1.3".to_string())]);

        let outcome = store.prune_releases("web", 1, &running).unwrap();
        let removed: Vec<&str> = outcome
            .plan
            .removed
            .iter()
            .map(|r| r.version.as_str())
            .collect();
        assert_eq!(removed, ["1.0", "1.1", "1.4"]);
        let kept: Vec<String> = outcome
            .plan
            .kept
            .iter()
            .map(|(r, why)| format!("{}: {why}", r.version))
            .collect();
        assert_eq!(
            kept,
            [
                "1.2: in use: desired on h1",
                "1.3: in use: running on h2",
                "1.5: one of the newest 1"
            ]
        );
        // sha256:d is still the artifact of api@9.9.
        assert_eq!(outcome.orphaned_digests, ["sha256:a"]);
        let left: Vec<String> = store
            .list_releases("web")
            .unwrap()
            .into_iter()
            .map(|r| r.version)
            .collect();
        assert_eq!(left, ["1.2", "1.3", "1.5"]);
        assert_eq!(store.list_releases("api").unwrap().len(), 1);
    }

    #[test]
    fn a_dump_holds_every_table_the_store_has() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let txn = store.db().unwrap().begin_read().unwrap();
        let existing: std::collections::BTreeSet<String> = txn
            .list_tables()
            .unwrap()
            .map(|t| t.name().to_string())
            .collect();
        let dumped: std::collections::BTreeSet<String> = TEXT_TABLES
            .iter()
            .map(|t| t.name().to_string())
            .chain([EVENTS.name().to_string(), COUNTERS.name().to_string()])
            .chain([CREDENTIAL_USES.name().to_string()])
            .collect();
        assert_eq!(existing, dumped, "a table the backup would leave out");
    }

    #[test]
    fn releases_are_inserted_once_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(
                store.insert_release(&release("1.0", "a")).unwrap(),
                ReleaseInsert::Created
            );
            assert_eq!(
                store.insert_release(&release("1.0", "b")).unwrap(),
                ReleaseInsert::Exists(Box::new(release("1.0", "a")))
            );
            assert_eq!(store.next_seq("rollout").unwrap(), 1);
            assert_eq!(store.next_seq("rollout").unwrap(), 2);
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            store.list_releases("web").unwrap(),
            vec![release("1.0", "a")]
        );
        assert!(store.list_releases("we").unwrap().is_empty());
        assert_eq!(store.next_seq("rollout").unwrap(), 3);
    }

    #[test]
    fn join_tokens_are_spent_once_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let record = JoinTokenRecord {
            expires_unix_ms: 1000,
            created_by: "admin".into(),
            used_unix_ms: None,
            used_by_host: None,
            used_with_key: None,
            issued_certificate_pem: None,
            host_removed_unix_ms: None,
            labels: None,
        };
        store.insert_join_token("a", &record).unwrap();
        store.insert_join_token("b", &record).unwrap();
        store.insert_join_token("c", &record).unwrap();
        let certificate = |serial: &str, name: &str| CertificateRecord {
            serial: serial.into(),
            name: name.into(),
            role: "agent".into(),
            issued_unix_ms: 1,
            not_after_unix_ms: i64::MAX,
            issued_by: "join token".into(),
            labels: None,
        };
        assert_eq!(
            store
                .join_with_token("nope", &certificate("01", "h1"), "pem-01", "k1", 10)
                .unwrap(),
            TokenUse::Unknown
        );
        assert_eq!(
            store
                .join_with_token("a", &certificate("02", "h1"), "pem-02", "k1", 10)
                .unwrap(),
            TokenUse::Spent
        );
        assert_eq!(
            store
                .join_with_token("a", &certificate("03", "h2"), "pem-03", "k2", 20)
                .unwrap(),
            TokenUse::AlreadyUsed {
                by_host: "h1".into()
            }
        );
        assert_eq!(
            store
                .join_with_token("b", &certificate("04", "h2"), "pem-04", "k2", 1000)
                .unwrap(),
            TokenUse::Expired {
                expired_unix_ms: 1000
            }
        );
        // A second token for a host that joined already: refused, and the token stays unspent.
        assert_eq!(
            store
                .join_with_token("c", &certificate("05", "h1"), "pem-05", "k9", 10)
                .unwrap(),
            TokenUse::HostHasCertificate
        );
        assert_eq!(
            store
                .join_with_token("c", &certificate("06", "h3"), "pem-06", "k3", 10)
                .unwrap(),
            TokenUse::Spent
        );
        // The same host and key again with its spent token (its answer was lost): retried;
        // another key, or after the token expired: refused.
        assert_eq!(
            store
                .join_with_token("a", &certificate("07", "h1"), "pem-07", "k1", 20)
                .unwrap(),
            TokenUse::Retried {
                certificate_pem: "pem-02".into()
            },
            "a retry is answered with the certificate of the first answer"
        );
        assert_eq!(
            store
                .join_with_token("a", &certificate("08", "h1"), "pem-08", "k8", 20)
                .unwrap(),
            TokenUse::AlreadyUsed {
                by_host: "h1".into()
            }
        );
        assert_eq!(
            store
                .join_with_token("a", &certificate("09", "h1"), "pem-09", "k1", 1000)
                .unwrap(),
            TokenUse::AlreadyUsed {
                by_host: "h1".into()
            }
        );
        let serials: Vec<String> = store
            .list_certificates()
            .unwrap()
            .into_iter()
            .map(|c| c.serial)
            .collect();
        assert_eq!(
            serials,
            ["02", "06"],
            "only admitted joins record a certificate; a retry signs nothing new"
        );
    }

    #[test]
    fn a_token_spent_before_the_upgrade_does_not_bring_a_removed_host_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let agent = |serial: &str| CertificateRecord {
            serial: serial.into(),
            name: "web-1".into(),
            role: "agent".into(),
            issued_unix_ms: 1,
            not_after_unix_ms: i64::MAX,
            issued_by: "join token".into(),
            labels: None,
        };
        // As an older controller left it: spent by web-1 with key k, no certificate kept.
        let token = JoinTokenRecord {
            expires_unix_ms: 1000,
            created_by: "admin".into(),
            used_unix_ms: Some(1),
            used_by_host: Some("web-1".into()),
            used_with_key: Some("k".into()),
            issued_certificate_pem: None,
            host_removed_unix_ms: None,
            labels: None,
        };
        store.insert_join_token("old", &token).unwrap();
        store.record_certificate(&agent("01")).unwrap();
        // Nothing to tell without the write: the precheck leaves it to join_with_token.
        assert_eq!(store.join_precheck("old", "web-1", "k", 5).unwrap(), None);
        assert_eq!(
            store.join_precheck("nope", "web-1", "k", 5).unwrap(),
            Some(TokenUse::Unknown)
        );
        assert_eq!(
            store.join_precheck("old", "web-1", "other", 5).unwrap(),
            Some(TokenUse::AlreadyUsed {
                by_host: "web-1".into()
            })
        );
        // Its certificate revoked by serial (as before revoke_host marked tokens dead):
        store.revoke_certificate("01", "web-1").unwrap();
        assert_eq!(
            store
                .join_with_token("old", &agent("02"), "pem-02", "k", 5)
                .unwrap(),
            TokenUse::HostRemoved {
                host: "web-1".into()
            }
        );
    }

    #[test]
    fn revoking_a_host_revokes_its_agent_certificates_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for (serial, name, role) in [
            ("01", "web-1", "agent"),
            ("02", "web-1", "deployer"),
            ("03", "web-2", "agent"),
        ] {
            store
                .record_certificate(&CertificateRecord {
                    serial: serial.into(),
                    name: name.into(),
                    role: role.into(),
                    issued_unix_ms: 1,
                    not_after_unix_ms: i64::MAX,
                    issued_by: "test".into(),
                    labels: None,
                })
                .unwrap();
        }
        let token = JoinTokenRecord {
            expires_unix_ms: 1000,
            created_by: "admin".into(),
            used_unix_ms: None,
            used_by_host: None,
            used_with_key: None,
            issued_certificate_pem: None,
            host_removed_unix_ms: None,
            labels: None,
        };
        store.insert_join_token("t1", &token).unwrap();
        store.insert_join_token("t2", &token).unwrap();
        let rejoin = |serial: &str| CertificateRecord {
            serial: serial.into(),
            name: "web-1".into(),
            role: "agent".into(),
            issued_unix_ms: 5,
            not_after_unix_ms: i64::MAX,
            issued_by: "join token".into(),
            labels: None,
        };
        // web-1's live agent certificate keeps a token from taking the name over ...
        assert_eq!(
            store
                .join_with_token("t1", &rejoin("04"), "pem-04", "k", 5)
                .unwrap(),
            TokenUse::HostHasCertificate
        );
        assert_eq!(store.revoke_host("web-1", false).unwrap(), 1);
        assert_eq!(store.revoke_host("web-1", false).unwrap(), 0);
        assert!(store.is_revoked("01").unwrap());
        assert!(!store.is_revoked("02").unwrap());
        assert!(!store.is_revoked("03").unwrap());
        // ... until it is revoked: the deployer certificate does not count.
        assert_eq!(
            store
                .join_with_token("t2", &rejoin("05"), "pem-05", "k", 5)
                .unwrap(),
            TokenUse::Spent
        );
        // Removed again, web-1 cannot come back with that token, not even as a retry of the
        // same key (its answer "lost") while the token is still valid.
        store.revoke_host("web-1", false).unwrap();
        assert_eq!(
            store
                .join_with_token("t2", &rejoin("06"), "pem-06", "k", 6)
                .unwrap(),
            TokenUse::HostRemoved {
                host: "web-1".into()
            }
        );
    }

    #[test]
    fn events_are_numbered_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for n in 0..5 {
            let event = EventRecord {
                seq: 0,
                unix_ms: n,
                actor: "a".into(),
                kind: "k".into(),
                app: String::new(),
                host: String::new(),
                message: format!("m{n}"),
            };
            assert_eq!(store.append_event(event).unwrap().seq, n as u64 + 1);
        }
        let recent = store.recent_events(2).unwrap();
        assert_eq!(recent.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![4, 5]);
    }

    fn credential(
        serial: &str,
        name: &str,
        role: &str,
        not_after_unix_ms: i64,
    ) -> CertificateRecord {
        CertificateRecord {
            serial: serial.to_string(),
            name: name.to_string(),
            role: role.to_string(),
            issued_unix_ms: 1,
            not_after_unix_ms,
            issued_by: "admin".to_string(),
            labels: None,
        }
    }

    /// Which revocations are refused, and why.
    #[test]
    fn a_credential_may_be_revoked_unless_it_is_unknown_a_host_or_the_last_admin() {
        let now = 1_000;
        let live = 2_000;
        let expired = 500;
        let fleet = |certs: &[(&str, &str, &str, i64, bool)]| -> Vec<(CertificateRecord, bool)> {
            certs
                .iter()
                .map(|(serial, name, role, not_after, revoked)| {
                    (credential(serial, name, role, *not_after), *revoked)
                })
                .collect()
        };
        use CredentialRevocation::*;
        type Case = (
            &'static str,
            Vec<(CertificateRecord, bool)>,
            &'static str,
            Option<CredentialRevocation>,
        );
        let cases: Vec<Case> = vec![
            (
                "a deployer",
                fleet(&[
                    ("1", "admin", "admin", live, false),
                    ("2", "ci", "deployer", live, false),
                ]),
                "ci",
                None,
            ),
            (
                "one of two admins",
                fleet(&[
                    ("1", "admin", "admin", live, false),
                    ("2", "alice", "admin", live, false),
                ]),
                "admin",
                None,
            ),
            (
                "unknown",
                fleet(&[("1", "admin", "admin", live, false)]),
                "bob",
                Some(Unknown),
            ),
            (
                "a host",
                fleet(&[
                    ("1", "admin", "admin", live, false),
                    ("2", "web-1", "agent", live, false),
                ]),
                "web-1",
                Some(IsHost),
            ),
            (
                "revoked already",
                fleet(&[
                    ("1", "admin", "admin", live, false),
                    ("2", "ci", "deployer", live, true),
                ]),
                "ci",
                Some(AlreadyRevoked),
            ),
            (
                "the last admin",
                fleet(&[
                    ("1", "admin", "admin", live, false),
                    ("2", "ci", "deployer", live, false),
                ]),
                "admin",
                Some(LastAdmin),
            ),
            (
                "the other admin is revoked",
                fleet(&[
                    ("1", "admin", "admin", live, false),
                    ("2", "alice", "admin", live, true),
                ]),
                "admin",
                Some(LastAdmin),
            ),
            (
                "the other admin expired",
                fleet(&[
                    ("1", "admin", "admin", live, false),
                    ("2", "alice", "admin", expired, false),
                ]),
                "admin",
                Some(LastAdmin),
            ),
            (
                "two certificates of one name are one credential",
                fleet(&[
                    ("1", "admin", "admin", live, false),
                    ("2", "admin", "admin", live, false),
                ]),
                "admin",
                Some(LastAdmin),
            ),
            (
                "an expired admin may go",
                fleet(&[
                    ("1", "admin", "admin", live, false),
                    ("2", "old", "admin", expired, false),
                ]),
                "old",
                None,
            ),
        ];
        for (what, all, name, expect) in cases {
            assert_eq!(revocation_refusal(&all, name, now), expect, "{what}");
        }
    }

    #[test]
    fn credential_uses_are_recorded_and_unknown_credentials_learned() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let far = i64::MAX / 2;
        store
            .record_certificate(&credential("0a", "ci", "deployer", far))
            .unwrap();
        let seen = |serial: &str, name: &str, role: &str, at: i64| CredentialUse {
            serial: serial.to_string(),
            name: name.to_string(),
            role: role.to_string(),
            not_after_unix_ms: far,
            used_unix_ms: at,
        };
        let learned = store
            .record_credential_uses(&[
                seen("0a", "ci", "deployer", 10),
                seen("0b", "admin", "admin", 20),
            ])
            .unwrap();
        assert_eq!(learned.len(), 1);
        assert_eq!(
            (learned[0].name.as_str(), learned[0].issued_by.as_str()),
            ("admin", ISSUED_OUTSIDE)
        );
        // An older use never moves the time back; a known credential is not learned again.
        assert!(store
            .record_credential_uses(&[
                seen("0a", "ci", "deployer", 5),
                seen("0b", "admin", "admin", 30)
            ])
            .unwrap()
            .is_empty());
        let list = store.list_credentials().unwrap();
        let summary: Vec<_> = list
            .iter()
            .map(|c| {
                (
                    c.certificate.name.as_str(),
                    c.last_used_unix_ms,
                    c.revoked_unix_ms,
                )
            })
            .collect();
        assert_eq!(summary, [("admin", Some(30), None), ("ci", Some(10), None)]);

        assert_eq!(
            store.revoke_credential("admin", 40).unwrap(),
            CredentialRevocation::LastAdmin
        );
        match store.revoke_credential("ci", 40).unwrap() {
            CredentialRevocation::Revoked(done) => assert_eq!(done.len(), 1),
            other => panic!("{other:?}"),
        }
        assert!(store.is_revoked("0a").unwrap());
        assert_eq!(
            store.revoke_credential("ci", 41).unwrap(),
            CredentialRevocation::AlreadyRevoked
        );
        assert_eq!(
            store.list_credentials().unwrap()[1].revoked_unix_ms,
            Some(40)
        );
    }

    #[test]
    fn a_purge_is_remembered_with_the_revocation() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .record_certificate(&credential("01", "web-1", "agent", i64::MAX / 2))
            .unwrap();
        store.revoke_host("web-1", false).unwrap();
        assert!(!store.revocation("01").unwrap().unwrap().purge);
        // Removed again with --purge (the host was gone already): the agent is told to wipe.
        assert_eq!(store.revoke_host("web-1", true).unwrap(), 0);
        assert!(store.revocation("01").unwrap().unwrap().purge);
        assert_eq!(store.revocation("02").unwrap(), None);
    }
}
