//! Artifact fan-out through peers, the controller's half: which hosts hold (or are fetching)
//! which artifact and where they serve it, the choice of peers a fetching host is told
//! ([`choose`], pure), each artifact's per-chunk sha256 list (computed once per artifact and
//! kept), and the count of artifact bytes this process sent itself. Only memory: after a
//! restart the first fetch of an artifact comes from the controller again and the directory
//! fills anew.

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Bytes per chunk of the peer protocol (the last chunk of an artifact may be shorter).
pub const CHUNK_BYTES: u32 = 1 << 20;
/// Peers named to one fetch: the first to fetch from, the rest to fall back on.
pub const PEERS_PER_FETCH: usize = 3;
/// Fetches a holder feeds before later holders are preferred: the fan-out of the tree that
/// forms, so its depth grows with log(N) and no holder's uplink carries many copies.
pub const FAN_OUT: u32 = 3;
/// How many artifacts' chunk lists are kept.
const CHUNK_LISTS_KEPT: usize = 16;
/// Holders remembered per artifact, at most.
const HOLDERS_KEPT: usize = 100_000;

/// Artifact bytes sent by `FetchArtifact` since this process started (one controller per
/// process): what `fleetctl status` reports as the controller's egress.
static ARTIFACT_BYTES_SENT: AtomicU64 = AtomicU64::new(0);

pub fn count_sent(bytes: u64) {
    ARTIFACT_BYTES_SENT.fetch_add(bytes, Ordering::Relaxed);
}

pub fn bytes_sent() -> u64 {
    ARTIFACT_BYTES_SENT.load(Ordering::Relaxed)
}

/// A host that holds an artifact or is fetching it, as [`choose`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub host: String,
    /// Where it serves peers; `None`: it serves none (`--peer-port 0`).
    pub addr: Option<SocketAddr>,
    pub connected: bool,
    /// When it began to fetch (or was first known to hold) the artifact, in order.
    pub since: u64,
    /// Fetches it was named first for.
    pub downloaders: u32,
}

/// The peers (indices into `holders`) to tell `requester` for one fetch, best first: those
/// that serve, are connected, are not the requester and were not dropped by this fetch
/// (`exclude`); when the requester is a holder already (it asks again), only those that began
/// before it, so no two hosts ever wait on each other. The first is the earliest holder still under [`FAN_OUT`] downloaders (the
/// earliest is furthest along), or else the least loaded; the rest follow in the same order.
/// Empty: fetch from the controller.
pub fn choose(requester: &str, holders: &[Holder], exclude: &[String], n: usize) -> Vec<usize> {
    let requester_since = holders
        .iter()
        .find(|h| h.host == requester)
        .map(|h| h.since);
    let mut candidates: Vec<usize> = (0..holders.len())
        .filter(|&i| {
            let h = &holders[i];
            h.addr.is_some()
                && h.connected
                && h.host != requester
                && !exclude.contains(&h.host)
                && requester_since.is_none_or(|since| h.since < since)
        })
        .collect();
    candidates.sort_by_key(|&i| {
        let h = &holders[i];
        let full = h.downloaders >= FAN_OUT;
        // Under the fan-out: by age; over it: by load, then age.
        (full, if full { h.downloaders } else { 0 }, h.since)
    });
    candidates.truncate(n);
    candidates
}

#[derive(Debug, Clone, Copy)]
struct HostPeer {
    addr: Option<SocketAddr>,
    /// The session that last said hello; a newer one replaces it.
    session: u64,
    connected: bool,
}

#[derive(Default)]
struct Inner {
    next: u64,
    hosts: HashMap<String, HostPeer>,
    /// digest -> (host, since, downloaders)
    holders: HashMap<String, Vec<(String, u64, u32)>>,
}

/// An artifact's per-chunk digests.
#[derive(Debug)]
pub struct ChunkList {
    pub size: u64,
    pub chunk_size: u32,
    pub sha256: Vec<[u8; 32]>,
}

/// Who holds what, shared by the sessions and `ArtifactSources`.
#[derive(Default)]
pub struct Directory {
    inner: Mutex<Inner>,
    chunk_lists: Mutex<Vec<(String, Arc<ChunkList>)>>,
}

