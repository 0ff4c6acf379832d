//! The fleet CA at run time: which CA signs new certificates, which CAs a client certificate
//! may chain to, the certificate the controller presents, and the CA rotation that changes all
//! three while the controller serves.
//!
//! The files `controller.toml` names hold the whole state, so a restart in the middle of a
//! rotation picks it up as it was:
//!
//! | phase | `ca` (PEM bundle) | `ca_key` | `cert` (the controller's) |
//! | --- | --- | --- | --- |
//! | steady | the CA | its key | signed by the CA |
//! | rotating | the new CA, then the old one | the new CA's key | still signed by the old CA, so agents that trust only the old CA still connect and renew |
//! | finished | the new CA | its key | signed by the new CA |
//!
//! The TLS server config is swapped whole (one `RwLock<Arc<_>>`): each new connection's
//! handshake takes the config current at its start; connections already open keep theirs,
//! and the edge refuses, request by request, a certificate no CA trusted now has signed
//! ([`Trust::refusal`]). Connected sessions are counted by the CA of the certificate they
//! presented, so `finish` can name the hosts that did not move yet.

use crate::config::TlsPaths;
use anyhow::Context;
use fleet_pki::ca::Authority;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::watch;
use tokio_rustls::rustls;
use tokio_rustls::rustls::server::danger::ClientCertVerifier;

/// What changed in the trust, as told to every open agent session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrustEvent {
    /// A session opened (nothing changed; the session's own certificate is looked at).
    Connected,
    /// A rotation began: a new CA signs, both are trusted.
    RotationStarted,
    /// The old CA was retired: only the new one is trusted, and the controller presents a
    /// certificate of it.
    RotationFinished,
}

/// Whether a session is told to renew its certificate now (`RenewCertificate`), given what
/// happened, whether the certificate it presented was signed by the CA that signs now, and
/// whether it was issued before the last rotation finished. After a rotation finished every
/// agent renews once more, so that the CA bundle it keeps drops the old CA; one that was not
/// connected then does so when it connects.
pub fn advise_renewal(
    event: TrustEvent,
    certificate_from_signing_ca: bool,
    issued_before_last_finish: bool,
) -> bool {
    match event {
        TrustEvent::Connected => !certificate_from_signing_ca || issued_before_last_finish,
        TrustEvent::RotationStarted => !certificate_from_signing_ca,
        TrustEvent::RotationFinished => true,
    }
}

struct Current {
    authority: Arc<Authority>,
    server: Arc<rustls::ServerConfig>,
    /// Client certificates of every trusted CA.
    any_trusted: Arc<dyn ClientCertVerifier>,
    /// Client certificates of the CA that signs now.
    signing: Arc<dyn ClientCertVerifier>,
    rotating: bool,
}

/// The controller's CA state; one per process, shared by the edge and both services.
pub struct Trust {
    paths: TlsPaths,
    current: RwLock<Current>,
    /// Bumped on every change, with the change; sessions watch it.
    changes: watch::Sender<(u64, TrustEvent)>,
    /// The certificate (DER) each host presented at its latest session, kept after the
    /// session ends: a host between two sessions has not moved until it presented a
    /// certificate of the new CA.
    sessions: Mutex<BTreeMap<String, Vec<u8>>>,
    /// When the last rotation finished (unix seconds), in this process.
    finished_at_unix: Mutex<Option<i64>>,
    /// How long the certificates the controller issues (hosts' and clients') are valid
    /// (`certificate_ttl`); a renewed client credential keeps its own lifetime instead.
    pub certificate_ttl: Duration,
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read {}; `fleetctl init --dir DIR` makes the CA and the controller's certificate",
            path.display()
        )
    })
}

/// Writes a file with mode 0600 through a temporary file and a rename.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    fleet_pki::files::write_private_atomically(path, text)
        .with_context(|| format!("cannot write {}", path.display()))
}

