//! The controllers of a fleet on etcd: each one registers itself under `PREFIX/controllers/`
//! with a lease of its own (its URL, its operators' HTTP address, since when it is up and, while
//! it leads, since when it leads), so that `fleetctl controllers` can list them and a leader can
//! find the others (to store an artifact on a second one). A controller that dies or is cut from
//! etcd drops out when its lease ends; one that comes back registers again.

use crate::leader::Role;
use crate::store::etcd::EtcdBackend;
use crate::store::StoreError;
use etcd_api::etcdserverpb::{kv_client::KvClient, PutRequest, RangeRequest};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The lease of a registration: a dead controller drops out of the list this long after.
const LEASE: Duration = Duration::from_secs(5);
const FOLDER: &str = "controllers/";

/// One controller as the registry holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerEntry {
    /// Where fleetctl and agents reach it: `https://HOST:PORT`.
    pub url: String,
    /// Its operators' HTTP listener, if it has one.
    #[serde(default)]
    pub http: Option<String>,
    pub up_since_unix_ms: i64,
    /// Since when it leads; `None` while it follows.
    #[serde(default)]
    pub leading_since_unix_ms: Option<i64>,
}

fn key(backend: &EtcdBackend, url: &str) -> Vec<u8> {
    backend.prefixed(&format!("{FOLDER}{url}"))
}

/// Every registered controller, by URL.
pub fn list(backend: &EtcdBackend) -> Result<Vec<ControllerEntry>, StoreError> {
    let start = backend.prefixed(FOLDER);
    let end = EtcdBackend::range_end(&start);
    let answer = backend.call_on_channel(Duration::from_secs(5), move |channel| async move {
        Ok(KvClient::new(channel)
            .range(RangeRequest {
                key: start,
                range_end: end,
                ..RangeRequest::default()
            })
            .await?
            .into_inner())
    })?;
    let mut entries: Vec<ControllerEntry> = answer
        .kvs
        .iter()
        .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
        .collect();
    entries.sort_by(|a, b| a.url.cmp(&b.url));
    Ok(entries)
}

/// The other live controllers' URLs (every registered one but `me`).
pub fn peers(backend: &EtcdBackend, me: &str) -> Result<Vec<String>, StoreError> {
    Ok(list(backend)?
        .into_iter()
        .map(|entry| entry.url)
        .filter(|url| url != me)
        .collect())
}

fn put(backend: &EtcdBackend, entry: &ControllerEntry, lease: i64) -> Result<(), StoreError> {
    let key = key(backend, &entry.url);
    let value = serde_json::to_vec(entry).map_err(|e| StoreError::Etcd(e.to_string()))?;
    backend.call_on_channel(Duration::from_secs(5), move |channel| async move {
        Ok(KvClient::new(channel)
            .put(PutRequest {
                key,
                value,
                lease,
                ..PutRequest::default()
            })
            .await?
            .into_inner())
    })?;
    Ok(())
}

/// The entry of this controller in `role`. Pure.
pub fn entry_for(base: &ControllerEntry, role: &Role) -> ControllerEntry {
    ControllerEntry {
        leading_since_unix_ms: match role {
            Role::Leader { since_unix_ms } => Some(*since_unix_ms),
            Role::Follower { .. } => None,
        },
        ..base.clone()
    }
}

