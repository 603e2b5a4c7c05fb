//! The WebSocket upgrade pipeline: from an upgrade request to a relayed connection, or to a
//! refusal that says why.
//!
//! Every refusal happens before the 101, as a short text answer whose status says why (400
//! malformed request, 403 origin or token refused, 429 a limit, 502 VNC server unreachable or
//! refusing, 503 token source down), and is counted by reason: the reasons that keep someone
//! out in `vncdispatch_auth_refusals_total`, which every service has, the others in
//! `vncdispatch_wsproxy_refusals_total` (see [`Refusal`]).
//!
//! The stages, in order; the first refusal answers:
//!
//! | stage | what it checks or does | refusal (status, reason) |
//! |---|---|---|
//! | [`checks::handshake`] | a GET with version 13, `Connection: upgrade` and a key | 400 `bad_request` |
//! | [`checks::client_ip`] | who the client is (X-Forwarded-For only from trusted proxies) | — |
//! | [`checks::origin`] | the Origin is the proxy's own or allow-listed | 403 `origin` |
//! | [`checks::subprotocol`] | `binary` offered, or nothing | 400 `bad_request` |
//! | [`checks::token`] | a token in the query string or a cookie | 400 `missing_token` |
//! | `stages::not_guessing` | the client has failed attempts left this minute | 429 `token_guessing` |
//! | `stages::resolve` | the token leads somewhere (5 s at most) | 403 `unknown_token`, 503 `token_source_down` |
//! | `stages::bound_to_ip` | with `--bind-token-to-ip`, the client is the one recorded | 403 `wrong_ip` |
//! | `stages::take_slot` | per-token and per-IP connection limits | 429 `limit` |
//! | `stages::connect` | the VNC server answers, re-checking the token when not | 403 `unknown_token`, 502 `unreachable` |
//! | `stages::vnc_login` | in auth-proxy mode, the proxy's own VNC login: over VeNCrypt TLS accepting only the desktop's pinned certificate when the session has a pin, else VNC authentication | 502 `vnc_login_failed` |
//! | `stages::switching_protocols`, `stages::spawn_relay` | 101, then the relay in a task of its own | — |
//!
//! The [`checks`] need no lookup and are plain functions of the request. From the token on,
//! everything runs in one `ws` span per connection, carrying the client's address and the
//! token's first 8 characters (never the whole token); the relay keeps that span.
pub mod checks;
mod stages;

use crate::http::{Body, Proxy, ProxyConfig, text};
use crate::relay::Upstream;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use vncdispatch_proto::redact::token_prefix;

/// A refused upgrade request: what the client is told, and the reason it is counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// The HTTP status of the answer.
    pub status: StatusCode,
    /// The `reason` label of the refusal counters; several refusals may share one.
    pub reason: &'static str,
    /// The answer's one line of text, for the person who reads it in a browser's console.
    pub message: &'static str,
}

impl Refusal {
    const fn new(status: StatusCode, reason: &'static str, message: &'static str) -> Self {
        Refusal {
            status,
            reason,
            message,
        }
    }

