//! The etcd backend: every record at `<prefix>/<table>/<key>` in an etcd cluster, so that
//! several controllers can share one fleet's state (`[etcd]` in controller.toml).
//!
//! A transaction is optimistic, like etcd's own STM: every read is at one store revision (the
//! first read's), the revision of every key read is remembered (0 when absent) and every range
//! read is remembered; the writes are buffered and committed as ONE etcd `Txn` whose compares
//! say "nothing I read changed": each key still at the revision read, no key of a range read
//! written since. When a compare fails another writer came in between, and the whole body runs
//! again (at most [`MAX_TRIES`] times, then a clear error). A key deleted from within a range
//! read (not read by itself) is not seen as a conflict: the store's methods never depend on
//! that. A fencing compare ([`Fence`]: the leader key still has the create revision it had when
//! this controller won the election) can be set, so a deposed leader's commits fail.
//!
//! The `Store` API is synchronous and etcd's client is async: the backend runs its own
//! current-thread tokio runtime on a thread of its own, and each call hands it a request over
//! a channel and waits for the answer, so a call works from any thread, inside a tokio runtime
//! or outside one, without `block_on` on a runtime worker.
//!
//! The marker key `<prefix>/fleet` holds the SHA-256 fingerprint of the fleet CA: a prefix
//! that holds another fleet's data (or data that is not a fleet's) is refused.

use super::backend::{Backend, Body, Range, Table, Txn};
use super::StoreError;
use etcd_api::etcdserverpb::{
    compare, kv_client::KvClient, request_op, Compare, DeleteRangeRequest, PutRequest,
    RangeRequest, RequestOp, TxnRequest,
};
use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// How many times a transaction runs when other writers keep changing what it read.
pub const MAX_TRIES: usize = 16;
/// How long one etcd call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long connecting to an endpoint may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The default key prefix.
pub const DEFAULT_PREFIX: &str = fleet_proto::etcd_config::DEFAULT_PREFIX;

/// Where the store is: `[etcd]` in controller.toml, or `migrate --to-etcd`'s flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `http://` or `https://` URLs of etcd members.
    pub endpoints: Vec<String>,
    /// The key prefix (`/fleet`): starts with `/`, does not end with one.
    pub prefix: String,
    /// The CA that signed etcd's certificate (required for https).
    pub ca: Option<PathBuf>,
    /// A client certificate and key, for an etcd that requires them.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl EtcdConfig {
    /// The endpoints as one text, for messages.
    pub fn url(&self) -> String {
        self.endpoints.join(",")
    }
}

/// The leadership a commit must still hold: the key's create revision is the fencing token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub key: Vec<u8>,
    pub create_revision: i64,
}

/// The fingerprint of a fleet CA (the first certificate of the CA file): SHA-256, hex.
pub fn ca_fingerprint(ca_pem: &str) -> String {
    use sha2::Digest;
    let first = fleet_pki::identity::split_pem_bundle(ca_pem)
        .into_iter()
        .next()
        .unwrap_or_else(|| ca_pem.to_string());
    let text: String = first.split_whitespace().collect();
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

/// What the marker key says about a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrefixState {
    /// No key at all under the prefix.
    Empty,
    /// The marker of the fleet with this CA fingerprint.
    Fleet(String),
    /// Keys, but no marker: not a fleet's data, or a migrate that did not finish.
    Unmarked,
}

/// Whether a controller of the fleet with CA fingerprint `ours` may use a prefix in `state`,
/// and if not, why (the text after "etcd at URL prefix P "). Pure.
pub fn open_refusal(state: &PrefixState, ours: &str) -> Option<String> {
    match state {
        PrefixState::Empty => None,
        PrefixState::Fleet(theirs) if theirs == ours => None,
        PrefixState::Fleet(theirs) => Some(format!(
            "holds the data of another fleet (CA fingerprint {theirs}); use another --etcd-prefix or an empty etcd"
        )),
        PrefixState::Unmarked => Some(
            "holds keys but no fleet marker (not a fleet's data, or a migrate that did not finish); use another --etcd-prefix, or delete the prefix's keys (etcdctl del --prefix PREFIX/) and run migrate again".to_string(),
        ),
    }
}