fn client_verifier(ca_bundle: &str) -> anyhow::Result<Arc<dyn ClientCertVerifier>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_bundle.as_bytes()) {
        roots.add(cert.context("a fleet CA cannot be read")?)?;
    }
    rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .context("cannot verify clients against the fleet CA")
}

fn accepts(verifier: &dyn ClientCertVerifier, der: &[u8]) -> bool {
    let cert = rustls::pki_types::CertificateDer::from(der);
    verifier
        .verify_client_cert(&cert, &[], rustls::pki_types::UnixTime::now())
        .is_ok()
}

fn current_from(ca_bundle: &str, ca_key: &str, cert: &str, key: &str) -> anyhow::Result<Current> {
    let authority =
        Authority::load(ca_bundle, ca_key).context("cannot load the fleet CA and its key")?;
    let server = crate::edge::server_tls(ca_bundle, cert, key).map_err(anyhow::Error::msg)?;
    let certificates = fleet_pki::identity::split_pem_bundle(ca_bundle);
    let signing_pem = certificates
        .first()
        .context("the fleet CA file holds no certificate")?;
    Ok(Current {
        authority: Arc::new(authority),
        server,
        any_trusted: client_verifier(ca_bundle)?,
        signing: client_verifier(signing_pem)?,
        rotating: certificates.len() > 1,
    })
}

impl Trust {
    /// Reads the TLS files named in controller.toml.
    pub fn load(paths: &TlsPaths, certificate_ttl: Duration) -> anyhow::Result<Arc<Trust>> {
        let current = current_from(
            &read(&paths.ca)?,
            &read(&paths.ca_key)?,
            &read(&paths.cert)?,
            &read(&paths.key)?,
        )
        .with_context(|| format!("cannot set up TLS with {}", paths.cert.display()))?;
        if current.rotating {
            tracing::warn!("a CA rotation is under way: `fleetctl ca rotate --finish` ends it once every host moved");
        }
        Ok(Arc::new(Trust {
            paths: paths.clone(),
            current: RwLock::new(current),
            changes: watch::channel((0, TrustEvent::Connected)).0,
            sessions: Mutex::default(),
            finished_at_unix: Mutex::default(),
            certificate_ttl,
        }))
    }

