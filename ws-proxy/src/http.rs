//! The HTTP side: one hyper HTTP/1.1 server that serves the noVNC client from a directory
//! and hands WebSocket requests to [`crate::upgrade`], which checks them, answers 101 or a
//! refusal, and starts the relay.
//!
//! This module keeps what every connection shares: the accept loop, the TLS accept, the bounds
//! on header size and header read time (slowloris, CVE-2023-43669's huge headers), the drain on
//! shutdown and the static files.
use crate::limits::{Guesses, Limits};
use crate::relay::RelayLimits;
use crate::token::TokenSource;
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::services::ServeDir;

/// A response body: static files stream, everything else is small and in memory.
pub(crate) type Body = UnsyncBoxBody<Bytes, std::io::Error>;

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
    /// In auth-proxy mode, log in with VNC authentication in clear where the session has no
    /// certificate pin (refused otherwise).
    pub allow_unpinned: bool,
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
    /// The settings every request is checked against.
    pub(crate) cfg: ProxyConfig,
    /// Where tokens lead; shared with the relays, which re-check their token.
    pub(crate) tokens: Arc<dyn TokenSource>,
    /// Connections per token and per client IP, across all connections.
    pub(crate) limits: Limits,
    /// Failed token attempts per client, so guessing costs time.
    pub(crate) guesses: Guesses,
    /// noVNC's files, when there is a directory to serve.
    files: Option<ServeDir>,
    /// The viewer page's Content-Security-Policy, made once from the settings.
    page_csp: Option<HeaderValue>,
    /// Cancelled when the drain times out: relays still open close then.
    pub(crate) cancel: CancellationToken,
    /// Every connection task and every relay (which outlives its HTTP connection once
    /// upgraded): the drain waits for all of them.
    pub(crate) tasks: TaskTracker,
}

impl Proxy {
    /// A proxy resolving tokens with `tokens`.
    pub fn new(cfg: ProxyConfig, tokens: Arc<dyn TokenSource>) -> Arc<Self> {
        let files = cfg
            .web_dir
            .as_ref()
            .map(|d| ServeDir::new(d).append_index_html_on_directories(false));
        let page_csp = HeaderValue::from_str(&crate::viewer::content_security_policy(
            &cfg.allowed_origins,
        ))
        .ok();
        let limits = Limits::new(cfg.max_per_token, cfg.max_per_ip);
        let guesses = Guesses::new(cfg.max_token_failures);
        Arc::new(Proxy {
            cfg,
            tokens,
            limits,
            guesses,
            files,
            page_csp,
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
    tracing::info!(addr = ?listener.local_addr().ok(), "ws-proxy serving");
    // The accept loop is a task of its own rather than part of the caller's future (which
    // `main` runs on a thread outside the worker pool): a connection it accepts then starts on
    // the same worker, not handed across threads with a wake-up each way, which cost a third
    // of the rate at which connections open (docs/bench/relay.txt).
    let stop = CancellationToken::new();
    // Should this future be dropped, the loop stops too (and closes the listener).
    let _stop_on_drop = stop.clone().drop_guard();
    let mut accepting = tokio::spawn(accept(listener, proxy.clone(), stop.clone()));
    let ended_early = tokio::select! {
        _ = shutdown => false,
        _ = &mut accepting => true,
    };
    stop.cancel();
    if ended_early {
        // Only a panic ends it: stop rather than run on without accepting.
        tracing::error!("the accept loop ended unexpectedly; draining and stopping");
    } else {
        // The listener is closed once the loop has returned.
        let _ = accepting.await;
    }
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

/// Accepts connections until `stop`, each served in a task the drain waits for.
async fn accept(listener: TcpListener, proxy: Arc<Proxy>, stop: CancellationToken) {
    loop {
        tokio::select! {
            // Shutdown first: no connection is accepted once it has begun.
            biased;
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    proxy.tasks.spawn(serve_connection(proxy.clone(), stream, peer));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; pausing 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

async fn serve_connection(proxy: Arc<Proxy>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    match proxy.cfg.tls.clone() {
        None => serve_http(proxy, stream, peer).await,
        Some(tls) => {
            // TLS accepts get the same deadline as request heads: a client that never finishes
            // its handshake must not hold a connection (and tonic once stopped accepting after
            // one failed TLS accept; here each accept is its own task).
            let handshake = tokio_rustls::TlsAcceptor::from(tls).accept(stream);
            match tokio::time::timeout(proxy.cfg.handshake_timeout, handshake).await {
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

/// A short plain-text answer (refusals and file-server errors).
pub(crate) fn text(status: StatusCode, msg: &str) -> Response<Body> {
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

/// One request: a WebSocket upgrade goes through the upgrade pipeline, anything else to the
/// static files.
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
        crate::upgrade::websocket(proxy, peer, req).await
    } else {
        files(&proxy, req).await
    })
}

/// Static files: the built-in viewer page (at `/` and `/vnc.html`: no redirect, so nothing
/// here can send a browser off-site), else noVNC's library from its directory; other and odd
/// paths are simply not found.
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
    let mut res = match crate::viewer::asset(&path) {
        Some(asset) => viewer_file(proxy, asset),
        // Only the library: another page there (Debian's vnc_lite.html honours host/port
        // and has no CSP) would undo what the built-in page holds to.
        None if !crate::viewer::library_file(&path) => text(StatusCode::NOT_FOUND, "not found"),
        None => {
            let req =
                Request::from_parts(req.into_parts().0, http_body_util::Empty::<Bytes>::new());
            match tower::ServiceExt::oneshot(files, req).await {
                Ok(r) => r.map(|b| b.boxed_unsync()),
                Err(never) => match never {},
            }
        }
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

/// A built-in viewer file; the page carries its Content-Security-Policy and is never cached
/// (an upgraded ws-proxy serves its own page at once).
fn viewer_file(proxy: &Proxy, asset: crate::viewer::Asset) -> Response<Body> {
    // hyper sends no body in answer to HEAD.
    let mut res = Response::new(
        Full::new(Bytes::from_static(asset.body.as_bytes()))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if asset.page
        && let Some(csp) = &proxy.page_csp
    {
        h.insert(header::CONTENT_SECURITY_POLICY, csp.clone());
    }
    res
}