/// Whether `migrate` may copy the fleet with CA fingerprint `ours` into a prefix in `state`,
/// and if not, why. Pure.
pub fn migrate_refusal(state: &PrefixState, ours: &str) -> Option<String> {
    match state {
        PrefixState::Empty => None,
        PrefixState::Fleet(theirs) if theirs == ours => Some(
            "holds this fleet's data already: it was migrated; point controller.toml's [etcd] at it and start the controller".to_string(),
        ),
        other => open_refusal(other, ours),
    }
}

type Job = Box<dyn FnOnce(Channel) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// The etcd backend (see the module doc).
pub struct EtcdBackend {
    jobs: tokio::sync::mpsc::UnboundedSender<Job>,
    config: EtcdConfig,
    fence: Mutex<Option<Fence>>,
}

fn prefix_end(key: &[u8]) -> Vec<u8> {
    let mut end = key.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn endpoint(url: &str, config: &EtcdConfig) -> Result<Endpoint, String> {
    let mut endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| format!("etcd URL {url} is not a URL: {e}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT);
    if url.starts_with("https://") {
        let read = |path: &PathBuf, what: &str| {
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read the etcd {what} {}: {e}", path.display()))
        };
        let ca = config.ca.as_ref().ok_or_else(|| {
            format!("etcd URL {url} is https: give the CA of etcd's certificate (--etcd-ca)")
        })?;
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca, "CA")?));
        if let (Some(cert), Some(key)) = (&config.cert, &config.key) {
            tls = tls.identity(Identity::from_pem(
                read(cert, "client certificate")?,
                read(key, "client key")?,
            ));
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| format!("etcd TLS for {url}: {e}"))?;
    }
    Ok(endpoint)
}