    /// Not an RFC 6455 opening handshake.
    pub const NOT_WEBSOCKET: Refusal = Refusal::new(
        StatusCode::BAD_REQUEST,
        "bad_request",
        "not a valid WebSocket request",
    );
    /// Subprotocols offered, but not `binary`.
    pub const SUBPROTOCOL: Refusal = Refusal::new(
        StatusCode::BAD_REQUEST,
        "bad_request",
        "only the `binary` subprotocol is supported",
    );
    /// A foreign Origin (cross-site WebSocket hijacking).
    pub const ORIGIN: Refusal = Refusal::new(StatusCode::FORBIDDEN, "origin", "origin not allowed");
    /// No token in the query string nor in a cookie.
    pub const MISSING_TOKEN: Refusal =
        Refusal::new(StatusCode::BAD_REQUEST, "missing_token", "missing token");
    /// Too many failed token attempts from this client this minute.
    pub const GUESSING: Refusal = Refusal::new(
        StatusCode::TOO_MANY_REQUESTS,
        "token_guessing",
        "too many failed attempts; try again in a minute",
    );
    /// The token is unknown, expired or revoked (which one is not revealed).
    pub const UNKNOWN_TOKEN: Refusal = Refusal::new(
        StatusCode::FORBIDDEN,
        "unknown_token",
        "unknown or expired token",
    );
    /// The token source failed to answer.
    pub const SOURCE_DOWN: Refusal = Refusal::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "token_source_down",
        "cannot check the token right now",
    );
    /// The token source did not answer in time.
    pub const SOURCE_TIMEOUT: Refusal = Refusal::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "token_source_down",
        "token check timed out",
    );
    /// The token is bound to another remote IP.
    pub const WRONG_IP: Refusal = Refusal::new(
        StatusCode::FORBIDDEN,
        "wrong_ip",
        "token not valid from this address",
    );
    /// The token has all the connections it may have.
    pub const OVER_TOKEN: Refusal = Refusal::new(
        StatusCode::TOO_MANY_REQUESTS,
        "limit",
        "too many connections with this token",
    );
    /// The client's address has all the connections it may have.
    pub const OVER_IP: Refusal = Refusal::new(
        StatusCode::TOO_MANY_REQUESTS,
        "limit",
        "too many connections from this address",
    );
    /// The VNC server did not accept a connection.
    pub const UNREACHABLE: Refusal = Refusal::new(
        StatusCode::BAD_GATEWAY,
        "unreachable",
        "the desktop is not reachable",
    );
    /// A share's token at a proxy without `--auth-proxy`: the viewer would have to be given a
    /// VNC password that outlives the share.
    pub const SHARE_NEEDS_AUTH_PROXY: Refusal = Refusal::new(
        StatusCode::FORBIDDEN,
        "share_needs_auth_proxy",
        "shared desktops are served only by a ws-proxy with --auth-proxy",
    );
    /// In auth-proxy mode, the VNC server refused the proxy's login.
    pub const VNC_LOGIN: Refusal = Refusal::new(
        StatusCode::BAD_GATEWAY,
        "vnc_login_failed",
        "the desktop refused the proxy's login",
    );

    /// The counter this refusal is counted in: the ones that keep someone out (`origin`,
    /// `unknown_token`, `wrong_ip`, `missing_token`, `token_guessing`) in the auth-refusal
    /// series every service has, the rest in ws-proxy's own.
    pub fn series(&self) -> &'static str {
        match self.reason {
            "origin" | "unknown_token" | "wrong_ip" | "missing_token" | "token_guessing" => {
                "vncdispatch_auth_refusals_total"
            }
            _ => "vncdispatch_wsproxy_refusals_total",
        }
    }

    /// Counts the refusal and answers with it.
    pub(crate) fn into_response(self) -> Response<Body> {
        metrics::counter!(self.series(), "reason" => self.reason).increment(1);
        text(self.status, self.message)
    }
}

/// A WebSocket request that passed the checks that need no lookup.
#[derive(Debug)]
struct Upgrade {
    /// The client's `Sec-WebSocket-Key`, for the 101's `Sec-WebSocket-Accept`.
    key: HeaderValue,
    /// The subprotocol to answer with, if the client offered any.
    protocol: Option<&'static str>,
    /// The client's IP, for limits, IP binding and the log.
    client: IpAddr,
    /// The whole token: only its prefix is ever logged.
    token: String,
}

