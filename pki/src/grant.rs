//! Peer-fetch grants: the controller's signed permission for one host to fetch one artifact
//! from its peers until a time. The controller signs with the fleet CA's key
//! ([`crate::ca::Authority::sign_grant`]); a serving agent checks the signature against the
//! CA bundle it already trusts, and that the grant names the host of the certificate that
//! asks and the artifact asked for ([`check`]). So the rule that a host gets only its own
//! releases holds between peers too. The signature is ECDSA P-256 with SHA-256 (ASN.1), made
//! and checked by ring, the project's one crypto provider.

use thiserror::Error;

/// What a grant says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub host_name: String,
    pub digest: String,
    pub expires_unix_ms: i64,
}

/// Why a grant does not let a caller fetch an artifact.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum GrantError {
    #[error("no grant: ask the controller for one (ArtifactSources)")]
    Missing,
    #[error("the grant is for host `{grant}`, not for the caller `{caller}`")]
    OtherHost { grant: String, caller: String },
    #[error("the grant is for artifact {grant}, not for {asked}")]
    OtherArtifact { grant: String, asked: String },
    #[error("the grant expired {0} ms ago: ask the controller for a fresh one")]
    Expired(i64),
    #[error("the grant's signature is not the fleet CA's")]
    BadSignature,
}

/// The bytes the signature covers: a fixed prefix, then the three fields, one a line (a host
/// name and a digest hold no newline, so no two grants share a text).
pub fn signed_text(grant: &Grant) -> Vec<u8> {
    format!(
        "fleet peer grant v1\n{}\n{}\n{}\n",
        grant.host_name, grant.digest, grant.expires_unix_ms
    )
    .into_bytes()
}

/// Whether `signature` over `grant` was made by the key of one of the CA certificates in
/// `ca_bundle_pem` (during a CA rotation the bundle holds two).
pub fn signed_by_ca(ca_bundle_pem: &str, grant: &Grant, signature: &[u8]) -> bool {
    let text = signed_text(grant);
    crate::identity::split_pem_bundle(ca_bundle_pem)
        .iter()
        .any(|pem| {
            let Ok((_, pem)) = x509_parser::pem::parse_x509_pem(pem.as_bytes()) else {
                return false;
            };
            let Ok(cert) = pem.parse_x509() else {
                return false;
            };
            let key = &cert.tbs_certificate.subject_pki.subject_public_key.data;
            ring::signature::UnparsedPublicKey::new(
                &ring::signature::ECDSA_P256_SHA256_ASN1,
                key.as_ref(),
            )
            .verify(&text, signature)
            .is_ok()
        })
}

/// Whether a grant lets `caller` (the name in its verified certificate) fetch `asked` at
/// `now_unix_ms`; `signed` says whether the signature checked out ([`signed_by_ca`]). Pure.
pub fn check(
    grant: Option<&Grant>,
    signed: bool,
    caller: &str,
    asked: &str,
    now_unix_ms: i64,
) -> Result<(), GrantError> {
    let grant = grant.ok_or(GrantError::Missing)?;
    if !signed {
        return Err(GrantError::BadSignature);
    }
    if grant.host_name != caller {
        return Err(GrantError::OtherHost {
            grant: grant.host_name.clone(),
            caller: caller.to_string(),
        });
    }
    if grant.digest != asked {
        return Err(GrantError::OtherArtifact {
            grant: grant.digest.clone(),
            asked: asked.to_string(),
        });
    }
    if now_unix_ms >= grant.expires_unix_ms {
        return Err(GrantError::Expired(now_unix_ms - grant.expires_unix_ms));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{generate_ca, Authority};

    fn grant(host: &str, digest: &str, expires: i64) -> Grant {
        Grant {
            host_name: host.into(),
            digest: digest.into(),
            expires_unix_ms: expires,
        }
    }

    #[test]
    fn check_table() {
        let g = grant("web-1", "sha256:aa", 1000);
        for (grant, signed, caller, asked, now, expect) in [
            (Some(&g), true, "web-1", "sha256:aa", 999, Ok(())),
            (
                None,
                true,
                "web-1",
                "sha256:aa",
                0,
                Err(GrantError::Missing),
            ),
            (
                Some(&g),
                false,
                "web-1",
                "sha256:aa",
                0,
                Err(GrantError::BadSignature),
            ),
            (
                Some(&g),
                true,
                "web-2",
                "sha256:aa",
                0,
                Err(GrantError::OtherHost {
                    grant: "web-1".into(),
                    caller: "web-2".into(),
                }),
            ),
            (
                Some(&g),
                true,
                "web-1",
                "sha256:bb",
                0,
                Err(GrantError::OtherArtifact {
                    grant: "sha256:aa".into(),
                    asked: "sha256:bb".into(),
                }),
            ),
            (
                Some(&g),
                true,
                "web-1",
                "sha256:aa",
                1000,
                Err(GrantError::Expired(0)),
            ),
        ] {
            assert_eq!(
                check(grant, signed, caller, asked, now),
                expect,
                "{caller} {asked} {now}"
            );
        }
    }

    #[test]
    fn signatures_check_against_the_ca_bundle_only() {
        let (ca_pem, ca_key) = generate_ca().unwrap();
        let (other_pem, _) = generate_ca().unwrap();
        let authority = Authority::load(&ca_pem, &ca_key).unwrap();
        let g = grant("web-1", "sha256:aa", 1000);
        let signature = authority.sign_grant(&g).unwrap();
        assert!(signed_by_ca(&ca_pem, &g, &signature));
        // A bundle during a rotation: the signing CA second.
        assert!(signed_by_ca(
            &format!("{other_pem}{ca_pem}"),
            &g,
            &signature
        ));
        assert!(!signed_by_ca(&other_pem, &g, &signature));
        // Another host, artifact or time under the same signature.
        for changed in [
            grant("web-2", "sha256:aa", 1000),
            grant("web-1", "sha256:ab", 1000),
            grant("web-1", "sha256:aa", 1001),
        ] {
            assert!(!signed_by_ca(&ca_pem, &changed, &signature));
        }
        assert!(!signed_by_ca(&ca_pem, &g, b"junk"));
    }
}
