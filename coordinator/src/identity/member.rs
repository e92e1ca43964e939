//! A member's own certificate: issued by the cluster CA for a finite life,
//! renewed by its member before it runs out, served by the listener and
//! presented on Raft streams from one place (so a renewal reaches every new
//! connection at once), and registered in the replicated state, so that a
//! member's earlier certificate (rotated, renewed, or that of a member that
//! left) is refused on the Raft stream by every member.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nembo_domain::access::{AccessCommand, MemberCert};
use nembo_domain::state::Command;
use nembo_proto::client::SecretError;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::{mpsc, watch};

use super::issuer::{unix_ms, IdentityError, Issuer};
use super::tls;
use crate::replication::raft::RaftHandle;

/// How long a member certificate is valid by default. It is renewed when
/// a third of that is left.
pub const DEFAULT_LIFE: Duration = Duration::from_secs(30 * 24 * 3600);

/// Where a member's certificate lives and what it is issued for.
#[derive(Debug, Clone)]
pub struct MemberCertConfig {
    /// The member.
    pub member_id: u64,
    /// Extra names or addresses it serves under.
    pub hosts: Vec<String>,
    /// How long each certificate is valid.
    pub life: Duration,
    /// Certificate (PEM).
    pub cert_path: PathBuf,
    /// Key (PEM, 0600).
    pub key_path: PathBuf,
}

/// The certificate a member serves and presents, ready for TLS.
pub struct MemberIdentity {
    /// Certificate, PEM.
    pub cert_pem: Vec<u8>,
    /// Key, PEM.
    pub key_pem: Vec<u8>,
    /// Both, as the listener serves them.
    pub certified: Arc<CertifiedKey>,
    /// As the replicated state knows it.
    pub cert: MemberCert,
    /// End of validity (Unix ms).
    pub not_after_ms: i64,
}

impl std::fmt::Debug for MemberIdentity {
    // Never the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemberIdentity")
            .field("cert", &self.cert)
            .field("not_after_ms", &self.not_after_ms)
            .finish_non_exhaustive()
    }
}

fn bad(why: impl std::fmt::Display) -> IdentityError {
    IdentityError::NotFor(why.to_string())
}

impl MemberIdentity {
    /// Parses a certificate and its key; fails if they do not belong together.
    pub fn from_pem(cert_pem: Vec<u8>, key_pem: Vec<u8>) -> Result<Self, IdentityError> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| bad(format!("member certificate: {e}")))?;
        let leaf = chain
            .first()
            .ok_or_else(|| bad("member certificate: no certificate in the file"))?;
        let (cert, not_after_ms) = validity(leaf)?;
        let key =
            PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| bad(format!("member key: {e}")))?;
        let signer = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| bad(format!("member key: {e}")))?;
        let certified = CertifiedKey::new(chain, signer);
        certified
            .keys_match()
            .map_err(|e| bad(format!("member certificate and key: {e}")))?;
        Ok(Self {
            cert_pem,
            key_pem,
            certified: Arc::new(certified),
            cert,
            not_after_ms,
        })
    }

    /// Whether to issue a new one now: a third of `life` or less is left,
    /// or it was issued for longer than `life` (as the certificates from
    /// before member certificates expired were: 1975 to 4096).
    pub fn needs_renewal(&self, life: Duration, now_ms: i64) -> bool {
        let life_ms = life.as_millis() as i64;
        let issued_for = self.not_after_ms - self.cert.not_before_ms;
        now_ms >= self.not_after_ms - life_ms / 3 || issued_for > life_ms + 120_000
    }
}

/// What a presented certificate is, for [`MemberCert::admits`]: its digest
/// and start of validity, and its end.
fn validity(cert: &CertificateDer<'_>) -> Result<(MemberCert, i64), IdentityError> {
    let params = rcgen::CertificateParams::from_ca_cert_der(cert)?;
    let ms = |t: time::OffsetDateTime| (t.unix_timestamp_nanos() / 1_000_000) as i64;
    Ok((
        MemberCert {
            sha256: tls::sha256_hex(cert),
            not_before_ms: ms(params.not_before),
        },
        ms(params.not_after),
    ))
}

/// The member certificate a peer presented, as the state compares it.
pub fn presented(cert: &CertificateDer<'_>) -> Option<MemberCert> {
    validity(cert).ok().map(|(c, _)| c)
}