impl EtcdBackend {
    /// Connects to etcd and checks that it answers within a few seconds. Does not look at the
    /// marker (see [`EtcdBackend::open`] and [`EtcdBackend::prefix_state`]).
    pub fn connect(config: &EtcdConfig) -> Result<EtcdBackend, StoreError> {
        if config.endpoints.is_empty() {
            return Err(StoreError::Etcd("no etcd URL given".into()));
        }
        let endpoints = config
            .endpoints
            .iter()
            .map(|url| endpoint(url, config))
            .collect::<Result<Vec<_>, _>>()
            .map_err(StoreError::Etcd)?;
        let (jobs, mut queue) = tokio::sync::mpsc::unbounded_channel::<Job>();
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("etcd-store".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let channel = Channel::balance_list(endpoints.into_iter());
                    let _ = ready_tx.send(Ok(()));
                    // Ends when the backend (every sender) is dropped.
                    while let Some(job) = queue.recv().await {
                        tokio::spawn(job(channel.clone()));
                    }
                });
            })
            .map_err(|e| StoreError::Etcd(format!("cannot start the etcd client thread: {e}")))?;
        ready_rx
            .recv()
            .map_err(|_| StoreError::Etcd("the etcd client thread did not start".into()))?
            .map_err(|e| StoreError::Etcd(format!("cannot start the etcd client runtime: {e}")))?;
        let backend = EtcdBackend {
            jobs,
            config: config.clone(),
            fence: Mutex::new(None),
        };
        backend.prefix_state()?;
        Ok(backend)
    }

    /// Connects, and claims (on an empty prefix) or checks the fleet marker: a prefix that
    /// holds another fleet's data, or data without a marker, is refused.
    pub fn open(config: &EtcdConfig, fingerprint: &str) -> Result<EtcdBackend, StoreError> {
        let backend = EtcdBackend::connect(config)?;
        let state = backend.prefix_state()?;
        if let Some(why) = open_refusal(&state, fingerprint) {
            return Err(backend.refused(&why));
        }
        if state == PrefixState::Empty {
            if let Err(lost) = backend.claim(fingerprint) {
                // Another controller of the same fleet, started at the same moment, claimed
                // it first: that is this fleet's prefix too.
                if backend.prefix_state()? != PrefixState::Fleet(fingerprint.to_string()) {
                    return Err(lost);
                }
            }
        }
        Ok(backend)
    }

    fn refused(&self, why: &str) -> StoreError {
        StoreError::Etcd(format!(
            "etcd at {} prefix {} {why}",
            self.config.url(),
            self.config.prefix
        ))
    }

    fn marker_key(&self) -> Vec<u8> {
        format!("{}/fleet", self.config.prefix).into_bytes()
    }

    /// What the prefix holds: nothing, a fleet's marker, or keys without one.
    pub fn prefix_state(&self) -> Result<PrefixState, StoreError> {
        let state = self.prefix_state_once()?;
        if state == PrefixState::Unmarked {
            // The marker may have come between the two reads (another controller of a fleet
            // claiming the empty prefix): it is never deleted, so a second look settles it.
            return self.prefix_state_once();
        }
        Ok(state)
    }

    fn prefix_state_once(&self) -> Result<PrefixState, StoreError> {
        let marker = self.marker_key();
        let found = self.call({
            let marker = marker.clone();
            move |mut kv| async move {
                Ok(kv
                    .range(RangeRequest {
                        key: marker,
                        ..RangeRequest::default()
                    })
                    .await?
                    .into_inner())
            }
        })?;
        if let Some(kv) = found.kvs.first() {
            return Ok(PrefixState::Fleet(
                String::from_utf8_lossy(&kv.value).into_owned(),
            ));
        }
        let start = format!("{}/", self.config.prefix).into_bytes();
        let counted = self.call(move |mut kv| async move {
            Ok(kv
                .range(RangeRequest {
                    range_end: prefix_end(&start),
                    key: start,
                    count_only: true,
                    ..RangeRequest::default()
                })
                .await?
                .into_inner())
        })?;
        Ok(if counted.count == 0 {
            PrefixState::Empty
        } else {
            PrefixState::Unmarked
        })
    }

    /// Writes the fleet marker, unless some marker is there already.
    pub fn claim(&self, fingerprint: &str) -> Result<(), StoreError> {
        let marker = self.marker_key();
        let value = fingerprint.as_bytes().to_vec();
        let done = self.call(move |mut kv| async move {
            Ok(kv
                .txn(TxnRequest {
                    compare: vec![Compare {
                        result: compare::CompareResult::Equal as i32,
                        target: compare::CompareTarget::Create as i32,
                        key: marker.clone(),
                        target_union: Some(compare::TargetUnion::CreateRevision(0)),
                        range_end: Vec::new(),
                    }],
                    success: vec![RequestOp {
                        request: Some(request_op::Request::RequestPut(PutRequest {
                            key: marker,
                            value,
                            ..PutRequest::default()
                        })),
                    }],
                    failure: Vec::new(),
                })
                .await?
                .into_inner())
        })?;
        if !done.succeeded {
            return Err(self.refused("got a fleet marker while this controller was claiming it; start the controller again"));
        }
        Ok(())
    }

    /// From now on every commit also requires `fence` (or none, with `None`).
    pub fn set_fence(&self, fence: Option<Fence>) {
        *self.fence.lock().unwrap_or_else(|e| e.into_inner()) = fence;
    }

    /// Runs `f` with the KV client on the backend's runtime thread and waits for its answer.
    fn call<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(KvClient<Channel>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, tonic::Status>> + Send + 'static,
    {
        self.call_on_channel(CALL_TIMEOUT, move |channel| f(KvClient::new(channel)))
    }

    /// Runs `f` with the channel to etcd on the backend's runtime thread (where it may spawn
    /// tasks) and waits at most `within` for its answer.
    pub(crate) fn call_on_channel<T, F, Fut>(&self, within: Duration, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(Channel) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, tonic::Status>> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let job: Job = Box::new(move |channel| {
            Box::pin(async move {
                let out = tokio::time::timeout(within, f(channel)).await;
                let _ = tx.send(out);
            })
        });
        let gone = || StoreError::Etcd("the etcd client thread is gone".into());
        self.jobs.send(job).map_err(|_| gone())?;
        match rx.recv().map_err(|_| gone())? {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(status)) => Err(self.etcd_error(&status)),
            Err(_) => Err(self.did_not_answer()),
        }
    }

    fn did_not_answer(&self) -> StoreError {
        StoreError::Etcd(format!(
            "etcd at {} did not answer: is it running, and is the URL right?",
            self.config.url()
        ))
    }

    fn etcd_error(&self, status: &tonic::Status) -> StoreError {
        let message = status.message();
        if message.contains("too many operations in txn request") {
            return StoreError::Etcd(format!(
                "etcd at {} refused a transaction for having too many operations: start etcd with a larger --max-txn-ops (128 by default; fleet writes a wave's hosts in one transaction)",
                self.config.url()
            ));
        }
        if matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ) {
            return self.did_not_answer();
        }
        StoreError::Etcd(format!(
            "etcd at {}: {} ({:?})",
            self.config.url(),
            message,
            status.code()
        ))
    }

    /// The key `rest` under the prefix, outside the store's tables (the controllers' registry).
    pub(crate) fn prefixed(&self, rest: &str) -> Vec<u8> {
        format!("{}/{rest}", self.config.prefix).into_bytes()
    }

    /// The end of the key range of every key that starts with `start`.
    pub(crate) fn range_end(start: &[u8]) -> Vec<u8> {
        prefix_end(start)
    }

    /// The name of election `election` under the prefix.
    pub(crate) fn election_name(&self, election: &str) -> Vec<u8> {
        format!("{}/election/{election}", self.config.prefix).into_bytes()
    }

    fn table_key(&self, table: Table, key: &str) -> Vec<u8> {
        format!("{}/{}/{key}", self.config.prefix, table.name()).into_bytes()
    }

    fn table_start(&self, table: Table) -> Vec<u8> {
        self.table_key(table, "")
    }

    /// The etcd key range of `range` in `table`.
    fn key_range(&self, table: Table, range: &Range) -> (Vec<u8>, Vec<u8>) {
        let start = match &range.from {
            Some(from) => self.table_key(table, from),
            None => self.table_start(table),
        };
        let end = match &range.below {
            Some(below) => self.table_key(table, below),
            None => prefix_end(&self.table_start(table)),
        };
        (start, end)
    }

    /// The table key of an etcd key of `table`.
    fn record_key(&self, table: Table, key: &[u8]) -> String {
        let start = self.table_start(table);
        String::from_utf8_lossy(&key[start.len().min(key.len())..]).into_owned()
    }

    fn run(&self, body: Body<'_>, writable: bool) -> Result<(), StoreError> {
        for _ in 0..MAX_TRIES {
            let mut txn = EtcdTxn {
                backend: self,
                writable,
                revision: 0,
                reads: BTreeMap::new(),
                ranges: Vec::new(),
                writes: BTreeMap::new(),
                deleted_below: Vec::new(),
            };
            body(&mut txn)?;
            if !writable || (txn.writes.is_empty() && txn.deleted_below.is_empty()) {
                return Ok(());
            }
            if txn.commit()? {
                return Ok(());
            }
        }
        Err(StoreError::Etcd(format!(
            "etcd at {}: a transaction conflicted with other writers {MAX_TRIES} times in a row; try again",
            self.config.url()
        )))
    }
}

