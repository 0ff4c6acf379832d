//! `FleetState`: what the controller knows right now. It joins the durable store (hosts'
//! desired releases, releases, rollouts, events) with what only lives while agents are
//! connected (their sessions and the instances they last reported), and it is the one place
//! that changes a host's desired state and tells its agent.
//!
//! Waiters (the rollout executor) watch `changes()`, which ticks on every report, connect,
//! disconnect and host that goes lost, so they wake on facts instead of polling. The converger
//! watches `topology_changes()` (the fleet's shape) and, while it has hosts waiting,
//! `settled_changes()` (reports that end a transition); it reads here why a host last changed
//! shape, and the convergences still under way.
//!
//! A host is `lost` when nothing was heard from it for `lost_after_ms`, stretched with the fleet
//! as its heartbeat interval is ([`crate::heartbeat`]: the interval and the silence a host was
//! last told, or the fleet's now, whichever is longer); a controller that just started counts
//! its own start as the last time it heard from everyone, so a restart does not make the whole
//! fleet lost at once.

use crate::artifacts::ArtifactStore;
use crate::heartbeat::{Cadence, Policy};
use crate::model::{
    AgentInfo, ConvergenceRecord, ConvergenceResult, DeploymentRecord, DrainRecord, EventRecord,
    HostRecord, HostState, ReleaseRecord, RolloutRecord,
};
use crate::store::{
    CertificateRecord, JoinTokenRecord, ReleaseInsert, Store, StoreError, TokenUse,
};
use fleet_proto::instance_state::InstanceState;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{broadcast, watch};

/// An event to record: what [`FleetState::event`] takes, for the writes that record one in
/// their own transaction ([`FleetState::begin_rollout`], [`FleetState::end_rollout`]).
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub actor: String,
    pub kind: String,
    pub app: String,
    pub host: String,
    pub message: String,
}

impl NewEvent {
    pub fn new(
        actor: &str,
        kind: &str,
        app: &str,
        host: &str,
        message: impl Into<String>,
    ) -> NewEvent {
        NewEvent {
            actor: actor.to_string(),
            kind: kind.to_string(),
            app: app.to_string(),
            host: host.to_string(),
            message: message.into(),
        }
    }

    /// The record, stamped now (numbered when it is appended).
    fn into_record(self) -> EventRecord {
        EventRecord {
            seq: 0,
            unix_ms: fleet_proto::now_unix_ms(),
            actor: self.actor,
            kind: self.kind,
            app: self.app,
            host: self.host,
            message: self.message,
        }
    }
}

/// One app's instance on a host, as its agent last reported it.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceStatus {
    pub app: String,
    pub version: String,
    pub state: InstanceState,
    pub message: String,
    pub since_unix_ms: i64,
    pub restarts: u32,
    pub rollout_id: String,
}

/// What the agent of a host is told to run for one app.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub app: String,
    pub version: String,
    pub artifact_digest: String,
    pub artifact_size: u64,
    pub env: BTreeMap<String, String>,
    pub secrets: fleet_proto::secrets::Secrets,
    pub rollout_id: String,
    pub generation: u64,
    pub smoke_timeout_ms: u64,
    pub run_release_hook: bool,
    pub min_healthy_ms: Option<u64>,
    pub unpacked_size: u64,
}

/// Everything a host should run. While drained, nothing.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DesiredAssignments {
    pub assignments: Vec<Assignment>,
    pub draining: bool,
}

/// A host's registration as its agent sent it.
#[derive(Debug, Clone)]
pub struct HostHello {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub advertise_addr: String,
    pub instances: Vec<InstanceStatus>,
    pub agent: AgentInfo,
}

struct LiveHost {
    session: u64,
    desired_tx: watch::Sender<DesiredAssignments>,
    instances: BTreeMap<String, InstanceStatus>,
    last_seen_unix_ms: i64,
    /// The `lost_after_ms` of the cadence the host's agent was last told.
    lost_after_ms: u64,
}

#[derive(Default)]
struct Live {
    hosts: HashMap<String, LiveHost>,
    next_session: u64,
    /// The last change of each host's shape that may make it converge (`joined`, `relabeled
    /// by ann`), for the convergence it causes to say why; dropped once the host needs nothing.
    why: HashMap<String, String>,
    /// Convergences whose result is not known yet, by key: what the converger resolves and
    /// counts against the budget.
    pending: BTreeMap<String, ConvergenceRecord>,
    /// When each host whose session ended was last heard from, set in the same step that
    /// forgets the session. The store's copy is written a moment later, after the host lock:
    /// without this, a reader in between found neither and took the stored time of the
    /// host's last connect, so a host cut off for an instant mid-wave was "lost: nothing heard
    /// from it for 13s" (found by fleet-faults' artifact-cut).
    /// With it, the `lost_after_ms` the host was last told.
    heard_before_disconnect: HashMap<String, (i64, u64)>,
}

pub struct FleetState {
    /// Private: every read and write goes through the methods below, and every write runs on
    /// the blocking pool ([`FleetState::write`]).
    store: Store,
    artifacts: ArtifactStore,
    /// The configured heartbeat figures, which [`FleetState::cadence`] stretches with the fleet.
    pub heartbeat: Policy,
    /// Hosts in the store at the lost-host watcher's last look: with the connected ones, what
    /// the cadence counts (after a restart, the hosts not yet back count too).
    registered: AtomicUsize,
    /// Since when this controller hears from agents (it started, or began to lead): nobody is
    /// lost before it had a chance to hear ([`FleetState::hearing_from_now`]).
    hearing_since_unix_ms: std::sync::atomic::AtomicI64,
    live: Mutex<Live>,
    /// Serialises read-modify-write of host records (two rollouts of different apps may touch
    /// one host at once).
    host_writes: Arc<tokio::sync::Mutex<()>>,
    changes: watch::Sender<u64>,
    /// The runtime whose blocking pool runs every store write: the one the controller started
    /// on (the agents' lane), caught at [`FleetState::new`]. A write asked for by a client's
    /// call (`release create`) then runs at the controller's own priority, not at the clients'
    /// lane's lower one: the store takes one writer at a time, and a commit held up on a
    /// starved low-priority thread would hold up the rollout executor waiting behind it
    /// (priority inversion). `None` outside a runtime (unit tests): the caller's.
    writes_on: Option<tokio::runtime::Handle>,
    /// Ticks on the changes that can move a host to another release between rollouts (hosts
    /// that connect, are relabeled, drained, undrained or forgotten, go lost or come back;
    /// rollouts that end), but not on instance reports: what the converger wakes on.
    topology: watch::Sender<u64>,
    /// Ticks on reports that end a transition (an instance running, failed, crashed or
    /// stopped): what frees or spends the budget and settles a convergence. The converger
    /// wakes on it while hosts wait for the budget or convergences wait for their result.
    settled: watch::Sender<u64>,
    events: broadcast::Sender<EventRecord>,
    /// Held while an event is appended and broadcast.
    event_order: Arc<Mutex<()>>,
    /// The latest use of each operator or CI credential since the last flush, by serial: kept
    /// in memory on every call and written in one transaction every
    /// [`CREDENTIAL_USE_FLUSH`] (and before `credentials list` and `revoke`), so a call never
    /// costs a store write.
    credential_uses: Mutex<std::collections::HashMap<String, crate::store::CredentialUse>>,
    /// Artifact copies on the other controllers, set once at start when the state is in etcd
    /// (several controllers); unset with the redb store (one controller).
    replicas: std::sync::OnceLock<Arc<crate::replicas::Replicas>>,
}

