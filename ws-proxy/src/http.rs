//! The HTTP side: one hyper HTTP/1.1 server that serves the noVNC client from a directory
//! and upgrades WebSocket requests carrying a token (`?token=` on any path, as noVNC's
//! `path=websockify?token=…` sends it, or a `token` cookie) into relayed connections.
//!
//! Every refusal happens before the 101 response, with a status that says why: 400 malformed
//! request, 403 origin or token refused, 429 connection limit, 502 VNC server unreachable.
//! Header size and header read time are bounded (slowloris, CVE-2023-43669's huge headers).
use crate::limits::{Guesses, Limits, Over};
use crate::relay::{RelayLimits, relay};
use crate::token::{Target, TokenError, TokenSource};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::services::ServeDir;
use vncdispatch_proto::redact::token_prefix;

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// Settings of the proxy.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// noVNC's directory; no static files when None.
    pub web_dir: Option<PathBuf>,
    /// Origins (`scheme://host[:port]`) allowed besides the proxy's own; `*` allows any.
    pub allowed_origins: Vec<String>,
    /// Refuse WebSocket requests without an Origin header (non-browser clients send none).
    pub require_origin: bool,
    /// Only the remote IP recorded at Dispatch may use a token.
    pub bind_to_ip: bool,
    /// Proxies whose X-Forwarded-For is believed (for the client IP).
    pub trusted_proxies: Vec<IpAddr>,
    /// Concurrent connections per token.
    pub max_per_token: usize,
    /// Concurrent connections per client IP.
    pub max_per_ip: usize,
    /// Failed token attempts allowed per client and minute (0: no limit).
    pub max_token_failures: u32,
    /// Time allowed for the request head.
    pub handshake_timeout: Duration,
    /// Largest WebSocket message (and frame) from the browser.
    pub max_message: usize,
    /// Log in to the VNC server ourselves and offer the browser "None".
    pub auth_proxy: bool,
    /// Relay limits (ping, idle, re-check).
    pub relay: RelayLimits,
    /// How long open sessions may run on after SIGTERM.
    pub drain_timeout: Duration,
    /// Serve HTTPS/wss with this rustls configuration.
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
}

/// The proxy's shared state.
#[derive(Debug)]
pub struct Proxy {
    cfg: ProxyConfig,
    tokens: Arc<dyn TokenSource>,
    limits: Limits,
    guesses: Guesses,
    files: Option<ServeDir>,
    cancel: CancellationToken,
    // Every connection task and every relay (which outlives its HTTP connection once
    // upgraded): the drain waits for all of them.
    tasks: TaskTracker,
}

impl Proxy {
    /// A proxy resolving tokens with `tokens`.
    pub fn new(cfg: ProxyConfig, tokens: Arc<dyn TokenSource>) -> Arc<Self> {
        let files = cfg
            .web_dir
            .as_ref()
            .map(|d| ServeDir::new(d).append_index_html_on_directories(false));
        let limits = Limits::new(cfg.max_per_token, cfg.max_per_ip);
        let guesses = Guesses::new(cfg.max_token_failures);
        Arc::new(Proxy {
            cfg,
            tokens,
            limits,
            guesses,
            files,
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
        })
    }
}

/// Serves on `listener` until `shutdown`; then stops accepting, lets open connections finish
/// for the drain timeout, closes the rest and returns.
pub async fn run(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let tracker = proxy.tasks.clone();
    tokio::pin!(shutdown);
    tracing::info!(addr = ?listener.local_addr().ok(), "ws-proxy serving");
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tracker.spawn(serve_connection(proxy.clone(), stream, peer));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; pausing 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    drop(listener);
    tracker.close();
    tracing::info!(open = tracker.len(), drain = ?proxy.cfg.drain_timeout, "draining");
    if tokio::time::timeout(proxy.cfg.drain_timeout, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = tracker.len(),
            "drain timeout: closing the remaining connections"
        );
        proxy.cancel.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
    }
    tracing::info!("ws-proxy stopped");
}

