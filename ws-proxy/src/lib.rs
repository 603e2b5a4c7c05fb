//! ws-proxy: a websockify-compatible WebSocket-to-TCP relay for noVNC.
//!
//! Layout:
//! - [`http`]: the HTTP server — noVNC's files, WebSocket upgrades and every refusal.
//! - [`relay`]: the WebSocket ⇄ TCP relay with heartbeat, idle timeout, expiry and revocation.
//! - [`authproxy`]: VNC auth-proxy mode (the password never reaches the browser).
//! - [`token`]: where a token leads (the dispatcher, or websockify token files).
//! - [`limits`]: per-token and per-IP connection limits.
pub mod authproxy;
pub mod http;
pub mod limits;
pub mod relay;
pub mod token;