    fn read_current<R>(&self, f: impl FnOnce(&Current) -> R) -> R {
        f(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The CA that signs now (its `ca_pem` is the bundle of every trusted CA).
    pub fn authority(&self) -> Arc<Authority> {
        self.read_current(|c| c.authority.clone())
    }

    /// The server side of TLS for a connection accepted now.
    pub fn server_tls(&self) -> Arc<rustls::ServerConfig> {
        self.read_current(|c| c.server.clone())
    }

    /// Every trusted CA (PEM bundle), what clients and agents verify the controller with.
    pub fn ca_bundle(&self) -> String {
        self.authority().ca_pem().to_string()
    }

    pub fn rotating(&self) -> bool {
        self.read_current(|c| c.rotating)
    }

    /// Why a client certificate (DER) that passed the handshake is refused now: no trusted CA
    /// signed it (the connection opened before its CA was retired).
    pub fn refusal(&self, der: &[u8]) -> Option<String> {
        if self.read_current(|c| accepts(c.any_trusted.as_ref(), der)) {
            return None;
        }
        Some("this certificate was signed by a CA the controller no longer trusts (it was rotated): get a new credential (`fleetctl credentials create`) or join the host again".to_string())
    }

    /// Whether a client certificate (DER) was signed by the CA that signs now.
    pub fn from_signing_ca(&self, der: &[u8]) -> bool {
        self.read_current(|c| accepts(c.signing.as_ref(), der))
    }

    /// The trust changes, for sessions to watch.
    pub fn changes(&self) -> watch::Receiver<(u64, TrustEvent)> {
        self.changes.subscribe()
    }

    /// Records the certificate (DER) a session of `host` presented.
    pub fn session_opened(&self, host: &str, der: &[u8]) {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(host.to_string(), der.to_vec());
    }

    /// When the certificate each host presented at its latest session (since this process
    /// started) expires, in unix milliseconds: what `fleetctl hosts` shows.
    pub fn presented_not_after(&self) -> BTreeMap<String, i64> {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|(host, der)| {
                let facts = fleet_pki::identity::facts_of_der(der)?;
                Some((host.clone(), facts.not_after_unix.saturating_mul(1000)))
            })
            .collect()
    }

    /// Hosts whose latest session presented a certificate of a CA that does not sign now.
    pub fn hosts_on_old_ca(&self) -> Vec<String> {
        let sessions = self
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        sessions
            .into_iter()
            .filter(|(_, der)| !self.from_signing_ca(der))
            .map(|(host, _)| host)
            .collect()
    }

    /// Whether a certificate (DER) was issued before the last rotation finished.
    pub fn issued_before_last_finish(&self, der: &[u8]) -> bool {
        let Some(finished) = *self
            .finished_at_unix
            .lock()
            .unwrap_or_else(|e| e.into_inner())
        else {
            return false;
        };
        fleet_pki::identity::facts_of_der(der)
            .is_some_and(|facts| facts.not_before_unix + fleet_pki::ca::BACKDATE_SECS <= finished)
    }

    /// Starts a rotation: a new CA signs from now on, the old one stays trusted, the
    /// controller keeps presenting its certificate of the old CA, and sessions are told.
    pub fn start_rotation(&self) -> anyhow::Result<()> {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if current.rotating {
            anyhow::bail!("a CA rotation is already under way: end it with `fleetctl ca rotate --finish` once every host moved");
        }
        let (new_ca, new_key) = fleet_pki::ca::generate_ca()?;
        let bundle = format!("{new_ca}{}", current.authority.ca_pem());
        let next = current_from(
            &bundle,
            &new_key,
            &read(&self.paths.cert)?,
            &read(&self.paths.key)?,
        )?;
        // The key first: a crash between the two writes leaves a pair the next start refuses
        // with a message naming it, never a CA signing with the wrong key.
        write_private(&self.paths.ca_key, &new_key)?;
        write_private(&self.paths.ca, &bundle)?;
        *current = next;
        drop(current);
        self.changes.send_modify(|(generation, event)| {
            *generation += 1;
            *event = TrustEvent::RotationStarted;
        });
        Ok(())
    }

    /// Ends a rotation: the controller's certificate is re-issued by the new CA (same names),
    /// the old CA is no longer trusted, and sessions are told. The caller checked that no
    /// connected host still uses a certificate of the old CA.
    pub fn finish_rotation(&self) -> anyhow::Result<()> {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if !current.rotating {
            anyhow::bail!("no CA rotation is under way: start one with `fleetctl ca rotate`");
        }
        let certificates = fleet_pki::identity::split_pem_bundle(current.authority.ca_pem());
        let new_ca = certificates[0].clone();
        let names: Vec<String> = fleet_pki::identity::alt_names_of_pem(&read(&self.paths.cert)?)
            .into_iter()
            .filter(|name| name != fleet_pki::CONTROLLER_TLS_NAME && name != "localhost")
            .collect();
        let controller = current.authority.issue_controller(&names)?;
        let controller_key = controller
            .key_pem
            .clone()
            .context("the controller's new certificate came without its key")?;
        let ca_key = read(&self.paths.ca_key)?;
        let next = current_from(&new_ca, &ca_key, &controller.cert_pem, &controller_key)?;
        write_private(&self.paths.key, &controller_key)?;
        write_private(&self.paths.cert, &controller.cert_pem)?;
        write_private(&self.paths.ca, &new_ca)?;
        *current = next;
        drop(current);
        *self
            .finished_at_unix
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(fleet_proto::now_unix_ms() / 1000);
        self.changes.send_modify(|(generation, event)| {
            *generation += 1;
            *event = TrustEvent::RotationFinished;
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_told_to_renew_when_their_ca_no_longer_signs() {
        use TrustEvent::*;
        for (event, from_signing_ca, before_finish, advise) in [
            (Connected, true, false, false),
            (Connected, false, false, true),
            // Missed the advice of a finished rotation: its CA bundle still holds the old CA.
            (Connected, true, true, true),
            (RotationStarted, true, false, false),
            (RotationStarted, false, false, true),
            (RotationFinished, true, false, true),
            (RotationFinished, false, false, true),
        ] {
            assert_eq!(
                advise_renewal(event, from_signing_ca, before_finish),
                advise,
                "{event:?} {from_signing_ca} {before_finish}"
            );
        }
    }

    #[test]
    fn a_rotation_trusts_both_cas_then_only_the_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, ca_key) = fleet_pki::ca::generate_ca().unwrap();
        let old = Authority::load(&ca, &ca_key).unwrap();
        let server = old.issue_controller(&["10.1.2.3".to_string()]).unwrap();
        let paths = TlsPaths {
            ca: dir.path().join("ca.pem"),
            ca_key: dir.path().join("ca.key"),
            cert: dir.path().join("controller.pem"),
            key: dir.path().join("controller.key"),
        };
        std::fs::write(&paths.ca, &ca).unwrap();
        std::fs::write(&paths.ca_key, &ca_key).unwrap();
        std::fs::write(&paths.cert, &server.cert_pem).unwrap();
        std::fs::write(&paths.key, server.key_pem.as_ref().unwrap()).unwrap();
        let der = |pem: &str| {
            use rustls::pki_types::pem::PemObject;
            rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
                .unwrap()
                .to_vec()
        };
        let old_client = der(&old
            .issue_client("ops", fleet_pki::Role::Admin, Duration::from_secs(3600))
            .unwrap()
            .cert_pem);

        let trust = Trust::load(&paths, Duration::from_secs(3600)).unwrap();
        assert!(!trust.rotating());
        trust.session_opened("h1", &old_client);
        assert!(trust.hosts_on_old_ca().is_empty());
        assert!(trust.finish_rotation().is_err());

        trust.start_rotation().unwrap();
        assert!(trust.rotating());
        assert!(trust.start_rotation().is_err());
        assert!(trust.refusal(&old_client).is_none());
        assert!(!trust.from_signing_ca(&old_client));
        // The session counted before the rotation now stands on the old CA, until the host
        // presents another certificate.
        assert_eq!(trust.hosts_on_old_ca(), ["h1"]);
        let new_client = der(&trust
            .authority()
            .issue_client("ops", fleet_pki::Role::Admin, Duration::from_secs(3600))
            .unwrap()
            .cert_pem);
        assert!(trust.from_signing_ca(&new_client));
        trust.session_opened("h1", &new_client);
        assert!(trust.hosts_on_old_ca().is_empty());
        // A restart in the middle of it reads the same state from the files.
        let again = Trust::load(&paths, Duration::from_secs(3600)).unwrap();
        assert!(again.rotating() && again.from_signing_ca(&new_client));

        assert!(!trust.issued_before_last_finish(&new_client));
        trust.finish_rotation().unwrap();
        assert!(!trust.rotating());
        assert!(trust.issued_before_last_finish(&new_client));
        assert!(trust.refusal(&old_client).is_some());
        assert!(trust.refusal(&new_client).is_none());
        let controller_pem = std::fs::read_to_string(&paths.cert).unwrap();
        let facts = fleet_pki::identity::facts_of_pem(&controller_pem).unwrap();
        let new_ca = std::fs::read_to_string(&paths.ca).unwrap();
        assert_eq!(
            facts.issuer,
            fleet_pki::identity::facts_of_pem(&new_ca).unwrap().subject
        );
        assert!(fleet_pki::identity::alt_names_of_pem(&controller_pem)
            .contains(&"10.1.2.3".to_string()));
        assert!(Trust::load(&paths, Duration::from_secs(3600)).is_ok());
    }
}