async fn serve_connection(proxy: Arc<Proxy>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    match proxy.cfg.tls.clone() {
        None => serve_http(proxy, stream, peer).await,
        Some(tls) => {
            // TLS accepts get the same deadline as request heads: a client that never finishes
            // its handshake must not hold a connection (and tonic once stopped accepting after
            // one failed TLS accept; here each accept is its own task).
            let accept = tokio_rustls::TlsAcceptor::from(tls).accept(stream);
            match tokio::time::timeout(proxy.cfg.handshake_timeout, accept).await {
                Ok(Ok(tls_stream)) => serve_http(proxy, tls_stream, peer).await,
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        }
    }
}

async fn serve_http<S>(proxy: Arc<Proxy>, stream: S, peer: SocketAddr)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn({
        let proxy = proxy.clone();
        move |req| handle(proxy.clone(), peer, req)
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(proxy.cfg.handshake_timeout)
        .max_buf_size(16 * 1024)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
    }
}

fn text(status: StatusCode, msg: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("{msg}\n")))
            .map_err(|n| match n {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn handle(
    proxy: Arc<Proxy>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    Ok(if upgrade {
        websocket(proxy, peer, req).await
    } else {
        files(&proxy, req).await
    })
}

/// Static files from the noVNC directory. `/` is `vnc.html` itself (no redirect, so nothing
/// here can send a browser off-site); odd paths are simply not found.
async fn files(proxy: &Proxy, req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD");
    }
    let Some(files) = proxy.files.clone() else {
        return text(StatusCode::NOT_FOUND, "not found");
    };
    let path = req.uri().path().to_owned();
    let lowered = path.to_ascii_lowercase();
    if path.starts_with("//")
        || path.contains('\\')
        || lowered.contains("%2f")
        || lowered.contains("%5c")
        || path.contains("/../")
    {
        return text(StatusCode::NOT_FOUND, "not found");
    }
    let (mut parts, _) = req.into_parts();
    if path == "/" {
        parts.uri = hyper::Uri::from_static("/vnc.html");
    }
    let req = Request::from_parts(parts, http_body_util::Empty::<Bytes>::new());
    let mut res = match tower::ServiceExt::oneshot(files, req).await {
        Ok(r) => r.map(|b| b.boxed_unsync()),
        Err(never) => match never {},
    };
    let h = res.headers_mut();
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    // The token rides in the page URL: never hand it to other sites as a Referer.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    res
}

/// `token` from the query string, else from a `token` cookie.
fn token_of(req: &Request<Incoming>) -> Option<String> {
    let from_query = req.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("token="))
            .map(|t| t.to_owned())
    });
    from_query.or_else(|| {
        req.headers()
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|c| c.trim().strip_prefix("token=").map(str::to_owned))
    })
}

/// The client's IP: the peer, or the last X-Forwarded-For hop when the peer is a trusted proxy.
fn client_ip(cfg: &ProxyConfig, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
    if cfg.trusted_proxies.contains(&peer.ip())
        && let Some(ip) = headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .and_then(|v| v.trim().parse().ok())
    {
        return ip;
    }
    peer.ip()
}

/// Same-origin (Origin's host:port equals Host) or on the allow-list.
fn origin_ok(cfg: &ProxyConfig, headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return !cfg.require_origin;
    };
    if cfg
        .allowed_origins
        .iter()
        .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
    {
        return true;
    }
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let origin_host = origin.split_once("://").map(|(_, h)| h).unwrap_or("");
    !host.is_empty() && origin_host.eq_ignore_ascii_case(host)
}

fn unreachable(target: &Target) -> Response<Body> {
    tracing::warn!(host = %target.host, port = target.port, "VNC server unreachable");
    refuse(
        StatusCode::BAD_GATEWAY,
        "unreachable",
        "the desktop is not reachable",
    )
}

