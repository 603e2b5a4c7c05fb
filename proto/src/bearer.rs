//! Shared-secret authentication between vncdispatch services: the secret is read from a file
//! only its owner can read, sent by callers as `authorization: Bearer <secret>`, and compared
//! in constant time by servers.
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use subtle::ConstantTimeEq;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
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

    /// The interceptor callers use to send this secret.
    pub fn client_auth(&self) -> Result<BearerAuth, String> {
        let value = format!("Bearer {}", String::from_utf8_lossy(&self.0));
        value
            .parse::<MetadataValue<Ascii>>()
            .map(|v| BearerAuth(Some(v)))
            .map_err(|_| "the secret must be printable ASCII".to_owned())
    }

    /// A server-side check (for a tonic interceptor) that refuses calls without the right
    /// bearer secret.
    pub fn check<T>(&self, req: Request<T>) -> Result<Request<T>, Status> {
        let presented = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                metrics::counter!("vncdispatch_auth_refusals_total", "reason" => "missing_secret")
                    .increment(1);
                Status::unauthenticated("missing `authorization: Bearer <secret>` metadata")
            })?;
        if bool::from(presented.as_bytes().ct_eq(&self.0)) {
            Ok(req)
        } else {
            metrics::counter!("vncdispatch_auth_refusals_total", "reason" => "wrong_secret")
                .increment(1);
            tracing::warn!("call refused: wrong secret");
            Err(Status::unauthenticated("wrong secret"))
        }
    }
}

/// Client interceptor adding `authorization: Bearer <secret>` to every call (or nothing, for
/// servers that require no secret).
#[derive(Clone)]
pub struct BearerAuth(Option<MetadataValue<Ascii>>);

impl BearerAuth {
    /// An interceptor that sends no secret.
    pub fn none() -> Self {
        BearerAuth(None)
    }
}

impl std::fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerAuth(<redacted>)")
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    fn secret_file(mode: u32, text: &str) -> (std::path::PathBuf, impl Drop + use<>) {
        struct Rm(std::path::PathBuf);
        impl Drop for Rm {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
        let path = std::env::temp_dir().join(format!(
            "vd-secret-{}-{mode:o}-{}",
            std::process::id(),
            text.len()
        ));
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(text.as_bytes()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        (path.clone(), Rm(path))
    }

    #[test]
    fn refuses_readable_or_short_secrets() {
        let good = "a".repeat(40);
        let (p, _rm) = secret_file(0o644, &good);
        assert!(
            SharedSecret::from_file(&p)
                .unwrap_err()
                .contains("chmod 600")
        );
        let (p, _rm2) = secret_file(0o600, "short\n");
        assert!(
            SharedSecret::from_file(&p)
                .unwrap_err()
                .contains("at least")
        );
    }

    #[test]
    fn checks_bearer_in_constant_time_compare() {
        let (p, _rm) = secret_file(0o600, &format!("{}\n", "b".repeat(40)));
        let secret = SharedSecret::from_file(&p).unwrap();
        let mut auth = secret.client_auth().unwrap();
        let req = auth.call(Request::new(())).unwrap();
        assert!(secret.check(req).is_ok());
        assert_eq!(
            secret.check(Request::new(())).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let mut wrong = Request::new(());
        wrong.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", "c".repeat(40)).parse().unwrap(),
        );
        assert_eq!(
            secret.check(wrong).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }
}
