//! The node's identity: a key made here, and the short-lived client
//! certificate the coordinators issued for it.
//!
//! A new node trades its one-time join token for a certificate (then
//! deletes the token); from then on every connection is mutual TLS with
//! that certificate, renewed once two thirds of its life has passed. An
//! agent that was down past its certificate's end needs a new join token.

use std::path::{Path, PathBuf};

use nembo_proto::agent::v1 as apb;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_ASN1_SIGNING};
use serde::{Deserialize, Serialize};

/// A key and its certificate.
#[derive(Clone)]
pub struct Identity {
    /// The node the certificate names.
    pub node_id: String,
    /// Certificate PEM.
    pub cert_pem: Vec<u8>,
    /// PKCS#8 key PEM (kept 0600).
    pub key_pem: Vec<u8>,
    /// Valid from (Unix ms).
    pub not_before_ms: i64,
    /// Valid until (Unix ms).
    pub not_after_ms: i64,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("node_id", &self.node_id)
            .field("not_after_ms", &self.not_after_ms)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
struct Meta {
    node_id: String,
    not_before_ms: i64,
    not_after_ms: i64,
}

/// A fresh key pair: (PKCS#8 PEM, raw public key for the coordinator).
pub fn new_key() -> Result<(Vec<u8>, Vec<u8>), String> {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
        .map_err(|_| "cannot generate a key".to_string())?;
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
        .map_err(|_| "cannot read the generated key".to_string())?;
    let public = pair.public_key().as_ref().to_vec();
    Ok((pem("PRIVATE KEY", pkcs8.as_ref()).into_bytes(), public))
}

/// The raw public key of a PKCS#8 key PEM this agent made: a node whose
/// certificate ran out while it was stopped enrolls again with the key it
/// has, so that only it can.
pub fn public_key_of(key_pem: &[u8]) -> Result<Vec<u8>, String> {
    use base64::Engine;
    let text = std::str::from_utf8(key_pem).map_err(|_| "the key is not PEM".to_string())?;
    let b64: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|_| "the key is not PEM".to_string())?;
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &der, &SystemRandom::new())
            .map_err(|_| "the key is not a P-256 PKCS#8 key".to_string())?;
    Ok(pair.public_key().as_ref().to_vec())
}

fn pem(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let n =
            chunk.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

impl Identity {
    fn dir(work_dir: &Path) -> PathBuf {
        work_dir.join("identity")
    }

    /// The identity saved in `work_dir`, if there is a whole one. A key
    /// that others can read is an error: the agent will not use it.
    pub fn load(work_dir: &Path) -> Result<Option<Identity>, String> {
        let dir = Self::dir(work_dir);
        let Some(meta) = std::fs::read(dir.join("node.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<Meta>(&b).ok())
        else {
            return Ok(None);
        };
        let key_pem = match nembo_proto::client::read_secret(&dir.join("node.key")) {
            Ok(k) => k.into_bytes(),
            Err(e @ nembo_proto::client::SecretError::Exposed(_)) => return Err(e.to_string()),
            Err(_) => return Ok(None),
        };
        let Ok(cert_pem) = std::fs::read(dir.join("node.pem")) else {
            return Ok(None);
        };
        Ok(Some(Identity {
            node_id: meta.node_id,
            cert_pem,
            key_pem,
            not_before_ms: meta.not_before_ms,
            not_after_ms: meta.not_after_ms,
        }))
    }

    /// The identity from a coordinator's answer for the key `key_pem`.
    pub fn issued(key_pem: Vec<u8>, r: apb::NodeCertificate) -> Identity {
        Identity {
            node_id: r.node_id,
            cert_pem: r.certificate_pem.into_bytes(),
            key_pem,
            not_before_ms: r.not_before_unix_ms,
            not_after_ms: r.not_after_unix_ms,
        }
    }

    /// Writes it to `work_dir` (key 0600), replacing the one there.
    pub fn save(&self, work_dir: &Path) -> std::io::Result<()> {
        let dir = Self::dir(work_dir);
        std::fs::create_dir_all(&dir)?;
        let write = |name: &str, data: &[u8], mode: u32| {
            nembo_proto::client::write_atomically(&dir.join(name), data, mode)
        };
        write("node.key", &self.key_pem, 0o600)?;
        write("node.pem", &self.cert_pem, 0o644)?;
        let meta = Meta {
            node_id: self.node_id.clone(),
            not_before_ms: self.not_before_ms,
            not_after_ms: self.not_after_ms,
        };
        write(
            "node.json",
            &serde_json::to_vec(&meta).unwrap_or_default(),
            0o644,
        )
    }

    /// When to renew: two thirds into its life.
    pub fn renew_at_ms(&self) -> i64 {
        self.not_before_ms + (self.not_after_ms - self.not_before_ms) * 2 / 3
    }

    /// Past its end (a minute early, for clock skew).
    pub fn expired(&self, now_ms: i64) -> bool {
        now_ms >= self.not_after_ms - 60_000.min((self.not_after_ms - self.not_before_ms) / 10)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_key_gives_back_its_public_key() {
        let (pem, public) = new_key().unwrap();
        assert_eq!(public_key_of(&pem).unwrap(), public);
        assert!(public_key_of(b"not a key").is_err());
    }

    #[test]
    fn keys_are_p256_and_pem_encoded() {
        let (key, public) = new_key().unwrap();
        assert_eq!(public.len(), 65);
        assert_eq!(public[0], 4);
        let text = String::from_utf8(key).unwrap();
        assert!(text.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        assert!(text.lines().all(|l| l.len() <= 64));
        // rustls reads it back.
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::PrivateKeyDer::from_pem_slice(text.as_bytes()).unwrap();
    }

    #[test]
    fn base64_matches_the_rfc_examples() {
        let body = |d: &[u8]| pem("X", d).lines().nth(1).unwrap_or("").to_string();
        assert_eq!(body(b"f"), "Zg==");
        assert_eq!(body(b"fo"), "Zm8=");
        assert_eq!(body(b"foo"), "Zm9v");
        assert_eq!(body(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn saved_identities_load_with_a_private_key() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let (key_pem, _) = new_key().unwrap();
        let id = Identity {
            node_id: "node-3".into(),
            cert_pem: b"cert".to_vec(),
            key_pem,
            not_before_ms: 0,
            not_after_ms: 3000,
        };
        id.save(d.path()).unwrap();
        let mode = std::fs::metadata(d.path().join("identity/node.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let back = Identity::load(d.path()).unwrap().unwrap();
        assert_eq!(back.node_id, "node-3");
        assert_eq!(back.renew_at_ms(), 2000);
        assert!(!back.expired(2000));
        assert!(back.expired(2800));
        let key = d.path().join("identity/node.key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        let refused = Identity::load(d.path()).unwrap_err();
        assert!(refused.contains("node.key"), "{refused}");
    }
}