/// The member's certificate from its files, after issuing a new one if
/// there is none, it does not match its key, or it is due for renewal.
/// Without the CA key (`issuer`), what is on disk is used as it is.
pub fn load_or_issue(
    cfg: &MemberCertConfig,
    issuer: Option<&Issuer>,
) -> Result<MemberIdentity, IdentityError> {
    // A key others can read is refused, not quietly replaced: the operator
    // must know it was exposed.
    let key = match tls::read_secret(&cfg.key_path) {
        Ok(key) => Some(key),
        Err(tls::CredentialError::Secret(SecretError::Io { source, .. }))
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            None
        }
        Err(e) => return Err(bad(e)),
    };
    let on_disk = std::fs::read(&cfg.cert_path)
        .ok()
        .zip(key)
        .map(|(cert, key)| MemberIdentity::from_pem(cert, key.into_bytes()));
    let now = SystemTime::now();
    match (on_disk, issuer) {
        (Some(Ok(current)), _) if !current.needs_renewal(cfg.life, unix_ms(now)) => Ok(current),
        (Some(Ok(current)), None) => {
            tracing::warn!(path = %cfg.cert_path.display(), "member certificate due for renewal, and no CA key here to renew it");
            Ok(current)
        }
        (on_disk, Some(issuer)) => {
            if let Some(Err(e)) = on_disk {
                tracing::warn!(error = %e, "member certificate unusable; issuing a new one");
            }
            let (cert, key) = issuer.sign_member(cfg.member_id, &cfg.hosts, now, cfg.life)?;
            // Key first: a crash between the two leaves a pair that does
            // not match, which the next start replaces.
            write_atomically(&cfg.key_path, key.as_bytes(), true)?;
            write_atomically(&cfg.cert_path, cert.as_bytes(), false)?;
            let issued = MemberIdentity::from_pem(cert.into_bytes(), key.into_bytes())?;
            tracing::info!(
                member = cfg.member_id,
                not_after_ms = issued.not_after_ms,
                "member certificate issued"
            );
            Ok(issued)
        }
        (Some(Err(e)), None) => Err(e),
        (None, None) => Err(bad(format!(
            "{}: no member certificate, and no CA key to issue one",
            cfg.cert_path.display()
        ))),
    }
}

fn write_atomically(
    path: &std::path::Path,
    data: &[u8],
    secret: bool,
) -> Result<(), IdentityError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".next");
    let tmp = PathBuf::from(tmp);
    let written = if secret {
        tls::write_secret(&tmp, data).map_err(|e| e.to_string())
    } else {
        std::fs::write(&tmp, data).map_err(|e| e.to_string())
    };
    written
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| e.to_string()))
        .map_err(|e| bad(format!("{}: {e}", path.display())))
}

/// The listener's certificate: whatever the member's current one is, at
/// each handshake.
#[derive(Debug)]
struct Served(watch::Receiver<Arc<MemberIdentity>>);

impl ResolvesServerCert for Served {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.borrow().certified.clone())
    }
}

