//! Leadership among controllers that share one fleet in etcd. A controller campaigns through
//! etcd's election API with a lease (5 s by default) it keeps alive from the etcd backend's
//! runtime; once it leads, the leader key's create revision becomes the etcd backend's fence,
//! so every commit it makes requires that key to be the same one, and a follower's fence is one
//! no key matches, so it cannot write at all. A leader that cannot renew its lease (it hung, or
//! was cut from etcd) steps down on its own before the lease can end ([`step_down_after`]),
//! and its later writes fail ("no longer the leader") however late they arrive.
//!
//! [`run`] is the loop: campaign, lead until the lease is lost or the controller stops, stand
//! down, campaign again; the [`Role`] it publishes is what the rest of the controller acts on
//! (`server` starts the leader's duties, `follower` redirects calls, sessions end). A
//! controller on the redb store has no election: it is always the leader ([`Role::sole`]).

use crate::store::etcd::{EtcdBackend, Fence};
use crate::store::StoreError;
use etcd_api::etcdserverpb::{
    lease_client::LeaseClient, LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest,
};
use etcd_api::v3electionpb::{election_client::ElectionClient, CampaignRequest, LeaderRequest};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// Waits until the value of `rx` satisfies `f`, or its sender is gone, holding no borrow of
/// it after (a `watch::Ref` held in a `select!` would make the task not `Send`).
pub async fn until<T>(rx: &mut watch::Receiver<T>, f: impl FnMut(&T) -> bool) {
    let _ = rx.wait_for(f).await;
}

/// The default lease of a leadership.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(5);
/// The election every controller of a fleet campaigns in (under the etcd prefix).
pub const ELECTION: &str = "leader";
/// How long one campaign waits before it is withdrawn and made afresh.
const CAMPAIGN_ROUND: Duration = Duration::from_secs(10);
/// How often a follower asks etcd who leads (to name it in redirects).
const LOOK_EVERY: Duration = Duration::from_millis(500);
/// The first and the longest pause after campaign rounds that failed at once.
const FIRST_PAUSE: Duration = Duration::from_millis(250);
const MAX_PAUSE: Duration = Duration::from_secs(5);

/// The pause before the next campaign round after one that ended without winning, `took`
/// long, the pause before it having been `last`: none after a round that ran for most of its
/// time (another leads; the next round asks again), else one that doubles from
/// [`FIRST_PAUSE`] to [`MAX_PAUSE`] (etcd refused at once: the prefix's permissions, a lease
/// quota), so that a refusal is not retried in a tight loop.
pub fn pause_after_round(took: Duration, round: Duration, last: Duration) -> Duration {
    if took >= round / 2 {
        Duration::ZERO
    } else {
        (last * 2).clamp(FIRST_PAUSE, MAX_PAUSE)
    }
}

/// What this controller is in its fleet right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// It leads (since then, unix ms): it runs rollouts, convergence, the lost-host watcher
    /// and holds the agents' sessions.
    Leader { since_unix_ms: i64 },
    /// Another controller leads (at that URL, when known): writes and sessions go there.
    Follower { leader: Option<String> },
}

impl Role {
    /// The role of a controller without an election (the redb store): the leader, since now.
    pub fn sole() -> Role {
        Role::Leader {
            since_unix_ms: fleet_proto::now_unix_ms(),
        }
    }

    pub fn is_leader(&self) -> bool {
        matches!(self, Role::Leader { .. })
    }

    /// The leader's URL a follower names in its redirects.
    pub fn leader_url(&self) -> Option<&str> {
        match self {
            Role::Follower { leader } => leader.as_deref(),
            Role::Leader { .. } => None,
        }
    }
}

/// A won election; the lease is kept alive until this is dropped or [`Leadership::resign`]ed.
pub struct Leadership {
    pub fence: Fence,
    pub lease: i64,
    /// Turns true when the lease could not be renewed in time: stop acting as leader.
    pub lost: watch::Receiver<bool>,
    keep_alive: tokio::task::AbortHandle,
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.keep_alive.abort();
    }
}