/// Keeps this controller registered (as `base`, with what `role` says) until `stop`: a lease
/// of its own, kept alive; the entry rewritten when the role changes; registered afresh when
/// the lease is lost.
pub async fn run(
    backend: Arc<EtcdBackend>,
    base: ControllerEntry,
    mut role: watch::Receiver<Role>,
    mut stop: watch::Receiver<bool>,
) {
    for _ in 0..1_000_000 {
        let registered = tokio::task::spawn_blocking({
            let backend = backend.clone();
            let entry = entry_for(&base, &role.borrow_and_update());
            move || -> Result<(i64, watch::Receiver<bool>, tokio::task::AbortHandle), StoreError> {
                let crate::leader::KeptLease { id, lost, keeping } =
                    crate::leader::keep_lease(&backend, LEASE)?;
                put(&backend, &entry, id)?;
                Ok((id, lost, keeping))
            }
        })
        .await;
        let (lease, mut lost, keeping) = match registered {
            Ok(Ok(registered)) => registered,
            Ok(Err(e)) => {
                tracing::warn!("cannot register this controller in etcd (retrying): {e}");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = crate::leader::until(&mut stop, |stop| *stop) => return,
                }
            }
            Err(_) => return,
        };
        loop {
            tokio::select! {
                _ = crate::leader::until(&mut lost, |lost| *lost) => break,
                changed = role.changed() => {
                    if changed.is_err() {
                        keeping.abort();
                        return;
                    }
                    let backend = backend.clone();
                    let entry = entry_for(&base, &role.borrow_and_update());
                    let _ = tokio::task::spawn_blocking(move || {
                        if let Err(e) = put(&backend, &entry, lease) {
                            tracing::warn!("cannot update this controller's entry in etcd: {e}");
                        }
                    })
                    .await;
                }
                _ = crate::leader::until(&mut stop, |stop| *stop) => {
                    keeping.abort();
                    return;
                }
            }
        }
        keeping.abort();
    }
}

/// This controller's place among the fleet's controllers: what `fleetctl controllers` is
/// answered from, and where a leader finds the others.
pub struct Membership {
    /// The etcd the fleet is on; `None` on the redb store, where this controller is the only one.
    pub etcd: Option<Arc<EtcdBackend>>,
    /// This controller (its entry without the role).
    pub me: ControllerEntry,
    pub role: watch::Receiver<Role>,
}

/// A controller and whether it leads now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub entry: ControllerEntry,
    pub leader: bool,
}

impl Membership {
    /// The fleet's controllers, the leader marked (blocks on etcd: call it off the workers).
    /// The leader is the one etcd's election names, whatever its entry says.
    pub fn list(&self) -> Result<Vec<Listed>, StoreError> {
        let Some(etcd) = &self.etcd else {
            let entry = entry_for(&self.me, &self.role.borrow());
            return Ok(vec![Listed {
                leader: entry.leading_since_unix_ms.is_some(),
                entry,
            }]);
        };
        let leader = crate::leader::current_leader(etcd, crate::leader::ELECTION);
        Ok(mark_leader(list(etcd)?, leader.as_deref()))
    }

    /// The other live controllers' URLs (none on the redb store).
    pub fn peers(&self) -> Result<Vec<String>, StoreError> {
        match &self.etcd {
            Some(etcd) => peers(etcd, &self.me.url),
            None => Ok(Vec::new()),
        }
    }
}

/// `entries` with the one at `leader`'s URL marked as the leader (and only it). Pure.
pub fn mark_leader(entries: Vec<ControllerEntry>, leader: Option<&str>) -> Vec<Listed> {
    entries
        .into_iter()
        .map(|entry| Listed {
            leader: Some(entry.url.as_str()) == leader,
            entry,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leader_says_since_when_and_a_follower_does_not() {
        let base = ControllerEntry {
            url: "https://127.0.0.1:7700".into(),
            http: None,
            up_since_unix_ms: 5,
            leading_since_unix_ms: None,
        };
        let leading = entry_for(&base, &Role::Leader { since_unix_ms: 9 });
        assert_eq!(leading.leading_since_unix_ms, Some(9));
        assert_eq!(leading.up_since_unix_ms, 5);
        let following = entry_for(&leading, &Role::Follower { leader: None });
        assert_eq!(following.leading_since_unix_ms, None);
    }

    #[test]
    fn the_leader_is_the_one_the_election_names() {
        let entry = |url: &str| ControllerEntry {
            url: url.into(),
            http: None,
            up_since_unix_ms: 1,
            leading_since_unix_ms: None,
        };
        let entries = vec![entry("https://a:1"), entry("https://b:1")];
        for (leader, marked) in [
            (Some("https://b:1"), vec![false, true]),
            (None, vec![false, false]),
            (Some("https://gone:1"), vec![false, false]),
        ] {
            let listed = mark_leader(entries.clone(), leader);
            assert_eq!(
                listed.iter().map(|l| l.leader).collect::<Vec<_>>(),
                marked,
                "{leader:?}"
            );
        }
    }
}
