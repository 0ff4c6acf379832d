//! The redirect a controller that is not the leader answers with, defined once for the
//! controller that sends it and the clients (fleetctl, the agent) that follow it.
//!
//! A follower answers a write, and an agent's session, with gRPC status `UNAVAILABLE`, the
//! message "this controller is not the leader; the leader is at URL" and the metadata
//! `fleet-leader: URL`. When no leader is known the metadata is absent and the message says
//! "no leader elected yet; try again in a few seconds". A client follows `fleet-leader` only
//! when it is a well-formed `https://HOST:PORT` ([`check_controller_url`]); following it is safe
//! because every connection verifies the controller against the fleet CA as
//! `fleet-controller`, whatever address it dials.

/// The metadata key that names the leader's URL in a redirect.
pub const LEADER_HEADER: &str = "fleet-leader";

/// The status a controller that is not the leader answers with: `UNAVAILABLE`, naming the
/// leader's URL in the message and in [`LEADER_HEADER`] when it is known (and well formed).
pub fn not_leader_status(leader_url: Option<&str>) -> tonic::Status {
    match leader_url.filter(|url| check_controller_url(url).is_ok()) {
        Some(url) => {
            let mut status = tonic::Status::unavailable(format!(
                "this controller is not the leader; the leader is at {url}"
            ));
            if let Ok(value) = url.parse() {
                status.metadata_mut().insert(LEADER_HEADER, value);
            }
            status
        }
        None => tonic::Status::unavailable(
            "this controller is not the leader, and no leader elected yet; try again in a few seconds",
        ),
    }
}

/// The leader's URL a redirect names: `Some` only for an `UNAVAILABLE` status whose
/// [`LEADER_HEADER`] is a valid controller URL (anything else is ignored). Pure.
pub fn leader_of(status: &tonic::Status) -> Option<String> {
    if status.code() != tonic::Code::Unavailable {
        return None;
    }
    let url = status.metadata().get(LEADER_HEADER)?.to_str().ok()?.trim();
    check_controller_url(url).ok()?;
    Some(url.trim_end_matches('/').to_string())
}

/// What is wrong with a controller URL: it must be `https://HOST:PORT` with nothing after the
/// authority but an optional `/` (the controller speaks only mutual TLS).
pub fn check_controller_url(url: &str) -> Result<(), &'static str> {
    let rest = url
        .strip_prefix("https://")
        .ok_or("it is not https:// (the controller speaks only mutual TLS)")?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty() {
        return Err("it names no host");
    }
    if authority.contains(['/', '?', '#', '@', ' ']) {
        return Err("it has more than https://HOST:PORT");
    }
    let (host, port) = authority.rsplit_once(':').ok_or("it names no port")?;
    if host.is_empty() || host == "[" {
        return Err("it names no host");
    }
    match port.parse::<u16>() {
        Ok(port) if port > 0 => Ok(()),
        _ => Err("its port is not a number from 1 to 65535"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn controller_urls() {
        for (url, ok) in [
            ("https://127.0.0.1:7700", true),
            ("https://127.0.0.1:7700/", true),
            ("https://c1.example.com:7700", true),
            ("https://[::1]:7700", true),
            ("http://127.0.0.1:7700", false),
            ("127.0.0.1:7700", false),
            ("https://127.0.0.1", false),
            ("https://127.0.0.1:0", false),
            ("https://127.0.0.1:x", false),
            ("https://:7700", false),
            ("https://127.0.0.1:7700/api", false),
            ("https://user@127.0.0.1:7700", false),
            ("https://", false),
            ("", false),
        ] {
            assert_eq!(check_controller_url(url).is_ok(), ok, "{url}");
        }
    }

    fn with_header(code: Code, value: &str) -> tonic::Status {
        let mut status = tonic::Status::new(code, "x");
        status
            .metadata_mut()
            .insert(LEADER_HEADER, value.parse().unwrap());
        status
    }

    /// Which statuses are redirects a client follows, and where to.
    #[test]
    fn the_leader_is_read_only_from_a_valid_redirect() {
        let cases: Vec<(&str, tonic::Status, Option<&str>)> = vec![
            (
                "redirect",
                with_header(Code::Unavailable, "https://127.0.0.2:7700"),
                Some("https://127.0.0.2:7700"),
            ),
            (
                "trailing slash",
                with_header(Code::Unavailable, "https://127.0.0.2:7700/"),
                Some("https://127.0.0.2:7700"),
            ),
            (
                "another code",
                with_header(Code::PermissionDenied, "https://127.0.0.2:7700"),
                None,
            ),
            (
                "not https",
                with_header(Code::Unavailable, "http://127.0.0.2:7700"),
                None,
            ),
            (
                "no port",
                with_header(Code::Unavailable, "https://127.0.0.2"),
                None,
            ),
            ("garbage", with_header(Code::Unavailable, "leader"), None),
            (
                "no header",
                tonic::Status::unavailable("connection refused"),
                None,
            ),
        ];
        for (what, status, expect) in cases {
            assert_eq!(leader_of(&status).as_deref(), expect, "{what}");
        }
    }

    #[test]
    fn the_status_round_trips_and_says_what_to_do() {
        let status = not_leader_status(Some("https://127.0.0.3:7700"));
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(
            status.message(),
            "this controller is not the leader; the leader is at https://127.0.0.3:7700"
        );
        assert_eq!(
            leader_of(&status).as_deref(),
            Some("https://127.0.0.3:7700")
        );
        // Through the wire form (a trailers-only response's headers) too.
        let response = status.into_http::<()>();
        let back = tonic::Status::from_header_map(response.headers()).unwrap();
        assert_eq!(leader_of(&back).as_deref(), Some("https://127.0.0.3:7700"));

        for unknown in [None, Some("http://127.0.0.3:7700")] {
            let status = not_leader_status(unknown);
            assert_eq!(status.code(), Code::Unavailable);
            assert!(
                status
                    .message()
                    .contains("no leader elected yet; try again in a few seconds"),
                "{}",
                status.message()
            );
            assert_eq!(leader_of(&status), None);
        }
    }
}
