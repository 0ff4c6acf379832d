//! Leadership among controllers that share one fleet in etcd: a controller campaigns through
//! etcd's election API with a lease (5 s by default) it keeps alive from the etcd backend's
//! runtime; once it leads, the leader key's create revision becomes the etcd backend's fence,
//! so every commit it makes requires that key to be the same one. When its lease ends (it hung,
//! or was cut from etcd) the key goes, and its later writes fail ("no longer the leader")
//! however late they arrive. What runs only on the leader (rollouts, convergence, the
//! lost-host watcher) is not wired to this yet.

use crate::store::etcd::{EtcdBackend, Fence};
use crate::store::StoreError;
use etcd_api::etcdserverpb::{lease_client::LeaseClient, LeaseGrantRequest, LeaseKeepAliveRequest};
use etcd_api::v3electionpb::{election_client::ElectionClient, CampaignRequest};
use std::sync::Arc;
use std::time::Duration;

/// The default lease of a leadership.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(5);

/// A won election; the lease is kept alive until this is dropped.
pub struct Leadership {
    pub fence: Fence,
    pub lease: i64,
    keep_alive: tokio::task::AbortHandle,
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.keep_alive.abort();
    }
}

/// How often a lease of `ttl` is renewed: three times per lease, at least once a second.
pub fn renew_every(ttl: Duration) -> Duration {
    (ttl / 3).max(Duration::from_secs(1)).min(ttl)
}

/// Campaigns for `election` (under the backend's prefix) with `value` (this controller's
/// address), waiting at most `within`; once won, the backend's commits are fenced by the
/// leader key.
pub fn campaign(
    backend: &Arc<EtcdBackend>,
    election: &str,
    value: &str,
    lease: Duration,
    within: Duration,
) -> Result<Leadership, StoreError> {
    let ttl = lease.as_secs().max(1) as i64;
    let granted = backend.call_on_channel(Duration::from_secs(5), move |channel| async move {
        Ok(LeaseClient::new(channel)
            .lease_grant(LeaseGrantRequest { ttl, id: 0 })
            .await?
            .into_inner())
    })?;
    let id = granted.id;
    let every = renew_every(Duration::from_secs(ttl as u64));
    let keep_alive =
        backend.call_on_channel(Duration::from_secs(5), move |channel| async move {
            let task = tokio::spawn(async move {
                let requests = async_stream(id, every);
                if let Ok(answers) = LeaseClient::new(channel).lease_keep_alive(requests).await {
                    let mut answers = answers.into_inner();
                    while let Ok(Some(answer)) = answers.message().await {
                        if answer.ttl <= 0 {
                            tracing::warn!("the leader's lease {id} ended");
                            break;
                        }
                    }
                }
            });
            Ok(task.abort_handle())
        })?;
    let name = backend.election_name(election);
    let value = value.as_bytes().to_vec();
    let won = backend.call_on_channel(within, move |channel| async move {
        Ok(ElectionClient::new(channel)
            .campaign(CampaignRequest {
                name,
                lease: id,
                value,
            })
            .await?
            .into_inner())
    });
    let won = match won {
        Ok(won) => won,
        Err(e) => {
            // Withdraw: the key this campaign queued goes with its lease, at once.
            keep_alive.abort();
            let _ = backend.call_on_channel(Duration::from_secs(5), move |channel| async move {
                Ok(LeaseClient::new(channel)
                    .lease_revoke(etcd_api::etcdserverpb::LeaseRevokeRequest { id })
                    .await?
                    .into_inner())
            });
            return Err(StoreError::Etcd(format!(
                "not the leader within {within:?} (another controller leads, or etcd is unreachable): {e}"
            )));
        }
    };
    let leader = won
        .leader
        .ok_or_else(|| StoreError::Etcd("etcd's campaign answer named no leader key".into()))?;
    let fence = Fence {
        key: leader.key,
        create_revision: leader.rev,
    };
    backend.set_fence(Some(fence.clone()));
    Ok(Leadership {
        fence,
        lease: id,
        keep_alive,
    })
}

/// A keep-alive request for lease `id` every `every`, for as long as the stream is read.
fn async_stream(
    id: i64,
    every: Duration,
) -> impl tokio_stream::Stream<Item = LeaseKeepAliveRequest> + Send + 'static {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::IntervalStream::new(tokio::time::interval(every))
        .map(move |_| LeaseKeepAliveRequest { id })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_renewed_three_times_per_lease_and_at_most_once_a_second() {
        for (ttl, every_ms) in [(5, 1666), (1, 1000), (30, 10_000), (2, 1000)] {
            assert_eq!(
                renew_every(Duration::from_secs(ttl)).as_millis(),
                every_ms,
                "{ttl}"
            );
        }
    }

    #[test]
    fn one_controller_leads_and_a_deposed_leader_cannot_write() {
        let Some(server) = fleet_etcd_harness::Etcd::single() else {
            return;
        };
        let config = crate::store::etcd::EtcdConfig {
            endpoints: server.urls(),
            prefix: "/fleet".into(),
            ca: None,
            cert: None,
            key: None,
        };
        let a = Arc::new(EtcdBackend::open(&config, "fleet").unwrap());
        let b = Arc::new(EtcdBackend::open(&config, "fleet").unwrap());
        let store_a = crate::store::Store::over(a.clone());
        let store_b = crate::store::Store::over(b.clone());
        let leading = campaign(&a, "leader", "a", DEFAULT_LEASE, Duration::from_secs(10)).unwrap();
        assert_eq!(store_a.next_seq("n").unwrap(), 1, "the leader writes");
        // b waits while a leads.
        let refused = campaign(&b, "leader", "b", DEFAULT_LEASE, Duration::from_secs(2))
            .err()
            .expect("two leaders at once")
            .to_string();
        assert!(refused.starts_with("not the leader within 2s"), "{refused}");
        // a's lease is revoked (as when it expires): its key goes, and so does its right to write.
        let lease = leading.lease;
        a.call_on_channel(Duration::from_secs(5), move |channel| async move {
            Ok(LeaseClient::new(channel)
                .lease_revoke(etcd_api::etcdserverpb::LeaseRevokeRequest { id: lease })
                .await?
                .into_inner())
        })
        .unwrap();
        let error = store_a.next_seq("n").err().unwrap().to_string();
        assert_eq!(
            error,
            "this controller is no longer the leader: its write was refused"
        );
        let _b_leads = campaign(&b, "leader", "b", DEFAULT_LEASE, Duration::from_secs(10)).unwrap();
        assert_eq!(
            store_b.next_seq("n").unwrap(),
            2,
            "the new leader writes, nothing of a's was lost or doubled"
        );
        drop(leading);
        drop(server);
    }
}
