//! One-time join tokens: 32 random bytes shown once as 64 hex digits. The controller keeps
//! only their sha256 (a stolen store file does not hand out tokens), with an expiry and a used
//! flag; `Store::join_with_token` checks and spends one, and records the certificate, in a single
//! transaction.

use sha2::{Digest, Sha256};

/// How long a join token lives when `--ttl` is not given.
pub const DEFAULT_TTL_MS: u64 = 3_600_000;
/// The longest a join token may live.
pub const MAX_TTL_MS: u64 = fleet_proto::MAX_JOIN_TOKEN_TTL_MS;

/// A fresh random token.
pub fn generate() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(hex::encode(bytes))
}

/// The form a token is stored and looked up in: sha256, lowercase hex.
pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Whether text looks like a token at all (64 lowercase hex digits), checked before lookup.
pub fn well_formed(token: &str) -> bool {
    token.len() == 64
        && token
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_hashed() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_ne!(a, b);
        assert!(well_formed(&a));
        assert!(!well_formed("x"));
        assert!(!well_formed(&a.to_uppercase()));
        assert_eq!(hash(&a).len(), 64);
        assert_ne!(hash(&a), a);
    }
}
