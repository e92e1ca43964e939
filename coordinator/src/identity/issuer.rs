//! Certificates for agents and members, and what a caller's certificate proves.
//!
//! Every certificate the listener accepts was verified by TLS against the
//! cluster CA (chain and validity period). What it is *for* is in its names:
//! a coordinator's carries `nembo-member-<id>`, an agent's carries
//! `<node id>.node.nembo` and nothing else. So an agent's certificate can
//! never pass as a member's (Raft), nor one node's as another's.

use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    PublicKeyData, SanType, SignatureAlgorithm,
};
use rustls_pki_types::{CertificateDer, ServerName};

/// Suffix of an agent certificate's only DNS name.
pub const NODE_NAME_SUFFIX: &str = ".node.nembo";

/// The DNS name an agent certificate for `node_id` carries.
pub fn node_name(node_id: &str) -> String {
    format!("{node_id}{NODE_NAME_SUFFIX}")
}

/// The DNS name a member's certificate carries.
pub fn member_name(member_id: u64) -> String {
    format!("nembo-member-{member_id}")
}

/// Why a certificate could not be issued or does not prove what it should.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Certificate generation or parsing.
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// A public key that is not an uncompressed P-256 point.
    #[error("public_key: must be an uncompressed ECDSA P-256 point (65 bytes)")]
    BadKey,
    /// No certificate, or not one for this name.
    #[error("{0}")]
    NotFor(String),
}

/// Signs agent and member certificates with the cluster CA.
pub struct Issuer {
    ca: rcgen::Certificate,
    key: KeyPair,
}

/// An agent's public key, as it sent it.
struct P256(Vec<u8>);

