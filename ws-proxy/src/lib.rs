//! ws-proxy: a websockify-compatible WebSocket-to-TCP relay for noVNC.
//!
//! Layout:
//! - [`http`]: the HTTP server — accept loop, TLS, drain on shutdown and noVNC's files.
//! - [`upgrade`]: a WebSocket request's way to a relayed connection, as named stages (origin,
//!   token, client IP, lookup, limits, connect, auth proxy, 101), each with its refusal.
//! - [`relay`]: the WebSocket ⇄ TCP relay with heartbeat, idle timeout, expiry and revocation.
//! - [`read_ahead`]: the browser's side as tungstenite reads it, small or large reads.
//! - [`authproxy`]: VNC auth-proxy mode (the password never reaches the browser).
//! - [`token`]: where a token leads (the dispatcher, or websockify token files).
//! - [`limits`]: per-token and per-IP connection limits.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
pub mod authproxy;
pub mod http;
pub mod limits;
pub mod read_ahead;
pub mod relay;
pub mod token;
pub mod upgrade;
pub mod viewer;
