//! The relay: WebSocket binary messages to the VNC server's TCP stream and back.
//!
//! Backpressure, not buffering: each direction awaits its write before reading more, so a slow
//! browser slows the VNC server down instead of growing memory. Pings every `ping_interval`
//! keep middleboxes from dropping idle connections; a client that neither sends nor answers
//! for `idle_timeout` is closed. The connection is also closed when its token expires, when a
//! periodic re-check finds the session ended, and on forced shutdown.
use crate::token::TokenSource;
use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;

/// What bounds one relayed connection.
#[derive(Debug, Clone)]
pub struct RelayLimits {
    /// How often to ping the browser.
    pub ping_interval: Duration,
    /// Close after this long without anything from the browser (pongs count).
    pub idle_timeout: Duration,
    /// How often to ask the token source whether the session still exists.
    pub recheck_interval: Duration,
}

/// Byte counts of a finished relay.
#[derive(Debug, Default, Clone, Copy)]
pub struct Relayed {
    /// Browser to VNC server.
    pub up: u64,
    /// VNC server to browser.
    pub down: u64,
}

/// Why the relay ended, for the log and the close frame.
fn close(code: CloseCode, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.to_owned().into(),
    }))
}

/// Relays until either side ends or a limit closes the connection.
#[allow(clippy::too_many_arguments)]
pub async fn relay<S>(
    ws: WebSocketStream<S>,
    mut tcp: TcpStream,
    pending: Vec<u8>,
    limits: RelayLimits,
    expires_at: Option<SystemTime>,
    token: String,
    tokens: Arc<dyn TokenSource>,
    cancel: CancellationToken,
) -> Relayed
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut stats = Relayed::default();
    let (mut sink, mut stream) = ws.split();
    if !pending.is_empty() {
        if tcp.write_all(&pending).await.is_err() {
            return stats;
        }
        stats.up += pending.len() as u64;
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut ping = tokio::time::interval(limits.ping_interval);
    ping.tick().await;
    let mut recheck = tokio::time::interval(limits.recheck_interval);
    recheck.tick().await;
    let mut last_heard = tokio::time::Instant::now();
    let expiry = async {
        match expires_at.and_then(|e| e.duration_since(SystemTime::now()).ok()) {
            Some(left) => tokio::time::sleep(left).await,
            None if expires_at.is_some() => {}
            None => std::future::pending().await,
        }
    };
    tokio::pin!(expiry);
    let reason = loop {
        let idle = tokio::time::sleep_until(last_heard + limits.idle_timeout);
        tokio::select! {
            msg = stream.next() => match msg {
                Some(Ok(Message::Binary(data))) => {
                    last_heard = tokio::time::Instant::now();
                    if tcp.write_all(&data).await.is_err() {
                        break close(CloseCode::Away, "VNC server closed the connection");
                    }
                    stats.up += data.len() as u64;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {
                    last_heard = tokio::time::Instant::now();
                    // Sends the queued pong.
                    let _ = sink.flush().await;
                }
                Some(Ok(Message::Text(_))) => break close(CloseCode::Unsupported, "binary frames only"),
                Some(Ok(Message::Close(_))) | None => break close(CloseCode::Normal, ""),
                Some(Ok(Message::Frame(_))) => {}
                Some(Err(tokio_tungstenite::tungstenite::Error::Capacity(e))) => {
                    tracing::warn!(error = %e, "browser sent an oversize message");
                    break close(CloseCode::Size, "message too big");
                }
                Some(Err(e)) => {
                    tracing::info!(error = %e, "WebSocket error from the browser");
                    break close(CloseCode::Protocol, "protocol error");
                }
            },
            read = tcp.read(&mut buf) => match read {
                Ok(0) | Err(_) => break close(CloseCode::Normal, "VNC server closed the connection"),
                Ok(n) => {
                    if sink.send(Message::Binary(buf[..n].to_vec().into())).await.is_err() {
                        return stats;
                    }
                    stats.down += n as u64;
                }
            },
            _ = ping.tick() => {
                if sink.send(Message::Ping(Vec::new().into())).await.is_err() {
                    return stats;
                }
            }
            _ = idle => break close(CloseCode::Policy, "idle timeout"),
            _ = &mut expiry => break close(CloseCode::Policy, "session expired"),
            _ = recheck.tick() => {
                if matches!(tokens.recheck(&token).await, Err(crate::token::TokenError::Unknown)) {
                    break close(CloseCode::Policy, "session ended");
                }
            }
            _ = cancel.cancelled() => break close(CloseCode::Away, "proxy shutting down"),
        }
    };
    if let Message::Close(Some(f)) = &reason
        && !f.reason.is_empty()
    {
        tracing::info!(reason = %f.reason, "closing relayed connection");
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), sink.send(reason)).await;
    let _ = tcp.shutdown().await;
    stats
}
