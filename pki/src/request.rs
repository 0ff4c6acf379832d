//! Keys and certificate requests, made on the side that keeps the key (an agent, `fleetctl
//! credentials create`): the private key never leaves it, only the request does. Keys are
//! ECDSA P-256 (rcgen with ring).

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

/// A new private key (PEM).
pub fn new_key() -> Result<String, rcgen::Error> {
    Ok(KeyPair::generate()?.serialize_pem())
}

/// A certificate request naming `name` (CN) for the key `key_pem` (PEM). The CA takes only
/// its public key; the name is a hint for the person reading it.
pub fn request_for(name: &str, key_pem: &str) -> Result<String, rcgen::Error> {
    let key = KeyPair::from_pem(key_pem)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.serialize_request(&key)?.pem()
}

/// A new key and a certificate request for `name`: `(request_pem, key_pem)`.
pub fn new_key_and_request(name: &str) -> Result<(String, String), rcgen::Error> {
    let key_pem = new_key()?;
    Ok((request_for(name, &key_pem)?, key_pem))
}

/// The sha256 (lowercase hex) of the public key a certificate request (PEM) carries: what
/// tells a retried join (same key) from another. The request is refused when it cannot be read
/// or is over [`crate::ca::MAX_CSR_BYTES`].
pub fn request_key_sha256(csr_pem: &str) -> Result<String, crate::ca::CaError> {
    use rcgen::PublicKeyData;
    use sha2::Digest;
    if csr_pem.len() > crate::ca::MAX_CSR_BYTES {
        return Err(crate::ca::CaError::BadRequest(format!(
            "it is over {} bytes",
            crate::ca::MAX_CSR_BYTES
        )));
    }
    let request = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| crate::ca::CaError::BadRequest(e.to_string()))?;
    Ok(hex::encode(sha2::Sha256::digest(
        request.public_key.subject_public_key_info(),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_names_the_host_and_a_kept_key_makes_the_same_request_key() {
        let key = new_key().unwrap();
        assert!(key.contains("PRIVATE KEY"));
        let csr = request_for("web-1", &key).unwrap();
        assert!(csr.contains("CERTIFICATE REQUEST"));
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(&csr).unwrap();
        let again =
            rcgen::CertificateSigningRequestParams::from_pem(&request_for("web-1", &key).unwrap())
                .unwrap();
        {
            use rcgen::PublicKeyData;
            assert_eq!(
                parsed.public_key.subject_public_key_info(),
                again.public_key.subject_public_key_info()
            );
        }
        assert_eq!(
            parsed.params.distinguished_name.get(&DnType::CommonName),
            Some(&rcgen::DnValue::Utf8String("web-1".into()))
        );
        assert!(request_for("web-1", "not a key").is_err());
        assert_eq!(
            request_key_sha256(&csr).unwrap(),
            request_key_sha256(&request_for("other", &key).unwrap()).unwrap()
        );
        assert_ne!(
            request_key_sha256(&csr).unwrap(),
            request_key_sha256(&new_key_and_request("web-1").unwrap().0).unwrap()
        );
        assert!(request_key_sha256("not a request").is_err());
    }
}
