//! Where a token leads: the [`TokenSource`] trait and its implementations.
//!
//! - [`dispatcher`]: `ResolveToken` over gRPC, with a short positive and negative cache.
//! - [`file`]: a websockify token file or directory (`token: host:port` per line), so existing
//!   websockify setups move over unchanged.
pub mod dispatcher;
pub mod file;

use std::time::SystemTime;

/// What a token resolves to.
#[derive(Clone, PartialEq, Eq)]
pub struct Target {
    /// Host of the VNC server.
    pub host: String,
    /// Its RFB port.
    pub port: u16,
    /// The session's user (empty for token files).
    pub username: String,
    /// Remote IP recorded at Dispatch (empty when unknown).
    pub remote_ip: String,
    /// When the token stops being valid (None: no expiry known).
    pub expires_at: Option<SystemTime>,
    /// The VNC password, for auth-proxy mode (empty when unknown).
    pub password: String,
    /// SHA-256 (hex) of the desktop's VeNCrypt certificate: auth-proxy logs in over TLS
    /// accepting only it. Empty: VNC authentication in clear.
    pub cert_sha256: String,
    /// When the session's client lease ends unless renewed (None: not leased, or unknown).
    pub lease_until: Option<SystemTime>,
    /// A view-only share's token: `password` is the desktop's view-only one.
    pub view_only: bool,
    /// The share's id when the token is a share's (empty: the owner's own token).
    pub share_id: String,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("remote_ip", &self.remote_ip)
            .field("view_only", &self.view_only)
            .field("share_id", &self.share_id)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Why a token did not resolve.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Unknown, expired or revoked.
    #[error("unknown or expired token")]
    Unknown,
    /// The source could not answer (dispatcher down, file unreadable).
    #[error("token source unavailable: {0}")]
    Unavailable(String),
}

/// Resolves tokens to targets.
#[async_trait::async_trait]
pub trait TokenSource: Send + Sync + std::fmt::Debug + 'static {
    /// The target of `token`.
    async fn resolve(&self, token: &str) -> Result<Target, TokenError>;
    /// Like [`TokenSource::resolve`] but never from a cache, for a client being relayed: used
    /// right before connecting and then periodically, to notice the session ending and (for
    /// the dispatcher) to renew the session's client lease.
    async fn recheck(&self, token: &str) -> Result<Target, TokenError> {
        self.resolve(token).await
    }
    /// Reports a browser's connection (connected, then disconnected) for the dispatcher's
    /// audit trail; token files keep none: nothing to do.
    fn report(&self, _event: vncdispatch_proto::v1::ConnectionEvent) {}
}
