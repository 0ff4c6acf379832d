//! Certificate renewal: the agent trades its certificate for a fresh one over its own
//! mutual-TLS connection (`AgentService.Renew`; no join token), with a new key each time.
//!
//! When: once two thirds of the certificate's lifetime passed ([`decide`], with the rule of
//! `fleet_pki::lifetime::renew_due`), checked at start and then at the moment they have (never later than [`MAX_CHECK`] after the
//! last check), and at once when the controller says so (`RenewCertificate`, during a CA
//! rotation). A failed attempt is retried after [`RETRY`].
//!
//! How: a new key and request; the answer's certificate and CA bundle are written to
//! `DATA/tls` (see [`crate::join::keep_renewed`]: a crash at any point leaves the old pair or
//! the new one), then a new channel with them replaces the old one: the session reconnects on
//! it at once and later fetches use it. The old certificate stays valid until it expires, so a
//! reconnect in flight on it is not refused.

use crate::join::{self, Credentials};
use fleet_proto::pb;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// The longest time between two checks of the certificate's lifetime.
pub const MAX_CHECK: Duration = Duration::from_secs(3600);
/// How long after a failed renewal the agent tries again.
pub const RETRY: Duration = Duration::from_secs(5);
/// How long one renewal call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// What to do about a certificate valid from `not_before` to `not_after` (unix seconds) at
/// `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Two thirds of its lifetime passed (or it cannot be read): renew now.
    RenewNow,
    /// Look again after this long.
    CheckIn(Duration),
}

/// Renew once two thirds of the lifetime passed ([`fleet_pki::lifetime::renew_due`], the rule
/// fleetctl's credentials follow too); otherwise look again when they have, at most
/// [`MAX_CHECK`] from now (a clock that jumps is caught within the hour).
pub fn decide(not_before: i64, not_after: i64, now: i64) -> Decision {
    match fleet_pki::lifetime::renew_at(not_before, not_after) {
        Some(renew_at) if now < renew_at => {
            let wait = Duration::from_secs((renew_at - now) as u64);
            Decision::CheckIn(wait.min(MAX_CHECK))
        }
        _ => Decision::RenewNow,
    }
}

fn now_unix() -> i64 {
    fleet_proto::now_unix_ms() / 1000
}

/// What the renewal task works with.
pub struct Renewer {
    pub data_dir: PathBuf,
    pub host_name: String,
    pub credentials: Credentials,
    /// The controller dialled now and the channel every call takes; replaced after a renewal.
    pub dialer: std::sync::Arc<crate::session::Dialer>,
}

impl Renewer {
    /// Renews when [`decide`] or the controller (`advice`) says so, until `stop` turns true.
    pub async fn run(
        mut self,
        mut advice: mpsc::UnboundedReceiver<String>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut advised: Option<String> = None;
        loop {
            let decision = match fleet_pki::identity::facts_of_pem(&self.credentials.cert_pem) {
                Some(facts) => decide(facts.not_before_unix, facts.not_after_unix, now_unix()),
                None => Decision::RenewNow,
            };
            let wait = match (decision, advised.take()) {
                (_, Some(reason)) => {
                    tracing::info!("the controller asked for a certificate renewal ({reason})");
                    self.renew_or_retry().await
                }
                (Decision::RenewNow, None) => {
                    tracing::info!("two thirds of the certificate's lifetime passed: renewing it");
                    self.renew_or_retry().await
                }
                (Decision::CheckIn(wait), None) => wait,
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                reason = advice.recv() => match reason {
                    Some(reason) => advised = Some(reason),
                    None => return,
                },
                _ = stop.wait_for(|stop| *stop) => return,
            }
        }
    }

    /// One renewal; returns how long to wait before the next check.
    async fn renew_or_retry(&mut self) -> Duration {
        match self.renew().await {
            Ok(()) => Duration::ZERO,
            Err(message) => {
                tracing::warn!(
                    "cannot renew this host's certificate, trying again in {RETRY:?}: {message}"
                );
                RETRY
            }
        }
    }

    async fn renew(&mut self) -> Result<(), String> {
        let key_pem = fleet_pki::request::new_key().map_err(|e| e.to_string())?;
        let csr_pem = fleet_pki::request::request_for(&self.host_name, &key_pem)
            .map_err(|e| e.to_string())?;
        let channel = self.dialer.channel();
        let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
        let response =
            tokio::time::timeout(CALL_TIMEOUT, client.renew(pb::RenewRequest { csr_pem }))
                .await
                .map_err(|_| format!("the controller did not answer within {CALL_TIMEOUT:?}"))?
                .map_err(|status| format!("{:?}: {}", status.code(), status.message()))?
                .into_inner();
        let found = fleet_pki::identity::common_name_of_pem(&response.certificate_pem);
        if found.as_deref() != Some(self.host_name.as_str()) {
            return Err(format!(
                "the controller answered with a certificate for {found:?}, not for this host"
            ));
        }
        let credentials = Credentials {
            ca_pem: if response.ca_pem.is_empty() {
                self.credentials.ca_pem.clone()
            } else {
                response.ca_pem
            },
            cert_pem: response.certificate_pem,
            key_pem,
        };
        // Checked before anything is kept: the dialer makes the same channel below.
        crate::session::lazy_channel(&self.dialer.current_url(), &credentials)
            .map_err(|e| e.to_string())?;
        join::keep_renewed(&self.data_dir, &credentials).map_err(|e| e.to_string())?;
        if let Some(facts) = fleet_pki::identity::facts_of_pem(&credentials.cert_pem) {
            tracing::info!(
                issuer = %facts.issuer,
                "certificate renewed; valid for {}s more; reconnecting with it",
                facts.not_after_unix - now_unix()
            );
        }
        self.credentials = credentials.clone();
        self.dialer
            .renewed(credentials)
            .map_err(|e| e.to_string())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_when_two_thirds_of_the_lifetime_passed() {
        use Decision::*;
        let b = fleet_pki::lifetime::BACKDATE_SECS;
        let hour = 3600;
        let year = 365 * 86_400;
        for (not_before, not_after, now, expect) in [
            // A 1-minute certificate issued at 0 (back-dated): renew from second 40 on.
            (-b, 60, 0, CheckIn(Duration::from_secs(40))),
            (-b, 60, 39, CheckIn(Duration::from_secs(1))),
            (-b, 60, 40, RenewNow),
            (-b, 60, 59, RenewNow),
            (-b, 60, 200, RenewNow), // expired: try anyway (the controller decides)
            // A year: look again within the hour, renew in the last third.
            (-b, year, 0, CheckIn(MAX_CHECK)),
            (
                -b,
                year,
                year - year / 3 - 10,
                CheckIn(Duration::from_secs(10)),
            ),
            (-b, year, year - year / 3, RenewNow),
            // Not yet valid (clock behind): wait, bounded.
            (hour, 4 * hour, 0, CheckIn(MAX_CHECK)),
            // Nonsense validity: renew.
            (10, 10, 0, RenewNow),
            (10, 5, 0, RenewNow),
        ] {
            assert_eq!(
                decide(not_before, not_after, now),
                expect,
                "{not_before}..{not_after} at {now}"
            );
        }
    }
}
