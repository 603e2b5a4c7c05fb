//! The relay: WebSocket binary messages to the VNC server's TCP stream and back.
//!
//! Backpressure, not buffering: each direction awaits its write before reading more, so a slow
//! browser slows the VNC server down instead of growing memory. Within that, what is already
//! there goes out together: browser messages received back to back are one write to the VNC
//! server, and what the server has ready is fed as messages and flushed once (1 KiB messages
//! cost a syscall per batch, not per message; `docs/bench/relay.txt`). Pings every `ping_interval`
//! keep middleboxes from dropping idle connections; a client that neither sends nor answers
//! for `idle_timeout` is closed. Every `recheck_interval` the token is re-checked with the
//! dispatcher as *attached*, which renews the session's lease: a desktop in use is never cut
//! at its token's expiry. The connection closes when a re-check finds the session ended, and
//! on forced shutdown.
use crate::token::TokenSource;
use bytes::BytesMut;
use futures_util::{FutureExt, SinkExt, StreamExt};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};
use tokio::io::AsyncWriteExt;
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

/// Byte counts of a finished relay, and why it ended.
#[derive(Debug, Default, Clone)]
pub struct Relayed {
    /// Browser to VNC server.
    pub up: u64,
    /// VNC server to browser.
    pub down: u64,
    /// Why it ended, as a short code (`browser_closed`, `session_ended`, `idle_timeout`,
    /// `proxy_shutting_down`, ...): the close reason we sent, in snake case.
    pub ended: String,
}

/// Why the relay ended, for the log and the close frame (`None`: the browser closed first).
fn close(code: CloseCode, reason: &str) -> Option<CloseFrame> {
    Some(CloseFrame {
        code,
        reason: reason.to_owned().into(),
    })
}

/// The connection to the VNC server: plain TCP, or TLS (VeNCrypt, auth-proxy mode with a
/// pinned certificate).
#[derive(Debug)]
pub enum Upstream {
    /// RFB in clear.
    Plain(TcpStream),
    /// RFB inside VeNCrypt's TLS.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Reads what the VNC server sent into `buf`, which is allocated when data arrives so that
/// an idle connection holds no read buffer.
trait ChunkRead {
    fn read_chunk<'a>(
        &'a mut self,
        buf: &'a mut BytesMut,
    ) -> impl std::future::Future<Output = std::io::Result<usize>> + Send + 'a;
}

/// Size of the read buffer towards the VNC server.
const READ_BUF: usize = 64 * 1024;
/// Most fed to the browser before a flush: what was readable at once is sent in one write,
/// up to this much (backpressure still holds: the flush is awaited before reading more).
const DOWN_BATCH: usize = 256 * 1024;
/// The buffer coalescing browser messages into one write to the VNC server (input events are
/// a few bytes each); larger messages go straight through.
const UP_BUF: usize = 16 * 1024;

/// Room for the next read: the spare capacity left after the last chunk was split off, or a
/// fresh buffer (which reuses the old allocation once the sent chunks are gone).
fn make_room(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_BUF / 4 {
        buf.reserve(READ_BUF);
    }
}

impl ChunkRead for tokio::net::tcp::OwnedReadHalf {
    async fn read_chunk(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        use tokio::io::AsyncReadExt;
        // Room only once there is something to read; then `read_buf`, not `try_read_buf`: a
        // read shorter than the room drained the socket, and tokio then forgets its readiness,
        // so asking whether more is already there costs no syscall (`try_read_buf` keeps the
        // readiness until a read fails: one more recvfrom per burst).
        self.readable().await?;
        make_room(buf);
        self.read_buf(buf).await
    }
}

impl<T: tokio::io::AsyncRead + Send> ChunkRead for tokio::io::ReadHalf<T> {
    async fn read_chunk(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        use tokio::io::AsyncReadExt;
        // TLS has records to decrypt; rustls holds its own buffers either way.
        make_room(buf);
        self.read_buf(buf).await
    }
}

/// Browser messages on their way to the VNC server: gathered while more are already there and
/// written together (input events are a few bytes each), larger ones written straight
/// through. The buffer is allocated when a message arrives and given back once written, so an
/// idle connection holds none (a `BufWriter` would keep its 16 KiB for the connection's life).
struct Coalesce<'a, W> {
    w: &'a mut W,
    buf: Vec<u8>,
}

impl<'a, W: tokio::io::AsyncWrite + Unpin> Coalesce<'a, W> {
    fn new(w: &'a mut W) -> Self {
        Coalesce { w, buf: Vec::new() }
    }

    /// Queues `data`, writing what is queued first when it would not fit.
    async fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        if self.buf.len() + data.len() > UP_BUF {
            self.write_queued().await?;
        }
        if data.len() >= UP_BUF {
            return self.w.write_all(data).await;
        }
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(UP_BUF); // never more, however it fills
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    async fn write_queued(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.w.write_all(&self.buf).await?;
        }
        self.buf = Vec::new();
        Ok(())
    }

    /// Writes what is queued and flushes the stream (TLS holds records until flushed).
    async fn flush(&mut self) -> std::io::Result<()> {
        self.write_queued().await?;
        self.w.flush().await
    }
}