/// The listener's TLS: the member's current certificate, and client
/// certificates optional but, when presented, verified against the
/// cluster CA (members and agents use them; API clients use tokens).
pub fn server_config(
    ca_pem: &[u8],
    identity: watch::Receiver<Arc<MemberIdentity>>,
) -> Result<Arc<ServerConfig>, IdentityError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem) {
        roots
            .add(ca.map_err(|e| bad(format!("CA certificate: {e}")))?)
            .map_err(|e| bad(format!("CA certificate: {e}")))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| bad(format!("client verifier: {e}")))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(format!("tls: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(Served(identity)));
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The owner of the member's certificate: renews it when due, and, while
/// this member leads, registers its own and its peers' current
/// certificates in the state. Peers' certificates arrive in `seen` from
/// the Raft service, which has already checked that the state admits them.
pub struct Renewal {
    /// The member's certificate files and life.
    pub cfg: MemberCertConfig,
    /// The cluster CA, where this member holds its key (else no renewal).
    pub issuer: Option<Arc<Issuer>>,
    /// Where the listener and the peer senders read the current certificate.
    pub identity: watch::Sender<Arc<MemberIdentity>>,
    /// To read the state and register certificates.
    pub raft: RaftHandle,
    /// Peers' certificates the Raft service admitted.
    pub seen: mpsc::Receiver<(u64, MemberCert)>,
}

impl Renewal {
    /// Runs until the process ends.
    pub async fn run(mut self) {
        let period = (self.cfg.life / 20).clamp(Duration::from_secs(1), Duration::from_secs(30));
        let mut tick = tokio::time::interval(period);
        let mut unregistered: BTreeMap<u64, MemberCert> = BTreeMap::new();
        loop {
            tokio::select! {
                seen = self.seen.recv() => match seen {
                    Some((id, cert)) => { unregistered.insert(id, cert); }
                    None => return,
                },
                _ = tick.tick() => {}
            }
            self.renew_if_due().await;
            let view = self.raft.view();
            if !view.is_leader() {
                continue;
            }
            unregistered.insert(self.cfg.member_id, self.identity.borrow().cert.clone());
            let access = &view.state.access;
            unregistered.retain(|id, cert| {
                access.member_certs.get(id) != Some(cert) && access.admits_member(*id, cert)
            });
            for (id, cert) in std::mem::take(&mut unregistered) {
                let cmd = Command::Access(AccessCommand::RegisterMemberCert {
                    member_id: id,
                    cert: cert.clone(),
                });
                match self.raft.propose(cmd).await {
                    Ok(_) => {
                        tracing::info!(member = id, sha256 = %cert.sha256, "member certificate registered")
                    }
                    Err(e) => {
                        tracing::debug!(member = id, error = %e, "member certificate not registered yet");
                        unregistered.insert(id, cert);
                    }
                }
            }
        }
    }

    async fn renew_if_due(&self) {
        let due = self
            .identity
            .borrow()
            .needs_renewal(self.cfg.life, unix_ms(SystemTime::now()));
        let Some(issuer) = self.issuer.clone().filter(|_| due) else {
            return;
        };
        let cfg = self.cfg.clone();
        let renewed = tokio::task::spawn_blocking(move || load_or_issue(&cfg, Some(&issuer))).await;
        match renewed {
            Ok(Ok(next)) => {
                self.identity.send_replace(Arc::new(next));
            }
            Ok(Err(e)) => tracing::error!(error = %e, "member certificate renewal failed"),
            Err(e) => tracing::error!(error = %e, "member certificate renewal failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn cluster() -> (tempfile::TempDir, Issuer, MemberCertConfig) {
        let d = tempfile::tempdir().unwrap();
        let creds = tls::ensure(d.path(), d.path()).unwrap();
        let ca = std::fs::read_to_string(&creds.ca_cert).unwrap();
        let issuer = Issuer::load(&ca, &tls::read_secret(&creds.ca_key).unwrap()).unwrap();
        let cfg = MemberCertConfig {
            member_id: 2,
            hosts: vec!["10.0.0.2".into(), "coord-2.example".into()],
            life: Duration::from_secs(3600),
            cert_path: creds.server_cert,
            key_path: creds.server_key,
        };
        (d, issuer, cfg)
    }

    #[test]
    fn member_and_ca_certificates_have_a_bounded_life_and_a_stated_use() {
        let (d, issuer, cfg) = cluster();
        let id = load_or_issue(&cfg, Some(&issuer)).unwrap();
        let life = id.not_after_ms - id.cert.not_before_ms;
        assert!((3_600_000..=3_661_000).contains(&life), "{life}");
        let der = CertificateDer::from_pem_slice(&id.cert_pem).unwrap();
        let p = rcgen::CertificateParams::from_ca_cert_der(&der).unwrap();
        assert_eq!(p.key_usages, vec![rcgen::KeyUsagePurpose::DigitalSignature]);
        assert_eq!(
            p.extended_key_usages,
            vec![
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth
            ]
        );
        // It serves under its names and addresses, and is no CA.
        let ee = webpki::EndEntityCert::try_from(&der).unwrap();
        for name in [
            "nembo-member-2",
            "localhost",
            "coord-2.example",
            "10.0.0.2",
            "127.0.0.1",
        ] {
            let n = rustls_pki_types::ServerName::try_from(name).unwrap();
            assert!(ee.verify_is_valid_for_subject_name(&n).is_ok(), "{name}");
        }
        assert!(!matches!(p.is_ca, rcgen::IsCa::Ca(_)));
        assert_eq!(
            std::fs::metadata(&cfg.key_path)
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        let ca = std::fs::read_to_string(d.path().join("tls/ca.pem")).unwrap();
        let ca = rcgen::CertificateParams::from_ca_cert_pem(&ca).unwrap();
        let years = (ca.not_after - ca.not_before).whole_days() / 365;
        assert!((9..=10).contains(&years), "CA valid for {years} years");
    }

    #[test]
    fn a_certificate_is_kept_until_due_then_replaced_with_a_later_one() {
        let (_d, issuer, cfg) = cluster();
        let first = load_or_issue(&cfg, Some(&issuer)).unwrap();
        let again = load_or_issue(&cfg, Some(&issuer)).unwrap();
        assert_eq!(first.cert, again.cert, "not due: kept");
        let now = unix_ms(SystemTime::now());
        assert!(!first.needs_renewal(cfg.life, now));
        assert!(first.needs_renewal(cfg.life, first.not_after_ms - 1_199_000));
        // Issued for longer than the configured life (as every member
        // certificate was before, 1975 to 4096): replaced at start.
        let shorter = MemberCertConfig {
            life: Duration::from_secs(600),
            ..cfg.clone()
        };
        assert!(first.needs_renewal(shorter.life, now));
        std::thread::sleep(Duration::from_millis(1100));
        let next = load_or_issue(&shorter, Some(&issuer)).unwrap();
        assert_ne!(next.cert, first.cert);
        assert!(first.cert.admits(&next.cert), "the new one counts as later");
        assert!(!next.cert.admits(&first.cert), "and shuts the old one out");
        // A key that does not match its certificate (a crash between the two
        // writes) is replaced, not served.
        let other = issuer
            .sign_member(2, &[], SystemTime::now(), cfg.life)
            .unwrap();
        std::fs::write(&cfg.cert_path, other.0).unwrap();
        assert!(MemberIdentity::from_pem(
            std::fs::read(&cfg.cert_path).unwrap(),
            std::fs::read(&cfg.key_path).unwrap()
        )
        .is_err());
        let fixed = load_or_issue(&cfg, Some(&issuer)).unwrap();
        assert!(fixed.certified.keys_match().is_ok());
        // Without the CA key nothing can be issued: a missing one is an error.
        std::fs::remove_file(&cfg.cert_path).unwrap();
        assert!(load_or_issue(&cfg, None).is_err());
    }
}
