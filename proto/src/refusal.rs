//! The one refusal a client must tell apart from the others: "your certificate was revoked"
//! (the host was removed). The controller answers it as `UNAUTHENTICATED` with a
//! [`pb::Refusal`] in the status details; the agent ends (stops its instances, and wipes its
//! data when told to purge) on that answer only. Every other refusal, including an
//! `UNAUTHENTICATED` without the detail (a controller with another CA, a restored backup that
//! does not know the host yet, an older controller), is retried.

use crate::pb;
use prost::Message as _;

/// What a revoked answer says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Revoked {
    /// The host was removed with `--purge`: wipe its releases, secrets and state too.
    pub purge: bool,
}

/// The status the controller answers a call with a revoked certificate with.
pub fn revoked_status(message: impl Into<String>, purge: bool) -> tonic::Status {
    let refusal = pb::Refusal {
        reason: pb::RefusalReason::Revoked as i32,
        purge,
    };
    tonic::Status::with_details(
        tonic::Code::Unauthenticated,
        message,
        refusal.encode_to_vec().into(),
    )
}

/// `Some` only for the controller's explicit revoked answer: an `UNAUTHENTICATED` status whose
/// details decode to a [`pb::Refusal`] with reason `REVOKED`. Pure.
pub fn revoked_of(code: tonic::Code, details: &[u8]) -> Option<Revoked> {
    if code != tonic::Code::Unauthenticated || details.is_empty() {
        return None;
    }
    let refusal = pb::Refusal::decode(details).ok()?;
    match pb::RefusalReason::try_from(refusal.reason) {
        Ok(pb::RefusalReason::Revoked) => Some(Revoked {
            purge: refusal.purge,
        }),
        Ok(pb::RefusalReason::Unspecified) | Err(_) => None,
    }
}

/// [`revoked_of`] for a status.
pub fn revoked(status: &tonic::Status) -> Option<Revoked> {
    revoked_of(status.code(), status.details())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn refusal(reason: i32, purge: bool) -> Vec<u8> {
        pb::Refusal { reason, purge }.encode_to_vec()
    }

    /// Which refusals end an agent: the explicit revoked answer, and nothing else.
    #[test]
    fn only_the_explicit_revoked_answer_counts() {
        let revoked = pb::RefusalReason::Revoked as i32;
        let cases: Vec<(&str, Code, Vec<u8>, Option<Revoked>)> = vec![
            (
                "revoked",
                Code::Unauthenticated,
                refusal(revoked, false),
                Some(Revoked { purge: false }),
            ),
            (
                "revoked, purge",
                Code::Unauthenticated,
                refusal(revoked, true),
                Some(Revoked { purge: true }),
            ),
            // A controller with another CA, a restored backup, an older controller: no detail.
            (
                "unauthenticated without detail",
                Code::Unauthenticated,
                vec![],
                None,
            ),
            (
                "permission denied with the detail",
                Code::PermissionDenied,
                refusal(revoked, false),
                None,
            ),
            ("unavailable", Code::Unavailable, vec![], None),
            (
                "unspecified reason",
                Code::Unauthenticated,
                refusal(0, true),
                None,
            ),
            (
                "a reason from a newer controller",
                Code::Unauthenticated,
                refusal(99, false),
                None,
            ),
            (
                "garbage detail",
                Code::Unauthenticated,
                vec![0xff, 0xff, 0xff],
                None,
            ),
        ];
        for (what, code, details, expect) in cases {
            assert_eq!(revoked_of(code, &details), expect, "{what}");
        }
    }

    #[test]
    fn the_status_round_trips() {
        for purge in [false, true] {
            let status = revoked_status("the certificate of `web-1` was revoked", purge);
            assert_eq!(revoked(&status), Some(Revoked { purge }));
        }
    }
}