impl PublicKeyData for P256 {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// A certificate issued to an agent.
#[derive(Debug, Clone)]
pub struct Issued {
    pub pem: String,
    /// Issued at (Unix ms); the certificate itself is valid from a minute
    /// earlier, for clock skew.
    pub not_before_ms: i64,
    /// Valid until (Unix ms).
    pub not_after_ms: i64,
}

pub(crate) fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn offset(t: SystemTime) -> time::OffsetDateTime {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

impl Issuer {
    /// The CA from its certificate and key (PEM). The certificate's own
    /// subject is kept, so a CA made elsewhere (`nembo-coordinator init
    /// --ca-cert`) issues certificates that chain to it.
    pub fn load(ca_pem: &str, ca_key_pem: &str) -> Result<Self, IdentityError> {
        let key = KeyPair::from_pem(ca_key_pem)?;
        let params = CertificateParams::from_ca_cert_pem(ca_pem)?;
        if !matches!(params.is_ca, IsCa::Ca(_)) {
            return Err(IdentityError::NotFor(
                "the CA certificate is not a CA (no basicConstraints cA)".into(),
            ));
        }
        let ca = params.self_signed(&key)?;
        Ok(Self { ca, key })
    }

    /// A client certificate for `node_id`'s agent and its `public_key`,
    /// valid for `ttl` from `now` (backdated a minute for clock skew).
    pub fn sign_node(
        &self,
        node_id: &str,
        public_key: &[u8],
        now: SystemTime,
        ttl: Duration,
    ) -> Result<Issued, IdentityError> {
        if !on_p256(public_key) {
            return Err(IdentityError::BadKey);
        }
        let mut p = CertificateParams::new(vec![node_name(node_id)])?;
        p.distinguished_name
            .push(DnType::CommonName, format!("nembo-agent {node_id}"));
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let not_after = valid_for_ttl(&mut p, now, ttl)?;
        let cert = p.signed_by(&P256(public_key.to_vec()), &self.ca, &self.key)?;
        // The agent times its renewal from the moment of issue, not from
        // the backdated start.
        Ok(Issued {
            pem: cert.pem(),
            not_before_ms: unix_ms(now),
            not_after_ms: unix_ms(not_after),
        })
    }

    /// A certificate and a fresh key for member `member_id`, valid for
    /// `life` from `now` (backdated a minute for clock skew). It serves the
    /// member's listener and is presented on its Raft streams, so it is
    /// for both ends of TLS and nothing else; `hosts` are extra names or
    /// addresses it serves under. Returns (certificate, key) in PEM.
    pub fn sign_member(
        &self,
        member_id: u64,
        hosts: &[String],
        now: SystemTime,
        life: Duration,
    ) -> Result<(String, String), IdentityError> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(vec!["localhost".to_string(), member_name(member_id)])?;
        p.distinguished_name
            .push(DnType::CommonName, format!("nembo-coordinator-{member_id}"));
        for ip in [
            IpAddr::from([127, 0, 0, 1]),
            IpAddr::from(Ipv6Addr::LOCALHOST),
        ] {
            p.subject_alt_names.push(SanType::IpAddress(ip));
        }
        for h in hosts {
            p.subject_alt_names.push(match h.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(h.clone().try_into()?),
            });
        }
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        valid_for_ttl(&mut p, now, life)?;
        let cert = p.signed_by(&key, &self.ca, &self.key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// Sets a leaf certificate's validity (from a minute before `now`, for
/// clock skew, to `now + ttl`) and a random serial; returns its end.
fn valid_for_ttl(
    p: &mut CertificateParams,
    now: SystemTime,
    ttl: Duration,
) -> Result<SystemTime, IdentityError> {
    let not_after = now + ttl;
    p.not_before = offset(now - Duration::from_secs(60));
    p.not_after = offset(not_after);
    let mut serial = [0u8; 16];
    getrandom::getrandom(&mut serial).map_err(|e| IdentityError::NotFor(e.to_string()))?;
    serial[0] &= 0x7f;
    p.serial_number = Some(serial.to_vec().into());
    Ok(not_after)
}

/// Whether `point` is an uncompressed point on the P-256 curve (a length and
/// a leading 4 are not enough: a certificate was signed for a point off the
/// curve). ring validates the point when it agrees a key with it.
pub fn on_p256(point: &[u8]) -> bool {
    use ring::agreement::{agree_ephemeral, EphemeralPrivateKey, UnparsedPublicKey, ECDH_P256};
    if point.len() != 65 || point[0] != 4 {
        return false;
    }
    let rng = ring::rand::SystemRandom::new();
    let Ok(mine) = EphemeralPrivateKey::generate(&ECDH_P256, &rng) else {
        return false;
    };
    agree_ephemeral(mine, &UnparsedPublicKey::new(&ECDH_P256, point), |_| ()).is_ok()
}

/// Whether the end-entity certificate is valid for `name` (its chain and
/// dates were checked by TLS).
fn valid_for(cert: &CertificateDer<'_>, name: &str) -> bool {
    let (Ok(ee), Ok(server_name)) = (
        webpki::EndEntityCert::try_from(cert),
        ServerName::try_from(name.to_string()),
    ) else {
        return false;
    };
    ee.verify_is_valid_for_subject_name(&server_name).is_ok()
}

/// The node an agent certificate was issued to.
pub fn node_of(cert: &CertificateDer<'_>) -> Option<String> {
    let ee = webpki::EndEntityCert::try_from(cert).ok()?;
    let names: Vec<&str> = ee.valid_dns_names().collect();
    match names.as_slice() {
        [only] => only.strip_suffix(NODE_NAME_SUFFIX).map(str::to_string),
        _ => None,
    }
}

/// Checks that the caller presented member `member_id`'s certificate.
pub fn require_member(
    certs: Option<&[CertificateDer<'static>]>,
    member_id: u64,
) -> Result<(), IdentityError> {
    match certs.and_then(|c| c.first()) {
        Some(c) if valid_for(c, &member_name(member_id)) => Ok(()),
        Some(_) => Err(IdentityError::NotFor(format!(
            "the certificate presented is not member {member_id}'s"
        ))),
        None => Err(IdentityError::NotFor(
            "raft traffic needs a member certificate signed by the cluster CA".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(DnType::CommonName, "Some other CA");
        p.distinguished_name.push(DnType::OrganizationName, "Acme");
        (p.self_signed(&key).unwrap().pem(), key.serialize_pem())
    }

    fn der(pem: &str) -> CertificateDer<'static> {
        use rustls_pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    #[test]
    fn agent_certificates_name_their_node_only_and_chain_to_an_imported_ca() {
        let (ca_pem, ca_key) = ca();
        let issuer = Issuer::load(&ca_pem, &ca_key).unwrap();
        let agent_key = KeyPair::generate().unwrap();
        let issued = issuer
            .sign_node(
                "node-7",
                agent_key.public_key_raw(),
                SystemTime::now(),
                Duration::from_secs(3600),
            )
            .unwrap();
        let cert = der(&issued.pem);
        assert_eq!(node_of(&cert).as_deref(), Some("node-7"));
        assert!(valid_for(&cert, "node-7.node.nembo"));
        assert!(!valid_for(&cert, "node-8.node.nembo"));
        assert!(require_member(Some(std::slice::from_ref(&cert)), 1).is_err());
        assert!(issued.not_after_ms - issued.not_before_ms >= 3_600_000);
        // It chains to the imported CA: its issuer is the CA's subject.
        let ca_der = der(&ca_pem);
        let anchor = webpki::anchor_from_trusted_cert(&ca_der).unwrap();
        let ee = webpki::EndEntityCert::try_from(&cert).unwrap();
        let now = rustls_pki_types::UnixTime::now();
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[anchor],
            &[],
            now,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .expect("the agent certificate chains to the imported CA");
        assert!(matches!(
            issuer.sign_node(
                "node-7",
                &[4; 10],
                SystemTime::now(),
                Duration::from_secs(1)
            ),
            Err(IdentityError::BadKey)
        ));
        // The right length and prefix, but not a point on the curve.
        let mut off_curve = [7u8; 65];
        off_curve[0] = 4;
        assert!(!on_p256(&off_curve));
        let real = KeyPair::generate().unwrap();
        assert!(on_p256(real.public_key_raw()));
    }
}
