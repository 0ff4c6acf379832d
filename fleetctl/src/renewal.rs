//! The credential fleetctl uses renews itself. Once two thirds of its certificate's lifetime
//! passed (`fleet_pki::lifetime::renew_due`, the rule agents follow too), the next call makes
//! a new key here, asks the controller for a certificate of the same name, role and lifetime
//! (`FleetService.RenewCredential`, which only an unrevoked operator or CI credential can call,
//! for itself), and replaces `client.key` and `client.pem` in its `--config-dir` in place: each
//! written complete beside the old one (mode 0600), then renamed over it, the key first (see
//! `fleet_pki::files::replace_key_and_certificate`; the next call completes a pair a crash cut
//! short). The call itself goes on with the connection it has: the old certificate is valid
//! until it expires.
//!
//! When those files cannot be written (a CI secret store, a read-only directory or file
//! system), nothing is renewed: every call from then on warns on stderr when the credential
//! expires and the command an admin runs to replace it, and still does what it was asked.
//!
//! fleetctl processes sharing a directory take turns with `flock` on it (`credential_files`):
//! a renewal holds it exclusively (another fleetctl that finds it held leaves the renewal to
//! that one), and reading the credential to connect holds it shared, so no call reads a new key
//! with an old certificate.

use crate::client::Connection;
use crate::credential_files::{lock_dir, writable, CA_FILE, CLIENT_CERT_FILE, CLIENT_KEY_FILE};
use fleet_pki::Identity;
use fleet_proto::pb;
use std::path::Path;
use std::time::Duration;

/// How long a renewal call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// What to do about the credential in a config directory at some moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Less than two thirds of its lifetime passed.
    NotDue,
    /// Two thirds passed and its files can be written: renew it on this call.
    Renew,
    /// Two thirds passed, its files cannot be written (why): warn on every call.
    CannotRenew(String),
    /// It expired: the controller refuses it; only a new one helps.
    Expired,
}

/// Decides what to do about a certificate valid from `not_before` to `not_after` (unix
/// seconds) at `now`, whose files are `writable` (or not, and why). Pure.
pub fn plan(not_before: i64, not_after: i64, now: i64, writable: Result<(), String>) -> Plan {
    if now >= not_after {
        return Plan::Expired;
    }
    if !fleet_pki::lifetime::renew_due(not_before, not_after, now) {
        return Plan::NotDue;
    }
    match writable {
        Ok(()) => Plan::Renew,
        Err(why) => Plan::CannotRenew(why),
    }
}

/// The warning for a credential that cannot renew itself (`why`, or `None`: it expired): when
/// it expires and the exact command an admin runs to replace it.
pub fn warning(identity: &Identity, dir: &Path, why: Option<&str>, now_unix_ms: i64) -> String {
    let expiry = crate::output::utc_time(identity.not_after_unix_ms);
    let state = match why {
        Some(why) => format!(
            "expires {expiry} (in {}) and cannot renew itself: {why}",
            fleet_proto::duration::format_duration(Duration::from_millis(
                (identity.not_after_unix_ms - now_unix_ms).max(0) as u64
            ))
        ),
        None => format!("expired {expiry}: the controller refuses it"),
    };
    let replacement = format!("{}.new", dir.display());
    format!(
        "warning: the credential `{name}` (role {role}) in {dir} {state}. To replace it, an admin runs\n  \
         fleetctl credentials create {name} --role {role} --ttl {ttl} --out {replacement}\n\
         and puts the client.key and client.pem it writes in place of those in {dir}",
        name = identity.name,
        role = identity.role.as_str(),
        dir = dir.display(),
        ttl = fleet_pki::lifetime::format_lifetime(identity.lifetime()),
    )
}

/// Before connecting: whether the credential of `dir` (certificate `cert_pem`) is to be
/// renewed on this call (its identity), after printing the warning when it cannot be.
pub fn before_connect(dir: &Path, cert_pem: &str) -> Option<Identity> {
    let identity = Identity::from_pem(cert_pem).ok()?;
    let now_ms = fleet_proto::now_unix_ms();
    let verdict = plan(
        identity.not_before_unix_ms / 1000,
        identity.not_after_unix_ms / 1000,
        now_ms / 1000,
        writable(dir),
    );
    match verdict {
        Plan::NotDue => None,
        Plan::Renew => Some(identity),
        Plan::CannotRenew(why) => {
            eprintln!("{}", warning(&identity, dir, Some(&why), now_ms));
            None
        }
        Plan::Expired => {
            eprintln!("{}", warning(&identity, dir, None, now_ms));
            None
        }
    }
}

