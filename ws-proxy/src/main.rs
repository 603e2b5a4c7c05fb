//! The `ws-proxy` command: serve noVNC and relay its WebSocket connections to VNC servers.
#![forbid(unsafe_code)]
use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use vncdispatch_proto::bearer::{BearerAuth, SharedSecret};
use vncdispatch_proto::tls::{Credentials, TlsFiles};
use ws_proxy::http::{Proxy, ProxyConfig};
use ws_proxy::relay::RelayLimits;
use ws_proxy::token::TokenSource;
use ws_proxy::token::dispatcher::DispatcherTokens;
use ws_proxy::token::file::FileTokens;

/// vncdispatch ws-proxy: a websockify-compatible WebSocket-to-TCP relay for noVNC.
///
/// Tokens come from the dispatcher (--dispatcher) or a websockify token file or directory
/// (--token-file). Every option can also be set through the environment variable shown.
#[derive(Debug, Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve noVNC and relay WebSocket connections.
    Serve(Box<ServeArgs>),
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// TOML file of settings keyed by these options' long names (`listen = "…"`); the
    /// command line and environment override it.
    #[arg(long, env = "WS_PROXY_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, env = "WS_PROXY_LISTEN", default_value = "0.0.0.0:6080")]
    listen: SocketAddr,
    /// Resolve tokens through this dispatcher.
    #[arg(long, env = "WS_PROXY_DISPATCHER", conflicts_with = "token_file")]
    dispatcher: Option<String>,
    /// The dispatcher's API secret file, if it requires one.
    #[arg(long, env = "WS_PROXY_DISPATCHER_SECRET_FILE")]
    dispatcher_secret_file: Option<PathBuf>,
    /// CA bundle (PEM) the dispatcher's certificate must chain to. With --cert and --key,
    /// tokens are resolved over mutual TLS (then --dispatcher is https://HOST:PORT).
    #[arg(long, env = "WS_PROXY_CA", requires = "dispatcher")]
    ca: Option<PathBuf>,
    /// This proxy's client certificate for the dispatcher (PEM, role proxy: it may resolve
    /// tokens and nothing else).
    #[arg(long, env = "WS_PROXY_CERT", requires = "dispatcher")]
    cert: Option<PathBuf>,
    /// The client certificate's private key (PEM, mode 0600).
    #[arg(long, env = "WS_PROXY_KEY", requires = "dispatcher")]
    key: Option<PathBuf>,
    /// Serve plain HTTP on a non-loopback --listen (e.g. behind a reverse proxy that does
    /// TLS) and allow an http:// dispatcher that is not on loopback. Tokens and, in
    /// auth-proxy mode, VNC passwords then cross that network in clear. Logged as a warning.
    #[arg(long, env = "WS_PROXY_INSECURE_PLAINTEXT")]
    insecure_plaintext: bool,
    /// Resolve tokens from a websockify token file or directory (`token: host:port` lines).
    #[arg(long, env = "WS_PROXY_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The noVNC library under the built-in viewer page ("" to serve no files). Default: the
    /// pinned release scripts/install-deps.sh puts in /usr/local/share/vncdispatch/novnc,
    /// else Debian's novnc package in /usr/share/novnc.
    #[arg(long, env = "WS_PROXY_WEB", value_parser = any_path)]
    web: Option<PathBuf>,
    /// Origins allowed besides the proxy's own (repeatable; `*` allows any — not advised).
    #[arg(
        long = "allowed-origin",
        env = "WS_PROXY_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    allowed_origins: Vec<String>,
    /// Refuse WebSocket requests that carry no Origin header.
    #[arg(long, env = "WS_PROXY_REQUIRE_ORIGIN")]
    require_origin: bool,
    /// Accept a token only from the remote IP recorded at Dispatch.
    #[arg(long, env = "WS_PROXY_BIND_TOKEN_TO_IP")]
    bind_token_to_ip: bool,
    /// Proxies whose X-Forwarded-For is trusted for the client IP (repeatable).
    #[arg(
        long = "trusted-proxy",
        env = "WS_PROXY_TRUSTED_PROXIES",
        value_delimiter = ','
    )]
    trusted_proxies: Vec<IpAddr>,
    /// Concurrent connections allowed per token.
    #[arg(long, env = "WS_PROXY_MAX_PER_TOKEN", default_value_t = 2)]
    max_per_token: usize,
    /// Concurrent connections allowed per client IP.
    #[arg(long, env = "WS_PROXY_MAX_PER_IP", default_value_t = 64)]
    max_per_ip: usize,
    /// Failed token attempts allowed per client IP (IPv6: per /64) and minute before its
    /// requests are refused with 429 without a lookup (0: no limit).
    #[arg(long, env = "WS_PROXY_MAX_TOKEN_FAILURES", default_value_t = 30)]
    max_token_failures: u32,
    /// Time allowed for a request's headers (slow clients are cut off).
    #[arg(long, env = "WS_PROXY_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    handshake_timeout: Duration,
    /// Largest WebSocket message from a browser, in bytes.
    #[arg(long, env = "WS_PROXY_MAX_MESSAGE", default_value_t = 1 << 20)]
    max_message: usize,
    /// Ping browsers this often (keeps middleboxes from dropping idle connections).
    #[arg(long, env = "WS_PROXY_PING_INTERVAL", default_value = "30s", value_parser = nonzero_duration)]
    ping_interval: Duration,
    /// Close connections that send nothing, not even a pong, for this long.
    #[arg(long, env = "WS_PROXY_IDLE_TIMEOUT", default_value = "2m", value_parser = nonzero_duration)]
    idle_timeout: Duration,
    /// Re-check open connections' tokens this often: ended sessions are closed, and with
    /// --dispatcher each re-check renews the session's client lease, which keeps a desktop in
    /// use alive past its token's expiry. Keep it well under the dispatcher's --lease (90s).
    #[arg(long, env = "WS_PROXY_RECHECK_INTERVAL", default_value = "30s", value_parser = nonzero_duration)]
    recheck_interval: Duration,
    /// Log in to the VNC server for the browser and offer it "None" (the VNC password never
    /// reaches the browser). Needs --dispatcher.
    #[arg(long, env = "WS_PROXY_AUTH_PROXY", requires = "dispatcher")]
    auth_proxy: bool,
    /// In auth-proxy mode, also log in to desktops whose session carries no certificate pin
    /// (agents before VeNCrypt, `--rfb-security vnc`) with VNC authentication in clear:
    /// the challenge, and every keystroke, then cross the network unencrypted. Refused by
    /// default; each such login is logged as a warning.
    #[arg(long, env = "WS_PROXY_ALLOW_UNPINNED", requires = "auth_proxy")]
    allow_unpinned: bool,
    /// After SIGTERM, how long open sessions may continue before they are closed.
    #[arg(long, env = "WS_PROXY_DRAIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// Serve HTTPS and wss with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "WS_PROXY_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) for --tls-cert.
    #[arg(long, env = "WS_PROXY_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (off unless set; keep it off public
    /// networks).
    #[arg(long, env = "WS_PROXY_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Log lines as JSON objects.
    #[arg(long, env = "WS_PROXY_LOG_JSON")]
    log_json: bool,
}