/// Runs an upgrade request through the pipeline: a 101 with the relay started, or a refusal.
pub(crate) async fn websocket(
    proxy: Arc<Proxy>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Body> {
    match request_checks(&proxy.cfg, peer, &req) {
        Ok(up) => admit(proxy, req, up).await,
        Err(refusal) => refusal.into_response(),
    }
}

/// The [`checks`] that need no lookup, in the pipeline's order. A refused Origin is logged
/// with the client and the Origin (`-` when unreadable).
fn request_checks(
    cfg: &ProxyConfig,
    peer: SocketAddr,
    req: &Request<Incoming>,
) -> Result<Upgrade, Refusal> {
    let headers = req.headers();
    let key = checks::handshake(req.method(), headers)?;
    let client = checks::client_ip(peer, headers, &cfg.trusted_proxies);
    checks::origin(headers, &cfg.allowed_origins, cfg.require_origin).inspect_err(|_| {
        let origin = headers
            .get(header::ORIGIN)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        tracing::warn!(%client, origin, "refused: origin not allowed");
    })?;
    let protocol = checks::subprotocol(headers)?;
    let token = checks::token(req.uri().query(), headers)?;
    Ok(Upgrade {
        key,
        protocol,
        client,
        token,
    })
}

/// The stages after the checks, in the connection's span; on success answers 101 and hands
/// the connection to a relay task that stays in the same span.
#[tracing::instrument(
    name = "ws",
    skip_all,
    fields(client = %up.client, token = token_prefix(&up.token))
)]
async fn admit(proxy: Arc<Proxy>, req: Request<Incoming>, up: Upgrade) -> Response<Body> {
    match open(&proxy, &up).await {
        Ok(opened) => {
            let res = stages::switching_protocols(&up.key, up.protocol);
            stages::spawn_relay(
                &proxy,
                req,
                opened,
                (up.token, up.client),
                tracing::Span::current(),
            );
            res
        }
        Err(refusal) => refusal.into_response(),
    }
}

/// The stages that look things up and take resources, in order; a refusal ends it, and
/// whatever was taken (a connection slot, a TCP connection) is released with it.
async fn open(proxy: &Proxy, up: &Upgrade) -> Result<stages::Opened, Refusal> {
    stages::not_guessing(&proxy.guesses, up.client)?;
    let target =
        stages::resolve(proxy.tokens.as_ref(), &proxy.guesses, &up.token, up.client).await?;
    stages::share_allowed(proxy.cfg.auth_proxy, &target)?;
    stages::bound_to_ip(proxy.cfg.bind_to_ip, &target, up.client)?;
    let slot = stages::take_slot(&proxy.limits, &up.token, up.client)?;
    let (target, tcp) = stages::connect(proxy.tokens.as_ref(), &up.token, target).await?;
    let upstream = if proxy.cfg.auth_proxy {
        stages::vnc_login(tcp, &target, proxy.cfg.allow_unpinned).await?
    } else {
        Upstream::Plain(tcp)
    };
    Ok(stages::Opened {
        target,
        slot,
        upstream,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_that_keep_someone_out_count_as_auth_refusals() {
        let all = [
            Refusal::NOT_WEBSOCKET,
            Refusal::SUBPROTOCOL,
            Refusal::ORIGIN,
            Refusal::MISSING_TOKEN,
            Refusal::GUESSING,
            Refusal::UNKNOWN_TOKEN,
            Refusal::SOURCE_DOWN,
            Refusal::SOURCE_TIMEOUT,
            Refusal::WRONG_IP,
            Refusal::OVER_TOKEN,
            Refusal::OVER_IP,
            Refusal::UNREACHABLE,
            Refusal::SHARE_NEEDS_AUTH_PROXY,
            Refusal::VNC_LOGIN,
        ];
        let auth: Vec<&str> = all
            .iter()
            .filter(|r| r.series() == "vncdispatch_auth_refusals_total")
            .map(|r| r.reason)
            .collect();
        assert_eq!(
            auth,
            [
                "origin",
                "missing_token",
                "token_guessing",
                "unknown_token",
                "wrong_ip"
            ]
        );
        for r in all {
            assert!(
                r.status.is_client_error() || r.status.is_server_error(),
                "{r:?}"
            );
            let res = r.into_response();
            assert_eq!(res.status(), r.status);
        }
    }
}