/// How often the credentials' last uses are written to the store.
pub const CREDENTIAL_USE_FLUSH: std::time::Duration = std::time::Duration::from_secs(30);

/// The host lock, owned, so it can travel into a blocking write.
type HostLock = tokio::sync::OwnedMutexGuard<()>;

/// A connected agent's session: its number (a newer session of the same host replaces it), the
/// channel its desired state arrives on, and the cadence to tell its agent in `Welcome`.
pub struct Session {
    pub id: u64,
    pub desired: watch::Receiver<DesiredAssignments>,
    pub cadence: Cadence,
}

impl FleetState {
    pub fn new(store: Store, artifacts: ArtifactStore, heartbeat: Policy) -> FleetState {
        let pending = match store.list_convergences(None) {
            Ok(all) => all
                .into_iter()
                .filter(|c| c.result == ConvergenceResult::Converging)
                .map(|c| (c.key(), c))
                .collect(),
            Err(e) => {
                tracing::error!("cannot read the convergences under way: {e}");
                BTreeMap::new()
            }
        };
        FleetState {
            store,
            artifacts,
            heartbeat,
            registered: AtomicUsize::new(0),
            hearing_since_unix_ms: std::sync::atomic::AtomicI64::new(fleet_proto::now_unix_ms()),
            live: Mutex::new(Live {
                pending,
                ..Live::default()
            }),
            host_writes: Arc::new(tokio::sync::Mutex::new(())),
            writes_on: tokio::runtime::Handle::try_current().ok(),
            changes: watch::channel(0).0,
            topology: watch::channel(0).0,
            settled: watch::channel(0).0,
            events: broadcast::channel(1024).0,
            event_order: Arc::new(Mutex::new(())),
            credential_uses: Mutex::new(Default::default()),
            replicas: std::sync::OnceLock::new(),
        }
    }

    /// Sets how artifacts are copied to the other controllers (once, at start, on etcd).
    pub fn set_replicas(&self, replicas: Arc<crate::replicas::Replicas>) {
        if self.replicas.set(replicas).is_err() {
            tracing::warn!("the artifact replicas were set twice; the first setting stays");
        }
    }

    /// How artifacts are copied to the other controllers, when there are others (etcd).
    pub fn replicas(&self) -> Option<&Arc<crate::replicas::Replicas>> {
        self.replicas.get()
    }

    fn live(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs a store write, an fsynced commit, on the blocking pool: a slow disk stalls the
    /// caller, never a runtime worker (and with it every other session and call). The write
    /// finishes even when the caller is dropped meanwhile.
    async fn write<T: Send + 'static>(
        &self,
        body: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.store.clone();
        self.spawn_write(move || body(&store))
            .await
            .map_err(|e| StoreError::Interrupted(e.to_string()))?
    }

    /// Runs `work` on the blocking pool of [`FleetState::writes_on`].
    fn spawn_write<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> tokio::task::JoinHandle<T> {
        match &self.writes_on {
            Some(home) => home.spawn_blocking(work),
            None => tokio::task::spawn_blocking(work),
        }
    }

    /// Takes the lock that serialises read-modify-write of host records.
    async fn lock_hosts(&self) -> HostLock {
        self.host_writes.clone().lock_owned().await
    }

    /// Like [`FleetState::write`], holding the host lock until the commit is done: the lock
    /// goes into the blocking task and comes back with its result. A caller dropped meanwhile
    /// (a cancelled call, a stopped executor) releases it only once the write committed, so no
    /// one reads the record before it and writes a stale copy back.
    async fn write_holding<T: Send + 'static>(
        &self,
        lock: HostLock,
        body: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<(T, HostLock), StoreError> {
        let store = self.store.clone();
        let (result, lock) = self
            .spawn_write(move || (body(&store), lock))
            .await
            .map_err(|e| StoreError::Interrupted(e.to_string()))?;
        Ok((result?, lock))
    }

    async fn save_host(&self, lock: HostLock, record: &HostRecord) -> Result<HostLock, StoreError> {
        let record = record.clone();
        let ((), lock) = self
            .write_holding(lock, move |store| store.put_host(&record))
            .await?;
        Ok(lock)
    }

    /// The artifact store (content-addressed files; no desired state lives there).
    pub fn artifacts(&self) -> &ArtifactStore {
        &self.artifacts
    }

    pub fn host_record(&self, name: &str) -> Result<Option<HostRecord>, StoreError> {
        self.store.get_host(name)
    }

    /// Every host, in natural order of names.
    pub fn host_records(&self) -> Result<Vec<HostRecord>, StoreError> {
        let mut hosts = self.store.list_hosts()?;
        // `web-2` before `web-10`, as every list of hosts is shown.
        hosts.sort_by(|a, b| fleet_proto::names::natural_cmp(&a.name, &b.name));
        Ok(hosts)
    }

    pub fn release(&self, app: &str, version: &str) -> Result<Option<ReleaseRecord>, StoreError> {
        self.store.get_release(app, version)
    }

    pub fn releases(&self, app: &str) -> Result<Vec<ReleaseRecord>, StoreError> {
        self.store.list_releases(app)
    }

    /// Records a release unless its version exists (see [`Store::insert_release`]).
    pub async fn insert_release(
        &self,
        record: &ReleaseRecord,
    ) -> Result<ReleaseInsert, StoreError> {
        let record = record.clone();
        self.write(move |store| store.insert_release(&record)).await
    }

    /// Deletes old releases of `app` (see [`Store::prune_releases`]), counting the versions its
    /// agents report as in use; under the host lock, so no desired state changes meanwhile.
    pub async fn prune_releases(
        &self,
        app: &str,
        keep: usize,
    ) -> Result<crate::store::PruneOutcome, StoreError> {
        let lock = self.lock_hosts().await;
        let running: BTreeMap<String, String> = self
            .live()
            .hosts
            .iter()
            .filter_map(|(name, host)| {
                let instance = host.instances.get(app)?;
                let gone = matches!(
                    instance.state,
                    InstanceState::Stopped | InstanceState::Failed
                );
                (!gone).then(|| (name.clone(), instance.version.clone()))
            })
            .collect();
        let app = app.to_string();
        let (outcome, _lock) = self
            .write_holding(lock, move |store| {
                store.prune_releases(&app, keep, &running)
            })
            .await?;
        Ok(outcome)
    }

    pub fn rollout(&self, id: &str) -> Result<Option<RolloutRecord>, StoreError> {
        self.store.get_rollout(id)
    }

    /// Rollouts, newest first, of one app or of all.
    pub fn rollouts(&self, app: Option<&str>) -> Result<Vec<RolloutRecord>, StoreError> {
        self.store.list_rollouts(app)
    }

    /// The standing deployments (of one app, when given), the most recently updated first.
    pub fn deployments(&self, app: Option<&str>) -> Result<Vec<DeploymentRecord>, StoreError> {
        self.store.list_deployments(app)
    }

