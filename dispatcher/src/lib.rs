//! dispatcher: hands out desktops. The portal calls `Dispatch(username, remote_ip)`; the
//! dispatcher returns the user's live session or picks a blade, has it start the desktop, and
//! stores the session; ws-proxy calls `ResolveToken`.
//!
//! Layout:
//! - [`store`]: the `Store` trait, its embedded (redb) and MongoDB implementations and their
//!   shared conformance suite.
pub mod dispatch;
pub mod error;
pub mod launcher;
pub mod seal;
pub mod secrets;
pub mod server;
pub mod service;
pub mod store;
