//! The identity in a fleet certificate: subject CN is the name (a host name for agents, a
//! person or CI job for credentials), subject OU is the role (`admin`, `deployer`, `agent`,
//! `controller`),
//! and the serial number (lowercase hex) is what revocation lists. The certificate has already
//! been verified against the fleet CA by rustls when this reads it.

use x509_parser::prelude::{FromDer, X509Certificate};

/// What a certificate allows; the controller's `auth` module has the table of calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Deployer,
    Agent,
    /// Another controller of the same fleet (they share the CA key): it may only replicate
    /// artifacts (`ReplicaService`). Each controller issues itself one at start; nobody else
    /// is given one.
    Controller,
}

impl Role {
    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "admin" => Some(Role::Admin),
            "deployer" => Some(Role::Deployer),
            "agent" => Some(Role::Agent),
            "controller" => Some(Role::Controller),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Deployer => "deployer",
            Role::Agent => "agent",
            Role::Controller => "controller",
        }
    }

    /// Whether a holder of `self` may make a call that needs `needed`. Admin covers deployer;
    /// agent calls need an agent certificate (they speak for a host, which an operator is not);
    /// a controller's calls need a controller certificate, which grants nothing else.
    pub fn grants(self, needed: Role) -> bool {
        matches!(
            (self, needed),
            (Role::Admin, Role::Admin)
                | (Role::Admin, Role::Deployer)
                | (Role::Deployer, Role::Deployer)
                | (Role::Agent, Role::Agent)
                | (Role::Controller, Role::Controller)
        )
    }
}

/// Who is calling, read from a verified client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub role: Role,
    /// The certificate's serial number, lowercase hex.
    pub serial: String,
    /// When the certificate expires (what `credentials list` shows for a credential the
    /// controller learns of at its first use, such as `fleetctl init`'s).
    pub not_after_unix_ms: i64,
    /// When it became valid (back-dated, see [`crate::lifetime`]): with `not_after_unix_ms`,
    /// the lifetime a renewal keeps.
    pub not_before_unix_ms: i64,
}

impl Identity {
    /// Reads the identity from a DER certificate; refuses one without exactly one CN and one
    /// OU naming a role.
    pub fn from_der(der: &[u8]) -> Result<Identity, String> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| format!("cannot parse the certificate: {e}"))?;
        let subject = cert.subject();
        let one = |values: Vec<Option<&str>>, what: &str| -> Result<String, String> {
            match values.as_slice() {
                [Some(value)] => Ok(value.to_string()),
                _ => Err(format!("its subject needs exactly one {what}")),
            }
        };
        let name = one(
            subject
                .iter_common_name()
                .map(|a| a.as_str().ok())
                .collect(),
            "common name (CN)",
        )?;
        let role_text = one(
            subject
                .iter_organizational_unit()
                .map(|a| a.as_str().ok())
                .collect(),
            "organizational unit (OU) naming its role",
        )?;
        let role = Role::parse(&role_text).ok_or_else(|| {
            format!("its role {role_text:?} is not admin, deployer, agent or controller")
        })?;
        Ok(Identity {
            name,
            role,
            serial: hex::encode(cert.raw_serial()),
            not_after_unix_ms: cert.validity().not_after.timestamp().saturating_mul(1000),
            not_before_unix_ms: cert.validity().not_before.timestamp().saturating_mul(1000),
        })
    }

    /// Like [`Identity::from_der`], from the first certificate of `cert_pem`.
    pub fn from_pem(cert_pem: &str) -> Result<Identity, String> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
            .map_err(|e| format!("cannot read the certificate: {e}"))?;
        Identity::from_der(&pem.contents)
    }

    /// The lifetime the certificate was issued with (see [`crate::lifetime::lifetime_of`]).
    pub fn lifetime(&self) -> std::time::Duration {
        crate::lifetime::lifetime_of(
            self.not_before_unix_ms / 1000,
            self.not_after_unix_ms / 1000,
        )
    }
}

/// The common name (CN) of a certificate (PEM), whoever issued it: what an agent checks its
/// kept certificate against before it uses it.
pub fn common_name_of_pem(cert_pem: &str) -> Option<String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    let name = cert.subject().iter_common_name().next()?.as_str().ok()?;
    Some(name.to_string())
}

/// What a certificate (PEM) says about itself that renewal and rotation look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFacts {
    pub not_before_unix: i64,
    pub not_after_unix: i64,
    /// The issuer's and the subject's distinguished names, as text (`CN=fleet CA 1a2b3c4d, O=fleet`).
    pub issuer: String,
    pub subject: String,
}

/// The validity and names of the first certificate in `cert_pem`; `None` when it cannot be read.
pub fn facts_of_pem(cert_pem: &str) -> Option<CertificateFacts> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).ok()?;
    facts_of_der(&pem.contents)
}

/// Like [`facts_of_pem`], from DER.
pub fn facts_of_der(der: &[u8]) -> Option<CertificateFacts> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    Some(CertificateFacts {
        not_before_unix: cert.validity().not_before.timestamp(),
        not_after_unix: cert.validity().not_after.timestamp(),
        issuer: cert.issuer().to_string(),
        subject: cert.subject().to_string(),
    })
}

/// Every certificate of a PEM bundle, each as PEM text of its own, in order.
pub fn split_pem_bundle(bundle: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in bundle.lines() {
        if line.starts_with("-----BEGIN") {
            current.clear();
        }
        current.push_str(line);
        current.push('\n');
        if line.starts_with("-----END") {
            out.push(std::mem::take(&mut current));
        }
    }
    out
}

/// The DNS names and IP addresses a certificate (PEM) names in its subject alternative names.
pub fn alt_names_of_pem(cert_pem: &str) -> Vec<String> {
    use x509_parser::prelude::GeneralName;
    let Ok((_, pem)) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()) else {
        return Vec::new();
    };
    let Ok(cert) = pem.parse_x509() else {
        return Vec::new();
    };
    let Ok(Some(names)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    names
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some(dns.to_string()),
            GeneralName::IPAddress(bytes) => match bytes.len() {
                4 => Some(std::net::IpAddr::from(<[u8; 4]>::try_from(*bytes).ok()?).to_string()),
                16 => Some(std::net::IpAddr::from(<[u8; 16]>::try_from(*bytes).ok()?).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_grant_what_the_table_says() {
        use Role::*;
        for (have, need, ok) in [
            (Admin, Admin, true),
            (Admin, Deployer, true),
            (Admin, Agent, false),
            (Deployer, Deployer, true),
            (Deployer, Admin, false),
            (Deployer, Agent, false),
            (Agent, Agent, true),
            (Agent, Deployer, false),
            (Agent, Admin, false),
            (Controller, Controller, true),
            (Controller, Admin, false),
            (Controller, Deployer, false),
            (Controller, Agent, false),
            (Admin, Controller, false),
            (Agent, Controller, false),
        ] {
            assert_eq!(have.grants(need), ok, "{have:?} {need:?}");
        }
        for role in [Admin, Deployer, Agent, Controller] {
            assert_eq!(Role::parse(role.as_str()), Some(role));
        }
        assert_eq!(Role::parse("root"), None);
    }
}