/// A rustls server configuration for browsers (HTTPS, wss) from PEM files.
fn tls_config(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Arc<tokio_rustls::rustls::ServerConfig>, String> {
    use vncdispatch_proto::tls::{load_certs, load_key};
    let certs = load_certs("--tls-cert", cert).map_err(|e| e.to_string())?;
    let key = load_key("--tls-key", key, false).map_err(|e| e.to_string())?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut cfg = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("--tls-cert/--tls-key: {e}"))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

fn main() -> ExitCode {
    let Command::Serve(args) = vncdispatch_proto::config::parse::<Cli>().command;
    vncdispatch_proto::serve::init_logging(args.log_json, "info");
    vncdispatch_proto::config::log_config_file(args.config.as_deref());
    // Two descriptors per relayed connection: the browser's and the desktop's.
    vncdispatch_proto::serve::raise_open_files_limit(2);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ws-proxy: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Inside the runtime: the dispatcher client's lazy channel needs one.
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => match tls_config(c, k) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("ws-proxy: {e}");
                return ExitCode::from(vncdispatch_proto::serve::EX_USAGE);
            }
        },
        _ => None,
    };
    if let Err(e) = plaintext_allowed(&args) {
        eprintln!("ws-proxy: {e}");
        return ExitCode::from(vncdispatch_proto::serve::EX_USAGE);
    }
    let tokens = match rt.block_on(async { token_source(&args) }) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("ws-proxy: {e}");
            return ExitCode::from(vncdispatch_proto::serve::EX_USAGE);
        }
    };
    match rt.block_on(serve(*args, tokens, tls)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ws-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Refuses plaintext where a network could read it — a non-loopback listener without
/// --tls-cert, an http:// dispatcher off loopback — unless --insecure-plaintext names it.
fn plaintext_allowed(a: &ServeArgs) -> Result<(), String> {
    // Parsed as the HTTP stack will read it (`HTTP://` is http too).
    let dispatcher_in_clear = a.dispatcher.as_deref().and_then(|url| {
        let (scheme, host) = vncdispatch_proto::tls::scheme_and_host(url)?;
        (scheme == "http" && !vncdispatch_proto::tls::is_loopback_host(&host))
            .then(|| url.to_owned())
    });
    let listen_in_clear = a.tls_cert.is_none() && !a.listen.ip().is_loopback();
    if a.insecure_plaintext {
        if listen_in_clear || dispatcher_in_clear.is_some() {
            tracing::warn!(
                "--insecure-plaintext: tokens (and, with --auth-proxy, VNC passwords) cross the network in clear"
            );
        }
        return Ok(());
    }
    if listen_in_clear {
        return Err(format!(
            "refusing to serve plain HTTP on {}: tokens in URLs would cross the network in clear. \
             Either give --tls-cert and --tls-key, or listen on loopback only (--listen \
             127.0.0.1:PORT, e.g. behind a reverse proxy), or add --insecure-plaintext",
            a.listen
        ));
    }
    if let Some(url) = dispatcher_in_clear {
        return Err(format!(
            "refusing to reach the dispatcher at {url} in clear: give --ca, --cert and --key \
             (role proxy, from `dispatcher pki issue --role proxy`) and an https:// URL, or add \
             --insecure-plaintext"
        ));
    }
    Ok(())
}

fn token_source(a: &ServeArgs) -> Result<Arc<dyn TokenSource>, String> {
    match (&a.dispatcher, &a.token_file) {
        (Some(url), None) => {
            let auth = match &a.dispatcher_secret_file {
                Some(p) => SharedSecret::from_file(p)
                    .and_then(|s| s.client_auth())
                    .map_err(|e| format!("--dispatcher-secret-file: {e}"))?,
                None => BearerAuth::none(),
            };
            let files = TlsFiles::from_flags(a.ca.clone(), a.cert.clone(), a.key.clone())
                .map_err(|e| e.to_string())?;
            let creds = match files {
                Some(f) => Some(Credentials::load(&f).map_err(|e| e.to_string())?),
                None => None,
            };
            let src = DispatcherTokens::new(
                url,
                auth,
                creds.as_ref(),
                Duration::from_secs(5),
                Duration::from_secs(1),
            )
            .map_err(|e| format!("--dispatcher: {e}"))?;
            Ok(Arc::new(src))
        }
        (None, Some(path)) => Ok(Arc::new(
            FileTokens::open(path).map_err(|e| format!("--token-file: {e}"))?,
        )),
        _ => Err("give --dispatcher URL or --token-file PATH".into()),
    }
}

async fn serve(
    a: ServeArgs,
    tokens: Arc<dyn TokenSource>,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
) -> anyhow::Result<()> {
    vncdispatch_proto::metrics::install(a.metrics_listen).map_err(anyhow::Error::msg)?;
    let web_dir = web_dir(a.web.as_deref());
    for o in &a.allowed_origins {
        ws_proxy::upgrade::checks::allowed_origin(o)
            .map_err(|e| anyhow::anyhow!("--allowed-origin {e}"))?;
    }
    let cfg = ProxyConfig {
        web_dir,
        allowed_origins: a.allowed_origins,
        require_origin: a.require_origin,
        bind_to_ip: a.bind_token_to_ip,
        trusted_proxies: a.trusted_proxies,
        max_per_token: a.max_per_token,
        max_per_ip: a.max_per_ip,
        max_token_failures: a.max_token_failures,
        handshake_timeout: a.handshake_timeout,
        max_message: a.max_message,
        auth_proxy: a.auth_proxy,
        allow_unpinned: a.allow_unpinned,
        relay: RelayLimits {
            ping_interval: a.ping_interval,
            idle_timeout: a.idle_timeout,
            recheck_interval: a.recheck_interval,
        },
        drain_timeout: a.drain_timeout,
        tls,
    };
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("binding {}", a.listen))?;
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "sd_notify READY failed");
    }
    ws_proxy::http::run(
        listener,
        Proxy::new(cfg, tokens),
        vncdispatch_proto::serve::shutdown_signal(),
    )
    .await;
    Ok(())
}

