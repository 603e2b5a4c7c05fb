//! How the relay benches measure, shared so every bench's numbers mean the same thing.
//!
//! A bench gives a way to open one connection (raw TCP, or a WebSocket through a proxy, after
//! whatever login that way needs) and these functions measure through it:
//! - [`throughput`]: `conns` connections each send their share of `mib` MiB in `msg`-byte
//!   messages while reading the echo back; MiB/s of echoed bytes over the wall time of all.
//! - [`round_trips`]: 64-byte messages one at a time, each timed from send to its whole echo;
//!   p50 and p99 in µs.
//! - [`opens_per_sec`]: connections opened and dropped one after the other for a while.
//!
//! The target always echoes, so every byte sent is counted once, when it comes back.
//!
//! Through a WebSocket, [`pump`] and [`round_trips`] drive the connection by hand once it is
//! open ([`Framed`]): each message is one frame built and masked once, written as it is, and
//! what comes back is counted by walking the frame headers in place. The client then costs
//! what a TCP client does (tungstenite allocates, copies and masks every message), and on a
//! machine whose cores the client shares with the relay a cell compares the relays, not the
//! client libraries.
use futures_util::{SinkExt, StreamExt};
use std::future::Future;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// A client WebSocket over plain TCP, as `tokio_tungstenite::connect_async` returns it.
pub type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// One connection, either raw TCP or WebSocket through a proxy, ready to carry echoed bytes.
#[derive(Debug)]
pub enum Conn {
    /// Raw TCP to the echo (or a TCP relay in front of it).
    Tcp(TcpStream),
    /// A WebSocket whose binary messages a proxy relays to the echo.
    Ws(Box<WsStream>),
}

