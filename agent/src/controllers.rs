//! Which controller the agent dials. The configured URLs are tried in turn: a session that
//! fails, or that a controller answers with the redirect to its leader
//! (`fleet_proto::leader`), moves on, to the leader it named first when it named one. The
//! choice is [`next`] (pure, table test); [`Dialer`] holds the choice and the channel every
//! call takes (session, fetches, renewal), replaced when the choice or the certificate changes.

use crate::join::Credentials;
use crate::AgentError;
use std::sync::Mutex;
use tokio::sync::watch;
use tonic::transport::Channel;

/// The controller the agent dials now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The configured URL at this index.
    Listed(usize),
    /// A leader a redirect named that is not in the list; `after`: the listed URL tried before
    /// it, so that the turn goes on from there when the leader fails too.
    Leader { url: String, after: usize },
}

/// Why the agent moves on from a controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The controller could not be reached, refused, or the session broke.
    Lost,
    /// The controller is not the leader; it named the leader's (valid) URL, or knows none.
    NotLeader(Option<String>),
}

/// The controller to try after `current` failed so: the leader a redirect named (as listed when
/// it is one of `urls`; never `current` itself), else the next URL of the list, round and
/// round. Pure.
pub fn next(urls: &[String], current: &Target, failure: &Failure) -> Target {
    let (current_url, listed) = match current {
        Target::Listed(idx) => (urls.get(*idx).map(String::as_str), *idx),
        Target::Leader { url, after } => (Some(url.as_str()), *after),
    };
    if let Failure::NotLeader(Some(leader)) = failure {
        if Some(leader.as_str()) != current_url {
            return match urls.iter().position(|url| url == leader) {
                Some(idx) => Target::Listed(idx),
                None => Target::Leader {
                    url: leader.clone(),
                    after: listed,
                },
            };
        }
    }
    Target::Listed((listed + 1) % urls.len().max(1))
}

/// The controller list, the one dialled now, and the channel to it.
pub struct Dialer {
    urls: Vec<String>,
    state: Mutex<(Target, Credentials)>,
    channels: watch::Sender<Channel>,
}

impl Dialer {
    /// Dials the first of `urls` (never empty: the config checked it). The receiver follows
    /// the channel as it is replaced.
    pub fn new(
        urls: Vec<String>,
        credentials: Credentials,
    ) -> Result<(Dialer, watch::Receiver<Channel>), AgentError> {
        let first = urls.first().cloned().unwrap_or_default();
        let channel = crate::session::lazy_channel(&first, &credentials)?;
        let (channels, receiver) = watch::channel(channel);
        Ok((
            Dialer {
                urls,
                state: Mutex::new((Target::Listed(0), credentials)),
                channels,
            },
            receiver,
        ))
    }

    /// The URL dialled now.
    pub fn current_url(&self) -> String {
        let state = self.state.lock().expect("dialer lock");
        self.url_of(&state.0)
    }

    /// Whether more than one controller is configured.
    pub fn several(&self) -> bool {
        self.urls.len() > 1
    }

    fn url_of(&self, target: &Target) -> String {
        match target {
            Target::Listed(idx) => self.urls.get(*idx).cloned().unwrap_or_default(),
            Target::Leader { url, .. } => url.clone(),
        }
    }

    /// Moves on from the controller dialled now after `failure`; returns the URL dialled next.
    /// With one controller and no redirect, the channel is left as it is (it reconnects by
    /// itself).
    pub fn move_on(&self, failure: &Failure) -> String {
        let mut state = self.state.lock().expect("dialer lock");
        let target = next(&self.urls, &state.0, failure);
        if target == state.0 {
            return self.url_of(&target);
        }
        let url = self.url_of(&target);
        match crate::session::lazy_channel(&url, &state.1) {
            Ok(channel) => {
                state.0 = target;
                self.channels.send_replace(channel);
            }
            // A leader URL the redirect check let through that tonic cannot use: skip it.
            Err(e) => {
                tracing::warn!("cannot dial {url}: {e}; trying the next controller");
                let listed = next(&self.urls, &state.0, &Failure::Lost);
                if let Ok(channel) = crate::session::lazy_channel(&self.url_of(&listed), &state.1) {
                    state.0 = listed;
                    self.channels.send_replace(channel);
                }
            }
        }
        self.url_of(&state.0)
    }

    /// A renewed certificate: a new channel to the controller dialled now, with it.
    pub fn renewed(&self, credentials: Credentials) -> Result<(), AgentError> {
        let mut state = self.state.lock().expect("dialer lock");
        let channel = crate::session::lazy_channel(&self.url_of(&state.0), &credentials)?;
        state.1 = credentials;
        self.channels.send_replace(channel);
        Ok(())
    }

    /// The channel dialled now.
    pub fn channel(&self) -> Channel {
        self.channels.borrow().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(n: usize) -> Vec<String> {
        (1..=n)
            .map(|i| format!("https://127.0.0.{i}:7700"))
            .collect()
    }

    #[test]
    fn the_next_controller() {
        let leader_elsewhere = "https://10.0.0.9:7700".to_string();
        let listed_2 = "https://127.0.0.2:7700".to_string();
        let listed_1 = "https://127.0.0.1:7700".to_string();
        let elsewhere = |after| Target::Leader {
            url: leader_elsewhere.clone(),
            after,
        };
        let cases: Vec<(&str, usize, Target, Failure, Target)> = vec![
            (
                "lost: the next",
                3,
                Target::Listed(0),
                Failure::Lost,
                Target::Listed(1),
            ),
            (
                "lost: round",
                3,
                Target::Listed(2),
                Failure::Lost,
                Target::Listed(0),
            ),
            (
                "lost, one controller: itself",
                1,
                Target::Listed(0),
                Failure::Lost,
                Target::Listed(0),
            ),
            (
                "no leader known: the next",
                3,
                Target::Listed(1),
                Failure::NotLeader(None),
                Target::Listed(2),
            ),
            (
                "a listed leader: that one",
                3,
                Target::Listed(0),
                Failure::NotLeader(Some(listed_2.clone())),
                Target::Listed(1),
            ),
            (
                "a leader not listed: it, then on from here",
                3,
                Target::Listed(1),
                Failure::NotLeader(Some(leader_elsewhere.clone())),
                elsewhere(1),
            ),
            (
                "that leader lost: the turn goes on",
                3,
                elsewhere(1),
                Failure::Lost,
                Target::Listed(2),
            ),
            (
                "a controller naming itself: not followed",
                3,
                Target::Listed(0),
                Failure::NotLeader(Some(listed_1.clone())),
                Target::Listed(1),
            ),
            (
                "a leader naming itself: not followed",
                3,
                elsewhere(2),
                Failure::NotLeader(Some(leader_elsewhere.clone())),
                Target::Listed(0),
            ),
            (
                "a leader redirecting to a listed one",
                3,
                elsewhere(0),
                Failure::NotLeader(Some(listed_2.clone())),
                Target::Listed(1),
            ),
        ];
        for (what, n, current, failure, expect) in cases {
            assert_eq!(next(&urls(n), &current, &failure), expect, "{what}");
        }
    }
}
