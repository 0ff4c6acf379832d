//! Which controller the agent dials. The configured URLs are tried in turn: a session that
//! fails, or that a controller answers with the redirect to its leader
//! (`fleet_proto::leader`), moves on, to the leader it named first when it named one. The
//! choice is [`next`] (pure, table test); `session::Dialer` holds the choice and the channel
//! every call takes (session, fetches, renewal), replaced when the choice or the certificate
//! changes.

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
