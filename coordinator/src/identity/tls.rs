//! Cluster credentials: a CA, the coordinator's serving certificate, the
//! client token, the agent secret (node tokens are derived from it) and the
//! secrets key. Secrets are written 0600.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

/// Paths of the credentials of one coordinator.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// Cluster CA certificate (public).
    pub ca_cert: PathBuf,
    /// Serving certificate.
    pub server_cert: PathBuf,
    /// Serving key (0600).
    pub server_key: PathBuf,
    /// Client API token (0600).
    pub token: PathBuf,
    /// The agent secret (0600): node tokens are derived from it, and as a
    /// bearer it admits only a simulated cloud's record-only nodes.
    pub agent_token: PathBuf,
    /// Key that seals task secrets at rest (0600, 64 hex characters).
    pub secrets_key: PathBuf,
    /// The cluster CA's key (0600): signs member and agent certificates.
    pub ca_key: PathBuf,
}

/// Why credentials could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// File system.
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// Certificate generation.
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// A secret file that is unreadable or readable by others.
    #[error(transparent)]
    Secret(#[from] nembo_proto::client::SecretError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CredentialError + '_ {
    move |source| CredentialError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes `data` to a new file that only the owner can read.
pub fn write_secret(path: &Path, data: &[u8]) -> Result<(), CredentialError> {
    nembo_proto::client::write_atomically(path, data, 0o600).map_err(io(path))
}

/// Reads a secret file, refusing one that group or others can read.
pub fn read_secret(path: &Path) -> Result<String, CredentialError> {
    Ok(nembo_proto::client::read_secret(path)?)
}

/// 256 random bits, hex.
pub fn random_token() -> String {
    let mut b = [0u8; 32];
    getrandom::getrandom(&mut b).expect("the OS random source is unavailable");
    hex(&b)
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of `data`, hex: token digests, key digests, checksums.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

/// How long a cluster CA made here is valid.
pub const CA_LIFE: time::Duration = time::Duration::days(10 * 365);

fn ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(DnType::CommonName, "Nembo cluster CA");
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    // A bounded life (rcgen's default runs from 1975 to 4096). The CA is
    // replaced by making a new cluster (SECURITY.md, "Rotating keys").
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + CA_LIFE;
    Ok(p)
}

/// Where a cluster's shared credentials live in its cluster dir.
struct ClusterFiles {
    tls: PathBuf,
    ca_cert: PathBuf,
    ca_key: PathBuf,
    token: PathBuf,
    agent_token: PathBuf,
    secrets_key: PathBuf,
}

impl ClusterFiles {
    fn in_dir(cluster_dir: &Path) -> Self {
        let tls = cluster_dir.join("tls");
        Self {
            ca_cert: tls.join("ca.pem"),
            ca_key: tls.join("ca.key"),
            tls,
            token: cluster_dir.join("token"),
            agent_token: cluster_dir.join("agent-token"),
            secrets_key: cluster_dir.join("secrets-key"),
        }
    }

    fn all(&self) -> [&PathBuf; 5] {
        [
            &self.ca_cert,
            &self.ca_key,
            &self.token,
            &self.agent_token,
            &self.secrets_key,
        ]
    }
}

/// Creates the cluster's CA and tokens in `cluster_dir` once (several
/// members may race to do it); existing files are kept. The member's own
/// certificate, at the paths returned, is [`super::member`]'s.
pub fn ensure(cluster_dir: &Path, member_dir: &Path) -> Result<Credentials, CredentialError> {
    let files = ClusterFiles::in_dir(cluster_dir);
    let member_tls = member_dir.join("tls");
    for d in [&files.tls, &member_tls] {
        fs::create_dir_all(d).map_err(io(d))?;
    }
    ensure_cluster_secrets(&files)?;
    let creds = Credentials {
        server_cert: member_tls.join("server.pem"),
        server_key: member_tls.join("server.key"),
        ca_cert: files.ca_cert,
        token: files.token,
        agent_token: files.agent_token,
        secrets_key: files.secrets_key,
        ca_key: files.ca_key,
    };
    Ok(creds)
}

/// `nembo-coordinator init`: creates the cluster's CA, tokens and secrets
/// key in `cluster_dir`, or installs an existing CA (`ca`: certificate and
/// key PEM files; the key file must be private). Refuses to replace a CA
/// already there. Returns what it wrote.
pub fn init(
    cluster_dir: &Path,
    ca: Option<(&Path, &Path)>,
) -> Result<Vec<PathBuf>, CredentialError> {
    let files = ClusterFiles::in_dir(cluster_dir);
    fs::create_dir_all(&files.tls).map_err(io(&files.tls))?;
    let (ca_cert, ca_key) = (&files.ca_cert, &files.ca_key);
    let mut written = Vec::new();
    if let Some((cert_path, key_path)) = ca {
        let cert = fs::read_to_string(cert_path).map_err(io(cert_path))?;
        let key = read_secret(key_path)?;
        check_ca(&cert, &key).map_err(|e| CredentialError::Io {
            path: cert_path.display().to_string(),
            source: std::io::Error::other(e),
        })?;
        if ca_cert.exists() {
            let existing = fs::read_to_string(ca_cert).map_err(io(ca_cert))?;
            if existing.trim() != cert.trim() {
                return Err(CredentialError::Io {
                    path: ca_cert.display().to_string(),
                    source: std::io::Error::other(
                        "this cluster already has another CA; init will not replace it",
                    ),
                });
            }
        } else {
            write_secret(ca_key, key.as_bytes())?;
            fs::write(ca_cert, &cert).map_err(io(ca_cert))?;
            written.extend([ca_cert.clone(), ca_key.clone()]);
        }
    }
    let before = files.all().map(|p| p.exists());
    ensure_cluster_secrets(&files)?;
    for (path, existed) in files.all().into_iter().zip(before) {
        if !existed && !written.contains(path) {
            written.push(path.clone());
        }
    }
    Ok(written)
}

/// That `cert` is a CA whose key is `key`: a certificate it signs for a
/// fresh key must verify against it.
fn check_ca(cert: &str, key: &str) -> Result<(), String> {
    use rustls_pki_types::pem::PemObject;
    let issuer = crate::identity::issuer::Issuer::load(cert, key).map_err(|e| e.to_string())?;
    let probe = KeyPair::generate().map_err(|e| e.to_string())?;
    let issued = issuer
        .sign_node(
            "probe",
            probe.public_key_raw(),
            std::time::SystemTime::now(),
            std::time::Duration::from_secs(60),
        )
        .map_err(|e| e.to_string())?;
    let ca_der = rustls_pki_types::CertificateDer::from_pem_slice(cert.as_bytes())
        .map_err(|e| format!("CA certificate: {e}"))?;
    let ee_der = rustls_pki_types::CertificateDer::from_pem_slice(issued.pem.as_bytes())
        .map_err(|e| e.to_string())?;
    let anchor = webpki::anchor_from_trusted_cert(&ca_der).map_err(|e| e.to_string())?;
    let ee = webpki::EndEntityCert::try_from(&ee_der).map_err(|e| e.to_string())?;
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &[anchor],
        &[],
        rustls_pki_types::UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map(|_| ())
    .map_err(|e| format!("the key does not belong to this CA certificate ({e:?})"))
}

/// The CA and the tokens, made by whichever member gets the lock first.
fn ensure_cluster_secrets(files: &ClusterFiles) -> Result<(), CredentialError> {
    let done = || {
        files.ca_cert.exists()
            && files.token.exists()
            && files.agent_token.exists()
            && files.secrets_key.exists()
    };
    if done() {
        return Ok(());
    }
    let lock = files.tls.join(".init.lock");
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&lock)
    {
        Ok(_) => {
            if !files.ca_cert.exists() {
                let ca_key = KeyPair::generate()?;
                let ca = ca_params()?.self_signed(&ca_key)?;
                write_secret(&files.ca_key, ca_key.serialize_pem().as_bytes())?;
                let tmp = files.ca_cert.with_extension("tmp");
                fs::write(&tmp, ca.pem()).map_err(io(&tmp))?;
                fs::rename(&tmp, &files.ca_cert).map_err(io(&files.ca_cert))?;
            }
            for path in [&files.token, &files.agent_token, &files.secrets_key] {
                if !path.exists() {
                    write_secret(path, random_token().as_bytes())?;
                }
            }
            let _ = fs::remove_file(&lock);
            Ok(())
        }
        Err(_) => {
            // Another member is creating them: wait for it.
            for _ in 0..200 {
                if done() {
                    return Ok(());
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(CredentialError::Io {
                path: lock.display().to_string(),
                source: std::io::Error::other(
                    "cluster credentials were not created; remove the stale lock",
                ),
            })
        }
    }
}

/// The token of `authorization: Bearer <token>`, if any.
pub fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Constant-time comparison, so a token cannot be guessed byte by byte.
pub fn token_matches(presented: &str, expected: &str) -> bool {
    let (a, b) = (presented.as_bytes(), expected.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The one-time join token of a node a provider launches (in its
/// user-data or node dir): it names that node, and enrolls it once, while it
/// is being provisioned; a leaked copy can pose as no other node and is
/// worth nothing after the enrollment.
pub fn node_token(agent_token: &str, node_id: &str) -> String {
    format!("node.{node_id}.{}", node_mac(agent_token, node_id))
}

fn node_mac(agent_token: &str, node_id: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, agent_token.as_bytes());
    let tag = ring::hmac::sign(&key, format!("nembo-node-token:{node_id}").as_bytes());
    hex(tag.as_ref())
}

/// The node a node token admits, if `presented` is a genuine one.
pub fn node_token_owner<'a>(agent_token: &str, presented: &'a str) -> Option<&'a str> {
    let (node_id, mac) = presented.strip_prefix("node.")?.rsplit_once('.')?;
    token_matches(mac, &node_mac(agent_token, node_id)).then_some(node_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_node_token_admits_its_node_only() {
        let t = node_token("secret", "node-7.a");
        assert_eq!(node_token_owner("secret", &t), Some("node-7.a"));
        assert_eq!(node_token_owner("other", &t), None);
        let forged = t.replace("node-7.a", "node-8");
        assert_eq!(node_token_owner("secret", &forged), None);
        assert_eq!(node_token_owner("secret", "secret"), None);
    }

    #[test]
    fn credentials_are_created_once_with_private_modes() {
        let d = tempfile::tempdir().unwrap();
        let c = ensure(d.path(), d.path()).unwrap();
        for p in [&c.token, &c.agent_token, &d.path().join("tls/ca.key")] {
            assert_eq!(
                fs::metadata(p).unwrap().permissions().mode() & 0o777,
                0o600,
                "{p:?}"
            );
        }
        let token = read_secret(&c.token).unwrap();
        assert_eq!(token.len(), 64);
        let again = ensure(d.path(), d.path()).unwrap();
        assert_eq!(read_secret(&again.token).unwrap(), token);
        fs::set_permissions(&c.token, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            read_secret(&c.token),
            Err(CredentialError::Secret(
                nembo_proto::client::SecretError::Exposed(_)
            ))
        ));
    }

    #[test]
    fn members_share_the_cluster_ca_and_tokens() {
        let cluster = tempfile::tempdir().unwrap();
        let (m1, m2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = ensure(cluster.path(), m1.path()).unwrap();
        let b = ensure(cluster.path(), m2.path()).unwrap();
        assert_eq!(a.ca_cert, b.ca_cert);
        assert_eq!(a.token, b.token);
        assert_ne!(a.server_cert, b.server_cert);
    }

    #[test]
    fn token_comparison() {
        assert!(token_matches("abc", "abc"));
        assert!(!token_matches("abd", "abc"));
        assert!(!token_matches("ab", "abc"));
    }
}
