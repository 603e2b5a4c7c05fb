//! dispatcher: hands out desktops. The portal calls `Dispatch(username, remote_ip)`; the
//! dispatcher returns the user's live session or picks a blade, has it start the desktop, and
//! stores the session; ws-proxy calls `ResolveToken`.
//!
//! Layout:
//! - [`dispatch`]: the domain — the [`dispatch::Dispatcher`] and, one file per concern,
//!   session lifecycle, blade placement and health, tokens and expiry, blade admin.
//! - [`clock`]: where the domain gets the time (the wall clock; a pausable one in tests).
//! - [`service`]: the thin gRPC layer over the domain; [`server`]: serving it with its
//!   background loops (store health, blade health, expiry sweep); [`http_route`]: the
//!   original deployment's `GET /vncdispatch/:username/:remoteip`, optional.
//! - [`store`]: the `Store` trait and its embedded (redb) and MongoDB implementations.
//! - [`launcher`]: starting desktops on blades, through blade-agent's gRPC or over SSH.
//! - [`seal`], [`secrets`]: sealing stored secrets; making tokens and passwords.
//! - [`error`]: the dispatcher's errors and their gRPC statuses.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod clock;
pub mod dispatch;
pub mod error;
pub mod http_route;
pub mod launcher;
pub mod seal;
pub mod secrets;
pub mod server;
pub mod service;
pub mod store;
