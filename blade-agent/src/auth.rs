//! Caller authentication: a shared secret, read from a root-only file, sent by callers as
//! `authorization: Bearer <secret>` and compared in constant time.
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use subtle::ConstantTimeEq;
use tonic::{Request, Status};

/// Shortest secret accepted: 128 bits as hex.
const MIN_SECRET_LEN: usize = 32;

/// The shared secret callers must present.
#[derive(Clone)]
pub struct SharedSecret(Vec<u8>);

impl std::fmt::Debug for SharedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedSecret(<redacted>)")
    }
}

impl SharedSecret {
    /// Reads the secret file, refusing one that others can read or that is too short: a
    /// readable secret would let any local user start desktops as anyone.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let meta =
            fs::metadata(path).map_err(|e| format!("secret file {}: {e}", path.display()))?;
        if meta.mode() & 0o077 != 0 {
            return Err(format!(
                "secret file {} has mode {:o}; it must not be readable by group or others (chmod 600)",
                path.display(),
                meta.mode() & 0o777
            ));
        }
        let text =
            fs::read_to_string(path).map_err(|e| format!("secret file {}: {e}", path.display()))?;
        let secret = text.trim();
        if secret.len() < MIN_SECRET_LEN {
            return Err(format!(
                "secret in {} is {} bytes; use at least {MIN_SECRET_LEN} (e.g. `openssl rand -hex 32`)",
                path.display(),
                secret.len()
            ));
        }
        Ok(SharedSecret(secret.as_bytes().to_vec()))
    }

    /// A tonic interceptor that refuses calls without the right bearer secret.
    pub fn check<T>(&self, req: Request<T>) -> Result<Request<T>, Status> {
        let presented = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("missing `authorization: Bearer <secret>` metadata")
            })?;
        if bool::from(presented.as_bytes().ct_eq(&self.0)) {
            Ok(req)
        } else {
            Err(Status::unauthenticated("wrong agent secret"))
        }
    }
}