/// A refused WebSocket request, counted by reason: the ones that keep someone out
/// (`origin`, `unknown_token`, `wrong_ip`, `missing_token`, `token_guessing`) in the
/// auth-refusal series every service has, the rest in ws-proxy's own.
fn refuse(status: StatusCode, reason: &'static str, message: &'static str) -> Response<Body> {
    let series = match reason {
        "origin" | "unknown_token" | "wrong_ip" | "missing_token" | "token_guessing" => {
            "vncdispatch_auth_refusals_total"
        }
        _ => "vncdispatch_wsproxy_refusals_total",
    };
    metrics::counter!(series, "reason" => reason).increment(1);
    text(status, message)
}

async fn websocket(proxy: Arc<Proxy>, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    let cfg = &proxy.cfg;
    let headers = req.headers();
    let key = headers.get("sec-websocket-key").cloned();
    let version_ok = headers
        .get("sec-websocket-version")
        .is_some_and(|v| v == "13");
    let connection_upgrade = headers
        .get(header::CONNECTION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        });
    let (Some(key), true, true, true) = (
        key,
        version_ok,
        connection_upgrade,
        req.method() == Method::GET,
    ) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "not a valid WebSocket request",
        );
    };
    let client = client_ip(cfg, peer, headers);
    if !origin_ok(cfg, headers) {
        let origin = headers
            .get(header::ORIGIN)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        tracing::warn!(%client, origin, "refused: origin not allowed");
        return refuse(StatusCode::FORBIDDEN, "origin", "origin not allowed");
    }
    // websockify only echoes `binary`; clients that offer nothing must work too.
    let offered: Vec<String> = headers
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .collect();
    let protocol = match (offered.is_empty(), offered.iter().any(|p| p == "binary")) {
        (true, _) => None,
        (false, true) => Some("binary"),
        (false, false) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "only the `binary` subprotocol is supported",
            );
        }
    };
    let Some(token) = token_of(&req) else {
        return refuse(StatusCode::BAD_REQUEST, "missing_token", "missing token");
    };
    let span = tracing::info_span!("ws", %client, token = token_prefix(&token));
    let upgrade = Upgrade {
        key,
        protocol,
        client,
        token,
    };
    tracing::Instrument::instrument(accept(proxy, req, upgrade, span.clone()), span).await
}

/// A WebSocket request that passed the checks that need no lookup.
struct Upgrade {
    key: HeaderValue,
    protocol: Option<&'static str>,
    client: IpAddr,
    token: String,
}

