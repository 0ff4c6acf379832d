//! The fleet's certificate authority, made by `fleetctl init` and used by the controller: it
//! signs the controller's own certificate, operator and CI credentials (`IssueCredential`) and
//! agents' certificates (`Join`). Keys are ECDSA P-256 (rcgen with ring). Subjects follow
//! [`crate::identity`]: CN = name, OU = role. Serials are 16 random bytes, so the
//! revoked list can name a certificate exactly.

use crate::identity::Role;
use crate::CONTROLLER_TLS_NAME;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use std::net::IpAddr;
use std::time::Duration;
use thiserror::Error;

/// How long the CA and the controller's certificate are valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86_400);
/// A certificate request larger than this is refused before it is parsed.
pub const MAX_CSR_BYTES: usize = 16 * 1024;

#[derive(Debug, Error)]
pub enum CaError {
    #[error("cannot make a certificate: {0}")]
    Generate(rcgen::Error),
    #[error("the fleet CA is not usable: {0}")]
    BadCa(String),
    #[error("the certificate request is invalid: {0}")]
    BadRequest(String),
    #[error("no randomness for a serial number: {0}")]
    Random(getrandom::Error),
}

/// A certificate and, when this side made the key, its private key (both PEM).
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: Option<String>,
    /// Lowercase hex, as [`crate::Identity::serial`].
    pub serial: String,
    pub not_after_unix_ms: i64,
}

/// The fleet CA: its certificate and the key that signs with it.
pub struct Authority {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").finish_non_exhaustive()
    }
}

fn distinguished_name(name: &str, role: Option<Role>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "fleet");
    if let Some(role) = role {
        dn.push(DnType::OrganizationalUnitName, role.as_str());
    }
    dn.push(DnType::CommonName, name);
    dn
}

/// 16 random bytes, first byte in 0x40..0x7f so the DER integer is positive and minimal (the
/// hex read back from a certificate is then exactly this).
fn random_serial() -> Result<(SerialNumber, String), CaError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(CaError::Random)?;
    bytes[0] = (bytes[0] & 0x3f) | 0x40;
    Ok((SerialNumber::from_slice(&bytes), hex::encode(bytes)))
}

pub use crate::lifetime::BACKDATE_SECS;

/// `not_before` [`BACKDATE_SECS`] ago (clock skew), `not_after` after `validity` from now.
fn validity_window(params: &mut CertificateParams, validity: Duration) -> i64 {
    let now = crate::now_unix_secs();
    let not_after = now + validity.as_secs() as i64;
    params.not_before =
        time::OffsetDateTime::from_unix_timestamp(now - BACKDATE_SECS).unwrap_or(params.not_before);
    params.not_after =
        time::OffsetDateTime::from_unix_timestamp(not_after).unwrap_or(params.not_after);
    not_after * 1000
}

/// Makes a new CA: returns its certificate and private key (PEM).
pub fn generate_ca() -> Result<(String, String), CaError> {
    let key = KeyPair::generate().map_err(CaError::Generate)?;
    let mut params = CertificateParams::default();
    // A CN of its own (a random suffix), so the CA before a rotation and the one after it are
    // told apart by the issuer a certificate names.
    let mut suffix = [0u8; 4];
    getrandom::fill(&mut suffix).map_err(CaError::Random)?;
    params.distinguished_name =
        distinguished_name(&format!("fleet CA {}", hex::encode(suffix)), None);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial()?.0);
    validity_window(&mut params, CA_VALIDITY);
    let cert = params.self_signed(&key).map_err(CaError::Generate)?;
    Ok((cert.pem(), key.serialize_pem()))
}

impl Authority {
    /// Loads the CA from its certificate and key (PEM).
    pub fn load(ca_pem: &str, ca_key_pem: &str) -> Result<Authority, CaError> {
        let key = KeyPair::from_pem(ca_key_pem)
            .map_err(|e| CaError::BadCa(format!("its key cannot be read: {e}")))?;
        // The first certificate of `ca_pem` signs; more may follow (a CA being rotated out,
        // still trusted). A key of another certificate (a rotation cut half-way) is refused.
        {
            use rcgen::PublicKeyData;
            let (_, pem) = x509_parser::pem::parse_x509_pem(ca_pem.as_bytes())
                .map_err(|e| CaError::BadCa(format!("its certificate cannot be read: {e}")))?;
            let cert = pem
                .parse_x509()
                .map_err(|e| CaError::BadCa(format!("its certificate cannot be read: {e}")))?;
            if cert.tbs_certificate.subject_pki.raw != key.subject_public_key_info().as_slice() {
                return Err(CaError::BadCa(
                    "its key is not the key of its (first) certificate: put the CA's certificate and key of one pair in place".into(),
                ));
            }
        }
        let issuer = Issuer::from_ca_cert_pem(ca_pem, key)
            .map_err(|e| CaError::BadCa(format!("its certificate cannot be read: {e}")))?;
        Ok(Authority {
            ca_pem: ca_pem.to_string(),
            issuer,
        })
    }

