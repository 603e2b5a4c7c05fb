//! A client of the dispatcher's original HTTP route (`dispatcher serve --http-listen`), as a
//! portal written for the original calls it: a plain HTTP/1.1 GET, JSON back; over TLS with a
//! role's certificate when the dispatcher serves TLS.
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET path` as the original's Node portal sent it; the status and the JSON body.
pub async fn get(
    addr: std::net::SocketAddr,
    path: &str,
    bearer: Option<&str>,
) -> (u16, serde_json::Value) {
    let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    get_on(s, addr, path, bearer).await
}

/// The same over any connection (plain TCP or TLS).
pub async fn get_on<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
    addr: std::net::SocketAddr,
    path: &str,
    bearer: Option<&str>,
) -> (u16, serde_json::Value) {
    let auth = bearer
        .map(|b| format!("Authorization: Bearer {b}\r\n"))
        .unwrap_or_default();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut raw))
        .await
        .expect("answered in time")
        .expect("read");
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    (status, serde_json::from_str(body).expect("a JSON body"))
}

/// A TLS connection to the route as a client of `role` (HTTP/1.1 offered in ALPN, as curl and
/// Python do); Err if the handshake fails.
pub async fn tls_to(
    pki: &crate::pki::TestPki,
    role: vncdispatch_proto::roles::Role,
    addr: std::net::SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let creds = pki.creds(role);
    let mut cfg = (*creds
        .client_config_for(vncdispatch_proto::roles::Role::Dispatcher)
        .expect("client config"))
    .clone();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await?;
    // TLS 1.3 reports a refused client certificate only on the first read or write.
    tokio::io::AsyncWriteExt::flush(&mut tls).await?;
    Ok(tls)
}