impl Leadership {
    /// Gives the leadership up at once (its key goes with its lease), so that another
    /// controller need not wait for the lease to end. Blocks at most a few seconds.
    pub fn resign(self, backend: &EtcdBackend) {
        self.keep_alive.abort();
        revoke(backend, self.lease);
    }
}

fn revoke(backend: &EtcdBackend, id: i64) {
    let _ = backend.call_on_channel(Duration::from_secs(3), move |channel| async move {
        Ok(LeaseClient::new(channel)
            .lease_revoke(LeaseRevokeRequest { id })
            .await?
            .into_inner())
    });
}

/// How often a lease of `ttl` is renewed: three times per lease, at least once a second.
pub fn renew_every(ttl: Duration) -> Duration {
    (ttl / 3).max(Duration::from_secs(1)).min(ttl)
}

/// How long after its last confirmed renewal was *sent* a leader steps down when no later one
/// is confirmed: before etcd can end the lease (which it does `ttl` after it received that
/// renewal, never before it was sent), by a tenth of the lease, at least 200 ms and at most
/// one second. Pure.
pub fn step_down_after(ttl: Duration) -> Duration {
    let margin = (ttl / 10)
        .max(Duration::from_millis(200))
        .min(Duration::from_secs(1));
    ttl.saturating_sub(margin)
}

/// The fence of a controller that does not lead: no key has create revision -1, so every
/// commit it tries is refused as "no longer the leader".
pub fn follower_fence(backend: &EtcdBackend) -> Fence {
    Fence {
        key: backend.election_name(ELECTION),
        create_revision: -1,
    }
}

/// A lease granted by etcd and kept alive on the backend's runtime until `keeping` is aborted.
pub(crate) struct KeptLease {
    pub id: i64,
    /// Turns true once it could not be renewed in time ([`keep_alive`]).
    pub lost: watch::Receiver<bool>,
    pub keeping: tokio::task::AbortHandle,
}

/// Asks etcd for a lease of `ttl` (whole seconds, at least one) and keeps it alive. Blocks.
pub(crate) fn keep_lease(backend: &EtcdBackend, ttl: Duration) -> Result<KeptLease, StoreError> {
    let ttl = ttl.as_secs().max(1) as i64;
    let asked = Instant::now();
    let granted = backend.call_on_channel(Duration::from_secs(5), move |channel| async move {
        Ok(LeaseClient::new(channel)
            .lease_grant(LeaseGrantRequest { ttl, id: 0 })
            .await?
            .into_inner())
    })?;
    let id = granted.id;
    let ttl = Duration::from_secs(granted.ttl.max(1) as u64);
    let (lost_tx, lost) = watch::channel(false);
    let keeping = backend.call_on_channel(Duration::from_secs(5), move |channel| async move {
        let task = tokio::spawn(keep_alive(channel, id, ttl, asked, lost_tx));
        Ok(task.abort_handle())
    })?;
    Ok(KeptLease { id, lost, keeping })
}