    /// Signs a peer-fetch grant with the CA's key (see [`crate::grant`]).
    pub fn sign_grant(&self, grant: &crate::grant::Grant) -> Result<Vec<u8>, CaError> {
        use rcgen::SigningKey;
        self.issuer
            .key()
            .sign(&crate::grant::signed_text(grant))
            .map_err(CaError::Generate)
    }

    /// The CA certificate (PEM), what every side trusts.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The controller's own certificate and key: DNS names `fleet-controller` (what clients
    /// verify) and `localhost`, plus `names`: the hosts of the URLs the controller is dialled
    /// at (`fleetctl init --url`) and its specific listen address, each an IP address or a DNS
    /// name. Unspecified addresses (`0.0.0.0`, `::`) and repeats are left out.
    pub fn issue_controller(&self, names: &[String]) -> Result<Issued, CaError> {
        let key = KeyPair::generate().map_err(CaError::Generate)?;
        let mut params = CertificateParams::new(vec![
            CONTROLLER_TLS_NAME.to_string(),
            "localhost".to_string(),
        ])
        .map_err(CaError::Generate)?;
        for name in names {
            let san = match name.parse::<IpAddr>() {
                Ok(ip) if ip.is_unspecified() => continue,
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    name.to_ascii_lowercase()
                        .try_into()
                        .map_err(CaError::Generate)?,
                ),
            };
            if !params.subject_alt_names.contains(&san) {
                params.subject_alt_names.push(san);
            }
        }
        params.distinguished_name = distinguished_name(CONTROLLER_TLS_NAME, None);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let (serial_number, serial) = random_serial()?;
        params.serial_number = Some(serial_number);
        let not_after_unix_ms = validity_window(&mut params, CA_VALIDITY);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(CaError::Generate)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: Some(key.serialize_pem()),
            serial,
            not_after_unix_ms,
        })
    }

    /// A client credential made here, key included, valid for `validity` (the admin
    /// credential of `fleetctl init`, `fleet-controller issue-admin`'s, the backup's).
    pub fn issue_client(
        &self,
        name: &str,
        role: Role,
        validity: Duration,
    ) -> Result<Issued, CaError> {
        let key = KeyPair::generate().map_err(CaError::Generate)?;
        let mut issued = self.sign_client(&key, name, role, validity)?;
        issued.key_pem = Some(key.serialize_pem());
        Ok(issued)
    }

    /// Signs a certificate request (PEM) as `name` with `role`, valid for `validity` (see
    /// [`crate::lifetime`]). Only the request's public key is used: the subject and every
    /// extension come from here, never from the request.
    pub fn sign_request(
        &self,
        csr_pem: &str,
        name: &str,
        role: Role,
        validity: Duration,
    ) -> Result<Issued, CaError> {
        if csr_pem.len() > MAX_CSR_BYTES {
            return Err(CaError::BadRequest(format!(
                "it is over {MAX_CSR_BYTES} bytes"
            )));
        }
        let request = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::BadRequest(e.to_string()))?;
        self.sign_client(&request.public_key, name, role, validity)
    }

    fn sign_client(
        &self,
        public_key: &impl rcgen::PublicKeyData,
        name: &str,
        role: Role,
        validity: Duration,
    ) -> Result<Issued, CaError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(name, Some(role));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if role == Role::Agent {
            // An agent also serves artifact chunks to its peers (mutual TLS both ways): its
            // certificate is a server's too, under its host name.
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
            params.subject_alt_names = vec![SanType::DnsName(
                name.try_into().map_err(CaError::Generate)?,
            )];
        }
        let (serial_number, serial) = random_serial()?;
        params.serial_number = Some(serial_number);
        let not_after_unix_ms = validity_window(&mut params, validity);
        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(CaError::Generate)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: None,
            serial,
            not_after_unix_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::new_key_and_request;
    use crate::Identity;

    fn der_of(pem: &str) -> Vec<u8> {
        let body: String = pem
            .lines()
            .filter(|line| !line.starts_with("-----"))
            .collect();
        base64_decode(&body)
    }

    /// A tiny base64 decoder, enough for test PEM bodies.
    fn base64_decode(text: &str) -> Vec<u8> {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = Vec::new();
        let mut acc = 0u32;
        let mut bits = 0;
        for byte in text.bytes().filter(|b| *b != b'=') {
            let value = ALPHABET.iter().position(|a| *a == byte).unwrap() as u32;
            acc = (acc << 6) | value;
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
                acc &= (1 << bits) - 1;
            }
        }
        out
    }

    #[test]
    fn signs_requests_with_the_identity_it_chooses() {
        let (ca_pem, ca_key) = generate_ca().unwrap();
        let authority = Authority::load(&ca_pem, &ca_key).unwrap();
        let (csr, _key) = new_key_and_request("someone-else").unwrap();
        let day = Duration::from_secs(86_400);
        let issued = authority
            .sign_request(&csr, "web-1", Role::Agent, day)
            .unwrap();
        let identity = Identity::from_der(&der_of(&issued.cert_pem)).unwrap();
        assert_eq!(identity.name, "web-1");
        assert_eq!(identity.role, Role::Agent);
        assert_eq!(identity.serial, issued.serial);

        let admin = authority.issue_client("admin", Role::Admin, day).unwrap();
        let identity = Identity::from_der(&der_of(&admin.cert_pem)).unwrap();
        assert_eq!(
            (identity.name.as_str(), identity.role),
            ("admin", Role::Admin)
        );
        assert!(admin.key_pem.is_some());

        assert!(authority
            .sign_request("not a csr", "x", Role::Agent, day)
            .is_err());
        assert!(authority
            .sign_request(&"x".repeat(MAX_CSR_BYTES + 1), "x", Role::Agent, day)
            .is_err());
        // The controller's certificate has no role: it is no client credential.
        let server = authority.issue_controller(&[]).unwrap();
        assert!(Identity::from_der(&der_of(&server.cert_pem)).is_err());
    }

    #[test]
    fn the_controller_is_named_by_its_urls_hosts() {
        let (ca_pem, ca_key) = generate_ca().unwrap();
        let authority = Authority::load(&ca_pem, &ca_key).unwrap();
        let names = [
            "controller.example.com",
            "10.0.0.5",
            "0.0.0.0",
            "::",
            "Controller.Example.com",
            "fd00::1",
        ]
        .map(String::from);
        let server = authority.issue_controller(&names).unwrap();
        let mut sans = crate::identity::alt_names_of_pem(&server.cert_pem);
        sans.sort();
        assert_eq!(
            sans,
            [
                "10.0.0.5",
                "controller.example.com",
                "fd00::1",
                "fleet-controller",
                "localhost"
            ]
        );
        assert!(authority
            .issue_controller(&["not a name\u{0}é".to_string()])
            .is_err());
    }

    #[test]
    fn a_bundle_signs_with_its_first_ca_and_a_mismatched_key_is_refused() {
        use crate::identity::{alt_names_of_pem, facts_of_pem, split_pem_bundle};
        let (old_pem, old_key) = generate_ca().unwrap();
        let (new_pem, new_key) = generate_ca().unwrap();
        let bundle = format!("{new_pem}{old_pem}");
        assert_eq!(
            split_pem_bundle(&bundle),
            [new_pem.clone(), old_pem.clone()]
        );
        let authority = Authority::load(&bundle, &new_key).unwrap();
        let (csr, _key) = new_key_and_request("web-1").unwrap();
        let issued = authority
            .sign_request(&csr, "web-1", Role::Agent, Duration::from_secs(120))
            .unwrap();
        let facts = facts_of_pem(&issued.cert_pem).unwrap();
        assert_eq!(facts.issuer, facts_of_pem(&new_pem).unwrap().subject);
        assert_ne!(facts.issuer, facts_of_pem(&old_pem).unwrap().subject);
        // Back-dated 5 minutes against clock skew, valid for what was asked.
        assert_eq!(
            facts.not_after_unix - facts.not_before_unix,
            120 + BACKDATE_SECS
        );
        assert_eq!(
            crate::lifetime::lifetime_of(facts.not_before_unix, facts.not_after_unix),
            Duration::from_secs(120)
        );
        // The CA's and the controller's own certificates are back-dated too.
        for pem in [&new_pem, &authority.issue_controller(&[]).unwrap().cert_pem] {
            let facts = facts_of_pem(pem).unwrap();
            let now = crate::now_unix_secs();
            assert!(
                (now - BACKDATE_SECS - 2..=now - BACKDATE_SECS).contains(&facts.not_before_unix),
                "{facts:?}"
            );
        }
        assert!(Authority::load(&bundle, &old_key).is_err());
        let server = authority
            .issue_controller(&["10.0.0.5".to_string()])
            .unwrap();
        let mut names = alt_names_of_pem(&server.cert_pem);
        names.sort();
        assert_eq!(names, ["10.0.0.5", "fleet-controller", "localhost"]);
    }
}
