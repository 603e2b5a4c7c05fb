//! blade-agent: starts users' TigerVNC desktops on a blade, as those users.
//!
//! Layout:
//! - [`agent`]: the domain logic — start (one Xvnc per user), stop, list, health.
//! - [`helper`]: the per-session helper process that runs as the user, writes `~/.vncpasswd`
//!   and starts and supervises Xvnc and the session.
//! - [`privdrop`]: running a program as a user (the crate's only `unsafe`).
//! - [`discover`]: finding running Xvnc servers in /proc (the agent's source of truth).
//! - [`account`]: which accounts may have a desktop.
//! - [`service`], [`server`]: the gRPC face, behind shared-secret authentication.
//! - [`config`], [`error`]: settings and the crate's error type.
pub mod account;
pub mod agent;
pub mod config;
pub mod discover;
pub mod error;
pub mod helper;
pub mod privdrop;
pub mod server;
pub mod service;