/// Resolves the token, applies the limits, connects to the VNC server, answers 101 and hands
/// the connection to the relay.
async fn accept(
    proxy: Arc<Proxy>,
    req: Request<Incoming>,
    up: Upgrade,
    span: tracing::Span,
) -> Response<Body> {
    let cfg = &proxy.cfg;
    let Upgrade {
        key,
        protocol,
        client,
        token,
    } = up;
    if proxy.guesses.blocked(client) {
        tracing::warn!("refused: too many failed token attempts from this client");
        return refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "token_guessing",
            "too many failed attempts; try again in a minute",
        );
    }
    let mut target =
        match tokio::time::timeout(Duration::from_secs(5), proxy.tokens.resolve(&token)).await {
            Ok(Ok(t)) => t,
            Ok(Err(TokenError::Unknown)) => {
                proxy.guesses.failed(client);
                tracing::warn!("refused: unknown or expired token");
                return refuse(
                    StatusCode::FORBIDDEN,
                    "unknown_token",
                    "unknown or expired token",
                );
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "token source failed");
                return refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "token_source_down",
                    "cannot check the token right now",
                );
            }
            Err(_) => {
                return refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "token_source_down",
                    "token check timed out",
                );
            }
        };
    if cfg.bind_to_ip && target.remote_ip.parse::<IpAddr>().ok() != Some(client) {
        tracing::warn!(recorded = %target.remote_ip, "refused: token used from another IP");
        return refuse(
            StatusCode::FORBIDDEN,
            "wrong_ip",
            "token not valid from this address",
        );
    }
    let slot = match proxy.limits.acquire(&token, client) {
        Ok(s) => s,
        Err(over) => {
            tracing::warn!(?over, "refused: connection limit");
            return refuse(
                StatusCode::TOO_MANY_REQUESTS,
                "limit",
                match over {
                    Over::Token => "too many connections with this token",
                    Over::Ip => "too many connections from this address",
                },
            );
        }
    };
    let connect = |t: &Target| {
        let addr = (t.host.clone(), t.port);
        async move { tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await }
    };
    let mut tcp = match connect(&target).await {
        Ok(Ok(s)) => s,
        _ => {
            // The answer may have come from the cache and the session ended since (its Xvnc
            // stopped): ask again, so a revoked token gets 403 rather than a connection to
            // whatever listens on that port now.
            match proxy.tokens.recheck(&token).await {
                Err(TokenError::Unknown) => {
                    tracing::warn!("refused: token revoked since it was cached");
                    return refuse(
                        StatusCode::FORBIDDEN,
                        "unknown_token",
                        "unknown or expired token",
                    );
                }
                Ok(fresh)
                    if (fresh.host.as_str(), fresh.port) != (target.host.as_str(), target.port) =>
                {
                    match connect(&fresh).await {
                        Ok(Ok(s)) => {
                            target = fresh;
                            s
                        }
                        _ => return unreachable(&fresh),
                    }
                }
                _ => return unreachable(&target),
            }
        }
    };
    let _ = tcp.set_nodelay(true);
    if cfg.auth_proxy
        && let Err(e) = crate::authproxy::login(&mut tcp, &target.password).await
    {
        tracing::warn!(error = %e, "auth proxy: VNC login failed");
        return refuse(
            StatusCode::BAD_GATEWAY,
            "vnc_login_failed",
            "the desktop refused the proxy's login",
        );
    }
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
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ProxyConfig {
        ProxyConfig {
            web_dir: None,
            allowed_origins: vec!["https://portal.example.com".into()],
            require_origin: false,
            bind_to_ip: false,
            trusted_proxies: vec![[10, 0, 0, 1].into()],
            max_per_token: 2,
            max_per_ip: 8,
            max_token_failures: 30,
            handshake_timeout: Duration::from_secs(5),
            tls: None,
            max_message: 1 << 20,
            auth_proxy: false,
            relay: RelayLimits {
                ping_interval: Duration::from_secs(30),
                idle_timeout: Duration::from_secs(60),
                recheck_interval: Duration::from_secs(30),
            },
            drain_timeout: Duration::from_secs(5),
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn origins() {
        let c = cfg();
        assert!(origin_ok(
            &c,
            &headers(&[("host", "proxy:6080"), ("origin", "http://proxy:6080")])
        ));
        assert!(origin_ok(
            &c,
            &headers(&[
                ("host", "proxy:6080"),
                ("origin", "https://portal.example.com")
            ])
        ));
        assert!(!origin_ok(
            &c,
            &headers(&[("host", "proxy:6080"), ("origin", "http://evil.example")])
        ));
        assert!(!origin_ok(
            &c,
            &headers(&[
                ("host", "proxy:6080"),
                ("origin", "http://proxy:6080.evil.example")
            ])
        ));
        assert!(
            origin_ok(&c, &headers(&[("host", "proxy:6080")])),
            "no Origin: not a browser"
        );
        assert!(!origin_ok(
            &ProxyConfig {
                require_origin: true,
                ..c
            },
            &headers(&[("host", "proxy:6080")])
        ));
    }

    #[test]
    fn forwarded_for_only_from_trusted_proxies() {
        let c = cfg();
        let h = headers(&[("x-forwarded-for", "198.51.100.7, 192.0.2.9")]);
        assert_eq!(
            client_ip(&c, "10.0.0.1:1".parse().unwrap(), &h),
            "192.0.2.9".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            client_ip(&c, "10.0.0.2:1".parse().unwrap(), &h),
            "10.0.0.2".parse::<IpAddr>().unwrap()
        );
    }
}
