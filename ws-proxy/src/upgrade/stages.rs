//! The stages of an upgrade that look things up or hold resources: the guessing limit, the
//! token lookup, IP binding, connection slots, the connection to the VNC server, the
//! auth-proxy login, the 101 and the relay task. They run in the connection's span, so their
//! log lines carry the client and the token prefix without naming them.
use super::{Refusal, checks};
use crate::http::{Body, Proxy};
use crate::limits::{Guesses, Limits, Over, Slot};
use crate::read_ahead::ReadAhead;
use crate::relay::{Upstream, relay};
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
use tokio_util::either::Either;
use vncdispatch_proto::v1::ConnectionEvent;
use vncdispatch_proto::v1::connection_event::Kind;
use vncdispatch_proto::vencrypt::CertPin;

/// Longest wait for a token lookup, and for a VNC server to accept a connection.
const WAIT: Duration = Duration::from_secs(5);

/// A connection that passed every stage, ready for the 101 and the relay.
#[derive(Debug)]
pub(super) struct Opened {
    /// Where the token leads (after a re-check, where it leads now).
    pub(super) target: Target,
    /// The connection's place in the per-token and per-IP limits, held until the relay ends.
    pub(super) slot: Slot,
    /// The connection to the VNC server (logged in, in auth-proxy mode; TLS when pinned).
    pub(super) upstream: Upstream,
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
/// ([`checks::ip_binding`]): 403 `wrong_ip`, logging the recorded address. A share's token
/// is not bound: its viewer is elsewhere by design.
pub(super) fn bound_to_ip(
    bind_to_ip: bool,
    target: &Target,
    client: IpAddr,
) -> Result<(), Refusal> {
    if !target.share_id.is_empty() {
        return Ok(());
    }
    checks::ip_binding(bind_to_ip, &target.remote_ip, client).inspect_err(|_| {
        tracing::warn!(recorded = %target.remote_ip, "refused: token used from another IP");
    })
}

/// A share's token is served only in auth-proxy mode (403 `share_needs_auth_proxy`
/// otherwise): there ws-proxy logs the viewer in with the password for the share's rights,
/// and the viewer never holds a password that would outlive the share.
pub(super) fn share_allowed(auth_proxy: bool, target: &Target) -> Result<(), Refusal> {
    if target.share_id.is_empty() || auth_proxy {
        return Ok(());
    }
    tracing::warn!(share = %target.share_id, "refused: a share's token needs --auth-proxy");
    Err(Refusal::SHARE_NEEDS_AUTH_PROXY)
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

/// In auth-proxy mode, logs in to the VNC server with the session's password, so the
/// browser never sees it: over VeNCrypt X509Vnc accepting only the desktop's own certificate
/// when the session has a pin ([`vncdispatch_proto::vencrypt`]; no fallback to VNC
/// authentication in clear), else — only with `allow_unpinned` — VNC authentication
/// ([`crate::authproxy::login`]). 502 `vnc_login_failed` either way.
pub(super) async fn vnc_login(
    mut tcp: TcpStream,
    target: &Target,
    allow_unpinned: bool,
) -> Result<Upstream, Refusal> {
    let refuse = |e: String| {
        tracing::warn!(error = %e, "auth proxy: VNC login failed");
        Refusal::VNC_LOGIN
    };
    if target.cert_sha256.is_empty() {
        if !allow_unpinned {
            return Err(refuse(
                "the session has no certificate pin (its agent offers no VeNCrypt, or predates \
                 it); refusing VNC authentication in clear — upgrade the blade's agent, or start \
                 ws-proxy with --allow-unpinned"
                    .into(),
            ));
        }
        tracing::warn!(
            "auth proxy: no certificate pin; VNC authentication in clear (--allow-unpinned)"
        );
        crate::authproxy::login(&mut tcp, &target.password)
            .await
            .map_err(refuse)?;
        return Ok(Upstream::Plain(tcp));
    }
    let pin = CertPin::from_hex(&target.cert_sha256).map_err(|e| refuse(e.to_owned()))?;
    let login = vncdispatch_proto::vencrypt::login(tcp, &target.password, pin);
    match tokio::time::timeout(WAIT * 2, login).await {
        Ok(Ok(tls)) => {
            tracing::info!("auth proxy: logged in over VeNCrypt, the desktop's certificate pinned");
            Ok(Upstream::Tls(Box::new(tls)))
        }
        Ok(Err(e)) => Err(refuse(e)),
        Err(_) => Err(refuse("VeNCrypt login timed out".into())),
    }
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

/// A new id for a relayed connection, pairing its two audit reports: this process's start
/// and a count, 16 hex digits.
fn connection_id() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static EPOCH: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as u32)
    });
    format!("{epoch:08x}{:08x}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Starts the relay in a task of the proxy's (so the drain waits for it) in `span`: once
/// hyper has sent the 101 and handed over the connection, presents "None" to the browser in
/// auth-proxy mode, then relays until either side ends, counting the connection in the
/// metrics. The slot is freed when the task ends, however it ends.
pub(super) fn spawn_relay(
    proxy: &Proxy,
    req: Request<Incoming>,
    opened: Opened,
    (token, client): (String, std::net::IpAddr),
    span: tracing::Span,
) {
    let cfg = &proxy.cfg;
    // Small I/O buffers: an idle desktop connection should cost kilobytes, not the 256 KiB
    // tungstenite's defaults pin per connection. tungstenite zero-fills its whole read buffer
    // on every read, and reads at most that much: 1 KiB holds what a browser mostly sends
    // (input events), and a larger message is read ahead 64 KiB a syscall (`read_ahead`).
    let ws_config = WebSocketConfig::default()
        .max_message_size(Some(cfg.max_message))
        .max_frame_size(Some(cfg.max_message))
        .read_buffer_size(crate::read_ahead::TUNGSTENITE_READ)
        .write_buffer_size(16 * 1024);
    let tls = cfg.tls.is_some();
    let (limits, auth_proxy, cancel, tokens) = (
        cfg.relay.clone(),
        cfg.auth_proxy,
        proxy.cancel.clone(),
        proxy.tokens.clone(),
    );
    let Opened {
        target,
        slot,
        upstream,
    } = opened;
    proxy.tasks.spawn(tracing::Instrument::instrument(
        async move {
            let upgraded = match hyper::upgrade::on(req).await {
                Ok(u) => u,
                Err(e) => {
                    tracing::info!(error = %e, "upgrade failed");
                    return;
                }
            };
            // Without TLS, the socket itself back from hyper, with what hyper read past the
            // request: tungstenite then reads and writes it directly, not through hyper's
            // upgrade layers (two adapters and a dynamic call on every read and write).
            let (io, early) = match upgraded.downcast::<TokioIo<TcpStream>>() {
                Ok(parts) => (Either::Left(parts.io.into_inner()), parts.read_buf.to_vec()),
                Err(upgraded) => {
                    if !tls {
                        // Works, but slower: http.rs serves something else than TokioIo<TcpStream>.
                        tracing::warn!("plain connection not handed back as a TcpStream; relaying through hyper's layers");
                    }
                    (Either::Right(TokioIo::new(upgraded)), Vec::new())
                }
            };
            let io = ReadAhead::new(io);
            let mut ws =
                WebSocketStream::from_partially_read(io, early, Role::Server, Some(ws_config))
                    .await;
            let pending = if auth_proxy {
                let viewer = !target.share_id.is_empty();
                match crate::authproxy::present_none(&mut ws, viewer).await {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::info!(error = %e, "auth proxy: browser handshake failed");
                        return;
                    }
                }
            } else {
                Vec::new()
            };
            tracing::info!(host = %target.host, port = target.port, user = %target.username, share = %target.share_id, view_only = target.view_only, "relaying");
            let mut report = ConnectionEvent {
                kind: Kind::Connected as i32,
                username: target.username.clone(),
                share_id: target.share_id.clone(),
                view_only: target.view_only,
                client_ip: client.to_string(),
                connection_id: connection_id(),
                ..ConnectionEvent::default()
            };
            tokens.report(report.clone());
            let began = std::time::Instant::now();
            metrics::counter!("vncdispatch_wsproxy_connections_total").increment(1);
            let active = metrics::gauge!("vncdispatch_wsproxy_connections_active");
            active.increment(1.0);
            let stats = relay(
                ws,
                upstream,
                pending,
                limits,
                token,
                tokens.clone(),
                cancel,
            )
            .await;
            active.decrement(1.0);
            // Freed before the log line says so: whoever reads the log may count on it. On
            // every earlier return the slot is freed as the task ends.
            drop(slot);
            tracing::info!(up = stats.up, down = stats.down, ended = %stats.ended, "relay ended");
            report.kind = Kind::Disconnected as i32;
            report.bytes_up = stats.up;
            report.bytes_down = stats.down;
            report.duration_ms = began.elapsed().as_millis() as u64;
            // For a share, a re-check that found it gone: revoked, expired, or its session
            // over — the share's end either way.
            report.reason = match stats.ended.as_str() {
                "session_ended" if !report.share_id.is_empty() => "share_ended".to_owned(),
                other => other.chars().take(32).collect(),
            };
            tokens.report(report);
        },
        span,
    ));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A token source with one answer for `resolve` and a queue of answers for `recheck`,
    /// counting the re-checks.
    #[derive(Debug)]
    struct Fake {
        resolved: Result<Target, &'static str>,
        rechecks: Mutex<Vec<Result<Target, &'static str>>>,
    }

    fn answer(a: &Result<Target, &'static str>) -> Result<Target, TokenError> {
        match a {
            Ok(t) => Ok(t.clone()),
            Err("unknown") => Err(TokenError::Unknown),
            Err(e) => Err(TokenError::Unavailable((*e).to_owned())),
        }
    }

    #[async_trait::async_trait]
    impl TokenSource for Fake {
        async fn resolve(&self, _token: &str) -> Result<Target, TokenError> {
            answer(&self.resolved)
        }
        async fn recheck(&self, _token: &str) -> Result<Target, TokenError> {
            let next = self.rechecks.lock().unwrap().pop();
            answer(&next.expect("an unexpected re-check"))
        }
    }

    fn fake(
        resolved: Result<Target, &'static str>,
        rechecks: Vec<Result<Target, &'static str>>,
    ) -> Fake {
        Fake {
            resolved,
            rechecks: Mutex::new(rechecks),
        }
    }

    fn target(port: u16) -> Target {
        Target {
            host: "127.0.0.1".into(),
            port,
            username: "alice".into(),
            remote_ip: "192.0.2.7".into(),
            expires_at: None,
            password: String::new(),
            cert_sha256: String::new(),
            lease_until: None,
            view_only: false,
            share_id: String::new(),
        }
    }

    /// A port that accepts connections, with its listener.
    async fn open_port() -> (tokio::net::TcpListener, u16) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        (l, port)
    }

    /// A port nothing listens on (just released by a listener).
    async fn closed_port() -> u16 {
        open_port().await.1
    }

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 7));

    #[tokio::test]
    async fn an_unknown_token_is_a_failed_guess_and_a_down_source_is_not() {
        let guesses = Guesses::new(2);
        let unknown = fake(Err("unknown"), vec![]);
        let down = fake(Err("dispatcher down"), vec![]);
        for _ in 0..3 {
            assert_eq!(
                resolve(&down, &guesses, "t", CLIENT).await,
                Err(Refusal::SOURCE_DOWN)
            );
        }
        assert_eq!(
            not_guessing(&guesses, CLIENT),
            Ok(()),
            "outages are no guesses"
        );
        for _ in 0..2 {
            assert_eq!(
                resolve(&unknown, &guesses, "t", CLIENT).await,
                Err(Refusal::UNKNOWN_TOKEN)
            );
        }
        assert_eq!(not_guessing(&guesses, CLIENT), Err(Refusal::GUESSING));
        assert_eq!(Refusal::GUESSING.status.as_u16(), 429);
        assert_eq!(Refusal::SOURCE_DOWN.status.as_u16(), 503);
        let ok = fake(Ok(target(5901)), vec![]);
        assert_eq!(resolve(&ok, &guesses, "t", CLIENT).await, Ok(target(5901)));
    }

    #[tokio::test]
    async fn connect_rechecks_the_token_only_when_the_server_is_unreachable() {
        let (_live, live) = open_port().await;
        let closed = closed_port().await;
        // Reachable: no re-check (the fake panics on one).
        let src = fake(Ok(target(live)), vec![]);
        let (t, _tcp) = connect(&src, "t", target(live)).await.unwrap();
        assert_eq!(t.port, live);
        // Unreachable and revoked since it was cached: 403, not 502.
        let src = fake(Ok(target(closed)), vec![Err("unknown")]);
        let r = connect(&src, "t", target(closed)).await.map(|(t, _)| t);
        assert_eq!(r.unwrap_err(), Refusal::UNKNOWN_TOKEN);
        // Unreachable and still there: 502.
        let src = fake(Ok(target(closed)), vec![Ok(target(closed))]);
        let r = connect(&src, "t", target(closed)).await.map(|(t, _)| t);
        assert_eq!(r.unwrap_err(), Refusal::UNREACHABLE);
        // The source failing on the re-check: 502 as well.
        let src = fake(Ok(target(closed)), vec![Err("dispatcher down")]);
        let r = connect(&src, "t", target(closed)).await.map(|(t, _)| t);
        assert_eq!(r.unwrap_err(), Refusal::UNREACHABLE);
        // Moved (a new session since): the new target is used.
        let src = fake(Ok(target(closed)), vec![Ok(target(live))]);
        let (t, _tcp) = connect(&src, "t", target(closed)).await.unwrap();
        assert_eq!(t.port, live);
        // Moved somewhere unreachable too: 502.
        let other = closed_port().await;
        let src = fake(Ok(target(closed)), vec![Ok(target(other))]);
        let r = connect(&src, "t", target(closed)).await.map(|(t, _)| t);
        assert_eq!(r.unwrap_err(), Refusal::UNREACHABLE);
        assert!(
            src.rechecks.lock().unwrap().is_empty(),
            "the unreachable target was re-checked"
        );
    }

    #[test]
    fn limits_and_ip_binding_answer_with_their_refusals() {
        let limits = Limits::new(1, 2);
        let _a = take_slot(&limits, "t", CLIENT).unwrap();
        assert_eq!(
            take_slot(&limits, "t", CLIENT).unwrap_err(),
            Refusal::OVER_TOKEN
        );
        let _b = take_slot(&limits, "u", CLIENT).unwrap();
        assert_eq!(
            take_slot(&limits, "v", CLIENT).unwrap_err(),
            Refusal::OVER_IP
        );
        assert_eq!(Refusal::OVER_IP.status.as_u16(), 429);
        assert_eq!(bound_to_ip(true, &target(1), CLIENT), Ok(()));
        let elsewhere: IpAddr = [192, 0, 2, 8].into();
        assert_eq!(
            bound_to_ip(true, &target(1), elsewhere),
            Err(Refusal::WRONG_IP)
        );
        assert_eq!(bound_to_ip(false, &target(1), elsewhere), Ok(()));
    }

    #[test]
    fn the_101_accepts_the_key_and_echoes_binary_only_when_chosen() {
        // RFC 6455 section 1.3's example key and answer.
        let key = HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ==");
        let res = switching_protocols(&key, Some("binary"));
        assert_eq!(res.status(), StatusCode::SWITCHING_PROTOCOLS);
        let h = res.headers();
        assert_eq!(h["sec-websocket-accept"], "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "Upgrade");
        assert_eq!(h["sec-websocket-protocol"], "binary");
        let res = switching_protocols(&key, None);
        assert!(res.headers().get("sec-websocket-protocol").is_none());
    }
}
