//! The stages of an upgrade that look things up or hold resources: the guessing limit, the
//! token lookup, IP binding, connection slots, the connection to the VNC server, the
//! auth-proxy login, the 101 and the relay task. They run in the connection's span, so their
//! log lines carry the client and the token prefix without naming them.
use super::{Refusal, checks};
use crate::http::{Body, Proxy};
use crate::limits::{Guesses, Limits, Over, Slot};
use crate::relay::relay;
use crate::token::{Target, TokenError, TokenSource};
use http_body_util::BodyExt;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::net::IpAddr;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

/// Longest wait for a token lookup, and for a VNC server to accept a connection.
const WAIT: Duration = Duration::from_secs(5);

/// A connection that passed every stage, ready for the 101 and the relay.
#[derive(Debug)]
pub(super) struct Opened {
    /// Where the token leads (after a re-check, where it leads now).
    pub(super) target: Target,
    /// The connection's place in the per-token and per-IP limits, held until the relay ends.
    pub(super) slot: Slot,
    /// The connection to the VNC server (logged in, in auth-proxy mode).
    pub(super) tcp: TcpStream,
}

/// Refuses, before any lookup, a client that used up its failed token attempts this minute
/// ([`Guesses`]): 429 `token_guessing`.
pub(super) fn not_guessing(guesses: &Guesses, client: IpAddr) -> Result<(), Refusal> {
    if guesses.blocked(client) {
        tracing::warn!("refused: too many failed token attempts from this client");
        return Err(Refusal::GUESSING);
    }
    Ok(())
}

/// Resolves the token, waiting 5 s at most. Unknown, expired or revoked: 403
/// `unknown_token`, counted as a failed attempt of this client. The source failing or not
/// answering in time: 503 `token_source_down`.
pub(super) async fn resolve(
    tokens: &dyn TokenSource,
    guesses: &Guesses,
    token: &str,
    client: IpAddr,
) -> Result<Target, Refusal> {
    match tokio::time::timeout(WAIT, tokens.resolve(token)).await {
        Ok(Ok(target)) => Ok(target),
        Ok(Err(TokenError::Unknown)) => {
            guesses.failed(client);
            tracing::warn!("refused: unknown or expired token");
            Err(Refusal::UNKNOWN_TOKEN)
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "token source failed");
            Err(Refusal::SOURCE_DOWN)
        }
        Err(_) => Err(Refusal::SOURCE_TIMEOUT),
    }
}

/// With `--bind-token-to-ip`, only the remote IP recorded at Dispatch may use the token
/// ([`checks::ip_binding`]): 403 `wrong_ip`, logging the recorded address.
pub(super) fn bound_to_ip(
    bind_to_ip: bool,
    target: &Target,
    client: IpAddr,
) -> Result<(), Refusal> {
    checks::ip_binding(bind_to_ip, &target.remote_ip, client).inspect_err(|_| {
        tracing::warn!(recorded = %target.remote_ip, "refused: token used from another IP");
    })
}

/// Takes the connection's slot in the per-token and per-IP limits (a token usable by any
/// number of connections was nova's OSSN-0008): 429 `limit` when either is full.
pub(super) fn take_slot(limits: &Limits, token: &str, client: IpAddr) -> Result<Slot, Refusal> {
    limits.acquire(token, client).map_err(|over| {
        tracing::warn!(?over, "refused: connection limit");
        match over {
            Over::Token => Refusal::OVER_TOKEN,
            Over::Ip => Refusal::OVER_IP,
        }
    })
}

/// A TCP connection to `target`, or None when it fails or takes longer than 5 s.
async fn dial(target: &Target) -> Option<TcpStream> {
    let addr = (target.host.as_str(), target.port);
    tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .ok()?
        .ok()
}

