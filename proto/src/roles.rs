//! Who may call what: the role a client certificate names, and the one table of which roles
//! each RPC allows, enforced by [`RoleLayer`] in front of every gRPC service.
//!
//! A certificate names its role with one URI subject alternative name,
//! `urn:vncdispatch:role:<role>` (see [`ROLE_URI_PREFIX`]); `dispatcher pki issue --role`
//! writes it, and an operator's own CA adds it the same way (step-ca templates, Vault's
//! `uri_sans`, cert-manager's `uris`). A certificate with no role URI, an unknown one or more
//! than one is refused: ambiguity is never resolved in the caller's favour.
//!
//! | role | may call |
//! |---|---|
//! | `portal` | Dispatcher: Dispatch, EndSession, ShareSession, RevokeShare, ListShares |
//! | `proxy` | Dispatcher: ResolveToken, RecordConnection |
//! | `admin` | every Dispatcher RPC (blades, listings too) |
//! | `dispatcher` | every BladeAgent RPC (the only role agents accept) |
//! | `agent` | nothing: it is a server's identity |
//!
//! Health and reflection answer any caller with a valid certificate. A method not in the table
//! is refused. Refusals: UNAUTHENTICATED without a client certificate, PERMISSION_DENIED with
//! the role needed otherwise — logged and counted in `vncdispatch_auth_refusals_total{reason}`.
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio_rustls::rustls::pki_types::CertificateDer;
use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use x509_parser::extensions::GeneralName;

/// What a certificate's role URI starts with.
pub const ROLE_URI_PREFIX: &str = "urn:vncdispatch:role:";

/// What a certificate is allowed to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Role {
    /// The portal backend: hands out and ends desktops.
    Portal,
    /// ws-proxy: resolves tokens it is shown, nothing more.
    Proxy,
    /// Operators and their tools: everything on the dispatcher.
    Admin,
    /// The dispatcher, as a client of the agents.
    Dispatcher,
    /// A blade agent's server identity.
    Agent,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 5] = [
        Role::Portal,
        Role::Proxy,
        Role::Admin,
        Role::Dispatcher,
        Role::Agent,
    ];

    /// The role's name as in the URI and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            Role::Portal => "portal",
            Role::Proxy => "proxy",
            Role::Admin => "admin",
            Role::Dispatcher => "dispatcher",
            Role::Agent => "agent",
        }
    }

    /// The URI SAN that names this role.
    pub fn uri(self) -> String {
        format!("{ROLE_URI_PREFIX}{}", self.name())
    }

    fn from_name(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == name)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a certificate names no usable role.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoleError {
    /// Not a parsable X.509 certificate.
    #[error("the certificate cannot be parsed")]
    Unparsable,
    /// No `urn:vncdispatch:role:` URI.
    #[error("the certificate names no role (a URI SAN {ROLE_URI_PREFIX}<role>)")]
    None,
    /// A role URI with an unknown name.
    #[error("the certificate names an unknown role `{0}`")]
    Unknown(String),
    /// More than one role URI.
    #[error("the certificate names more than one role")]
    Several,
}

/// The role a certificate names.
pub fn role_of(cert: &CertificateDer<'_>) -> Result<Role, RoleError> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|_| RoleError::Unparsable)?;
    let mut found = None;
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            let GeneralName::URI(uri) = name else {
                continue;
            };
            let Some(role) = uri.strip_prefix(ROLE_URI_PREFIX) else {
                continue;
            };
            let role = Role::from_name(role).ok_or_else(|| RoleError::Unknown(role.to_owned()))?;
            if found.replace(role).is_some() {
                return Err(RoleError::Several);
            }
        }
    }
    found.ok_or(RoleError::None)
}

/// Who called, for the audit trail: the certificate's role and its name (the subject's common
/// name; empty when it has none). Authorized calls carry it in their extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The role the certificate names.
    pub role: Role,
    /// The subject's common name, as `dispatcher pki issue NAME` writes it.
    pub name: String,
}

impl std::fmt::Display for Identity {
    /// `role:name` (or just the role when the certificate has no name).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.name.is_empty() {
            write!(f, "{}", self.role)
        } else {
            write!(f, "{}:{}", self.role, self.name)
        }
    }
}

/// A certificate's subject common name; empty if it has none or it is not printable ASCII
/// (it goes into logs and the audit trail verbatim, so nothing else is taken).
pub fn name_of(cert: &CertificateDer<'_>) -> String {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return String::new();
    };
    parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .filter(|cn| cn.len() <= 64 && cn.bytes().all(|b| b.is_ascii_graphic() || b == b' '))
        .map(str::to_owned)
        .unwrap_or_default()
}

/// Who may call a method: specific roles, or any caller with a valid certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowed {
    /// Only these roles.
    Roles(&'static [Role]),
    /// Any authenticated caller (health, reflection).
    AnyRole,
}

/// The roles allowed to call `path` (`/package.Service/Method`); None: nobody.
pub fn allowed(path: &str) -> Option<Allowed> {
    use Role::*;
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    Some(match (service, method) {
        (
            "vncdispatch.v1.Dispatcher",
            "Dispatch" | "EndSession" | "ShareSession" | "RevokeShare" | "ListShares",
        ) => Allowed::Roles(&[Portal, Admin]),
        ("vncdispatch.v1.Dispatcher", "ResolveToken") => Allowed::Roles(&[Proxy, Admin]),
        // Only ws-proxy reports connections: an operator's tool has nothing to report.
        ("vncdispatch.v1.Dispatcher", "RecordConnection") => Allowed::Roles(&[Proxy]),
        (
            "vncdispatch.v1.Dispatcher",
            "ListSessions" | "SessionHistory" | "AddBlade" | "ListBlades" | "DrainBlade"
            | "RemoveBlade" | "Audit",
        ) => Allowed::Roles(&[Admin]),
        ("vncdispatch.v1.BladeAgent", _) => Allowed::Roles(&[Dispatcher]),
        ("grpc.health.v1.Health", _)
        | ("grpc.reflection.v1.ServerReflection", _)
        | ("grpc.reflection.v1alpha.ServerReflection", _) => Allowed::AnyRole,
        _ => return None,
    })
}

