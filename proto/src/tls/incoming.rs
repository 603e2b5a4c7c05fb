//! The server side's accept loop for mutual TLS: each handshake in a task of its own, under a
//! deadline and a per-address cap, never holding up the accept loop.
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tokio_rustls::server::TlsStream;
use tokio_stream::Stream;

/// Longest a client may take to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Handshakes under way at once; further connections wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 256;

/// Handshakes under way at once from one address: past it, a new connection from there is
/// closed at once, so one peer opening silent connections cannot hold every slot.
const MAX_HANDSHAKES_PER_IP: usize = 16;

/// One handshake's place in the per-address count, given back on drop.
struct IpSlot {
    map: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl IpSlot {
    fn take(
        map: &Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
        ip: std::net::IpAddr,
    ) -> Option<IpSlot> {
        let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= MAX_HANDSHAKES_PER_IP {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            map: map.clone(),
            ip,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// Connections from `listener` that completed a TLS handshake with `config`. Each handshake
/// runs in its own task under [`HANDSHAKE_TIMEOUT`]; failures are logged and counted
/// (`vncdispatch_auth_refusals_total{reason="tls_handshake"}`) and never end the stream.
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> impl Stream<Item = io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let per_ip: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>> =
        Arc::default();
    tokio::spawn(async move {
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; pausing 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let ip = peer.ip().to_canonical();
            let Some(slot) = IpSlot::take(&per_ip, ip) else {
                tracing::info!(%peer, "too many TLS handshakes under way from this address");
                crate::metrics::auth_refusal("tls_handshakes_per_ip");
                continue;
            };
            let acceptor = acceptor.clone();
            let handed = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let _slot = slot;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = handed.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::info!(%peer, error = %e, "TLS handshake refused");
                        crate::metrics::auth_refusal("tls_handshake");
                    }
                    Err(_) => {
                        tracing::info!(%peer, "TLS handshake timed out");
                        crate::metrics::auth_refusal("tls_handshake");
                    }
                }
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