impl Backend for EtcdBackend {
    fn read(&self, body: Body<'_>) -> Result<(), StoreError> {
        self.run(body, false)
    }

    fn write(&self, body: Body<'_>) -> Result<(), StoreError> {
        self.run(body, true)
    }

    fn describe(&self) -> String {
        format!(
            "etcd at {} prefix {}",
            self.config.url(),
            self.config.prefix
        )
    }
}

/// One optimistic transaction (see the module doc).
struct EtcdTxn<'a> {
    backend: &'a EtcdBackend,
    writable: bool,
    /// The store revision every read is at; 0 until the first read.
    revision: i64,
    /// Keys read by themselves, and their mod revision then (0: absent).
    reads: BTreeMap<Vec<u8>, i64>,
    /// Key ranges read.
    ranges: Vec<(Vec<u8>, Vec<u8>)>,
    /// Buffered writes: a value to put, or `None` to delete.
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Buffered range deletions `[start, end)`.
    deleted_below: Vec<(Vec<u8>, Vec<u8>)>,
}

fn is_in(key: &[u8], (start, end): &(Vec<u8>, Vec<u8>)) -> bool {
    key >= start.as_slice() && key < end.as_slice()
}

impl EtcdTxn<'_> {
    fn range_request(
        &mut self,
        request: RangeRequest,
    ) -> Result<Vec<etcd_api::mvccpb::KeyValue>, StoreError> {
        let request = RangeRequest {
            revision: self.revision,
            ..request
        };
        let answer = self
            .backend
            .call(move |mut kv| async move { Ok(kv.range(request).await?.into_inner()) })?;
        if self.revision == 0 {
            self.revision = answer.header.map(|h| h.revision).unwrap_or(0);
        }
        Ok(answer.kvs)
    }

    fn read_only(&self) -> Result<(), StoreError> {
        if self.writable {
            Ok(())
        } else {
            Err(StoreError::Interrupted(
                "a write in a read-only transaction (a bug)".into(),
            ))
        }
    }

    /// Commits the buffered writes if nothing read changed: `Ok(false)` on a conflict.
    fn commit(self) -> Result<bool, StoreError> {
        use compare::{CompareResult, CompareTarget, TargetUnion};
        let mut compares = Vec::new();
        for (start, end) in &self.ranges {
            compares.push(Compare {
                result: CompareResult::Less as i32,
                target: CompareTarget::Mod as i32,
                key: start.clone(),
                target_union: Some(TargetUnion::ModRevision(self.revision + 1)),
                range_end: end.clone(),
            });
        }
        for (key, mod_revision) in &self.reads {
            // A key within a range read is covered by the range's compare.
            if self.ranges.iter().any(|range| is_in(key, range)) {
                continue;
            }
            compares.push(Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Mod as i32,
                key: key.clone(),
                target_union: Some(TargetUnion::ModRevision(*mod_revision)),
                range_end: Vec::new(),
            });
        }
        let fence = self
            .backend
            .fence
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut failure = Vec::new();
        if let Some(fence) = &fence {
            compares.push(Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Create as i32,
                key: fence.key.clone(),
                target_union: Some(TargetUnion::CreateRevision(fence.create_revision)),
                range_end: Vec::new(),
            });
            failure.push(RequestOp {
                request: Some(request_op::Request::RequestRange(RangeRequest {
                    key: fence.key.clone(),
                    ..RangeRequest::default()
                })),
            });
        }
        let mut success = Vec::new();
        for (start, end) in self.deleted_below {
            success.push(RequestOp {
                request: Some(request_op::Request::RequestDeleteRange(
                    DeleteRangeRequest {
                        key: start,
                        range_end: end,
                        prev_kv: false,
                    },
                )),
            });
        }
        for (key, value) in self.writes {
            success.push(RequestOp {
                request: Some(match value {
                    Some(value) => request_op::Request::RequestPut(PutRequest {
                        key,
                        value,
                        ..PutRequest::default()
                    }),
                    None => request_op::Request::RequestDeleteRange(DeleteRangeRequest {
                        key,
                        ..DeleteRangeRequest::default()
                    }),
                }),
            });
        }
        let request = TxnRequest {
            compare: compares,
            success,
            failure,
        };
        let answer = self
            .backend
            .call(move |mut kv| async move { Ok(kv.txn(request).await?.into_inner()) })?;
        if answer.succeeded {
            return Ok(true);
        }
        if let Some(fence) = fence {
            let holder = answer.responses.first().and_then(|r| match &r.response {
                Some(etcd_api::etcdserverpb::response_op::Response::ResponseRange(range)) => {
                    range.kvs.first().map(|kv| kv.create_revision)
                }
                _ => None,
            });
            if holder != Some(fence.create_revision) {
                return Err(StoreError::Etcd(
                    "this controller is no longer the leader: its write was refused".into(),
                ));
            }
        }
        Ok(false)
    }
}