impl Directory {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A session said hello: the host serves peers on `advertise:peer_port` (0: not at all).
    /// Returns the token [`Directory::session_closed`] takes.
    pub fn session_opened(&self, host: &str, advertise: IpAddr, peer_port: u32) -> u64 {
        let mut inner = self.lock();
        inner.next += 1;
        let session = inner.next;
        let addr = u16::try_from(peer_port)
            .ok()
            .filter(|port| *port != 0)
            .map(|port| SocketAddr::new(advertise, port));
        inner.hosts.insert(
            host.to_string(),
            HostPeer {
                addr,
                session,
                connected: true,
            },
        );
        session
    }

    /// The session `session` of `host` ended (a newer one may have replaced it already).
    pub fn session_closed(&self, host: &str, session: u64) {
        let mut inner = self.lock();
        if let Some(peer) = inner.hosts.get_mut(host) {
            if peer.session == session {
                peer.connected = false;
            }
        }
    }

    /// The peers `requester` should fetch `digest` from (host name and address), and notes
    /// that `requester` now fetches it (so later fetches may be told of it).
    pub fn sources(
        &self,
        requester: &str,
        digest: &str,
        exclude: &[String],
    ) -> Vec<(String, SocketAddr)> {
        let mut inner = self.lock();
        inner.next += 1;
        let now = inner.next;
        let Inner { hosts, holders, .. } = &mut *inner;
        let list = holders.entry(digest.to_string()).or_default();
        let view: Vec<Holder> = list
            .iter()
            .map(|(host, since, downloaders)| {
                let peer = hosts.get(host);
                Holder {
                    host: host.clone(),
                    addr: peer.and_then(|p| p.addr),
                    connected: peer.is_some_and(|p| p.connected),
                    since: *since,
                    downloaders: *downloaders,
                }
            })
            .collect();
        let chosen = choose(requester, &view, exclude, PEERS_PER_FETCH);
        if let Some(&first) = chosen.first() {
            list[first].2 += 1;
        }
        let answer = chosen
            .iter()
            .filter_map(|&i| Some((view[i].host.clone(), view[i].addr?)))
            .collect();
        if !list.iter().any(|(host, _, _)| host == requester) && list.len() < HOLDERS_KEPT {
            list.push((requester.to_string(), now, 0));
        }
        answer
    }

    /// The chunk list of the stored artifact at `path`, computed on the first call (on a
    /// blocking thread: it reads the whole file) and kept for the next.
    pub async fn chunk_list(&self, digest: &str, path: &Path) -> std::io::Result<Arc<ChunkList>> {
        if let Some(found) = self
            .chunk_lists
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(d, _)| d == digest)
        {
            return Ok(found.1.clone());
        }
        let path = path.to_path_buf();
        let list = tokio::task::spawn_blocking(move || chunk_list_of(&path))
            .await
            .map_err(std::io::Error::other)??;
        let list = Arc::new(list);
        let mut lists = self.chunk_lists.lock().unwrap_or_else(|e| e.into_inner());
        if !lists.iter().any(|(d, _)| d == digest) {
            if lists.len() >= CHUNK_LISTS_KEPT {
                lists.remove(0);
            }
            lists.push((digest.to_string(), list.clone()));
        }
        Ok(list)
    }
}

