//! The vncdispatch wire contract and the rules every service applies to its fields.
//!
//! Layout:
//! - [`v1`]: code generated from `proto/vncdispatch/v1/*.proto` (package `vncdispatch.v1`):
//!   the `Dispatcher` and `BladeAgent` services, their clients and messages.
//! - [`rules`]: what a valid username, VNC password, remote IP and token are. The dispatcher,
//!   the blade agent and ws-proxy all validate with these, so a value one accepts the others do too.
//! - [`vencrypt`]: RFB login over VeNCrypt X509Vnc with the server's certificate pinned.
//! - [`vncauth`]: VNC password obfuscation (rfbauth files) and challenge responses.
//! - [`refusal`]: how blade-agent turns down a desktop — a kind per reason, sent as a gRPC status
//!   with an `ErrorInfo` detail or as a `cloudvnc` exit code — and whether the dispatcher
//!   should refuse the request or try the next blade.
//! - [`bearer`]: the shared-secret authentication between services.
//! - [`tls`]: mutual TLS 1.3 between services (PEM files in, rustls configs out).
//! - [`roles`]: the role a client certificate names and which RPCs each role may call.
//! - [`pki`]: a small CA (rcgen) for operators who have none.
//! - [`serve`]: what every gRPC server here shares (limits, health, reflection, signals).
//! - [`FILE_DESCRIPTOR_SET`]: the compiled descriptors, served by gRPC reflection.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod bearer;
pub mod config;
pub mod metrics;
pub mod pki;
pub mod redact;
pub mod refusal;
pub mod roles;
pub mod rules;
pub mod serve;
pub mod tls;
pub mod vencrypt;
pub mod vncauth;

/// Generated code for package `vncdispatch.v1`.
#[allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    missing_debug_implementations
)]
pub mod v1 {
    tonic::include_proto!("vncdispatch.v1");
}

/// Encoded `FileDescriptorSet` of the whole contract, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("vncdispatch_descriptor");