/// Relays until either side ends or a limit closes the connection.
///
/// The two directions run concurrently: a relay that awaited its write to the VNC server while
/// not reading from it could deadlock with a server that is itself blocked writing to us (both
/// sides' buffers full), which a large paste in both directions at once causes.
#[allow(clippy::too_many_arguments)]
pub async fn relay<S>(
    ws: WebSocketStream<S>,
    upstream: Upstream,
    pending: Vec<u8>,
    limits: RelayLimits,
    token: String,
    tokens: Arc<dyn TokenSource>,
    cancel: CancellationToken,
) -> Relayed
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let ends = (pending, limits, token, tokens, cancel);
    match upstream {
        Upstream::Plain(tcp) => {
            let (r, w) = tcp.into_split();
            relay_halves(ws, r, w, ends).await
        }
        Upstream::Tls(tls) => {
            let (r, w) = tokio::io::split(*tls);
            relay_halves(ws, r, w, ends).await
        }
    }
}

/// What ends or feeds a relay besides its two streams (see [`relay`]).
type Ends = (
    Vec<u8>,
    RelayLimits,
    String,
    Arc<dyn TokenSource>,
    CancellationToken,
);

async fn relay_halves<S, R, W>(
    ws: WebSocketStream<S>,
    mut tcp_r: R,
    mut tcp_w: W,
    (pending, limits, token, tokens, cancel): Ends,
) -> Relayed
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    R: ChunkRead,
    W: tokio::io::AsyncWrite + Unpin,
{
    let (sink, mut stream) = ws.split();
    let sink = tokio::sync::Mutex::new(sink);
    let up_bytes = AtomicU64::new(0);
    let down_bytes = AtomicU64::new(0);
    let started = tokio::time::Instant::now();
    // Milliseconds since `started` when the browser was last heard from.
    let last_heard = AtomicU64::new(0);
    let heard = || last_heard.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
    let up_counter =
        metrics::counter!("vncdispatch_wsproxy_relayed_bytes_total", "direction" => "up");
    let down_counter =
        metrics::counter!("vncdispatch_wsproxy_relayed_bytes_total", "direction" => "down");

    // Browser to VNC server.
    let up = async {
        if !pending.is_empty() {
            if tcp_w.write_all(&pending).await.is_err() {
                return close(CloseCode::Away, "VNC server closed the connection");
            }
            up_bytes.fetch_add(pending.len() as u64, Ordering::Relaxed);
        }
        // Messages already received are written together: flushed once none is waiting.
        let mut tcp_w = Coalesce::new(&mut tcp_w);
        loop {
            let next = match stream.next().now_or_never() {
                Some(next) => next,
                None => {
                    if tcp_w.flush().await.is_err() {
                        return close(CloseCode::Away, "VNC server closed the connection");
                    }
                    stream.next().await
                }
            };
            match next {
                Some(Ok(Message::Binary(data))) => {
                    heard();
                    if tcp_w.write(&data).await.is_err() {
                        return close(CloseCode::Away, "VNC server closed the connection");
                    }
                    up_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                    up_counter.increment(data.len() as u64);
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {
                    heard();
                    // Input already received goes first: the sink may be busy with a batch
                    // to a slow browser for a while.
                    if tcp_w.flush().await.is_err() {
                        return close(CloseCode::Away, "VNC server closed the connection");
                    }
                    // Sends the queued pong.
                    let _ = sink.lock().await.flush().await;
                }
                // As websockify: VNC is binary, and a text frame means a confused client.
                Some(Ok(Message::Text(_))) => {
                    return close(CloseCode::Unsupported, "binary frames only");
                }
                // tungstenite has queued the reply to a close; sending it (and what the
                // browser sent before it) is all that is left.
                Some(Ok(Message::Close(_))) | None => {
                    let _ = tcp_w.flush().await;
                    return None;
                }
                Some(Ok(Message::Frame(_))) => {}
                Some(Err(tokio_tungstenite::tungstenite::Error::Capacity(e))) => {
                    tracing::warn!(error = %e, "browser sent an oversize message");
                    return close(CloseCode::Size, "message too big");
                }
                Some(Err(tokio_tungstenite::tungstenite::Error::Utf8(_))) => {
                    return close(CloseCode::Invalid, "invalid UTF-8");
                }
                Some(Err(e)) => {
                    tracing::info!(error = %e, "WebSocket error from the browser");
                    return close(CloseCode::Protocol, "protocol error");
                }
            }
        }
    };

    // VNC server to browser, with the heartbeat.
    let down = async {
        // Allocated when the server sends: an idle connection holds no buffer.
        let mut buf = BytesMut::new();
        // Not `interval` and its first tick: that tick, though due at once, waits for the
        // timer wheel's next millisecond, and the server's first bytes (its RFB banner) with
        // it (docs/bench/relay.txt, "opened + one echo").
        let first_ping = tokio::time::Instant::now() + limits.ping_interval;
        let mut ping = tokio::time::interval_at(first_ping, limits.ping_interval);
        let server_closed = || close(CloseCode::Normal, "VNC server closed the connection");
        loop {
            tokio::select! {
                read = tcp_r.read_chunk(&mut buf) => {
                    let Ok(n @ 1..) = read else { return server_closed() };
                    // Each chunk is one message, handed over without a copy of our own
                    // (tungstenite frames it into its write buffer); what is readable at once
                    // goes out in one flush (chunks over its 16 KiB buffer are written as fed).
                    let mut sink = sink.lock().await;
                    let (mut fed, mut n) = (0, n);
                    // True when the server closed right after what was fed.
                    let ended = loop {
                        if sink.feed(Message::Binary(buf.split().freeze())).await.is_err() {
                            return close(CloseCode::Away, "");
                        }
                        fed += n;
                        if fed >= DOWN_BATCH {
                            break false;
                        }
                        match tcp_r.read_chunk(&mut buf).now_or_never() {
                            Some(Ok(more @ 1..)) => n = more,
                            Some(_) => break true,
                            None => break false,
                        }
                    };
                    if sink.flush().await.is_err() {
                        return close(CloseCode::Away, "");
                    }
                    drop(sink);
                    down_bytes.fetch_add(fed as u64, Ordering::Relaxed);
                    down_counter.increment(fed as u64);
                    if ended {
                        return server_closed();
                    }
                    // Give the buffer back between bursts: an idle desktop's connection then
                    // holds none (a burst cut at DOWN_BATCH just allocates the next one).
                    buf = BytesMut::new();
                },
                _ = ping.tick() => {
                    if sink.lock().await.send(Message::Ping(Vec::new().into())).await.is_err() {
                        return close(CloseCode::Away, "");
                    }
                }
            }
        }
    };

    // Limits: idle browser, session ended (the re-check also renews the lease), shutdown.
    let idle = async {
        loop {
            let quiet_for = started
                .elapsed()
                .saturating_sub(Duration::from_millis(last_heard.load(Ordering::Relaxed)));
            if quiet_for >= limits.idle_timeout {
                return close(CloseCode::Policy, "idle timeout");
            }
            tokio::time::sleep(limits.idle_timeout - quiet_for).await;
        }
    };
    let revoked = async {
        // The first re-check is at once: the session's lease starts when the relay does, not
        // one interval later (a token near its expiry would lapse meanwhile).
        let next = tokio::time::Instant::now() + limits.recheck_interval;
        let mut recheck = tokio::time::interval_at(next, limits.recheck_interval);
        let mut warned = false;
        loop {
            match tokens.recheck(&token).await {
                Err(crate::token::TokenError::Unknown) => {
                    return close(CloseCode::Policy, "session ended");
                }
                Ok(t) if !warned => {
                    // Less lease left than until our next renewal: the dispatcher's --lease is
                    // too short for --recheck-interval, and a desktop in use could lapse.
                    let left = t
                        .lease_until
                        .and_then(|l| l.duration_since(SystemTime::now()).ok());
                    if left.is_some_and(|left| left < limits.recheck_interval) {
                        warned = true;
                        tracing::warn!(
                            lease_left = ?left,
                            recheck_interval = ?limits.recheck_interval,
                            "the dispatcher's --lease is shorter than this proxy's --recheck-interval: desktops in use may be stopped; shorten --recheck-interval or lengthen --lease"
                        );
                    }
                }
                _ => {}
            }
            recheck.tick().await;
        }
    };
    let reason = tokio::select! {
        r = up => r,
        r = down => r,
        r = idle => r,
        r = revoked => r,
        _ = cancel.cancelled() => close(CloseCode::Away, "proxy shutting down"),
    };
    // The closing handshake, bounded: send our close (or the queued reply to the browser's) and,
    // when we started it, wait for the browser's answer so the close is clean (RFC 6455 7.1.1).
    let ended = reason.as_ref().map_or_else(
        || "browser_closed".to_owned(),
        |f| f.reason.to_lowercase().replace(' ', "_"),
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let mut sink = sink.lock().await;
        match reason {
            Some(frame) => {
                tracing::info!(code = %frame.code, reason = %frame.reason, "closing relayed connection");
                if sink.send(Message::Close(Some(frame))).await.is_ok() {
                    while let Some(Ok(m)) = stream.next().await {
                        if m.is_close() {
                            break;
                        }
                    }
                    let _ = sink.flush().await;
                }
            }
            None => {
                let _ = sink.flush().await;
            }
        }
    })
    .await;
    let _ = tcp_w.shutdown().await;
    Relayed {
        up: up_bytes.load(Ordering::Relaxed),
        down: down_bytes.load(Ordering::Relaxed),
        ended,
    }
}