/// Reads a file and hashes it chunk by chunk.
fn chunk_list_of(path: &Path) -> std::io::Result<ChunkList> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let size = file.metadata()?.len();
    let mut buf = vec![0u8; CHUNK_BYTES as usize];
    let mut sha256 = Vec::new();
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = file.read(&mut buf[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        sha256.push(Sha256::digest(&buf[..filled]).into());
        if filled < buf.len() {
            break;
        }
    }
    Ok(ChunkList {
        size,
        chunk_size: CHUNK_BYTES,
        sha256,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(host: &str, serves: bool, connected: bool, since: u64, downloaders: u32) -> Holder {
        Holder {
            host: host.into(),
            addr: serves.then(|| "127.0.0.2:7702".parse().unwrap()),
            connected,
            since,
            downloaders,
        }
    }

    fn names(holders: &[Holder], chosen: Vec<usize>) -> Vec<&str> {
        chosen
            .into_iter()
            .map(|i| holders[i].host.as_str())
            .collect()
    }

    #[test]
    fn choose_table() {
        let a = holder("a", true, true, 1, 0);
        let a_full = holder("a", true, true, 1, FAN_OUT);
        let a_fuller = holder("a", true, true, 1, FAN_OUT + 2);
        let b = holder("b", true, true, 2, 0);
        let b_full = holder("b", true, true, 2, FAN_OUT + 1);
        let c = holder("c", true, true, 3, 1);
        let off = holder("off", false, true, 0, 0);
        let gone = holder("gone", true, false, 0, 0);
        for (what, requester, holders, exclude, expect) in [
            (
                "nobody holds it: the controller",
                "x",
                vec![],
                vec![],
                vec![],
            ),
            (
                "the earliest first",
                "x",
                vec![c.clone(), b.clone(), a.clone()],
                vec![],
                vec!["a", "b", "c"],
            ),
            (
                "not itself",
                "x",
                vec![a.clone(), holder("x", true, true, 0, 0), b.clone()],
                vec![],
                vec![],
            ),
            (
                "asking again: only those that began before it",
                "b",
                vec![c.clone(), b.clone(), a.clone()],
                vec![],
                vec!["a"],
            ),
            (
                "not one that serves no peers, nor a disconnected one",
                "x",
                vec![off.clone(), gone.clone(), b.clone()],
                vec![],
                vec!["b"],
            ),
            (
                "not one this fetch dropped",
                "x",
                vec![a.clone(), b.clone()],
                vec!["a".to_string()],
                vec!["b"],
            ),
            (
                "a holder at its fan-out goes after those under it",
                "x",
                vec![a_full.clone(), b.clone()],
                vec![],
                vec!["b", "a"],
            ),
            (
                "all at their fan-out: the least loaded",
                "x",
                vec![a_fuller.clone(), b_full.clone()],
                vec![],
                vec!["b", "a"],
            ),
            (
                "at most PEERS_PER_FETCH",
                "x",
                vec![
                    a.clone(),
                    b.clone(),
                    c.clone(),
                    holder("d", true, true, 4, 0),
                ],
                vec![],
                vec!["a", "b", "c"],
            ),
        ] {
            let chosen = choose(requester, &holders, &exclude, PEERS_PER_FETCH);
            assert_eq!(names(&holders, chosen), expect, "{what}");
        }
    }

    #[test]
    fn fetches_form_a_tree_and_only_serving_connected_hosts_are_named() {
        let dir = Directory::default();
        let ip: IpAddr = "127.0.0.2".parse().unwrap();
        let mut first_choice = HashMap::new();
        for i in 0..13 {
            let host = format!("h{i}");
            dir.session_opened(&host, ip, 7702);
            let peers = dir.sources(&host, "sha256:aa", &[]);
            if let Some((first, _)) = peers.first() {
                *first_choice.entry(first.clone()).or_insert(0) += 1;
            } else {
                assert_eq!(i, 0, "only the first fetch goes to the controller");
            }
        }
        // h0 feeds h1..h3; h1 feeds h4..h6; and so on: no one above the fan-out.
        assert!(first_choice.values().all(|n| *n <= FAN_OUT));
        assert_eq!(first_choice["h0"], FAN_OUT);
        let token = dir.session_opened("off", ip, 0);
        dir.sources("off", "sha256:bb", &[]);
        assert!(dir.sources("y", "sha256:bb", &[]).is_empty());
        dir.session_closed("off", token);
        dir.session_opened("z", ip, 7702);
        dir.sources("z", "sha256:cc", &[]);
        let token = dir.session_opened("z", ip, 7702);
        dir.session_opened("w", ip, 7702);
        assert_eq!(dir.sources("w", "sha256:cc", &[]).len(), 1);
        dir.session_closed("z", token);
        // z's session ended: only w, which fetches it too, is named.
        let named: Vec<String> = dir
            .sources("v", "sha256:cc", &[])
            .into_iter()
            .map(|(h, _)| h)
            .collect();
        assert_eq!(named, vec!["w".to_string()]);
    }
}
