//! What every vncdispatch service shares: the same gRPC limits, health and reflection, an
//! accept loop that survives accept errors, one shutdown signal, logging set up one way, the
//! open-files limit raised one way, and the exit code for configuration errors.
use std::future::Future;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::{Stream, StreamExt, wrappers::TcpListenerStream};

/// Largest request any vncdispatch RPC needs; bigger ones are refused before decoding.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// The layers every vncdispatch gRPC server has: metrics outermost (so refusals are counted
/// as calls too), then the role check.
pub type Layers = tower::layer::util::Stack<
    crate::roles::RoleLayer,
    tower::layer::util::Stack<crate::metrics::GrpcMetricsLayer, tower::layer::util::Identity>,
>;

/// A tonic server with the limits tonic leaves open by default: a per-request deadline,
/// bounded HTTP/2 streams and per-connection concurrency, keepalives that find dead peers.
/// With `tls`, every call must come with a client certificate whose role may call it.
pub fn server(request_timeout: Duration, tls: bool) -> tonic::transport::Server<Layers> {
    tonic::transport::Server::builder()
        .timeout(request_timeout)
        .max_concurrent_streams(Some(256))
        .concurrency_limit_per_connection(256)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .tcp_keepalive(Some(Duration::from_secs(60)))
        .tcp_nodelay(true)
        .layer(crate::metrics::GrpcMetricsLayer)
        .layer(crate::roles::RoleLayer::new(tls))
}

/// Serves `router` on `listener` until `shutdown`: over mutual TLS with `tls`, else plaintext.
pub async fn serve(
    router: tonic::transport::server::Router<Layers>,
    listener: TcpListener,
    tls: Option<std::sync::Arc<tokio_rustls::rustls::ServerConfig>>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    match tls {
        Some(cfg) => {
            router
                .serve_with_incoming_shutdown(crate::tls::tls_incoming(listener, cfg), shutdown)
                .await
        }
        None => {
            router
                .serve_with_incoming_shutdown(incoming(listener), shutdown)
                .await
        }
    }
}

/// Refuses a plaintext listener on anything but loopback unless the operator named the
/// insecure choice: anyone who reaches such a port could call it. The error says the ways
/// forward.
pub fn check_listen(
    addr: std::net::SocketAddr,
    tls: bool,
    insecure_plaintext: bool,
) -> Result<(), String> {
    if tls || addr.ip().is_loopback() {
        return Ok(());
    }
    if insecure_plaintext {
        tracing::warn!(
            %addr,
            "--insecure-plaintext: serving without TLS or client certificates on a non-loopback \
             address; anyone who reaches it can call every RPC"
        );
        return Ok(());
    }
    Err(format!(
        "refusing to listen on {addr} without TLS: anyone who reaches it could call it. \
         Either give --ca, --cert and --key (make them with `dispatcher pki init` and \
         `dispatcher pki issue`), or listen on loopback only (--listen 127.0.0.1:PORT), or, on a \
         network you trust, add --insecure-plaintext"
    ))
}

/// Accepted connections from `listener`. An accept error (EMFILE, ECONNABORTED) is logged and
/// followed by a short pause instead of ending the server or spinning on it.
pub fn incoming(listener: TcpListener) -> impl Stream<Item = std::io::Result<TcpStream>> {
    TcpListenerStream::new(listener).then(|accepted| async move {
        match &accepted {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed; pausing 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        accepted
    })
}

/// gRPC reflection over the whole contract (plus the health service).
pub fn reflection() -> Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::Error,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

/// Raises the soft limit on open files to the hard one, as Go's runtime and most servers do,
/// and logs what is in force: a shell's soft limit (often 1,024) would cap a proxy at a few
/// hundred connections while the hard limit allows far more (systemd units set both). Not for
/// the blade agent, whose children are desktop sessions that should get the limits PAM gives.
pub fn raise_open_files_limit(per_connection: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let limit = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    let connections = limit / per_connection.max(1);
    if limit < 4096 {
        tracing::warn!(
            open_files = limit,
            connections,
            "few open files allowed: about this many connections at once; raise the hard limit (LimitNOFILE= in the unit, or ulimit -Hn)"
        );
    } else {
        tracing::info!(open_files = limit, connections, "open files limit");
    }
}

/// Exit code for configuration errors (sysexits EX_USAGE).
pub const EX_USAGE: u8 = 64;

/// Logs to stderr, filtered by `RUST_LOG` (else `default`), as text or as JSON objects; text
/// in colour only on a terminal (a journal or a log file gets plain lines to grep).
pub fn init_logging(json: bool, default: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