/// Checks a caller's certificate (None: no certificate) against the table for `path`.
pub fn authorize(path: &str, cert: Option<&CertificateDer<'_>>) -> Result<Role, tonic::Status> {
    let refuse = |reason: &'static str, status: tonic::Status| {
        tracing::warn!(method = path, reason, "call refused: {}", status.message());
        crate::metrics::auth_refusal(reason);
        Err(status)
    };
    let Some(cert) = cert else {
        return refuse(
            "no_client_cert",
            tonic::Status::unauthenticated(
                "a client certificate from the vncdispatch CA is required (--ca/--cert/--key)",
            ),
        );
    };
    let role = match role_of(cert) {
        Ok(role) => role,
        Err(e) => {
            return refuse(
                "no_role",
                tonic::Status::permission_denied(format!(
                    "{e}; issue one with `dispatcher pki issue --role …`"
                )),
            );
        }
    };
    match allowed(path) {
        Some(Allowed::AnyRole) => Ok(role),
        Some(Allowed::Roles(roles)) if roles.contains(&role) => Ok(role),
        Some(Allowed::Roles(roles)) => {
            let needed: Vec<&str> = roles.iter().map(|r| r.name()).collect();
            refuse(
                "wrong_role",
                tonic::Status::permission_denied(format!(
                    "{path} needs role {}; this certificate is role {role}",
                    needed.join(" or ")
                )),
            )
        }
        None => refuse(
            "unknown_method",
            tonic::Status::permission_denied(format!("{path} is not open to any role")),
        ),
    }
}

/// Enforces the role table on every call of the server it wraps, from the client
/// certificate tonic's TLS connect info carries. A plaintext server (loopback, or the
/// operator's explicit `--insecure-plaintext`) has no certificates to check and passes calls.
#[derive(Debug, Clone, Copy)]
pub struct RoleLayer {
    enforce: bool,
}

impl RoleLayer {
    /// A layer that checks roles when `enforce` (the server speaks TLS).
    pub fn new(enforce: bool) -> Self {
        RoleLayer { enforce }
    }
}

impl<S> tower::Layer<S> for RoleLayer {
    type Service = RoleCheck<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RoleCheck {
            inner,
            enforce: self.enforce,
        }
    }
}

/// The service [`RoleLayer`] wraps around the server's routes.
#[derive(Debug, Clone)]
pub struct RoleCheck<S> {
    inner: S,
    enforce: bool,
}

impl<S, B, RB> tower::Service<http::Request<B>> for RoleCheck<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    RB: Default + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // Authorized calls carry the caller's [`Role`] in their extensions.
        if !self.enforce {
            return Box::pin(self.inner.call(req));
        }
        let cert = req
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|info| info.peer_certs())
            .and_then(|certs| certs.first().cloned());
        match authorize(req.uri().path(), cert.as_ref()) {
            Ok(role) => {
                tracing::debug!(%role, method = req.uri().path(), "call authorized");
                // The handler may want to know who asked (an operator or the portal), and the
                // audit trail by name.
                let name = cert.as_ref().map(name_of).unwrap_or_default();
                let mut req = req;
                req.extensions_mut().insert(role);
                req.extensions_mut().insert(Identity { role, name });
                Box::pin(self.inner.call(req))
            }
            Err(status) => Box::pin(std::future::ready(Ok(status.into_http()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rpc_of_both_services_has_an_entry() {
        for m in [
            "Dispatch",
            "ResolveToken",
            "EndSession",
            "ListSessions",
            "SessionHistory",
            "AddBlade",
            "ListBlades",
            "DrainBlade",
            "RemoveBlade",
            "ShareSession",
            "RevokeShare",
            "ListShares",
            "Audit",
            "RecordConnection",
        ] {
            assert!(
                allowed(&format!("/vncdispatch.v1.Dispatcher/{m}")).is_some(),
                "{m}"
            );
        }
        assert!(allowed("/vncdispatch.v1.Dispatcher/Nope").is_none());
        assert!(allowed("/vncdispatch.v1.Other/Dispatch").is_none());
        assert!(allowed("Dispatch").is_none());
        assert!(allowed("").is_none());
    }

    #[test]
    fn agents_accept_only_the_dispatcher() {
        for role in Role::ALL {
            let ok = matches!(
                allowed("/vncdispatch.v1.BladeAgent/StartSession"),
                Some(Allowed::Roles(r)) if r.contains(&role)
            );
            assert_eq!(ok, role == Role::Dispatcher, "{role}");
        }
    }

    #[test]
    fn no_certificate_is_unauthenticated() {
        let err = authorize("/vncdispatch.v1.Dispatcher/Dispatch", None).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        let cert = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        assert_eq!(role_of(&cert), Err(RoleError::Unparsable));
        let err = authorize("/vncdispatch.v1.Dispatcher/Dispatch", Some(&cert)).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
    }
}
