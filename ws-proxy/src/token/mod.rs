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

/// A browser's connection to a desktop, for the dispatcher's audit trail.
#[derive(Debug, Clone)]
pub struct ConnectionReport {
    /// Connected (false: disconnected).
    pub connected: bool,
    /// What the token resolved to.
    pub username: String,
    /// The share's id, when the token was a share's.
    pub share_id: String,
    /// Whether that share is view-only.
    pub view_only: bool,
    /// The browser's address.
    pub client_ip: std::net::IpAddr,
    /// This proxy's id for the connection, pairing its two reports.
    pub connection_id: String,
    /// Disconnected only: bytes up and down, how long, and why it ended.
    pub bytes_up: u64,
    /// Bytes from the desktop to the browser.
    pub bytes_down: u64,
    /// How long the relay lasted.
    pub duration: std::time::Duration,
    /// Why it ended (a short code: browser_closed, session_ended, idle_timeout, ...).
    pub reason: String,
}

impl ConnectionReport {
    /// The report as the dispatcher's RecordConnection takes it.
    pub fn into_event(self) -> vncdispatch_proto::v1::ConnectionEvent {
        use vncdispatch_proto::v1::connection_event::Kind;
        vncdispatch_proto::v1::ConnectionEvent {
            kind: if self.connected {
                Kind::Connected
            } else {
                Kind::Disconnected
            } as i32,
            username: self.username,
            share_id: self.share_id,
            view_only: self.view_only,
            client_ip: self.client_ip.to_string(),
            connection_id: self.connection_id,
            bytes_up: self.bytes_up,
            bytes_down: self.bytes_down,
            duration_ms: self.duration.as_millis() as u64,
            reason: self.reason,
        }
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
    /// Reports a connection for the audit trail (token files keep none: nothing to do).
    fn report(&self, _report: ConnectionReport) {}
}
