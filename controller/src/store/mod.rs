//! The store: hosts, releases, rollouts, deployments, convergences, certificates and the event
//! log, as records. This module is the one narrow interface to state that the rest of the
//! controller calls ([`Store`]); each record-level method is written once, over a backend
//! transaction (`backend.rs`): the embedded redb file (`redb.rs`, the default) or an etcd
//! cluster (`etcd.rs`). A read-modify-write method is one transaction in either backend.
//! Records are stored as JSON so they stay readable with any tool and survive added fields.
//!
//! ## Export and import (backup and restore)
//!
//! [`Store::export`] writes every record of every table, read in one read transaction (a
//! consistent snapshot, taken while writers go on), as a *store dump*: JSON lines, backend
//! neutral, so a dump of one backend can be imported into the other (`fleet-controller
//! migrate` does this). The first line is the header `{"fleet_store_dump":1}`; each further
//! line is one record, `{"table":"hosts","key":"web-1","value":"<the record's JSON, as
//! stored>"}`. Keys of the `events` table and values of the `counters` and `credential_uses`
//! tables (numbers) are written in decimal. [`Store::import`] makes a new store from a dump and
//! refuses a store that holds records already, a table it does not know and a newer dump.

pub mod backend;
pub mod etcd;
pub mod redb;

use crate::model::{
    ConvergenceRecord, DeploymentRecord, EventRecord, HostRecord, ReleaseRecord, RolloutRecord,
};
use backend::{event_key, Backend, Range, Table, Txn};
use serde::{de::DeserializeOwned, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use thiserror::Error;

pub use self::redb::STORE_FILE;

/// The version of the store dump [`Store::export`] writes; [`Store::import`] reads it and
/// every older one.
pub const DUMP_VERSION: u32 = 1;

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
    #[error("{0} holds records already: import fills only an empty store")]
    NotEmpty(String),
    #[error("store: {0}")]
    Db(Box<::redb::Error>),
    #[error("{0}")]
    Etcd(String),
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
    ::redb::Error,
    ::redb::DatabaseError,
    ::redb::TransactionError,
    ::redb::TableError,
    ::redb::StorageError,
    ::redb::CommitError
);

/// What `insert_release` found.
#[derive(Debug, PartialEq)]
pub enum ReleaseInsert {
    Created,
    /// The same version already exists; the caller compares it with what it tried to create.
    Exists(Box<ReleaseRecord>),
}

/// A handle on the store; clones share one backend. Calls block (on the disk, or on etcd),
/// so a write is handed to the blocking pool (see `FleetState`), never run on a runtime worker.
#[derive(Clone)]
pub struct Store {
    backend: Arc<dyn Backend>,
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

/// A record of `table`, decoded.
fn get_in<T: DeserializeOwned>(
    txn: &mut dyn Txn,
    table: Table,
    key: &str,
) -> Result<Option<T>, StoreError> {
    match txn.get(table, key)? {
        Some(bytes) => Ok(Some(decode(key, &bytes)?)),
        None => Ok(None),
    }
}

/// Every record of `table`, decoded, in key order.
fn all_in<T: DeserializeOwned>(txn: &mut dyn Txn, table: Table) -> Result<Vec<T>, StoreError> {
    txn.range(table, &Range::all())?
        .into_iter()
        .map(|(key, bytes)| decode(&key, &bytes))
        .collect()
}

/// The next number of a named counter, in `txn`.
fn next_seq_in(txn: &mut dyn Txn, counter: &str) -> Result<u64, StoreError> {
    let current: u64 = match txn.get(Table::Counters, counter)? {
        Some(bytes) => number(Table::Counters, counter, &bytes)?,
        None => 0,
    };
    let next = current + 1;
    txn.put(Table::Counters, counter, next.to_string().as_bytes())?;
    Ok(next)
}

/// Appends `event` in `txn`, numbered after the last one, trimming the log as
/// [`Store::append_event`] says; returns it numbered.
fn append_event_in(
    txn: &mut dyn Txn,
    event: &EventRecord,
    max_events: u64,
) -> Result<EventRecord, StoreError> {
    let seq_of = |found: Vec<(String, Vec<u8>)>| -> Result<Option<u64>, StoreError> {
        found
            .first()
            .map(|(key, _)| number(Table::Events, key, key.as_bytes()))
            .transpose()
    };
    let last = seq_of(txn.range(Table::Events, &Range::last())?)?.unwrap_or(0);
    let mut event = event.clone();
    event.seq = last + 1;
    let first = seq_of(txn.range(Table::Events, &Range::first())?)?.unwrap_or(event.seq);
    put_in(txn, Table::Events, &event_key(event.seq), &event)?;
    // Numbers are consecutive, so the first and the last say how many there are.
    let n_events = event.seq - first + 1;
    if n_events > max_events + trim_batch(max_events) {
        let keep_from = event.seq - max_events + 1;
        txn.delete_below(Table::Events, &event_key(keep_from))?;
    }
    Ok(event)
}

fn put_in<T: Serialize>(
    txn: &mut dyn Txn,
    table: Table,
    key: &str,
    value: &T,
) -> Result<(), StoreError> {
    txn.put(table, key, &encode(value))
}

/// A number kept as decimal text (`counters`, `credential_uses`, event keys).
fn number<T: std::str::FromStr>(table: Table, key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| StoreError::Dump(format!("{} {key} is not a number", table.name())))
}