/// Connects to the VNC server the token leads to. When that fails, the answer may have come
/// from the cache and the session ended since (its Xvnc stopped), so the token is asked
/// again, uncached: revoked, 403 `unknown_token` (rather than a connection to whatever
/// listens on that port now); moved, the new target is tried; otherwise, or when the new
/// target fails too, 502 `unreachable`, logging the host and port.
pub(super) async fn connect(
    tokens: &dyn TokenSource,
    token: &str,
    target: Target,
) -> Result<(Target, TcpStream), Refusal> {
    let (target, tcp) = match dial(&target).await {
        Some(tcp) => (target, tcp),
        None => match tokens.recheck(token).await {
            Err(TokenError::Unknown) => {
                tracing::warn!("refused: token revoked since it was cached");
                return Err(Refusal::UNKNOWN_TOKEN);
            }
            Ok(fresh)
                if (fresh.host.as_str(), fresh.port) != (target.host.as_str(), target.port) =>
            {
                match dial(&fresh).await {
                    Some(tcp) => (fresh, tcp),
                    None => return Err(unreachable(&fresh)),
                }
            }
            _ => return Err(unreachable(&target)),
        },
    };
    let _ = tcp.set_nodelay(true);
    Ok((target, tcp))
}

/// Logs an unreachable VNC server and refuses with 502 `unreachable`.
fn unreachable(target: &Target) -> Refusal {
    tracing::warn!(host = %target.host, port = target.port, "VNC server unreachable");
    Refusal::UNREACHABLE
}

/// In auth-proxy mode, logs in to the VNC server with the session's password
/// ([`crate::authproxy::login`]), so the browser never sees it: 502 `vnc_login_failed`.
pub(super) async fn vnc_login(tcp: &mut TcpStream, target: &Target) -> Result<(), Refusal> {
    crate::authproxy::login(tcp, &target.password)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "auth proxy: VNC login failed");
            Refusal::VNC_LOGIN
        })
}

/// The 101 answer: `Sec-WebSocket-Accept` from the client's key, and the chosen subprotocol.
pub(super) fn switching_protocols(
    key: &HeaderValue,
    protocol: Option<&'static str>,
) -> Response<Body> {
    let mut res = Response::new(
        http_body_util::Empty::<Bytes>::new()
            .map_err(|n| match n {})
            .boxed_unsync(),
    );
    *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = res.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        h.insert("sec-websocket-accept", accept);
    }
    if let Some(p) = protocol {
        h.insert("sec-websocket-protocol", HeaderValue::from_static(p));
    }
    res
}

/// Starts the relay in a task of the proxy's (so the drain waits for it) in `span`: once
/// hyper has sent the 101 and handed over the connection, presents "None" to the browser in
/// auth-proxy mode, then relays until either side ends, counting the connection in the
/// metrics. The slot is freed when the task ends, however it ends.
pub(super) fn spawn_relay(
    proxy: &Proxy,
    req: Request<Incoming>,
    opened: Opened,
    token: String,
    span: tracing::Span,
) {
    let cfg = &proxy.cfg;
    // Small I/O buffers: an idle desktop connection should cost kilobytes, not the 256 KiB
    // tungstenite's defaults pin per connection.
    let ws_config = WebSocketConfig::default()
        .max_message_size(Some(cfg.max_message))
        .max_frame_size(Some(cfg.max_message))
        .read_buffer_size(32 * 1024)
        .write_buffer_size(16 * 1024);
    let (limits, auth_proxy, cancel, tokens) = (
        cfg.relay.clone(),
        cfg.auth_proxy,
        proxy.cancel.clone(),
        proxy.tokens.clone(),
    );
    let Opened { target, slot, tcp } = opened;
    proxy.tasks.spawn(tracing::Instrument::instrument(
        async move {
            let _slot = slot;
            let upgraded = match hyper::upgrade::on(req).await {
                Ok(u) => u,
                Err(e) => {
                    tracing::info!(error = %e, "upgrade failed");
                    return;
                }
            };
            let mut ws = WebSocketStream::from_raw_socket(
                TokioIo::new(upgraded),
                Role::Server,
                Some(ws_config),
            )
            .await;
            let pending = if auth_proxy {
                match crate::authproxy::present_none(&mut ws).await {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::info!(error = %e, "auth proxy: browser handshake failed");
                        return;
                    }
                }
            } else {
                Vec::new()
            };
            tracing::info!(host = %target.host, port = target.port, user = %target.username, "relaying");
            metrics::counter!("vncdispatch_wsproxy_connections_total").increment(1);
            let active = metrics::gauge!("vncdispatch_wsproxy_connections_active");
            active.increment(1.0);
            let stats = relay(
                ws,
                tcp,
                pending,
                limits,
                target.expires_at,
                token,
                tokens,
                cancel,
            )
            .await;
            active.decrement(1.0);
            tracing::info!(up = stats.up, down = stats.down, "relay ended");
        },
        span,
    ));
}