impl Txn for EtcdTxn<'_> {
    fn get(&mut self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = self.backend.table_key(table, key);
        if let Some(written) = self.writes.get(&key) {
            return Ok(written.clone());
        }
        if self.deleted_below.iter().any(|range| is_in(&key, range)) {
            return Ok(None);
        }
        let found = self.range_request(RangeRequest {
            key: key.clone(),
            ..RangeRequest::default()
        })?;
        let kv = found.into_iter().next();
        self.reads
            .entry(key)
            .or_insert(kv.as_ref().map_or(0, |kv| kv.mod_revision));
        Ok(kv.map(|kv| kv.value))
    }

    fn range(&mut self, table: Table, range: &Range) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        use etcd_api::etcdserverpb::range_request::{SortOrder, SortTarget};
        let bounds = self.backend.key_range(table, range);
        let touched =
            self.writes.keys().any(|key| is_in(key, &bounds)) || !self.deleted_below.is_empty();
        // With writes of its own in the range, read it all and merge them in.
        let limit = if touched { 0 } else { range.limit as i64 };
        let found = self.range_request(RangeRequest {
            key: bounds.0.clone(),
            range_end: bounds.1.clone(),
            limit,
            sort_order: if range.reverse {
                SortOrder::Descend
            } else {
                SortOrder::Ascend
            } as i32,
            sort_target: SortTarget::Key as i32,
            ..RangeRequest::default()
        })?;
        self.ranges.push(bounds.clone());
        let mut records: BTreeMap<Vec<u8>, Vec<u8>> =
            found.into_iter().map(|kv| (kv.key, kv.value)).collect();
        if touched {
            records.retain(|key, _| !self.deleted_below.iter().any(|range| is_in(key, range)));
            for (key, value) in &self.writes {
                if is_in(key, &bounds) {
                    match value {
                        Some(value) => records.insert(key.clone(), value.clone()),
                        None => records.remove(key),
                    };
                }
            }
        }
        let limit = if range.limit == 0 {
            usize::MAX
        } else {
            range.limit
        };
        let records: Box<dyn Iterator<Item = (Vec<u8>, Vec<u8>)>> = if range.reverse {
            Box::new(records.into_iter().rev())
        } else {
            Box::new(records.into_iter())
        };
        Ok(records
            .take(limit)
            .map(|(key, value)| (self.backend.record_key(table, &key), value))
            .collect())
    }

    fn put(&mut self, table: Table, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.read_only()?;
        self.writes
            .insert(self.backend.table_key(table, key), Some(value.to_vec()));
        Ok(())
    }

    fn delete(&mut self, table: Table, key: &str) -> Result<(), StoreError> {
        self.read_only()?;
        self.writes.insert(self.backend.table_key(table, key), None);
        Ok(())
    }

    fn delete_below(&mut self, table: Table, below: &str) -> Result<(), StoreError> {
        self.read_only()?;
        let range = (
            self.backend.table_start(table),
            self.backend.table_key(table, below),
        );
        // A buffered write in the range is deleted with it (etcd refuses a key twice in a txn).
        self.writes.retain(|key, _| !is_in(key, &range));
        self.deleted_below.push(range);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_is_opened_only_empty_or_by_its_own_fleet() {
        let ours = "aa";
        let cases = [
            (PrefixState::Empty, None, None),
            (
                PrefixState::Fleet("aa".into()),
                None,
                Some("it was migrated"),
            ),
            (
                PrefixState::Fleet("bb".into()),
                Some("holds the data of another fleet (CA fingerprint bb); use another --etcd-prefix or an empty etcd"),
                Some("another fleet"),
            ),
            (
                PrefixState::Unmarked,
                Some("holds keys but no fleet marker"),
                Some("no fleet marker"),
            ),
        ];
        for (state, open, migrate) in cases {
            let refused = open_refusal(&state, ours);
            match open {
                None => assert_eq!(refused, None, "{state:?}"),
                Some(text) => assert!(refused.unwrap().contains(text), "{state:?}"),
            }
            let refused = migrate_refusal(&state, ours);
            match migrate {
                None => assert_eq!(refused, None, "{state:?}"),
                Some(text) => assert!(refused.unwrap().contains(text), "{state:?}"),
            }
        }
    }

    #[test]
    fn prefix_ends_are_the_next_key_after_every_key_with_the_prefix() {
        assert_eq!(prefix_end(b"/fleet/hosts/"), b"/fleet/hosts0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }

    #[test]
    fn fingerprints_ignore_line_breaks_but_not_the_certificate() {
        let a = "-----BEGIN CERTIFICATE-----\nAAAA\nBBBB\n-----END CERTIFICATE-----\n";
        let a_crlf = a.replace('\n', "\r\n");
        let b = "-----BEGIN CERTIFICATE-----\nAAAA\nCCCC\n-----END CERTIFICATE-----\n";
        assert_eq!(ca_fingerprint(a), ca_fingerprint(&a_crlf));
        assert_ne!(ca_fingerprint(a), ca_fingerprint(b));
        assert_eq!(ca_fingerprint(a).len(), 64);
    }
}

/// Against a real etcd (skipped, with a line, when there is none and none is required).
#[cfg(test)]
mod against_etcd {
    use super::*;
    use crate::store::Store;
    use std::sync::Arc;

    fn config(server: &fleet_etcd_harness::Etcd, prefix: &str) -> EtcdConfig {
        EtcdConfig {
            endpoints: server.urls(),
            prefix: prefix.into(),
            ca: None,
            cert: None,
            key: None,
        }
    }

    fn store(config: &EtcdConfig) -> Store {
        Store::over(Arc::new(EtcdBackend::open(config, "fleet-a").unwrap()))
    }

    #[test]
    fn two_controllers_counting_at_once_never_hand_out_a_number_twice() {
        let Some(server) = fleet_etcd_harness::Etcd::single() else {
            return;
        };
        let config = config(&server, "/fleet");
        let (a, b) = (store(&config), store(&config));
        let count = |store: Store| {
            std::thread::spawn(move || {
                (0..40)
                    .map(|_| store.next_seq("rollout").unwrap())
                    .collect::<Vec<u64>>()
            })
        };
        let (from_a, from_b) = (count(a), count(b));
        let mut all: Vec<u64> = from_a.join().unwrap();
        all.extend(from_b.join().unwrap());
        all.sort();
        assert_eq!(all, (1..=80).collect::<Vec<u64>>(), "every number once");
        drop(server);
    }

    #[test]
    fn controllers_of_one_fleet_started_at_once_on_an_empty_prefix_all_open_it() {
        let Some(server) = fleet_etcd_harness::Etcd::single() else {
            return;
        };
        // Several rounds: the claims race for the marker each time.
        for round in 0..5 {
            let config = config(&server, &format!("/race{round}"));
            let opens: Vec<_> = (0..3)
                .map(|_| {
                    let config = config.clone();
                    std::thread::spawn(move || EtcdBackend::open(&config, "fleet-a").map(|_| ()))
                })
                .collect();
            for open in opens {
                open.join().unwrap().unwrap();
            }
            assert!(EtcdBackend::open(&config, "fleet-b").is_err());
        }
        drop(server);
    }

    #[test]
    fn a_prefix_of_another_fleet_is_refused_and_an_unanswering_etcd_is_named() {
        let Some(server) = fleet_etcd_harness::Etcd::single() else {
            return;
        };
        let config = config(&server, "/fleet");
        drop(store(&config));
        let refused = EtcdBackend::open(&config, "fleet-b")
            .err()
            .unwrap()
            .to_string();
        assert_eq!(
            refused,
            format!(
                "etcd at {} prefix /fleet holds the data of another fleet (CA fingerprint fleet-a); use another --etcd-prefix or an empty etcd",
                config.url()
            )
        );
        // Another prefix of the same etcd is free.
        let other = EtcdConfig {
            prefix: "/other".into(),
            ..config.clone()
        };
        assert!(EtcdBackend::open(&other, "fleet-b").is_ok());

        let silent_port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let nobody = EtcdConfig {
            endpoints: vec![format!("http://127.0.0.1:{silent_port}")],
            ..config
        };
        let started = std::time::Instant::now();
        let refused = EtcdBackend::open(&nobody, "fleet-a")
            .err()
            .unwrap()
            .to_string();
        assert_eq!(
            refused,
            format!(
                "etcd at http://127.0.0.1:{silent_port} did not answer: is it running, and is the URL right?"
            )
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        drop(server);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_store_answers_from_inside_a_runtime_and_a_fenced_write_fails_once_deposed() {
        let Some(server) = fleet_etcd_harness::Etcd::single() else {
            return;
        };
        let config = config(&server, "/fleet");
        let backend = Arc::new(EtcdBackend::open(&config, "fleet-a").unwrap());
        let store = Store::over(backend.clone());
        // Called on this runtime's only thread: the backend's own thread does the I/O.
        assert_eq!(store.next_seq("n").unwrap(), 1);
        // The marker stands in for a leader key: its create revision is the fence.
        let marker = backend.marker_key();
        let created = backend
            .call({
                let marker = marker.clone();
                move |mut kv| async move {
                    Ok(kv
                        .range(RangeRequest {
                            key: marker,
                            ..RangeRequest::default()
                        })
                        .await?
                        .into_inner())
                }
            })
            .unwrap()
            .kvs[0]
            .create_revision;
        backend.set_fence(Some(Fence {
            key: marker.clone(),
            create_revision: created,
        }));
        assert_eq!(store.next_seq("n").unwrap(), 2, "still the leader");
        backend.set_fence(Some(Fence {
            key: marker,
            create_revision: created + 1000,
        }));
        let refused = store.next_seq("n").err().unwrap().to_string();
        assert_eq!(
            refused,
            "this controller is no longer the leader: its write was refused"
        );
        backend.set_fence(None);
        assert_eq!(store.next_seq("n").unwrap(), 3, "nothing was written");
        drop(server);
    }
}