/// Campaigns for `election` (under the backend's prefix) with `value` (this controller's
/// URL), waiting at most `within`; once won, the backend's commits are fenced by the leader
/// key. Blocks: call it on the blocking pool.
pub fn campaign(
    backend: &Arc<EtcdBackend>,
    election: &str,
    value: &str,
    lease: Duration,
    within: Duration,
) -> Result<Leadership, StoreError> {
    let KeptLease {
        id,
        lost,
        keeping: keep_alive,
    } = keep_lease(backend, lease)?;
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
        Ok(won) if !*lost.borrow() => won,
        outcome => {
            // Withdraw: the key this campaign queued goes with its lease, at once.
            keep_alive.abort();
            revoke(backend, id);
            let why = match outcome {
                Err(e) => e.to_string(),
                Ok(_) => "its lease could not be kept alive".to_string(),
            };
            return Err(StoreError::Etcd(format!(
                "not the leader within {within:?} (another controller leads, or etcd is unreachable): {why}"
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
        lost,
        keep_alive,
    })
}

/// Keeps lease `id` alive, renewing it every [`renew_every`]; sets `lost` once no renewal was
/// confirmed for [`step_down_after`] since the last confirmed one was sent (`asked`: when the
/// lease was asked for), or etcd says the lease is gone. A broken stream is opened again while
/// there is time.
pub(crate) async fn keep_alive(
    channel: tonic::transport::Channel,
    id: i64,
    ttl: Duration,
    asked: Instant,
    lost: watch::Sender<bool>,
) {
    let every = renew_every(ttl);
    let mut confirmed = asked;
    for _ in 0..100_000 {
        let deadline = confirmed + step_down_after(ttl);
        if Instant::now() >= deadline {
            break;
        }
        // When each renewal was sent, oldest first: each answer confirms the oldest.
        let sent: Arc<Mutex<VecDeque<Instant>>> = Arc::default();
        let requests = {
            use tokio_stream::StreamExt;
            let sent = sent.clone();
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tokio_stream::wrappers::IntervalStream::new(ticks).map(move |_| {
                let mut sent = sent.lock().unwrap_or_else(|e| e.into_inner());
                sent.push_back(Instant::now());
                if sent.len() > 64 {
                    sent.pop_front();
                }
                LeaseKeepAliveRequest { id }
            })
        };
        let opened = tokio::time::timeout_at(
            deadline,
            LeaseClient::new(channel.clone()).lease_keep_alive(requests),
        )
        .await;
        let Ok(Ok(answers)) = opened else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut answers = answers.into_inner();
        loop {
            let deadline = confirmed + step_down_after(ttl);
            match tokio::time::timeout_at(deadline, answers.message()).await {
                Err(_) => {
                    tracing::warn!(
                        "the leader's lease {id:x} was not renewed for {:?}: stepping down before it ends",
                        step_down_after(ttl)
                    );
                    let _ = lost.send(true);
                    return;
                }
                Ok(Ok(Some(answer))) if answer.ttl > 0 => {
                    let sent_at = sent.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
                    if let Some(sent_at) = sent_at {
                        confirmed = confirmed.max(sent_at);
                    }
                }
                Ok(Ok(Some(_))) => {
                    tracing::warn!("the leader's lease {id:x} ended");
                    let _ = lost.send(true);
                    return;
                }
                // The stream broke: open it again while the lease may still hold.
                Ok(_) => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = lost.send(true);
}

/// The URL of the controller that leads now, if any (blocks, at most two seconds).
pub fn current_leader(backend: &EtcdBackend, election: &str) -> Option<String> {
    let name = backend.election_name(election);
    let answer = backend
        .call_on_channel(Duration::from_secs(2), move |channel| async move {
            Ok(ElectionClient::new(channel)
                .leader(LeaderRequest { name })
                .await?
                .into_inner())
        })
        .ok()?;
    let value = answer.kv?.value;
    String::from_utf8(value).ok()
}

/// Campaigns for as long as the controller runs (until `stop`), publishing this controller's
/// role on `role`: a follower while another leads (naming it), the leader once it wins, a
/// follower again as soon as its lease cannot be kept. A leader that stops resigns, so that
/// another takes over without waiting for the lease.
pub async fn run(
    backend: Arc<EtcdBackend>,
    url: String,
    lease: Duration,
    role: watch::Sender<Role>,
    mut stop: watch::Receiver<bool>,
) {
    let mut pause = Duration::ZERO;
    loop {
        backend.set_fence(Some(follower_fence(&backend)));
        let round_began = std::time::Instant::now();
        let mut campaigning = tokio::task::spawn_blocking({
            let (backend, url) = (backend.clone(), url.clone());
            move || campaign(&backend, ELECTION, &url, lease, CAMPAIGN_ROUND)
        });
        let mut look = tokio::time::interval(LOOK_EVERY);
        let won = loop {
            tokio::select! {
                outcome = &mut campaigning => break outcome,
                _ = look.tick() => {
                    let backend = backend.clone();
                    let leader = tokio::task::spawn_blocking(move || current_leader(&backend, ELECTION))
                        .await
                        .ok()
                        .flatten()
                        .filter(|leader| *leader != url);
                    role.send_if_modified(|now| {
                        let next = Role::Follower { leader: leader.clone() };
                        let changed = *now != next;
                        *now = next;
                        changed
                    });
                }
                _ = crate::leader::until(&mut stop, |stop| *stop) => {
                    // A campaign that wins after this resigns at once.
                    let backend = backend.clone();
                    tokio::spawn(async move {
                        if let Ok(Ok(leadership)) = campaigning.await {
                            let _ = tokio::task::spawn_blocking(move || leadership.resign(&backend)).await;
                        }
                    });
                    return;
                }
            }
        };
        let leadership = match won {
            Ok(Ok(leadership)) => leadership,
            Ok(Err(e)) => {
                pause = pause_after_round(round_began.elapsed(), CAMPAIGN_ROUND, pause);
                if pause.is_zero() {
                    tracing::debug!("campaign round ended: {e}");
                } else {
                    tracing::warn!("campaigning to lead the fleet failed at once: {e}; trying again in {pause:?}: check that etcd is reachable and lets this controller write under its prefix");
                    if tokio::time::timeout(pause, crate::leader::until(&mut stop, |stop| *stop))
                        .await
                        .is_ok()
                    {
                        return;
                    }
                }
                continue;
            }
            Err(e) => {
                tracing::error!("the campaign task failed: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let since_unix_ms = fleet_proto::now_unix_ms();
        tracing::info!("this controller leads the fleet ({url})");
        role.send_replace(Role::Leader { since_unix_ms });
        let mut lost = leadership.lost.clone();
        tokio::select! {
            _ = crate::leader::until(&mut lost, |lost| *lost) => {
                backend.set_fence(Some(follower_fence(&backend)));
                role.send_replace(Role::Follower { leader: None });
                tracing::warn!("this controller no longer leads the fleet: it could not renew its lease");
                drop(leadership);
            }
            _ = crate::leader::until(&mut stop, |stop| *stop) => {
                backend.set_fence(Some(follower_fence(&backend)));
                role.send_replace(Role::Follower { leader: None });
                let backend = backend.clone();
                let _ = tokio::task::spawn_blocking(move || leadership.resign(&backend)).await;
                return;
            }
        }
    }
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
    fn a_round_that_failed_at_once_is_retried_after_a_growing_pause() {
        let round = Duration::from_secs(10);
        let ms = Duration::from_millis;
        for (took, last, pause) in [
            // A round that ran its course: another leads, ask again at once.
            (ms(10_000), ms(0), ms(0)),
            (ms(5_000), ms(4_000), ms(0)),
            // Refused at once: 250 ms, doubling, at most 5 s.
            (ms(3), ms(0), ms(250)),
            (ms(3), ms(250), ms(500)),
            (ms(4_999), ms(2_000), ms(4_000)),
            (ms(3), ms(4_000), ms(5_000)),
            (ms(3), ms(5_000), ms(5_000)),
        ] {
            assert_eq!(
                pause_after_round(took, round, last),
                pause,
                "{took:?} after {last:?}"
            );
        }
    }

    #[test]
    fn a_leader_steps_down_before_its_lease_can_end() {
        for (ttl_ms, after_ms) in [(5000, 4500), (1000, 800), (30_000, 29_000), (2000, 1800)] {
            assert_eq!(
                step_down_after(Duration::from_millis(ttl_ms)).as_millis(),
                after_ms,
                "{ttl_ms}"
            );
            // Renewed three times per lease: two renewals may go unanswered before it steps down.
            assert!(
                step_down_after(Duration::from_millis(ttl_ms))
                    > 2 * renew_every(Duration::from_millis(ttl_ms))
                    || ttl_ms < 3000
            );
        }
    }

    #[test]
    fn roles() {
        assert!(Role::sole().is_leader());
        let follower = Role::Follower {
            leader: Some("https://127.0.0.1:7700".into()),
        };
        assert!(!follower.is_leader());
        assert_eq!(follower.leader_url(), Some("https://127.0.0.1:7700"));
        assert_eq!(Role::sole().leader_url(), None);
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