/// Renews the credential `identity` of `dir` over `connection` (see the module doc). Never
/// fails the call: what goes wrong is a warning on stderr, and the next call tries again.
pub async fn renew(connection: &Connection, dir: &Path, identity: &Identity) {
    if let Err(message) = try_renew(connection, dir, identity).await {
        eprintln!(
            "{}",
            warning(
                identity,
                dir,
                Some(&format!("{message}; fleetctl tries again at its next call")),
                fleet_proto::now_unix_ms()
            )
        );
    }
}

async fn try_renew(connection: &Connection, dir: &Path, identity: &Identity) -> Result<(), String> {
    // Another fleetctl renewing this credential now does it for both.
    let Some(_lock) = lock_dir(dir, true, Duration::ZERO) else {
        return Ok(());
    };
    let (key_path, cert_path) = (dir.join(CLIENT_KEY_FILE), dir.join(CLIENT_CERT_FILE));
    let current = std::fs::read_to_string(&cert_path)
        .ok()
        .and_then(|pem| Identity::from_pem(&pem).ok());
    if current.is_none_or(|current| current.serial != identity.serial) {
        return Ok(()); // renewed meanwhile
    }
    let (csr_pem, key_pem) = fleet_pki::request::new_key_and_request(&identity.name)
        .map_err(|e| format!("cannot make a key: {e}"))?;
    let mut client = connection.client.clone();
    let response = tokio::time::timeout(
        CALL_TIMEOUT,
        client.renew_credential(pb::RenewCredentialRequest { csr_pem }),
    )
    .await
    .map_err(|_| format!("the controller did not answer within {CALL_TIMEOUT:?}"))?
    .map_err(|status| format!("the controller refused to renew it: {}", status.message()))?
    .into_inner();
    let renewed = Identity::from_pem(&response.certificate_pem).map_err(|e| {
        format!("the controller answered with a certificate fleetctl cannot read: {e}")
    })?;
    if (renewed.name.as_str(), renewed.role) != (identity.name.as_str(), identity.role) {
        return Err(format!(
            "the controller answered with a certificate for `{}` (role {})",
            renewed.name,
            renewed.role.as_str()
        ));
    }
    fleet_pki::files::replace_key_and_certificate(
        &key_path,
        &cert_path,
        &key_pem,
        &response.certificate_pem,
    )
    .map_err(|e| format!("cannot write {}: {e}", cert_path.display()))?;
    let ca_path = dir.join(CA_FILE);
    let ca_now = std::fs::read_to_string(&ca_path).unwrap_or_default();
    if !response.ca_pem.is_empty() && response.ca_pem != ca_now {
        fleet_pki::files::write_private_atomically(&ca_path, &response.ca_pem)
            .map_err(|e| format!("cannot write {}: {e}", ca_path.display()))?;
    }
    eprintln!(
        "renewed the credential `{}` in {}: certificate {} valid until {} (was {})",
        identity.name,
        dir.display(),
        response.serial,
        crate::output::utc_time(response.not_after_unix_ms),
        identity.serial
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credential_renews_after_two_thirds_when_it_can_and_warns_when_it_cannot() {
        let b = fleet_pki::lifetime::BACKDATE_SECS;
        let read_only = || Err("DIR is read-only (mode 555)".to_string());
        // A 90-minute credential issued at 0: due from minute 60 on.
        for (now, writable, expect) in [
            (0, Ok(()), Plan::NotDue),
            (3599, Ok(()), Plan::NotDue),
            (3599, read_only(), Plan::NotDue),
            (3600, Ok(()), Plan::Renew),
            (5399, Ok(()), Plan::Renew),
            (
                3600,
                read_only(),
                Plan::CannotRenew("DIR is read-only (mode 555)".into()),
            ),
            (5400, Ok(()), Plan::Expired),
            (9000, read_only(), Plan::Expired),
        ] {
            assert_eq!(plan(-b, 5400, now, writable), expect, "at {now}");
        }
    }

    #[test]
    fn the_warning_says_when_and_the_command_that_replaces_it() {
        let identity = Identity {
            name: "ci".to_string(),
            role: fleet_pki::Role::Deployer,
            serial: "ab".to_string(),
            not_before_unix_ms: -fleet_pki::lifetime::BACKDATE_SECS * 1000,
            not_after_unix_ms: 7 * 86_400_000,
        };
        let dir = Path::new("secrets/ci");
        let text = warning(
            &identity,
            dir,
            Some("secrets/ci is read-only"),
            6 * 86_400_000,
        );
        assert!(
            text.contains("expires 1970-01-08 00:00:00Z (in 24h0m)"),
            "{text}"
        );
        assert!(
            text.contains("cannot renew itself: secrets/ci is read-only"),
            "{text}"
        );
        assert!(
            text.contains(
                "fleetctl credentials create ci --role deployer --ttl 7d --out secrets/ci.new"
            ),
            "{text}"
        );
        let expired = warning(&identity, dir, None, 8 * 86_400_000);
        assert!(
            expired.contains("expired 1970-01-08 00:00:00Z"),
            "{expired}"
        );
    }
}