    /// Starts a rollout in one fsynced commit: its number, the record `make` builds with it
    /// and the event `started` says about it (see [`Store::begin_rollout`]); then tells the
    /// event's followers. Returns the record.
    pub async fn begin_rollout(
        &self,
        make: impl Fn(u64) -> RolloutRecord + Send + 'static,
        started: impl Fn(&RolloutRecord) -> NewEvent + Send + 'static,
    ) -> Result<RolloutRecord, StoreError> {
        self.write_with_event(move |store| {
            store.begin_rollout(make, |record| started(record).into_record())
        })
        .await
    }

    /// Ends a rollout in one fsynced commit: its record, the deployment it leaves when it
    /// completed, and the event `ended`; then tells the event's followers and, with a
    /// deployment, wakes the converger.
    pub async fn end_rollout(
        &self,
        record: &RolloutRecord,
        deployment: Option<DeploymentRecord>,
        ended: NewEvent,
    ) -> Result<(), StoreError> {
        let record = record.clone();
        let completes = deployment.is_some();
        let ended = ended.into_record();
        self.write_with_event(move |store| {
            let event = store.end_rollout(&record, deployment.as_ref(), &ended)?;
            Ok(((), event))
        })
        .await?;
        if completes {
            self.bump();
        }
        Ok(())
    }

    pub async fn save_rollout(&self, record: &RolloutRecord) -> Result<(), StoreError> {
        let record = record.clone();
        self.write(move |store| store.put_rollout(&record)).await
    }

    /// The next number of a counter (`rollout`, `converge`), durable before it is handed out.
    pub async fn next_seq(&self, counter: &'static str) -> Result<u64, StoreError> {
        self.write(move |store| store.next_seq(counter)).await
    }

    /// Writes a consistent snapshot of the whole store as a store dump ([`Store::export`]).
    /// Blocking (it reads every record): call it on the blocking pool.
    pub fn export_store(
        &self,
        to: impl std::io::Write,
    ) -> Result<crate::store::ExportSummary, StoreError> {
        self.store.export(to)
    }

    pub fn recent_events(&self, limit: usize) -> Result<Vec<EventRecord>, StoreError> {
        self.store.recent_events(limit)
    }

    pub fn is_revoked(&self, serial: &str) -> Result<bool, StoreError> {
        self.store.is_revoked(serial)
    }

    /// The revocation of a certificate, if it was revoked (and whether to purge, for a host).
    pub fn revocation(
        &self,
        serial: &str,
    ) -> Result<Option<crate::store::RevokedRecord>, StoreError> {
        self.store.revocation(serial)
    }

    /// Notes a call by an operator or CI credential (in memory only; see
    /// [`FleetState::flush_credential_uses`]). Agents are not tracked (their sessions are),
    /// nor controllers (their certificates are their own, issued at each start).
    pub fn note_credential_use(&self, identity: &fleet_pki::Identity) {
        if matches!(
            identity.role,
            fleet_pki::Role::Agent | fleet_pki::Role::Controller
        ) {
            return;
        }
        let seen = crate::store::CredentialUse {
            serial: identity.serial.clone(),
            name: identity.name.clone(),
            role: identity.role.as_str().to_string(),
            not_after_unix_ms: identity.not_after_unix_ms,
            used_unix_ms: fleet_proto::now_unix_ms(),
        };
        self.credential_uses
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(seen.serial.clone(), seen);
    }