/// MiB per throughput cell: `BENCH_MIB`, default 64.
pub fn mib_per_cell() -> usize {
    std::env::var("BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

/// Waits until something listens on 127.0.0.1:`port` (10 s at most, then panics).
pub async fn wait_port(port: u16) {
    for _ in 0..500 {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("port {port} never opened");
}

/// Opens a WebSocket to `url` offering the `binary` subprotocol, as noVNC does.
pub async fn ws_connect(url: &str) -> Result<WsStream, String> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = url.into_client_request().map_err(|e| e.to_string())?;
    req.headers_mut().insert(
        "sec-websocket-protocol",
        tokio_tungstenite::tungstenite::http::HeaderValue::from_static("binary"),
    );
    let (ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .map_err(|e| format!("WebSocket to {url}: {e}"))?;
    Ok(ws)
}

impl Conn {
    /// The TCP stream under the connection, one `msg`-byte message as written on it, and for
    /// a WebSocket what counts the echoed payload ([`Framed`]).
    fn into_raw(self, msg: usize) -> (TcpStream, Vec<u8>, Option<Framed>) {
        match self {
            Conn::Tcp(t) => (t, vec![7u8; msg], None),
            Conn::Ws(ws) => (
                Framed::take(*ws),
                Framed::frame(msg),
                Some(Framed::default()),
            ),
        }
    }
}

/// A WebSocket driven by hand after its handshake (see the module's comment): the frames to
/// send are built once; the payload bytes of binary frames received are counted in place.
#[derive(Debug, Default)]
pub struct Framed {
    /// A received frame's header read so far (headers may straddle reads).
    header: Vec<u8>,
    /// Payload bytes of the current frame still to come.
    payload_left: usize,
    /// Whether the current frame's payload is data (binary or continuation), not a ping.
    data: bool,
}

impl Framed {
    /// The raw TCP stream under an open client WebSocket. Nothing arrives unasked after the
    /// last message read (the target echoes; an RFB login ends at ServerInit), so tungstenite
    /// holds no unread bytes.
    pub fn take(ws: WsStream) -> TcpStream {
        match ws.into_inner() {
            tokio_tungstenite::MaybeTlsStream::Plain(t) => t,
            _ => panic!("the bench speaks ws://, not wss://"),
        }
    }

    /// One binary frame of `len` bytes of 7s, masked as a client must (a fixed key: the
    /// relay unmasks whatever key it gets).
    pub fn frame(len: usize) -> Vec<u8> {
        let key = [0x5a, 0x13, 0xc4, 0x7e];
        let mut f = vec![0x82];
        match len {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xffff => {
                f.push(0x80 | 126);
                f.extend((n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend((n as u64).to_be_bytes());
            }
        }
        f.extend(key);
        f.extend((0..len).map(|i| 7 ^ key[i % 4]));
        f
    }

    /// Payload bytes of data frames in `bytes`, the next part of what the server sent.
    pub fn count(&mut self, mut bytes: &[u8]) -> usize {
        let mut got = 0;
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let k = self.payload_left.min(bytes.len());
                self.payload_left -= k;
                if self.data {
                    got += k;
                }
                bytes = &bytes[k..];
                continue;
            }
            self.header.push(bytes[0]);
            bytes = &bytes[1..];
            let h = &self.header;
            if h.len() < 2 {
                continue;
            }
            assert_eq!(h[1] & 0x80, 0, "a server's frames are never masked");
            let len = match h[1] & 0x7f {
                126 if h.len() == 4 => u16::from_be_bytes([h[2], h[3]]) as usize,
                127 if h.len() == 10 => {
                    let mut b = [0; 8];
                    b.copy_from_slice(&h[2..10]);
                    u64::from_be_bytes(b) as usize
                }
                126 | 127 => continue,
                n => n as usize,
            };
            let opcode = h[0] & 0x0f;
            assert_ne!(opcode, 0x8, "the relay closed the WebSocket");
            self.data = opcode <= 0x2;
            self.payload_left = len;
            self.header.clear();
        }
        got
    }
}

/// Reads from `r` into `buf` until `want` payload bytes have come back; panics if the
/// connection ends.
async fn read_echo(
    r: &mut (impl AsyncReadExt + Unpin),
    buf: &mut [u8],
    mut framed: Option<&mut Framed>,
    want: usize,
) {
    let mut got = 0;
    while got < want {
        match r.read(buf).await.expect("read") {
            0 => panic!("the connection closed after {got} bytes"),
            k => {
                got += match framed.as_deref_mut() {
                    Some(f) => f.count(&buf[..k]),
                    None => k,
                }
            }
        }
    }
}

/// Sends `total` bytes in `msg`-byte messages on `conn` and reads the echo; returns the bytes
/// echoed. Panics if the connection breaks (a bench has no use for a partial number).
pub async fn pump(conn: Conn, msg: usize, total: usize) -> usize {
    let n = total / msg;
    let (tcp, message, mut framed) = conn.into_raw(msg);
    let (mut r, mut w) = tcp.into_split();
    let writer = tokio::spawn(async move {
        for _ in 0..n {
            w.write_all(&message).await.expect("write");
        }
        w
    });
    let mut buf = vec![0u8; 256 * 1024];
    read_echo(&mut r, &mut buf, framed.as_mut(), n * msg).await;
    let _ = writer.await;
    n * msg
}

/// MiB/s of `mib` MiB in `msg`-byte messages over `conns` connections from `connect`, all
/// opened before the clock starts.
pub async fn throughput<F, Fut>(mut connect: F, msg: usize, conns: usize, mib: usize) -> f64
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Conn>,
{
    let mut cs = Vec::with_capacity(conns);
    for _ in 0..conns {
        cs.push(connect().await);
    }
    let per = mib * 1024 * 1024 / conns;
    let t = Instant::now();
    let tasks: Vec<_> = cs
        .into_iter()
        .map(|c| tokio::spawn(pump(c, msg, per)))
        .collect();
    let mut bytes = 0;
    for task in tasks {
        bytes += task.await.expect("pump");
    }
    bytes as f64 / t.elapsed().as_secs_f64() / (1024.0 * 1024.0)
}

/// Round trips of 64-byte messages on `conn`, `n` times: (p50, p99) in µs.
pub async fn round_trips(conn: Conn, n: usize) -> (f64, f64) {
    let (mut tcp, message, mut framed) = conn.into_raw(64);
    let mut lat = Vec::with_capacity(n);
    let mut buf = vec![0u8; 4096];
    for _ in 0..n {
        let start = Instant::now();
        tcp.write_all(&message).await.expect("write");
        read_echo(&mut tcp, &mut buf, framed.as_mut(), 64).await;
        lat.push(start.elapsed());
    }
    lat.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    (us(lat[n / 2]), us(lat[n * 99 / 100]))
}

/// One 64-byte message echoed on `conn`: what a connection that has carried something (and
/// so has whatever buffers the relay keeps after use) costs while it then sits idle.
pub async fn echo_once(conn: &mut Conn) {
    match conn {
        Conn::Tcp(t) => {
            let mut buf = [0u8; 64];
            t.write_all(&[1u8; 64]).await.expect("write");
            t.read_exact(&mut buf).await.expect("read");
        }
        Conn::Ws(ws) => {
            ws.send(Message::Binary(vec![1u8; 64].into()))
                .await
                .expect("send");
            let mut got = 0;
            while got < 64 {
                match ws.next().await {
                    Some(Ok(Message::Binary(b))) => got += b.len(),
                    Some(Ok(_)) => {}
                    other => panic!("relay ended: {other:?}"),
                }
            }
        }
    }
}

/// Connections from `connect` opened (and dropped) one after another for `secs` seconds; per s.
pub async fn opens_per_sec<F, Fut>(mut connect: F, secs: f64) -> f64
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Conn>,
{
    let t = Instant::now();
    let mut n = 0;
    while t.elapsed().as_secs_f64() < secs {
        drop(connect().await);
        n += 1;
    }
    n as f64 / t.elapsed().as_secs_f64()
}

/// The median of `xs` (NaN for none): the cell a bench reports from several rounds.
pub fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}