impl Store {
    /// Opens (or creates) the redb store in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        Ok(Store::over(Arc::new(self::redb::RedbBackend::open(
            data_dir,
        )?)))
    }

    /// The store a controller.toml names: in etcd when it has `[etcd]` (its marker checked
    /// against the fleet CA in `ca_path`), else the redb file in `data_dir`. Blocks (on etcd):
    /// call it outside the runtime's workers.
    /// Also returns the etcd backend, for what a controller on etcd does with it beside the
    /// store (its election, its registration).
    pub fn open_configured(
        data_dir: &Path,
        etcd: Option<&etcd::EtcdConfig>,
        ca_path: &Path,
    ) -> Result<(Store, Option<Arc<etcd::EtcdBackend>>), StoreError> {
        let Some(etcd) = etcd else {
            return Ok((Store::open(data_dir)?, None));
        };
        let ca = std::fs::read_to_string(ca_path).map_err(|e| {
            StoreError::Etcd(format!(
                "cannot read the fleet CA {} (its fingerprint marks the fleet's etcd prefix): {e}",
                ca_path.display()
            ))
        })?;
        let backend = Arc::new(etcd::EtcdBackend::open(etcd, &etcd::ca_fingerprint(&ca))?);
        Ok((Store::over(backend.clone()), Some(backend)))
    }

    /// The store over `backend`.
    pub fn over(backend: Arc<dyn Backend>) -> Store {
        Store {
            backend,
            max_events: DEFAULT_MAX_EVENTS,
        }
    }

    /// What the store is, for messages ("the redb file …", "etcd at … prefix …").
    pub fn describe(&self) -> String {
        self.backend.describe()
    }

    /// The same store, keeping at least `max_events` events (at least 1).
    pub fn with_max_events(mut self, max_events: u64) -> Store {
        self.max_events = max_events.max(1);
        self
    }

    /// Runs `body` in a read transaction and returns what it computed.
    fn read<T>(
        &self,
        mut body: impl FnMut(&mut dyn Txn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut out = None;
        self.backend.read(&mut |txn| {
            out = Some(body(txn)?);
            Ok(())
        })?;
        Ok(out.expect("the read ran"))
    }

    /// Runs `body` in a write transaction, commits it, and returns what the run that
    /// committed computed (an optimistic backend may run `body` more than once).
    fn write<T>(
        &self,
        mut body: impl FnMut(&mut dyn Txn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut out = None;
        self.backend.write(&mut |txn| {
            out = Some(body(txn)?);
            Ok(())
        })?;
        Ok(out.expect("the write ran"))
    }

    fn get<T: DeserializeOwned>(&self, table: Table, key: &str) -> Result<Option<T>, StoreError> {
        self.read(|txn| get_in(txn, table, key))
    }

    fn all<T: DeserializeOwned>(&self, table: Table) -> Result<Vec<T>, StoreError> {
        self.read(|txn| all_in(txn, table))
    }

    pub fn get_host(&self, name: &str) -> Result<Option<HostRecord>, StoreError> {
        self.get(Table::Hosts, name)
    }

    /// Every host, ordered by name.
    pub fn list_hosts(&self) -> Result<Vec<HostRecord>, StoreError> {
        self.all(Table::Hosts)
    }

    pub fn put_host(&self, host: &HostRecord) -> Result<(), StoreError> {
        self.write(|txn| put_in(txn, Table::Hosts, &host.name, host))
    }

    /// Forgets a host.
    pub fn delete_host(&self, name: &str) -> Result<(), StoreError> {
        self.write(|txn| txn.delete(Table::Hosts, name))
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
            for host in hosts {
                put_in(txn, Table::Hosts, &host.name, host)?;
            }
            if let Some(rollout) = rollout {
                put_in(txn, Table::Rollouts, &rollout.id, rollout)?;
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
            for host in hosts {
                put_in(txn, Table::Hosts, &host.name, host)?;
            }
            for convergence in convergences {
                put_in(txn, Table::Convergences, &convergence.key(), convergence)?;
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
            .all::<ConvergenceRecord>(Table::Convergences)?
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
        self.get(Table::Releases, &release_key(app, version))
    }

    /// The releases of one app, oldest first.
    pub fn list_releases(&self, app: &str) -> Result<Vec<ReleaseRecord>, StoreError> {
        let prefix = format!("{app}/");
        let mut releases: Vec<ReleaseRecord> = self
            .all::<ReleaseRecord>(Table::Releases)?
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
        self.write(|txn| {
            Ok(match get_in::<ReleaseRecord>(txn, Table::Releases, &key)? {
                Some(existing) => ReleaseInsert::Exists(Box::new(existing)),
                None => {
                    put_in(txn, Table::Releases, &key, release)?;
                    ReleaseInsert::Created
                }
            })
        })
    }

    pub fn get_rollout(&self, id: &str) -> Result<Option<RolloutRecord>, StoreError> {
        self.get(Table::Rollouts, id)
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
            put_in(txn, Table::Rollouts, &rollout.id, rollout)?;
            if let Some(deployment) = deployment {
                let key = DeploymentRecord::key(&deployment.app, &deployment.selector);
                put_in(txn, Table::Deployments, &key, deployment)?;
            }
            Ok(())
        })
    }

    /// The standing deployments (of one app, when given), the most recently updated first.
    pub fn list_deployments(&self, app: Option<&str>) -> Result<Vec<DeploymentRecord>, StoreError> {
        let mut deployments: Vec<DeploymentRecord> = self
            .all(Table::Deployments)?
            .into_iter()
            .filter(|d: &DeploymentRecord| app.is_none_or(|app| d.app == app))
            .collect();
        deployments.sort_by_key(|d| std::cmp::Reverse((d.seq, d.updated_unix_ms)));
        Ok(deployments)
    }

    /// Every rollout (of one app, when given), newest first.
    pub fn list_rollouts(&self, app: Option<&str>) -> Result<Vec<RolloutRecord>, StoreError> {
        let mut rollouts: Vec<RolloutRecord> = self
            .all::<RolloutRecord>(Table::Rollouts)?
            .into_iter()
            .filter(|r| app.is_none_or(|app| r.app == app))
            .collect();
        rollouts.sort_by_key(|r| std::cmp::Reverse(r.seq));
        Ok(rollouts)
    }

    /// The next number of a named counter, starting at 1; durable once returned.
    pub fn next_seq(&self, counter: &str) -> Result<u64, StoreError> {
        self.write(|txn| next_seq_in(txn, counter))
    }

    /// Appends an event, numbering it; returns it with its number. Once the log holds a tenth
    /// more than `max_events`, the oldest are deleted in the same transaction down to
    /// `max_events`, so the cost of trimming is spread over many writes.
    pub fn append_event(&self, event: EventRecord) -> Result<EventRecord, StoreError> {
        let max_events = self.max_events;
        self.write(|txn| append_event_in(txn, &event, max_events))
    }

    /// Starts a rollout in one transaction: the next number of the `rollout` counter, the
    /// record `make` builds with it and the event `started` says about that record. Returns
    /// both (the event numbered). Either all three are written or none.
    pub fn begin_rollout(
        &self,
        make: impl Fn(u64) -> RolloutRecord,
        started: impl Fn(&RolloutRecord) -> EventRecord,
    ) -> Result<(RolloutRecord, EventRecord), StoreError> {
        let max_events = self.max_events;
        self.write(|txn| {
            let seq = next_seq_in(txn, "rollout")?;
            let record = make(seq);
            put_in(txn, Table::Rollouts, &record.id, &record)?;
            let event = append_event_in(txn, &started(&record), max_events)?;
            Ok((record, event))
        })
    }

    /// Ends a rollout in one transaction: its record, the deployment it leaves when it
    /// completed, and the event that says so. Returns the event, numbered.
    pub fn end_rollout(
        &self,
        rollout: &RolloutRecord,
        deployment: Option<&DeploymentRecord>,
        ended: &EventRecord,
    ) -> Result<EventRecord, StoreError> {
        let max_events = self.max_events;
        self.write(|txn| {
            put_in(txn, Table::Rollouts, &rollout.id, rollout)?;
            if let Some(deployment) = deployment {
                let key = DeploymentRecord::key(&deployment.app, &deployment.selector);
                put_in(txn, Table::Deployments, &key, deployment)?;
            }
            append_event_in(txn, ended, max_events)
        })
    }

    /// The newest `limit` events, oldest first.
    pub fn recent_events(&self, limit: usize) -> Result<Vec<EventRecord>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let range = Range {
            limit,
            reverse: true,
            ..Range::default()
        };
        let mut out: Vec<EventRecord> = self.read(|txn| {
            txn.range(Table::Events, &range)?
                .into_iter()
                .map(|(key, bytes)| decode(&key, &bytes))
                .collect()
        })?;
        out.reverse();
        Ok(out)
    }

    /// Stores a new join token by its hash.
    pub fn insert_join_token(
        &self,
        token_hash: &str,
        record: &JoinTokenRecord,
    ) -> Result<(), StoreError> {
        self.write(|txn| put_in(txn, Table::JoinTokens, token_hash, record))
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
        self.write(|txn| {
            let Some(mut record) = get_in::<JoinTokenRecord>(txn, Table::JoinTokens, token_hash)?
            else {
                return Ok(TokenUse::Unknown);
            };
            let retry = match token_admission(&record, &certificate.name, key_sha256, now_unix_ms) {
                Err(refusal) => return Ok(refusal),
                Ok(retry) => retry,
            };
            if retry {
                if let Some(issued) = &record.issued_certificate_pem {
                    return Ok(TokenUse::Retried {
                        certificate_pem: issued.clone(),
                    });
                }
            }
            let live = live_agent_certificate_in(txn, &certificate.name, now_unix_ms)?;
            if retry && live.is_none() {
                // A token spent before removed hosts' tokens were marked dead: the host's every
                // certificate is revoked, so it was removed.
                return Ok(TokenUse::HostRemoved {
                    host: certificate.name.clone(),
                });
            }
            if !retry {
                if live.is_some() {
                    return Ok(TokenUse::HostHasCertificate);
                }
                record.used_unix_ms = Some(now_unix_ms);
                record.used_by_host = Some(certificate.name.clone());
                record.used_with_key = Some(key_sha256.to_string());
            }
            // A token spent before certificates were kept with it keeps the one it gets now.
            record.issued_certificate_pem = Some(certificate_pem.to_string());
            put_in(txn, Table::JoinTokens, token_hash, &record)?;
            let certificate = CertificateRecord {
                labels: record.labels.clone(),
                ..certificate.clone()
            };
            put_in(txn, Table::Certificates, &certificate.serial, &certificate)?;
            Ok(if retry {
                TokenUse::Retried {
                    certificate_pem: certificate_pem.to_string(),
                }
            } else {
                TokenUse::Spent
            })
        })
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
        let Some(record) = self.get::<JoinTokenRecord>(Table::JoinTokens, token_hash)? else {
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
        self.write(|txn| put_in(txn, Table::Certificates, &record.serial, record))
    }

    /// The certificate the controller signed with `serial` (hex).
    pub fn get_certificate(&self, serial: &str) -> Result<Option<CertificateRecord>, StoreError> {
        self.get(Table::Certificates, serial)
    }

    /// Every certificate the controller signed.
    pub fn list_certificates(&self) -> Result<Vec<CertificateRecord>, StoreError> {
        self.all(Table::Certificates)
    }

    /// Whether a certificate serial (hex) is revoked. Called by auth on every call.
    pub fn is_revoked(&self, serial: &str) -> Result<bool, StoreError> {
        self.read(|txn| Ok(txn.get(Table::Revoked, serial)?.is_some()))
    }

    /// The revocation of a certificate serial (hex), if it was revoked.
    pub fn revocation(&self, serial: &str) -> Result<Option<RevokedRecord>, StoreError> {
        self.get(Table::Revoked, serial)
    }

    /// Records when operator and CI credentials were used, in ONE transaction (called in
    /// batches, never per call). A credential the controller did not sign (the admin of
    /// `fleetctl init`, one from `fleet-controller issue-admin`) is recorded at its first use;
    /// those are returned, for an event.
    pub fn record_credential_uses(
        &self,
        uses: &[CredentialUse],
    ) -> Result<Vec<CertificateRecord>, StoreError> {
        self.write(|txn| {
            let mut learned = Vec::new();
            for seen in uses {
                if txn.get(Table::Certificates, &seen.serial)?.is_none() {
                    let record = CertificateRecord {
                        serial: seen.serial.clone(),
                        name: seen.name.clone(),
                        role: seen.role.clone(),
                        issued_unix_ms: seen.used_unix_ms,
                        not_after_unix_ms: seen.not_after_unix_ms,
                        issued_by: ISSUED_OUTSIDE.to_string(),
                        labels: None,
                    };
                    put_in(txn, Table::Certificates, &record.serial, &record)?;
                    learned.push(record);
                }
                let before: Option<i64> = match txn.get(Table::CredentialUses, &seen.serial)? {
                    Some(bytes) => Some(number(Table::CredentialUses, &seen.serial, &bytes)?),
                    None => None,
                };
                if before.is_none_or(|before| before < seen.used_unix_ms) {
                    txn.put(
                        Table::CredentialUses,
                        &seen.serial,
                        seen.used_unix_ms.to_string().as_bytes(),
                    )?;
                }
            }
            Ok(learned)
        })
    }

    /// Every operator and CI credential (certificates of role admin or deployer), with when
    /// it was last used and revoked, ordered by name and issue time.
    pub fn list_credentials(&self) -> Result<Vec<CredentialView>, StoreError> {
        let mut out = self.read(|txn| {
            let revoked: BTreeMap<String, RevokedRecord> = txn
                .range(Table::Revoked, &Range::all())?
                .into_iter()
                .map(|(key, bytes)| Ok((key.clone(), decode(&key, &bytes)?)))
                .collect::<Result<_, StoreError>>()?;
            let last_used: BTreeMap<String, i64> = txn
                .range(Table::CredentialUses, &Range::all())?
                .into_iter()
                .map(|(key, bytes)| Ok((key.clone(), number(Table::CredentialUses, &key, &bytes)?)))
                .collect::<Result<_, StoreError>>()?;
            let mut out = Vec::new();
            for certificate in all_in::<CertificateRecord>(txn, Table::Certificates)? {
                if certificate.role == "agent" {
                    continue;
                }
                out.push(CredentialView {
                    revoked_unix_ms: revoked.get(&certificate.serial).map(|r| r.revoked_unix_ms),
                    last_used_unix_ms: last_used.get(&certificate.serial).copied(),
                    certificate,
                });
            }
            Ok(out)
        })?;
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
        self.write(|txn| {
            let revoked: std::collections::BTreeSet<String> = txn
                .range(Table::Revoked, &Range::all())?
                .into_iter()
                .map(|(key, _)| key)
                .collect();
            let all: Vec<(CertificateRecord, bool)> =
                all_in::<CertificateRecord>(txn, Table::Certificates)?
                    .into_iter()
                    .map(|c| {
                        let is_revoked = revoked.contains(&c.serial);
                        (c, is_revoked)
                    })
                    .collect();
            if let Some(refusal) = revocation_refusal(&all, name, now_unix_ms) {
                return Ok(refusal);
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
                    put_in(txn, Table::Revoked, &certificate.serial, &record)?;
                    done.push(certificate);
                }
            }
            Ok(CredentialRevocation::Revoked(done))
        })
    }

    /// Revokes one certificate by serial (hex); `name` is kept for the record.
    pub fn revoke_certificate(&self, serial: &str, name: &str) -> Result<(), StoreError> {
        let record = RevokedRecord {
            serial: serial.to_string(),
            name: name.to_string(),
            revoked_unix_ms: fleet_proto::now_unix_ms(),
            purge: false,
        };
        self.write(|txn| put_in(txn, Table::Revoked, serial, &record))
    }

    /// Revokes every agent certificate ever signed for host `name` (what `fleetctl remove`
    /// calls), and kills every join token it joined with, so not even a retried join brings it
    /// back: from the next call on, that host's agent is refused, and the name may join again
    /// only with a new token. With `purge`, the revocation tells the agent to wipe its data
    /// (also when its certificates were revoked before). Returns how many certificates were
    /// revoked.
    pub fn revoke_host(&self, name: &str, purge: bool) -> Result<usize, StoreError> {
        let now = fleet_proto::now_unix_ms();
        self.write(|txn| {
            let mut n_revoked = 0;
            let serials: Vec<String> = all_in::<CertificateRecord>(txn, Table::Certificates)?
                .into_iter()
                .filter(|record| record.role == "agent" && record.name == name)
                .map(|record| record.serial)
                .collect();
            for serial in serials {
                let before: Option<RevokedRecord> = get_in(txn, Table::Revoked, &serial)?;
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
                put_in(txn, Table::Revoked, &serial, &record)?;
            }
            for (key, bytes) in txn.range(Table::JoinTokens, &Range::all())? {
                let mut token: JoinTokenRecord = decode("join token", &bytes)?;
                if token.used_by_host.as_deref() == Some(name)
                    && token.host_removed_unix_ms.is_none()
                {
                    token.host_removed_unix_ms = Some(now);
                    put_in(txn, Table::JoinTokens, &key, &token)?;
                }
            }
            Ok(n_revoked)
        })
    }

    /// Writes every record, read in one read transaction, as a store dump (see the module
    /// doc). Writers go on meanwhile; the dump is the state of one moment.
    pub fn export(&self, to: impl std::io::Write) -> Result<ExportSummary, StoreError> {
        use std::io::Write;
        let mut to = std::io::BufWriter::new(to);
        let io = |e: std::io::Error| StoreError::Dump(format!("cannot write it: {e}"));
        let line = |to: &mut std::io::BufWriter<_>, record: &DumpRecord| {
            serde_json::to_writer(&mut *to, record).map_err(|e| io(e.into()))?;
            to.write_all(b"\n").map_err(io)
        };
        serde_json::to_writer(
            &mut to,
            &DumpHeader {
                fleet_store_dump: DUMP_VERSION,
            },
        )
        .map_err(|e| io(e.into()))?;
        to.write_all(b"\n").map_err(io)?;
        let mut summary = ExportSummary::default();
        self.backend.read(&mut |txn| {
            summary = ExportSummary::default();
            for table in Table::ALL {
                for (key, bytes) in txn.range(table, &Range::all())? {
                    let value = String::from_utf8(bytes).map_err(|e| {
                        StoreError::Dump(format!(
                            "record {key} of {} is not text: {e}",
                            table.name()
                        ))
                    })?;
                    if table == Table::Releases {
                        let release: ReleaseRecord = decode(&key, value.as_bytes())?;
                        summary.artifact_digests.insert(release.artifact_digest);
                    }
                    let key = match table {
                        // In decimal, as a dump has always had them.
                        Table::Events => number::<u64>(table, &key, key.as_bytes())?.to_string(),
                        _ => key,
                    };
                    line(
                        &mut to,
                        &DumpRecord {
                            table: table.name().to_string(),
                            key,
                            value,
                        },
                    )?;
                    summary.records += 1;
                }
            }
            Ok(())
        })?;
        to.flush().map_err(io)?;
        Ok(summary)
    }

    /// Makes a new redb store in `data_dir` from a store dump, in one transaction: either
    /// every record is in, or the store is not there. Refuses a data directory that has a
    /// store.
    pub fn import(data_dir: &Path, from: impl std::io::Read) -> Result<Store, StoreError> {
        let path = data_dir.join(STORE_FILE);
        if path.exists() {
            return Err(StoreError::Exists { path });
        }
        let records = read_dump(from)?;
        let store = Store::open(data_dir)?;
        let imported = store.write(|txn| {
            for (table, key, value) in &records {
                txn.put(*table, key, value.as_bytes())?;
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

    /// Whether the store holds no record at all.
    pub fn is_empty(&self) -> Result<bool, StoreError> {
        self.read(|txn| {
            for table in Table::ALL {
                if !txn.range(table, &Range::first())?.is_empty() {
                    return Ok(false);
                }
            }
            Ok(true)
        })
    }

    /// Fills this store, which must be empty, from a store dump, in transactions of at most
    /// `batch` records (etcd limits the operations of one transaction). Returns how many
    /// records it wrote.
    pub fn import_into(&self, from: impl std::io::Read, batch: usize) -> Result<u64, StoreError> {
        if !self.is_empty()? {
            return Err(StoreError::NotEmpty(self.describe()));
        }
        let records = read_dump(from)?;
        for chunk in records.chunks(batch.max(1)) {
            self.write(|txn| {
                for (table, key, value) in chunk {
                    txn.put(*table, key, value.as_bytes())?;
                }
                Ok(())
            })?;
        }
        Ok(records.len() as u64)
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
        self.write(|txn| {
            let hosts: Vec<HostRecord> = all_in(txn, Table::Hosts)?;
            let deployments: Vec<DeploymentRecord> = all_in(txn, Table::Deployments)?;
            let rollouts: Vec<RolloutRecord> = all_in(txn, Table::Rollouts)?;
            let every_release: Vec<ReleaseRecord> = all_in(txn, Table::Releases)?;
            let mut releases: Vec<ReleaseRecord> = every_release
                .iter()
                .filter(|r| r.app == app)
                .cloned()
                .collect();
            releases.sort_by_key(|r| r.created_unix_ms);
            let in_use = crate::prune::uses(app, &deployments, &hosts, &rollouts, running);
            let plan = crate::prune::plan(releases, keep, &in_use);
            for release in &plan.removed {
                txn.delete(
                    Table::Releases,
                    &release_key(&release.app, &release.version),
                )?;
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
            Ok(PruneOutcome {
                plan,
                orphaned_digests,
            })
        })
    }
}

/// The records of a store dump, checked: each one's table, and its number where the table
/// holds numbers. Event keys come back as the backend's keys ([`event_key`]).
fn read_dump(from: impl std::io::Read) -> Result<Vec<(Table, String, String)>, StoreError> {
    use std::io::BufRead;
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
    let mut records = Vec::new();
    for (n, line) in lines.enumerate() {
        let line = line.map_err(|e| dump(e.to_string()))?;
        let record: DumpRecord = serde_json::from_str(&line)
            .map_err(|e| dump(format!("record {} is not a dump record: {e}", n + 1)))?;
        let bad_number = |what: &str| {
            dump(format!(
                "record {} has a {what} that is not a number",
                n + 1
            ))
        };
        let Some(table) = Table::from_name(&record.table) else {
            return Err(dump(format!(
                "record {} is of table {:?}, which this controller does not know: import it with the fleet-controller that made it, or a newer one",
                n + 1,
                record.table
            )));
        };
        let key = match table {
            Table::Events => event_key(record.key.parse().map_err(|_| bad_number("key"))?),
            _ => record.key,
        };
        let is_number = match table {
            Table::Counters => record.value.parse::<u64>().is_ok(),
            Table::CredentialUses => record.value.parse::<i64>().is_ok(),
            _ => true,
        };
        if !is_number {
            return Err(bad_number("value"));
        }
        records.push((table, key, record.value));
    }
    Ok(records)
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
        if record.table == Table::Releases.name() {
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

/// The live (unexpired, unrevoked) agent certificate of host `name`, read in `txn`.
fn live_agent_certificate_in(
    txn: &mut dyn Txn,
    name: &str,
    now_unix_ms: i64,
) -> Result<Option<CertificateRecord>, StoreError> {
    for record in all_in::<CertificateRecord>(txn, Table::Certificates)? {
        if record.role == "agent"
            && record.name == name
            && record.not_after_unix_ms > now_unix_ms
            && txn.get(Table::Revoked, &record.serial)?.is_none()
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

    /// Where a test's store lives: a data directory (redb), or a prefix of a real etcd.
    struct Place {
        name: &'static str,
        dir: tempfile::TempDir,
        etcd: Option<super::etcd::EtcdConfig>,
    }

    impl Place {
        /// The store there, opened again each time (as a restarted controller would).
        fn open(&self) -> Store {
            match &self.etcd {
                None => Store::open(self.dir.path()).unwrap(),
                Some(config) => Store::over(std::sync::Arc::new(
                    super::etcd::EtcdBackend::open(config, "test-fleet").unwrap(),
                )),
            }
        }
    }

    /// Runs `test` on redb, then on a real etcd (its own one-member server, killed at the
    /// end), unless etcd is not installed and not required.
    fn on_every_backend(test: impl Fn(&Place)) {
        let redb = Place {
            name: "redb",
            dir: tempfile::tempdir().unwrap(),
            etcd: None,
        };
        test(&redb);
        let Some(server) = fleet_etcd_harness::Etcd::single() else {
            return;
        };
        let etcd = Place {
            name: "etcd",
            dir: tempfile::tempdir().unwrap(),
            etcd: Some(super::etcd::EtcdConfig {
                endpoints: server.urls(),
                prefix: "/fleet-test".into(),
                ca: None,
                cert: None,
                key: None,
            }),
        };
        eprintln!("on {}", etcd.name);
        test(&etcd);
        drop(server);
    }

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
        on_every_backend(|place| {
            let store = place.open().with_max_events(20);
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
            let store = place.open();
            assert_eq!(store.append_event(event(101)).unwrap().seq, 101);
        });
    }

    #[test]
    fn prune_deletes_old_unused_releases_and_names_the_artifacts_no_one_shares() {
        on_every_backend(|place| {
            let store = place.open();
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
        });
    }

    #[test]
    fn a_dump_holds_every_table_the_store_has() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        drop(store);
        let existing: std::collections::BTreeSet<String> =
            self::redb::RedbBackend::open(dir.path())
                .unwrap()
                .table_names()
                .unwrap()
                .into_iter()
                .collect();
        let dumped: std::collections::BTreeSet<String> =
            Table::ALL.iter().map(|t| t.name().to_string()).collect();
        assert_eq!(existing, dumped, "a table the backup would leave out");
    }

    #[test]
    fn releases_are_inserted_once_and_survive_reopen() {
        on_every_backend(|place| {
            {
                let store = place.open();
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
            let store = place.open();
            assert_eq!(
                store.list_releases("web").unwrap(),
                vec![release("1.0", "a")]
            );
            assert!(store.list_releases("we").unwrap().is_empty());
            assert_eq!(store.next_seq("rollout").unwrap(), 3);
        });
    }

    #[test]
    fn join_tokens_are_spent_once_and_expire() {
        on_every_backend(|place| {
            let store = place.open();
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
        });
    }

    #[test]
    fn a_token_spent_before_the_upgrade_does_not_bring_a_removed_host_back() {
        on_every_backend(|place| {
            let store = place.open();
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
        });
    }

    #[test]
    fn revoking_a_host_revokes_its_agent_certificates_only() {
        on_every_backend(|place| {
            let store = place.open();
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
        });
    }

    #[test]
    fn a_rollout_begins_and_ends_in_one_write_each_with_its_event() {
        use crate::model::RolloutState;
        on_every_backend(|place| {
            let store = place.open();
            store.append_event(event(1)).unwrap();
            let seq_before = store.next_seq("rollout").unwrap();
            let (record, started) = store
                .begin_rollout(
                    |seq| {
                        let mut record = crate::step::fixtures::record(&[]);
                        record.id = format!("r{seq}");
                        record.seq = seq;
                        record
                    },
                    |record| EventRecord {
                        message: format!("{} started", record.id),
                        ..event(2)
                    },
                )
                .unwrap();
            // The counter's next number, the record under it, the event after the last one.
            assert_eq!(record.seq, seq_before + 1);
            assert_eq!(record.id, format!("r{}", seq_before + 1));
            assert_eq!(store.get_rollout(&record.id).unwrap(), Some(record.clone()));
            assert_eq!(started.seq, 2);
            assert_eq!(started.message, format!("{} started", record.id));
            assert_eq!(store.recent_events(1).unwrap(), vec![started]);

            let mut ended = record.clone();
            ended.state = RolloutState::Succeeded;
            let deployment = DeploymentRecord {
                app: ended.app.clone(),
                selector: ended.policy.selector.clone(),
                version: ended.version.clone(),
                rollout_id: ended.id.clone(),
                updated_unix_ms: 5,
                updated_by: "ci".into(),
                seq: ended.seq,
            };
            let completed = store
                .end_rollout(&ended, Some(&deployment), &event(3))
                .unwrap();
            assert_eq!(completed.seq, 3);
            assert_eq!(store.get_rollout(&ended.id).unwrap(), Some(ended.clone()));
            assert_eq!(
                store.list_deployments(Some("web")).unwrap(),
                vec![deployment]
            );
            // Without a deployment (a rollout that failed), the record and the event only.
            ended.state = RolloutState::Failed;
            store.end_rollout(&ended, None, &event(4)).unwrap();
            assert_eq!(
                store.get_rollout(&ended.id).unwrap().unwrap().state,
                RolloutState::Failed
            );
            assert_eq!(store.recent_events(1).unwrap()[0].seq, 4);
        });
    }

    #[test]
    fn events_are_numbered_in_order() {
        on_every_backend(|place| {
            let store = place.open();
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
        });
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
        on_every_backend(|place| {
            let store = place.open();
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
        });
    }

    #[test]
    fn a_purge_is_remembered_with_the_revocation() {
        on_every_backend(|place| {
            let store = place.open();
            store
                .record_certificate(&credential("01", "web-1", "agent", i64::MAX / 2))
                .unwrap();
            store.revoke_host("web-1", false).unwrap();
            assert!(!store.revocation("01").unwrap().unwrap().purge);
            // Removed again with --purge (the host was gone already): the agent is told to wipe.
            assert_eq!(store.revoke_host("web-1", true).unwrap(), 0);
            assert!(store.revocation("01").unwrap().unwrap().purge);
            assert_eq!(store.revocation("02").unwrap(), None);
        });
    }
}
