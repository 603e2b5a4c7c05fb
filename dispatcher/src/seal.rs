//! Secrets at rest. A reconnecting user must get their token and password back, so the store
//! keeps them — sealed with XChaCha20-Poly1305 under a key only the dispatchers hold, bound to
//! the username (a sealed value moved to another row does not open). Lookups never need the
//! token itself: they go by its SHA-256 (see [`crate::secrets`]).
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// The key that seals stored secrets. Every dispatcher sharing a store needs the same one.
#[derive(Clone)]
pub struct SealKey(XChaCha20Poly1305);

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(<redacted>)")
    }
}

impl SealKey {
    /// Reads the key file (64 hex characters), creating it (0600, from the OS RNG) when
    /// missing and `create` is set. Refuses a file others can read.
    pub fn load(path: &Path, create: bool) -> Result<SealKey, String> {
        if create && !path.exists() {
            let mut key = [0u8; 32];
            crate::secrets::fill_random(&mut key)?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| format!("creating seal key {}: {e}", path.display()))?;
            writeln!(f, "{}", hex::encode(key))
                .map_err(|e| format!("writing {}: {e}", path.display()))?;
        }
        let meta =
            std::fs::metadata(path).map_err(|e| format!("seal key {}: {e}", path.display()))?;
        if meta.mode() & 0o077 != 0 {
            return Err(format!(
                "seal key {} must not be readable by group or others (chmod 600)",
                path.display()
            ));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("seal key {}: {e}", path.display()))?;
        let bytes = hex::decode(text.trim())
            .ok()
            .filter(|b| b.len() == 32)
            .ok_or_else(|| format!("seal key {} must hold 64 hex characters", path.display()))?;
        XChaCha20Poly1305::new_from_slice(&bytes)
            .map(SealKey)
            .map_err(|e| e.to_string())
    }

    /// A key from raw bytes (tests).
    pub fn from_bytes(key: &[u8; 32]) -> SealKey {
        SealKey(XChaCha20Poly1305::new(key.into()))
    }

    /// Seals `plain` for `username`: `v1:` + hex(nonce ‖ ciphertext).
    pub fn seal(&self, username: &str, plain: &str) -> Result<String, String> {
        let mut nonce = [0u8; 24];
        crate::secrets::fill_random(&mut nonce)?;
        let sealed = self
            .0
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plain.as_bytes(),
                    aad: username.as_bytes(),
                },
            )
            .map_err(|_| "sealing failed".to_owned())?;
        Ok(format!("v1:{}{}", hex::encode(nonce), hex::encode(sealed)))
    }

    /// Opens a value sealed for `username`.
    pub fn open(&self, username: &str, sealed: &str) -> Result<String, String> {
        let bytes = sealed
            .strip_prefix("v1:")
            .and_then(|h| hex::decode(h).ok())
            .filter(|b| b.len() > 24)
            .ok_or("not a sealed value")?;
        let (nonce, ct) = bytes.split_at(24);
        let plain = self
            .0
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad: username.as_bytes() })
            .map_err(|_| "cannot open a sealed secret: wrong seal key (all dispatchers sharing a store need the same --seal-key-file)")?;
        String::from_utf8(plain).map_err(|_| "sealed secret is not UTF-8".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_and_opens_bound_to_the_user() {
        let key = SealKey::from_bytes(&[7; 32]);
        let sealed = key.seal("alice", "hunter22").unwrap();
        assert!(!sealed.contains("hunter22"));
        assert_eq!(key.open("alice", &sealed).unwrap(), "hunter22");
        assert!(
            key.open("bob", &sealed).is_err(),
            "moved to another user's row"
        );
        assert!(
            SealKey::from_bytes(&[8; 32])
                .open("alice", &sealed)
                .unwrap_err()
                .contains("seal key")
        );
        assert_ne!(
            key.seal("alice", "hunter22").unwrap(),
            sealed,
            "fresh nonce each time"
        );
    }

    #[test]
    fn key_file_is_created_private_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seal.key");
        let a = SealKey::load(&path, true).unwrap();
        let b = SealKey::load(&path, false).unwrap();
        assert_eq!(b.open("u", &a.seal("u", "x").unwrap()).unwrap(), "x");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        assert!(
            SealKey::load(&path, false)
                .unwrap_err()
                .contains("chmod 600")
        );
    }
}