    /// Writes the credential uses noted since the last flush, in one transaction; a credential
    /// the controller did not sign (`fleetctl init`'s admin, `issue-admin`'s) is recorded at
    /// its first use, with an event.
    pub async fn flush_credential_uses(&self) -> Result<(), StoreError> {
        let uses: Vec<_> = std::mem::take(
            &mut *self
                .credential_uses
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
        .into_values()
        .collect();
        if uses.is_empty() {
            return Ok(());
        }
        let learned = self
            .write(move |store| store.record_credential_uses(&uses))
            .await?;
        for certificate in learned {
            self.event(
                &certificate.name,
                "credential.learned",
                "",
                "",
                format!(
                    "credential `{}` with role {} (certificate {}), signed with the CA key outside the controller (fleetctl init or fleet-controller issue-admin), first used",
                    certificate.name, certificate.role, certificate.serial
                ),
            )
            .await;
        }
        Ok(())
    }

    /// Flushes the credential uses every [`CREDENTIAL_USE_FLUSH`] and once more when `stop`
    /// turns true.
    pub async fn keep_credential_uses(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(CREDENTIAL_USE_FLUSH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let stopping = tokio::select! {
                _ = tick.tick() => false,
                _ = stop.wait_for(|stop| *stop) => true,
            };
            if let Err(e) = self.flush_credential_uses().await {
                tracing::warn!("cannot record when credentials were last used: {e}");
            }
            if stopping {
                return;
            }
        }
    }

    /// Every operator and CI credential, with its last use up to now.
    pub async fn list_credentials(&self) -> Result<Vec<crate::store::CredentialView>, StoreError> {
        self.flush_credential_uses().await?;
        self.store.list_credentials()
    }

    /// Revokes the credential `name` (see [`Store::revoke_credential`]); from the next call
    /// on, also on connections already open, it is refused.
    pub async fn revoke_credential(
        &self,
        name: &str,
        actor: &str,
    ) -> Result<crate::store::CredentialRevocation, StoreError> {
        // The caller's own credential is known before the last-admin rule counts admins.
        self.flush_credential_uses().await?;
        let outcome = {
            let name = name.to_string();
            self.write(move |store| store.revoke_credential(&name, fleet_proto::now_unix_ms()))
                .await?
        };
        if let crate::store::CredentialRevocation::Revoked(certificates) = &outcome {
            let serials: Vec<&str> = certificates.iter().map(|c| c.serial.as_str()).collect();
            self.event(
                actor,
                "credential.revoked",
                "",
                "",
                format!(
                    "credential `{name}` revoked by {actor} (certificate {})",
                    serials.join(", ")
                ),
            )
            .await;
        }
        Ok(outcome)
    }

    pub async fn insert_join_token(
        &self,
        token_hash: String,
        record: JoinTokenRecord,
    ) -> Result<(), StoreError> {
        self.write(move |store| store.insert_join_token(&token_hash, &record))
            .await
    }

    /// Spends a join token for a host's certificate (see [`Store::join_with_token`]).
    pub async fn join_with_token(
        &self,
        token_hash: String,
        certificate: CertificateRecord,
        certificate_pem: String,
        key_sha256: String,
        now_unix_ms: i64,
    ) -> Result<TokenUse, StoreError> {
        self.write(move |store| {
            store.join_with_token(
                &token_hash,
                &certificate,
                &certificate_pem,
                &key_sha256,
                now_unix_ms,
            )
        })
        .await
    }

    /// A join's outcome as far as it can be told without writing (see
    /// [`Store::join_precheck`]).
    pub fn join_precheck(
        &self,
        token_hash: String,
        name: &str,
        key_sha256: &str,
        now_unix_ms: i64,
    ) -> Result<Option<TokenUse>, StoreError> {
        self.store
            .join_precheck(&token_hash, name, key_sha256, now_unix_ms)
    }

    pub async fn record_certificate(&self, record: CertificateRecord) -> Result<(), StoreError> {
        self.write(move |store| store.record_certificate(&record))
            .await
    }

    /// The artifact digests of the releases in host `host`'s desired state.
    pub fn desired_digests(&self, host: &str) -> Result<Vec<String>, StoreError> {
        let Some(record) = self.store.get_host(host)? else {
            return Ok(Vec::new());
        };
        let mut digests = Vec::with_capacity(record.desired.len());
        for (app, desired) in &record.desired {
            if let Some(release) = self.store.get_release(app, &desired.version)? {
                digests.push(release.artifact_digest);
            }
        }
        Ok(digests)
    }

    /// A change of the fleet's shape: wakes waiters and the converger.
    fn bump(&self) {
        self.changes.send_modify(|n| *n += 1);
        self.topology.send_modify(|n| *n += 1);
    }

    /// A report: wakes waiters only.
    fn bump_report(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// Ticks on changes that can move hosts between releases outside a rollout (see the field).
    pub fn topology_changes(&self) -> watch::Receiver<u64> {
        self.topology.subscribe()
    }

    /// A rollout ended: hosts it held may converge now.
    pub fn rollout_ended(&self) {
        self.bump();
    }

    /// Desired state changed outside a rollout and the converger (`replace`'s converge-like):
    /// the converger looks again.
    pub fn desired_changed(&self) {
        self.bump();
    }

    /// Ticks on reports that end a transition (see the field).
    pub fn settled_changes(&self) -> watch::Receiver<u64> {
        self.settled.subscribe()
    }

    /// Notes the last change of a host's shape, for the convergence it causes to say why.
    fn note_why(&self, host: &str, why: String) {
        self.live().why.insert(host.to_string(), why);
    }

    /// Why the host may have to converge, as last noted.
    pub fn why(&self, host: &str) -> Option<String> {
        self.live().why.get(host).cloned()
    }

    /// Drops the note of a host that needs nothing any more.
    pub fn forget_why(&self, host: &str) {
        self.live().why.remove(host);
    }

    /// The convergences whose result is not known yet.
    pub fn pending_convergences(&self) -> Vec<ConvergenceRecord> {
        self.live().pending.values().cloned().collect()
    }

    /// Every convergence of an app (or all), newest first.
    pub fn convergences(&self, app: Option<&str>) -> Result<Vec<ConvergenceRecord>, StoreError> {
        self.store.list_convergences(app)
    }

    /// Records how a convergence ended.
    pub async fn finish_convergence(&self, record: ConvergenceRecord) -> Result<(), StoreError> {
        let saved = record.clone();
        self.write(move |store| store.put_convergence(&saved))
            .await?;
        self.live().pending.remove(&record.key());
        Ok(())
    }

    /// Ticks whenever a host connects, disconnects or reports.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Waits until `done()` holds, checking it again on every change, or until `until`;
    /// returns whether it held.
    pub async fn wait_until(
        &self,
        until: tokio::time::Instant,
        mut done: impl FnMut() -> bool,
    ) -> bool {
        let mut changes = self.changes();
        loop {
            changes.borrow_and_update();
            if done() {
                return true;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return false,
                _ = changes.changed() => {}
            }
        }
    }

    /// New events as they are recorded.
    pub fn subscribe_events(&self) -> broadcast::Receiver<EventRecord> {
        self.events.subscribe()
    }

    /// Records an event in the log and tells followers. A store failure is logged, not
    /// returned: the event log must never stop a deploy.
    pub async fn event(
        &self,
        actor: &str,
        kind: &str,
        app: &str,
        host: &str,
        message: impl Into<String>,
    ) {
        let event = NewEvent::new(actor, kind, app, host, message).into_record();
        let appended = self
            .write_with_event(move |store| Ok(((), store.append_event(event)?)))
            .await;
        if let Err(e) = appended {
            tracing::error!("cannot record event: {e}");
        }
    }

    /// Runs a store write that appends one event (`body` returns it, numbered, with its own
    /// result), then tells followers of the event, under one lock, so followers see events in
    /// the order of their numbers (a follower skips any number it has seen).
    async fn write_with_event<T: Send + 'static>(
        &self,
        body: impl FnOnce(&Store) -> Result<(T, EventRecord), StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (events, order) = (self.events.clone(), self.event_order.clone());
        self.write(move |store| {
            let _in_order = order.lock().unwrap_or_else(|p| p.into_inner());
            let (out, event) = body(store)?;
            tracing::info!(kind = %event.kind, app = %event.app, host = %event.host, "{}", event.message);
            let _ = events.send(event);
            Ok(out)
        })
        .await
    }

    /// The certificate the controller signed with `serial`.
    pub fn certificate(&self, serial: &str) -> Result<Option<CertificateRecord>, StoreError> {
        self.store.get_certificate(serial)
    }

    /// Every certificate the controller signed (or learned of at its first use).
    pub fn certificates(&self) -> Result<Vec<CertificateRecord>, StoreError> {
        self.store.list_certificates()
    }

    /// Registers a connecting agent: records the host (keeping its desired state and the labels
    /// it joined with, see [`labels_on_connect`]), replaces any older session of the same host,
    /// and hands back the desired state to send. `joined_labels` are those its join token
    /// named, if any. `None` when the certificate the session came with (`serial`) was revoked
    /// meanwhile: a host removed while its hello was on the way must not come back.
    pub async fn host_connected(
        &self,
        hello: HostHello,
        joined_labels: Option<BTreeMap<String, String>>,
        serial: &str,
    ) -> Result<Option<Session>, StoreError> {
        let now = fleet_proto::now_unix_ms();
        // The session is registered under the same lock that writes desired state, so a wave
        // written meanwhile either is in the state computed here or is pushed to this session.
        let mut held = self.lock_hosts().await;
        // Under the lock `forget` takes too: either the host is forgotten after this, or its
        // certificate is already revoked here.
        if self.store.is_revoked(serial)? {
            return Ok(None);
        }
        let record = {
            let mut record = self.store.get_host(&hello.name)?.unwrap_or(HostRecord {
                name: hello.name.clone(),
                labels: BTreeMap::new(),
                advertise_addr: String::new(),
                registered_unix_ms: now,
                last_seen_unix_ms: now,
                desired: BTreeMap::new(),
                drain: None,
                agent: AgentInfo::default(),
            });
            let is_new = record.advertise_addr.is_empty();
            let was_lost = !is_new && record.drain.is_none() && self.is_lost(&record);
            let known = (!is_new).then_some(&record.labels);
            let (labels, claim_ignored) =
                labels_on_connect(known, joined_labels.as_ref(), &hello.labels);
            record.labels = labels;
            record.advertise_addr = hello.advertise_addr.clone();
            record.agent = hello.agent.clone();
            record.last_seen_unix_ms = now;
            held = self.save_host(held, &record).await?;
            if claim_ignored {
                self.event(
                    &hello.name,
                    "host.labels_ignored",
                    "",
                    &hello.name,
                    format!(
                        "host {} claims labels {}, kept {}: a host's labels change only with `fleetctl label {} ...`",
                        hello.name,
                        labels_text(&hello.labels),
                        labels_text(&record.labels),
                        hello.name
                    ),
                )
                .await;
            }
            if is_new {
                self.note_why(&hello.name, "joined".to_string());
            } else if was_lost {
                self.note_why(&hello.name, "back from lost".to_string());
            }
            if is_new {
                self.event(
                    &hello.name,
                    "host.registered",
                    "",
                    &hello.name,
                    format!(
                        "host {} registered, advertising {}",
                        hello.name, hello.advertise_addr
                    ),
                )
                .await;
            }
            record
        };
        let assignments = self.assignments_for(&record);
        let (desired_tx, desired) = watch::channel(assignments);
        let (id, cadence) = {
            let mut live = self.live();
            live.next_session += 1;
            let id = live.next_session;
            // Counting this host: the first hosts of a fleet that grows are told the longer
            // interval at their next heartbeat.
            let connected = live.hosts.len() + usize::from(!live.hosts.contains_key(&hello.name));
            let cadence = self.cadence_for(connected);
            live.hosts.insert(
                hello.name.clone(),
                LiveHost {
                    session: id,
                    desired_tx,
                    instances: hello
                        .instances
                        .into_iter()
                        .map(|i| (i.app.clone(), i))
                        .collect(),
                    last_seen_unix_ms: now,
                    lost_after_ms: cadence.lost_after_ms,
                },
            );
            (id, cadence)
        };
        drop(held);
        self.event(
            &hello.name,
            "host.connected",
            "",
            &hello.name,
            format!("host {} connected", hello.name),
        )
        .await;
        self.bump();
        Ok(Some(Session {
            id,
            desired,
            cadence,
        }))
    }

    /// Records an instance transition reported by a host's current session.
    pub async fn host_reported(&self, host: &str, session: u64, status: InstanceStatus) {
        let notable = matches!(status.state, InstanceState::Crashed | InstanceState::Failed);
        let settles = notable
            || matches!(
                status.state,
                InstanceState::Running | InstanceState::Stopped
            );
        {
            let mut live = self.live();
            let Some(live_host) = live.hosts.get_mut(host).filter(|h| h.session == session) else {
                return;
            };
            live_host.last_seen_unix_ms = fleet_proto::now_unix_ms();
            live_host
                .instances
                .insert(status.app.clone(), status.clone());
        }
        if notable {
            self.event(
                host,
                &format!("instance.{}", status.state),
                &status.app,
                host,
                format!(
                    "{}@{} on {}: {}: {}",
                    status.app, status.version, host, status.state, status.message
                ),
            )
            .await;
        }
        if status.state == InstanceState::Stopped {
            if let Err(e) = self.note_if_drained(host).await {
                tracing::error!("cannot record that host {host} drained: {e}");
            }
        }
        self.bump_report();
        if settles {
            self.settled.send_modify(|n| *n += 1);
        }
    }

    /// Whether every instance the connected host reported has stopped.
    fn runs_nothing(&self, host: &str) -> bool {
        self.live().hosts.get(host).is_some_and(|h| {
            h.instances
                .values()
                .all(|i| i.state == InstanceState::Stopped)
        })
    }

    /// Marks a draining host drained once its last instance is gone.
    pub async fn note_if_drained(&self, host: &str) -> Result<(), StoreError> {
        if !self.runs_nothing(host) {
            return Ok(());
        }
        let held = self.lock_hosts().await;
        let Some(mut record) = self.store.get_host(host)? else {
            return Ok(());
        };
        match &mut record.drain {
            Some(drain) if drain.drained_unix_ms.is_none() => {
                drain.drained_unix_ms = Some(fleet_proto::now_unix_ms());
                let _held = self.save_host(held, &record).await?;
                self.event(
                    host,
                    "host.drained",
                    "",
                    host,
                    format!("host {host} is drained: every instance stopped"),
                )
                .await;
            }
            _ => {}
        }
        Ok(())
    }

    /// Sets and removes labels of a host (`fleetctl label`); the host's record as it is now, or
    /// `None` when there is no such host. Labels decide which hosts a rollout selects, so the
    /// change is an event.
    pub async fn label_host(
        &self,
        host: &str,
        set: &BTreeMap<String, String>,
        remove: &[String],
        actor: &str,
    ) -> Result<Option<HostRecord>, StoreError> {
        let record = {
            let held = self.lock_hosts().await;
            let Some(mut record) = self.store.get_host(host)? else {
                return Ok(None);
            };
            let before = record.labels.clone();
            for key in remove {
                record.labels.remove(key);
            }
            record
                .labels
                .extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
            if record.labels == before {
                return Ok(Some(record));
            }
            let _held = self.save_host(held, &record).await?;
            self.note_why(host, format!("relabeled by {actor}"));
            self.event(
                actor,
                "host.labeled",
                "",
                host,
                format!(
                    "labels of host {host} changed by {actor}: {} -> {}",
                    labels_text(&before),
                    labels_text(&record.labels)
                ),
            )
            .await;
            record
        };
        self.bump();
        Ok(Some(record))
    }

    /// Drains a host: it keeps its desired releases but runs none of them until undrained.
    /// Returns false when the host does not exist.
    pub async fn drain(&self, host: &str, actor: &str) -> Result<bool, StoreError> {
        {
            let held = self.lock_hosts().await;
            let Some(mut record) = self.store.get_host(host)? else {
                return Ok(false);
            };
            let _held = if record.drain.is_none() {
                record.drain = Some(DrainRecord {
                    requested_by: actor.to_string(),
                    requested_unix_ms: fleet_proto::now_unix_ms(),
                    drained_unix_ms: None,
                });
                let held = self.save_host(held, &record).await?;
                self.event(
                    actor,
                    "host.draining",
                    "",
                    host,
                    format!("host {host} draining, asked by {actor}"),
                )
                .await;
                held
            } else {
                held
            };
            // Pushed under the lock, so desired states reach the agent in the order written.
            self.push_desired(&record);
        }
        self.note_if_drained(host).await?;
        self.bump();
        Ok(true)
    }

    /// Brings a drained host back to its desired releases. Returns false when it does not exist.
    pub async fn undrain(&self, host: &str, actor: &str) -> Result<bool, StoreError> {
        {
            let held = self.lock_hosts().await;
            let Some(mut record) = self.store.get_host(host)? else {
                return Ok(false);
            };
            let _held = if record.drain.take().is_some() {
                let held = self.save_host(held, &record).await?;
                self.note_why(host, format!("undrained by {actor}"));
                self.event(
                    actor,
                    "host.undrained",
                    "",
                    host,
                    format!("host {host} undrained by {actor}"),
                )
                .await;
                held
            } else {
                held
            };
            self.push_desired(&record);
        }
        self.bump();
        Ok(true)
    }

    /// Revokes every certificate of a host, forgets it and ends its session. Revocation comes
    /// first: a crash in between leaves a host that can no longer connect, never a forgotten
    /// host whose certificate still works.
    pub async fn forget(&self, host: &str, actor: &str, purge: bool) -> Result<(), StoreError> {
        let n_revoked = {
            let host = host.to_string();
            self.write(move |store| store.revoke_host(&host, purge))
                .await?
        };
        {
            let held = self.lock_hosts().await;
            let host = host.to_string();
            self.write_holding(held, move |store| store.delete_host(&host))
                .await?;
        }
        {
            let mut live = self.live();
            live.hosts.remove(host);
            live.why.remove(host);
        }
        self.event(
            actor,
            "host.removed",
            "",
            host,
            format!(
                "host {host} removed by {actor}: {n_revoked} certificate(s) revoked{}",
                if purge {
                    "; its agent is told to wipe its releases, secrets and state"
                } else {
                    ""
                }
            ),
        )
        .await;
        self.bump();
        Ok(())
    }

    /// The state an operator sees for a host.
    pub fn host_state(&self, record: &HostRecord) -> HostState {
        match &record.drain {
            Some(drain) if drain.drained_unix_ms.is_some() => return HostState::Drained,
            Some(_) => return HostState::Draining,
            None => {}
        }
        if self.is_lost(record) {
            HostState::Lost
        } else {
            HostState::Ready
        }
    }

    /// From now on, as when the process started: no host is counted lost before it had
    /// its `lost_after_ms` to be heard. A controller that begins to lead calls it, since the
    /// agents were talking to the leader before it, not to it.
    pub fn hearing_from_now(&self) {
        self.hearing_since_unix_ms.store(
            fleet_proto::now_unix_ms(),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// What the store is, for messages and `fleetctl controllers`.
    pub fn describe_store(&self) -> String {
        self.store.describe()
    }

    /// Whether nothing was heard from the host for its `lost_after_ms`: the one it was last
    /// told, or the fleet's now, whichever is longer.
    pub fn is_lost(&self, record: &HostRecord) -> bool {
        let (heard, connected) = {
            let live = self.live();
            (Self::heard(&live, &record.name), live.hosts.len())
        };
        let (last_seen, told) = heard.unwrap_or((record.last_seen_unix_ms, 0));
        let last_seen = last_seen.max(record.last_seen_unix_ms).max(
            self.hearing_since_unix_ms
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        let lost_after = told.max(self.cadence_for(connected).lost_after_ms);
        fleet_proto::now_unix_ms() - last_seen > lost_after as i64
    }

    /// The heartbeat interval and lost-after for the fleet as it stands: stretched by the
    /// hosts connected or registered, whichever are more ([`crate::heartbeat::cadence`]).
    pub fn cadence(&self) -> Cadence {
        let connected = self.live().hosts.len();
        self.cadence_for(connected)
    }

    fn cadence_for(&self, connected: usize) -> Cadence {
        let registered = self.registered.load(Ordering::Relaxed);
        crate::heartbeat::cadence(&self.heartbeat, connected.max(registered))
    }

    /// How long ago the host was last heard from, in whole seconds.
    pub fn silent_for_secs(&self, record: &HostRecord) -> i64 {
        let last_seen = self
            .last_seen(&record.name)
            .unwrap_or(record.last_seen_unix_ms)
            .max(record.last_seen_unix_ms);
        (fleet_proto::now_unix_ms() - last_seen) / 1000
    }

    /// Watches for hosts going lost, records it, and wakes waiters, one check per heartbeat
    /// interval (the fleet's, as it stretches: a check reads every host), until `stop` turns
    /// true. Each check also counts the registered hosts, for [`FleetState::cadence`].
    pub async fn watch_for_lost_hosts(self: std::sync::Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut lost = std::collections::HashSet::new();
        // The first check at once, as the configured interval's ticks began.
        let mut period = std::time::Duration::ZERO;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
            period = std::time::Duration::from_millis(self.cadence().interval_ms);
            let Ok(hosts) = self.store.list_hosts() else {
                continue;
            };
            self.registered.store(hosts.len(), Ordering::Relaxed);
            let mut changed = false;
            for host in &hosts {
                let is_lost = host.drain.is_none() && self.is_lost(host);
                if is_lost && lost.insert(host.name.clone()) {
                    let message = format!(
                        "host {} is lost: nothing heard from it for {}s",
                        host.name,
                        self.silent_for_secs(host)
                    );
                    self.event("controller", "host.lost", "", &host.name, message)
                        .await;
                    changed = true;
                } else if !is_lost && lost.remove(&host.name) {
                    self.note_why(&host.name, "back from lost".to_string());
                    self.event(
                        "controller",
                        "host.ready",
                        "",
                        &host.name,
                        format!("host {} is back", host.name),
                    )
                    .await;
                    changed = true;
                }
            }
            if changed {
                self.bump();
            }
        }
    }

    /// Notes a heartbeat of `host`'s current session; the cadence to answer it with, which
    /// the host's lost-after follows from now on (None: the session was replaced).
    pub fn host_heartbeat(&self, host: &str, session: u64) -> Option<Cadence> {
        let mut live = self.live();
        let cadence = self.cadence_for(live.hosts.len());
        let live_host = live.hosts.get_mut(host).filter(|h| h.session == session)?;
        live_host.last_seen_unix_ms = fleet_proto::now_unix_ms();
        live_host.lost_after_ms = cadence.lost_after_ms;
        Some(cadence)
    }

    /// Removes the live entry of `host` if it is still `session`'s, keeping when it was last
    /// heard from ([`Live::heard_before_disconnect`]); that time, if it was.
    fn forget_session(&self, host: &str, session: u64) -> Option<i64> {
        let mut live = self.live();
        match live.hosts.get(host) {
            Some(h) if h.session == session => {
                let gone = live.hosts.remove(host)?;
                live.heard_before_disconnect.insert(
                    host.to_string(),
                    (gone.last_seen_unix_ms, gone.lost_after_ms),
                );
                Some(gone.last_seen_unix_ms)
            }
            _ => None,
        }
    }

    /// Forgets a session when its stream ends (unless a newer one already replaced it).
    pub async fn host_disconnected(&self, host: &str, session: u64) {
        let last_seen = self.forget_session(host, session);
        if let Some(last_seen) = last_seen {
            {
                // Under the lock: a removed host stays removed, a wave just written stays.
                let held = self.lock_hosts().await;
                if let Ok(Some(mut record)) = self.store.get_host(host) {
                    record.last_seen_unix_ms = last_seen;
                    let _held = self.save_host(held, &record).await;
                }
            }
            self.event(
                host,
                "host.disconnected",
                "",
                host,
                format!("host {host} disconnected"),
            )
            .await;
            self.bump();
        }
    }

    pub fn is_connected(&self, host: &str) -> bool {
        self.live().hosts.contains_key(host)
    }

    /// When the host was last heard from while connected (this run of the controller).
    pub fn last_seen(&self, host: &str) -> Option<i64> {
        Self::heard(&self.live(), host).map(|(last_seen, _)| last_seen)
    }

    /// When the host was last heard from while connected, and the lost-after it was told then.
    fn heard(live: &Live, host: &str) -> Option<(i64, u64)> {
        live.hosts
            .get(host)
            .map(|h| (h.last_seen_unix_ms, h.lost_after_ms))
            .or_else(|| live.heard_before_disconnect.get(host).copied())
    }

    /// The instance of `app` on `host` as last reported, if the host is connected.
    pub fn instance(&self, host: &str, app: &str) -> Option<InstanceStatus> {
        self.live().hosts.get(host)?.instances.get(app).cloned()
    }

    /// Every instance a connected host reported.
    pub fn instances(&self, host: &str) -> BTreeMap<String, InstanceStatus> {
        self.live()
            .hosts
            .get(host)
            .map(|h| h.instances.clone())
            .unwrap_or_default()
    }

    /// Reads the named hosts, lets `change` edit them, and writes them (with the rollout record
    /// that explains the change, if any) in one transaction; then tells their agents.
    pub async fn update_hosts(
        &self,
        names: &[String],
        mut change: impl FnMut(&mut HostRecord),
        rollout: Option<&crate::model::RolloutRecord>,
    ) -> Result<Vec<HostRecord>, StoreError> {
        let mut rollout = rollout.cloned();
        self.write_hosts(names, |host, _| change(host), rollout.as_mut())
            .await
    }

    /// [`FleetState::update_hosts`] for a rollout that records what it saw of each host:
    /// `change` gets each host as it stands under the host lock together with the rollout's
    /// record, so what it reads there (a host's release before the change) cannot go stale
    /// before the write, and the record it leaves is written with the hosts in one
    /// transaction.
    pub async fn update_hosts_for_rollout(
        &self,
        names: &[String],
        mut change: impl FnMut(&mut HostRecord, &mut crate::model::RolloutRecord),
        rollout: &mut crate::model::RolloutRecord,
    ) -> Result<Vec<HostRecord>, StoreError> {
        self.write_hosts(
            names,
            |host, rollout| {
                if let Some(rollout) = rollout {
                    change(host, rollout);
                }
            },
            Some(rollout),
        )
        .await
    }

    async fn write_hosts(
        &self,
        names: &[String],
        mut change: impl FnMut(&mut HostRecord, Option<&mut crate::model::RolloutRecord>),
        mut rollout: Option<&mut crate::model::RolloutRecord>,
    ) -> Result<Vec<HostRecord>, StoreError> {
        let hosts = {
            let held = self.lock_hosts().await;
            let mut hosts = Vec::with_capacity(names.len());
            for name in names {
                if let Some(mut host) = self.store.get_host(name)? {
                    change(&mut host, rollout.as_deref_mut());
                    hosts.push(host);
                }
            }
            let (written, rollout) = (hosts.clone(), rollout.as_deref().cloned());
            let ((), _held) = self
                .write_holding(held, move |store| {
                    store.put_hosts_and_rollout(&written, rollout.as_ref())
                })
                .await?;
            // Pushed under the lock, so desired states reach agents in the order written.
            for host in &hosts {
                self.push_desired(host);
            }
            hosts
        };
        Ok(hosts)
    }

    /// Like [`FleetState::update_hosts`], for changes outside a rollout: `change` edits a host
    /// and returns the convergences that explain it, written with the hosts in one transaction
    /// and pending until the converger settles them. A host it returns none for is not written.
    pub async fn converge_hosts(
        &self,
        names: &[String],
        mut change: impl FnMut(&mut HostRecord) -> Vec<ConvergenceRecord>,
    ) -> Result<Vec<ConvergenceRecord>, StoreError> {
        let held = self.lock_hosts().await;
        let mut hosts = Vec::with_capacity(names.len());
        let mut convergences = Vec::new();
        for name in names {
            if let Some(mut host) = self.store.get_host(name)? {
                let made = change(&mut host);
                if !made.is_empty() {
                    convergences.extend(made);
                    hosts.push(host);
                }
            }
        }
        if hosts.is_empty() {
            return Ok(convergences);
        }
        let (written, records) = (hosts.clone(), convergences.clone());
        let ((), _held) = self
            .write_holding(held, move |store| {
                store.put_hosts_and_convergences(&written, &records)
            })
            .await?;
        {
            let mut live = self.live();
            for convergence in &convergences {
                live.pending.insert(convergence.key(), convergence.clone());
            }
        }
        // Pushed under the lock, so desired states reach agents in the order written.
        for host in &hosts {
            self.push_desired(host);
        }
        Ok(convergences)
    }

    /// Sends a host's desired state to its agent, if connected.
    pub fn push_desired(&self, host: &HostRecord) {
        let assignments = self.assignments_for(host);
        let live = self.live();
        if let Some(live_host) = live.hosts.get(&host.name) {
            live_host.desired_tx.send_replace(assignments);
        }
    }

    fn assignments_for(&self, host: &HostRecord) -> DesiredAssignments {
        if host.drain.is_some() {
            return DesiredAssignments {
                assignments: Vec::new(),
                draining: true,
            };
        }
        let mut out = Vec::with_capacity(host.desired.len());
        for (app, desired) in &host.desired {
            match self.store.get_release(app, &desired.version) {
                Ok(Some(release)) => out.push(Assignment {
                    app: app.clone(),
                    version: desired.version.clone(),
                    artifact_digest: release.artifact_digest,
                    artifact_size: release.artifact_size,
                    env: release.env,
                    secrets: release.secrets,
                    rollout_id: desired.rollout_id.clone(),
                    generation: desired.generation,
                    smoke_timeout_ms: desired.smoke_timeout_ms,
                    run_release_hook: desired.run_release_hook,
                    min_healthy_ms: desired.min_healthy_ms,
                    unpacked_size: release.unpacked_size,
                }),
                Ok(None) => tracing::error!(
                    "host {} wants {app}@{} which has no release record",
                    host.name,
                    desired.version
                ),
                Err(e) => tracing::error!("cannot read release {app}@{}: {e}", desired.version),
            }
        }
        DesiredAssignments {
            assignments: out,
            draining: false,
        }
    }
}

/// `k=v,k2=v2`, or `(none)`.
fn labels_text(labels: &BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        return "(none)".to_string();
    }
    fleet_proto::names::format_labels(labels)
}

/// The labels a connecting host gets, and whether its own claim was ignored. A host's labels
/// are fixed when it first registers: from its join token when the token named them, from its
/// first claim otherwise. Afterwards they change only through `fleetctl label`: a claim that
/// differs is ignored (and the caller records that). `known` is `None` for a new host.
pub fn labels_on_connect(
    known: Option<&BTreeMap<String, String>>,
    joined: Option<&BTreeMap<String, String>>,
    claimed: &BTreeMap<String, String>,
) -> (BTreeMap<String, String>, bool) {
    let kept = match (known, joined) {
        (Some(known), _) => known.clone(),
        (None, Some(joined)) => joined.clone(),
        (None, None) => claimed.clone(),
    };
    let ignored = &kept != claimed;
    (kept, ignored)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Heartbeats every 500 ms, lost after 6 s, 100 a second at most (tests of other modules
    /// use it too).
    pub(crate) fn test_policy() -> Policy {
        Policy {
            interval_ms: 500,
            lost_after_ms: 6_000,
            per_second: 100,
        }
    }

    fn live_host(last_seen_unix_ms: i64, lost_after_ms: u64) -> LiveHost {
        LiveHost {
            session: 1,
            desired_tx: watch::channel(DesiredAssignments::default()).0,
            instances: BTreeMap::new(),
            last_seen_unix_ms,
            lost_after_ms,
        }
    }

    fn host_record(name: &str, last_seen_unix_ms: i64) -> HostRecord {
        HostRecord {
            name: name.to_string(),
            labels: BTreeMap::new(),
            advertise_addr: "127.0.0.2".to_string(),
            registered_unix_ms: last_seen_unix_ms,
            last_seen_unix_ms,
            desired: BTreeMap::new(),
            drain: None,
            agent: AgentInfo::default(),
        }
    }

    /// A host is lost after the silence it was last told, or the fleet's now, whichever is
    /// longer: a host told a long interval is not lost when the fleet shrinks before its next
    /// heartbeat, and every host gets the longer silence at once when the fleet grows.
    #[test]
    fn a_host_is_lost_after_what_it_was_told_or_the_fleets_silence_whichever_is_longer() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let artifacts =
            ArtifactStore::open(dir.path(), crate::config::UploadLimits::default()).unwrap();
        // 10 heartbeats a second: past 5 hosts the interval stretches from 500 ms.
        let policy = Policy {
            per_second: 10,
            ..test_policy()
        };
        let fleet = FleetState::new(store, artifacts, policy);
        let now = fleet_proto::now_unix_ms();
        // As if the controller had started long ago.
        fleet
            .hearing_since_unix_ms
            .store(now - 3_600_000, std::sync::atomic::Ordering::Relaxed);
        let eight_s_ago = now - 8_000;
        fleet
            .live()
            .hosts
            .insert("told-long".into(), live_host(eight_s_ago, 12_000));
        fleet
            .live()
            .hosts
            .insert("told-short".into(), live_host(eight_s_ago, 6_000));
        assert_eq!(fleet.cadence(), crate::heartbeat::cadence(&policy, 2));
        assert_eq!(fleet.cadence().lost_after_ms, 6_000);
        assert!(!fleet.is_lost(&host_record("told-long", eight_s_ago)));
        assert!(fleet.is_lost(&host_record("told-short", eight_s_ago)));
        // A host never connected in this run: the fleet's silence, from its stored time.
        assert!(fleet.is_lost(&host_record("stored", eight_s_ago)));
        assert!(!fleet.is_lost(&host_record("stored", now - 5_000)));

        // Six hosts registered (the watcher counted them): 1 s heartbeats, lost after 12 s.
        fleet.registered.store(6, Ordering::Relaxed);
        assert_eq!(
            fleet.cadence(),
            Cadence {
                interval_ms: 1_000,
                lost_after_ms: 12_000
            }
        );
        assert!(!fleet.is_lost(&host_record("told-short", eight_s_ago)));
        assert!(!fleet.is_lost(&host_record("stored", eight_s_ago)));

        // A heartbeat is answered with the fleet's cadence, which the host is held to from
        // then on; a stale session's heartbeat is not answered.
        assert_eq!(fleet.host_heartbeat("told-short", 2), None);
        assert_eq!(fleet.host_heartbeat("told-short", 1), Some(fleet.cadence()));
        assert_eq!(fleet.live().hosts["told-short"].lost_after_ms, 12_000);
        // The host's session ends: it keeps the silence it was told.
        fleet.registered.store(0, Ordering::Relaxed);
        assert!(fleet.forget_session("told-long", 1).is_some());
        assert!(!fleet.is_lost(&host_record("told-long", eight_s_ago)));
    }

    /// `k=v,...` as a label map (tests of other modules use it too).
    pub(crate) fn labels(text: &str) -> BTreeMap<String, String> {
        fleet_proto::names::parse_labels(text)
            .unwrap()
            .into_iter()
            .collect()
    }

    /// A store write asked for from another runtime (the clients' lane) runs on the blocking
    /// pool of the runtime the state was made on, the agents' lane (no priority inversion on
    /// the store's one writer).
    #[test]
    fn store_writes_run_on_the_runtime_the_state_was_made_on() {
        let dir = tempfile::tempdir().unwrap();
        let home = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fleet-home")
            .build()
            .unwrap();
        let fleet = {
            let _inside = home.enter();
            let store = Store::open(dir.path()).unwrap();
            let artifacts =
                ArtifactStore::open(dir.path(), crate::config::UploadLimits::default()).unwrap();
            FleetState::new(store, artifacts, test_policy())
        };
        let clients = tokio::runtime::Builder::new_current_thread()
            .thread_name("fleet-clients")
            .build()
            .unwrap();
        let ran_on = clients
            .block_on(fleet.write(|_| Ok(std::thread::current().name().map(str::to_string))))
            .unwrap();
        assert_eq!(ran_on.as_deref(), Some("fleet-home"));
    }

    /// A session that ends leaves when its host was last heard from readable at once, before
    /// the store's copy is written: a host heard a moment ago is not lost.
    #[test]
    fn a_host_whose_session_just_ended_is_not_silent_since_it_connected() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let artifacts =
            ArtifactStore::open(dir.path(), crate::config::UploadLimits::default()).unwrap();
        let fleet = FleetState::new(store, artifacts, test_policy());
        let heard = fleet_proto::now_unix_ms() - 100;
        fleet.live().hosts.insert(
            "h1".to_string(),
            LiveHost {
                session: 7,
                desired_tx: watch::channel(DesiredAssignments::default()).0,
                instances: BTreeMap::new(),
                last_seen_unix_ms: heard,
                lost_after_ms: 6_000,
            },
        );
        // A stale session's end changes nothing.
        assert_eq!(fleet.forget_session("h1", 6), None);
        assert!(fleet.is_connected("h1"));
        assert_eq!(fleet.forget_session("h1", 7), Some(heard));
        assert!(!fleet.is_connected("h1"));
        assert_eq!(fleet.last_seen("h1"), Some(heard));
        // The host's record still holds the time it connected, long ago.
        let record = HostRecord {
            name: "h1".to_string(),
            labels: BTreeMap::new(),
            advertise_addr: "127.0.0.2".to_string(),
            registered_unix_ms: heard - 60_000,
            last_seen_unix_ms: heard - 60_000,
            desired: BTreeMap::new(),
            drain: None,
            agent: AgentInfo::default(),
        };
        assert!(!fleet.is_lost(&record));
        assert_eq!(fleet.silent_for_secs(&record), 0);
    }

    #[test]
    fn a_host_keeps_the_labels_it_joined_with() {
        // (known, from the join token, claimed) -> (kept, claim ignored)
        type Case<'a> = (Option<&'a str>, Option<&'a str>, &'a str, &'a str, bool);
        let cases: [Case; 7] = [
            (None, None, "zone=a", "zone=a", false),
            (None, None, "", "", false),
            (None, Some("zone=a"), "zone=a", "zone=a", false),
            (None, Some("zone=a"), "zone=b", "zone=a", true),
            (None, Some("zone=a"), "", "zone=a", true),
            (Some("zone=a"), None, "zone=b", "zone=a", true),
            (
                Some("zone=a,env=prod"),
                Some("zone=c"),
                "zone=a,env=prod",
                "zone=a,env=prod",
                false,
            ),
        ];
        for (known, joined, claimed, kept, ignored) in cases {
            let (known, joined) = (known.map(labels), joined.map(labels));
            assert_eq!(
                labels_on_connect(known.as_ref(), joined.as_ref(), &labels(claimed)),
                (labels(kept), ignored),
                "{known:?} {joined:?} {claimed}"
            );
        }
    }
}