/// The noVNC directory to serve, saying in the log which noVNC that is.
fn web_dir(given: Option<&std::path::Path>) -> Option<PathBuf> {
    use ws_proxy::viewer::{NOVNC_DIR, default_web_dir, novnc_version};
    let dir = match given {
        Some(d) if d.as_os_str().is_empty() => return None,
        Some(d) => d.to_owned(),
        None => match default_web_dir() {
            Some(d) => d.to_owned(),
            None => {
                tracing::warn!(
                    "no noVNC found (scripts/install-deps.sh installs it in {NOVNC_DIR}); the viewer page will not load"
                );
                return None;
            }
        },
    };
    if !dir.join("core").join("rfb.js").is_file() {
        tracing::warn!(dir = %dir.display(), "no core/rfb.js there: the viewer page needs noVNC's library (scripts/install-deps.sh installs it in {NOVNC_DIR})");
    }
    match novnc_version(&dir) {
        Some(version) => tracing::info!(dir = %dir.display(), %version, "serving noVNC"),
        None => {
            tracing::info!(dir = %dir.display(), "serving noVNC of unknown version (no package.json: Debian's package?)")
        }
    }
    Some(dir)
}

/// A duration that is not zero: a relay's timers cannot tick every 0 s.
fn nonzero_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be longer than 0s".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

/// A path that may be empty (clap's own path parser refuses "", which means "no files" here).
fn any_path(s: &str) -> Result<PathBuf, std::convert::Infallible> {
    Ok(PathBuf::from(s))
}
