//! Cluster credentials: a CA, the coordinator's serving certificate, the
//! client token and the agent join token. Secrets are written 0600.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};

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
    /// Agent join token (0600).
    pub agent_token: PathBuf,
}

/// Why credentials could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// File system.
    #[error("{path}: {source}")]
    Io {
        /// Which file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Certificate generation.
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// A secret file others can read.
    #[error("{0} is readable by other users; run chmod 600 on it")]
    Exposed(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CredentialError + '_ {
    move |source| CredentialError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes `data` to a new file that only the owner can read.
pub fn write_secret(path: &Path, data: &[u8]) -> Result<(), CredentialError> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(data).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}

/// Reads a secret file, refusing one that group or others can read.
pub fn read_secret(path: &Path) -> Result<String, CredentialError> {
    let meta = fs::metadata(path).map_err(io(path))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(CredentialError::Exposed(path.display().to_string()));
    }
    Ok(fs::read_to_string(path)
        .map_err(io(path))?
        .trim()
        .to_string())
}

/// 256 random bits, hex.
pub fn random_token() -> String {
    let mut b = [0u8; 32];
    getrandom::getrandom(&mut b).expect("the OS random source is unavailable");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Creates whatever credentials `dir` lacks; existing ones are kept.
/// `hosts` are extra names or IPs the serving certificate must cover.
pub fn ensure(dir: &Path, hosts: &[String]) -> Result<Credentials, CredentialError> {
    let tls = dir.join("tls");
    fs::create_dir_all(&tls).map_err(io(&tls))?;
    let creds = Credentials {
        ca_cert: tls.join("ca.pem"),
        server_cert: tls.join("server.pem"),
        server_key: tls.join("server.key"),
        token: dir.join("token"),
        agent_token: dir.join("agent-token"),
    };
    let ca_key_path = tls.join("ca.key");
    if !creds.server_key.exists() || !creds.ca_cert.exists() {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "Nembo cluster CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = ca_params.self_signed(&ca_key)?;

        let server_key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec!["localhost".to_string()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "nembo-coordinator");
        for ip in ["127.0.0.1", "::1"] {
            if let Ok(ip) = ip.parse::<IpAddr>() {
                params.subject_alt_names.push(SanType::IpAddress(ip));
            }
        }
        for h in hosts {
            match h.parse::<IpAddr>() {
                Ok(ip) => params.subject_alt_names.push(SanType::IpAddress(ip)),
                Err(_) => params
                    .subject_alt_names
                    .push(SanType::DnsName(h.clone().try_into()?)),
            }
        }
        let cert = params.signed_by(&server_key, &ca, &ca_key)?;
        write_secret(&ca_key_path, ca_key.serialize_pem().as_bytes())?;
        write_secret(&creds.server_key, server_key.serialize_pem().as_bytes())?;
        fs::write(&creds.server_cert, cert.pem()).map_err(io(&creds.server_cert))?;
        fs::write(&creds.ca_cert, ca.pem()).map_err(io(&creds.ca_cert))?;
    }
    for path in [&creds.token, &creds.agent_token] {
        if !path.exists() {
            write_secret(path, random_token().as_bytes())?;
        }
    }
    Ok(creds)
}

/// Constant-time comparison, so a token cannot be guessed byte by byte.
pub fn token_matches(presented: &str, expected: &str) -> bool {
    let (a, b) = (presented.as_bytes(), expected.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_created_once_with_private_modes() {
        let d = tempfile::tempdir().unwrap();
        let c = ensure(d.path(), &[]).unwrap();
        for p in [
            &c.server_key,
            &c.token,
            &c.agent_token,
            &d.path().join("tls/ca.key"),
        ] {
            assert_eq!(
                fs::metadata(p).unwrap().permissions().mode() & 0o777,
                0o600,
                "{p:?}"
            );
        }
        let token = read_secret(&c.token).unwrap();
        assert_eq!(token.len(), 64);
        let again = ensure(d.path(), &[]).unwrap();
        assert_eq!(read_secret(&again.token).unwrap(), token);
        fs::set_permissions(&c.token, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            read_secret(&c.token),
            Err(CredentialError::Exposed(_))
        ));
    }

    #[test]
    fn token_comparison() {
        assert!(token_matches("abc", "abc"));
        assert!(!token_matches("abd", "abc"));
        assert!(!token_matches("ab", "abc"));
    }
}
