//! The certificate side of `FleetService`, kept apart from the verbs: `RenewCredential` (an
//! operator's or CI credential trades itself for a fresh certificate, same name, role and
//! lifetime), the caller's own re-issue during a CA rotation (the same function), the lifetime
//! `IssueCredential` gives, and when each host's certificate expires (`fleetctl hosts`).
//!
//! Who may renew is `auth`'s: any certificate with a role an operator or CI holds (admin,
//! deployer), not revoked, for itself only (the name and role come from the certificate
//! presented, never from the request).

use super::{actor_of, store_status};
use crate::auth::{self, Identity, Role};
use crate::ca_trust::Trust;
use crate::fleet_state::FleetState;
use crate::store::CertificateRecord;
use fleet_proto::pb;
use std::collections::BTreeMap;
use std::time::Duration;
use tonic::{Request, Response, Status};

/// How `issued_by` names a certificate that replaced another by renewal, followed by the old
/// serial (hosts' renewals and credentials' alike): what `credentials list` reads back.
pub const RENEWAL_OF: &str = "renewal of ";

/// The lifetime `IssueCredential` gives: the request's `ttl_ms`, else the controller's
/// `certificate_ttl`.
pub fn credential_lifetime(ttl_ms: u64, default: Duration) -> Result<Duration, Status> {
    if ttl_ms == 0 {
        return Ok(default);
    }
    fleet_pki::lifetime::check_lifetime(Duration::from_millis(ttl_ms))
        .map_err(|e| Status::invalid_argument(format!("--ttl {e}")))
}

/// Signs `csr_pem` for the caller's own name and role, valid as long as the certificate it
/// presented was issued for, and records it as issued by `issued_by`.
pub async fn reissue_own(
    fleet: &FleetState,
    trust: &Trust,
    identity: &Identity,
    csr_pem: &str,
    issued_by: String,
) -> Result<fleet_pki::ca::Issued, Status> {
    let issued = trust
        .authority()
        .sign_request(csr_pem, &identity.name, identity.role, identity.lifetime())
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    fleet
        .record_certificate(CertificateRecord {
            serial: issued.serial.clone(),
            name: identity.name.clone(),
            role: identity.role.as_str().to_string(),
            issued_unix_ms: fleet_proto::now_unix_ms(),
            not_after_unix_ms: issued.not_after_unix_ms,
            issued_by,
            labels: None,
        })
        .await
        .map_err(store_status)?;
    Ok(issued)
}

/// `RenewCredential`: see the module doc.
pub async fn renew_credential(
    fleet: &FleetState,
    trust: &Trust,
    request: Request<pb::RenewCredentialRequest>,
) -> Result<Response<pb::RenewCredentialResponse>, Status> {
    // Deployer is the least an operator or CI credential holds; an agent renews with
    // `AgentService.Renew`.
    let identity = auth::require(fleet, &request, Role::Deployer)?;
    let actor = actor_of(&identity, &request);
    let request = request.into_inner();
    let issued = reissue_own(
        fleet,
        trust,
        &identity,
        &request.csr_pem,
        format!("{RENEWAL_OF}{}", identity.serial),
    )
    .await?;
    fleet
        .event(
            &actor,
            "credential.renewed",
            "",
            "",
            format!(
                "credential `{}` with role {} renewed its certificate {} for {} (valid {})",
                identity.name,
                identity.role.as_str(),
                identity.serial,
                issued.serial,
                fleet_pki::lifetime::format_lifetime(identity.lifetime()),
            ),
        )
        .await;
    Ok(Response::new(pb::RenewCredentialResponse {
        certificate_pem: issued.cert_pem,
        ca_pem: trust.ca_bundle(),
        serial: issued.serial,
        not_after_unix_ms: issued.not_after_unix_ms,
    }))
}

/// For each certificate serial that a renewal replaced, the serial of its replacement.
pub fn renewals(
    certificates: impl IntoIterator<Item = CertificateRecord>,
) -> BTreeMap<String, String> {
    certificates
        .into_iter()
        .filter_map(|certificate| {
            let old = certificate.issued_by.strip_prefix(RENEWAL_OF)?.to_string();
            Some((old, certificate.serial))
        })
        .collect()
}

/// Fills in when each host's certificate expires: the one its latest session presented, else
/// the latest the controller issued for its name.
pub fn fill_certificate_expiry(
    fleet: &FleetState,
    trust: &Trust,
    hosts: &mut [pb::Host],
) -> Result<(), Status> {
    let presented = trust.presented_not_after();
    for host in hosts.iter_mut() {
        host.certificate_not_after_unix_ms = presented.get(&host.name).copied().unwrap_or(0);
    }
    if hosts
        .iter()
        .all(|host| host.certificate_not_after_unix_ms > 0)
    {
        return Ok(());
    }
    let mut issued: BTreeMap<String, i64> = BTreeMap::new();
    for certificate in fleet.certificates().map_err(store_status)? {
        if certificate.role == Role::Agent.as_str() {
            let latest = issued.entry(certificate.name).or_default();
            *latest = (*latest).max(certificate.not_after_unix_ms);
        }
    }
    for host in hosts.iter_mut() {
        if host.certificate_not_after_unix_ms == 0 {
            host.certificate_not_after_unix_ms = issued.get(&host.name).copied().unwrap_or(0);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credential_lives_as_asked_or_as_configured() {
        let day = Duration::from_secs(86_400);
        for (ttl_ms, expect) in [
            (0, Some(30 * 86_400)),
            (60_000, Some(60)),
            (7 * 86_400_000, Some(7 * 86_400)),
            (59_999, None),
            (366 * 86_400_000, None),
        ] {
            assert_eq!(
                credential_lifetime(ttl_ms, 30 * day)
                    .ok()
                    .map(|d| d.as_secs()),
                expect,
                "{ttl_ms}"
            );
        }
    }

    #[test]
    fn a_renewal_names_the_certificate_it_replaced() {
        let certificate = |serial: &str, issued_by: &str| CertificateRecord {
            serial: serial.to_string(),
            name: "ci".to_string(),
            role: "deployer".to_string(),
            issued_unix_ms: 0,
            not_after_unix_ms: 0,
            issued_by: issued_by.to_string(),
            labels: None,
        };
        let found = renewals([
            certificate("aa", "admin"),
            certificate("bb", "renewal of aa"),
            certificate("cc", "renewal of bb"),
        ]);
        assert_eq!(
            found.into_iter().collect::<Vec<_>>(),
            [
                ("aa".to_string(), "bb".to_string()),
                ("bb".to_string(), "cc".to_string())
            ]
        );
    }
}
