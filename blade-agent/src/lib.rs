//! blade-agent: starts users' TigerVNC desktops on a blade, as those users.
//!
//! Layout:
//! - [`agent`]: the domain logic — start (one Xvnc per user), stop, list, health; with its
//!   display choice and the agent's side of the helper protocol in submodules.
//! - [`helper`]: the per-session helper process, started as root ahead of its request, which
//!   drops to the user, writes `~/.vncpasswd` and starts and supervises Xvnc and the session
//!   (login, files, start, supervise submodules).
//! - [`privdrop`]: starting the helper, dropping to a user; [`pam`]: the PAM account and session stages
//!   (the crate's only `unsafe`, FFI and fork: the crate denies `unsafe_code` elsewhere).
//! - [`discover`]: finding running Xvnc servers in /proc (the agent's source of truth).
//! - [`account`]: which accounts may have a desktop.
//! - [`service`], [`server`]: the gRPC face, behind shared-secret authentication.
//! - [`config`], [`error`]: settings and the crate's error type, each variant of which maps
//!   to a kind of the shared refusal contract ([`vncdispatch_proto::refusal`]).
#![deny(unsafe_code)]
#![warn(missing_docs)]
pub mod account;
pub mod agent;
pub mod config;
pub mod discover;
pub mod error;
pub mod helper;
#[allow(unsafe_code)] // libpam FFI: see the module doc and its SAFETY comments.
pub mod pam;
#[allow(unsafe_code)] // pre_exec, fork, set_var, fcntl: see the module doc and SAFETY comments.
pub mod privdrop;
pub mod server;
pub mod service;
