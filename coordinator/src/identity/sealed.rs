//! Task secrets sealed at rest: a secret's value is encrypted (AES-256-GCM,
//! the cluster's key, the secret's name as associated data) before it is
//! proposed, so neither the Raft log nor a snapshot holds it in plain text.
//! Only the leader, building a job's environment for its agent, opens it.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};

const PREFIX: &str = "sealed:v1:";

/// Why a sealed value cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The key file does not hold 32 bytes of hex.
    #[error("the cluster's secrets key is not 64 hex characters")]
    BadKey,
    /// Tampered with, or sealed under another key or name.
    #[error("a sealed secret does not open with this cluster's key")]
    Open,
}

/// Seals and opens secret values with the cluster's key.
pub struct SecretBox {
    key: LessSafeKey,
}

impl SecretBox {
    /// The box for a key given as 64 hex characters.
    pub fn from_hex(hex: &str) -> Result<Self, SealError> {
        let bytes = decode_hex(hex.trim())
            .filter(|b| b.len() == 32)
            .ok_or(SealError::BadKey)?;
        let key = UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| SealError::BadKey)?;
        Ok(Self {
            key: LessSafeKey::new(key),
        })
    }

    /// `value` sealed for the secret called `name`.
    pub fn seal(&self, name: &str, value: &str) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::getrandom(&mut nonce).expect("the OS random source is unavailable");
        let mut data = value.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                &mut data,
            )
            .expect("AES-GCM sealing does not fail for in-memory data");
        let mut out = nonce.to_vec();
        out.extend(data);
        format!("{PREFIX}{}", crate::identity::tls::hex(&out))
    }

    /// The plain value of the secret called `name`. A value that is not
    /// sealed (from before sealing existed) is returned as it is.
    pub fn open(&self, name: &str, value: &str) -> Result<String, SealError> {
        let Some(hex) = value.strip_prefix(PREFIX) else {
            return Ok(value.to_string());
        };
        let raw = decode_hex(hex)
            .filter(|r| r.len() >= NONCE_LEN)
            .ok_or(SealError::Open)?;
        let (nonce, sealed) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Open)?;
        let mut data = sealed.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(name.as_bytes()), &mut data)
            .map_err(|_| SealError::Open)?;
        String::from_utf8(plain.to_vec()).map_err(|_| SealError::Open)
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_under_their_key_and_name() {
        let key = "ab".repeat(32);
        let b = SecretBox::from_hex(&key).unwrap();
        let sealed = b.seal("HF_TOKEN", "hf_secret");
        assert!(sealed.starts_with(PREFIX) && !sealed.contains("hf_secret"));
        assert_ne!(
            sealed,
            b.seal("HF_TOKEN", "hf_secret"),
            "a fresh nonce each time"
        );
        assert_eq!(b.open("HF_TOKEN", &sealed).unwrap(), "hf_secret");
        assert!(b.open("OTHER", &sealed).is_err(), "bound to the name");
        let other = SecretBox::from_hex(&"cd".repeat(32)).unwrap();
        assert!(other.open("HF_TOKEN", &sealed).is_err());
        let mut tampered = sealed.clone();
        tampered.replace_range(tampered.len() - 2.., "00");
        assert!(b.open("HF_TOKEN", &tampered).is_err());
        assert_eq!(b.open("X", "plain").unwrap(), "plain");
        assert!(SecretBox::from_hex("short").is_err());
    }
}
