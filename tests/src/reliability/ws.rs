//! WebSocket clients for the ws-proxy cases of the fault and bad-input suite: connect from a
//! chosen loopback address (ws-proxy limits and binds per client IP), read until the server
//! closes, get through ws-proxy's auth proxy to the desktop as a browser would.
use std::net::SocketAddr;
use std::time::Duration;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{Error, Message};

/// A client connection to ws-proxy.
pub type Ws = WebSocketStream<tokio::net::TcpStream>;

/// Opens `ws://proxy/websockify?token=T` from `from` (a loopback address). On refusal, the
/// HTTP status; 0 when the socket could not be set up, 1 for any other handshake failure.
pub async fn ws_from(proxy: SocketAddr, from: [u8; 4], token: &str) -> Result<Ws, u16> {
    let sock = tokio::net::TcpSocket::new_v4().map_err(|_| 0u16)?;
    sock.bind(SocketAddr::from((from, 0))).map_err(|_| 0u16)?;
    let tcp = sock.connect(proxy).await.map_err(|_| 0u16)?;
    let url = format!("ws://{proxy}/websockify?token={token}");
    match tokio_tungstenite::client_async(url, tcp).await {
        Ok((ws, _)) => Ok(ws),
        Err(Error::Http(r)) => Err(r.status().as_u16()),
        Err(_) => Err(1),
    }
}

/// Closes `ws` (if any) and waits, at most 10 s, until `proxy` has logged the end of all
/// but `still_open` of the relays it started: only then are their slots free under the
/// per-token and per-IP limits (ws-proxy releases a slot after the closing handshake and the
/// upstream shutdown, a moment after the client sees the end). For a proxy one case uses at
/// a time.
pub async fn close_released(
    proxy: &crate::wsproxy::WsProxyProc,
    ws: impl IntoIterator<Item = Ws>,
    still_open: usize,
) {
    for mut ws in ws {
        let _ = ws.close(None).await;
    }
    let until = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = proxy.log();
        let active = log
            .matches("relaying host=")
            .count()
            .saturating_sub(log.matches("relay ended up=").count());
        if active <= still_open {
            return;
        }
        assert!(
            std::time::Instant::now() < until,
            "ws-proxy still relays {active} connections 10 s after the close, {still_open} expected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads until the server closes; the close code (0 if the connection just ended), None if
/// it is still open after `secs`.
pub async fn close_code<S>(ws: &mut WebSocketStream<S>, secs: u64) -> Option<u16>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::StreamExt;
    let until = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        match tokio::time::timeout_at(until, ws.next()).await {
            Err(_) => return None,
            Ok(Some(Ok(Message::Close(f)))) => {
                return Some(f.map(|f| u16::from(f.code)).unwrap_or(0));
            }
            Ok(Some(Ok(_))) => {}
            Ok(_) => return Some(0),
        }
    }
}

/// Reads `n` more bytes of the relayed stream (RFB ignores message boundaries) into `buf`.
async fn fill<S>(
    ws: &mut WebSocketStream<S>,
    buf: &mut Vec<u8>,
    n: usize,
    until: tokio::time::Instant,
) -> Result<Vec<u8>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::StreamExt;
    while buf.len() < n {
        match tokio::time::timeout_at(until, ws.next()).await {
            Err(_) => return Err(format!("{} of {n} bytes relayed in time", buf.len())),
            Ok(Some(Ok(Message::Binary(b)))) => buf.extend_from_slice(&b),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            Ok(Some(Ok(other))) => return Err(format!("{other:?} instead of data")),
            Ok(Some(Err(e))) => return Err(e.to_string()),
            Ok(None) => return Err("closed during the RFB handshake".into()),
        }
    }
    Ok(buf.drain(..n).collect())
}

/// Plays a browser's part of RFB 3.8 through ws-proxy in auth-proxy mode, where the proxy
/// has logged in to the desktop with the session's password and offers only "None": version,
/// security type 1, SecurityResult, ClientInit. Returns the desktop's ServerInit as
/// "WIDTHxHEIGHT name", which only the real Xvnc behind the relay can send.
pub async fn rfb_through_auth_proxy<S>(
    ws: &mut WebSocketStream<S>,
    secs: u64,
) -> Result<String, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::SinkExt;
    let until = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut buf = Vec::new();
    let send = |b: &[u8]| Message::Binary(b.to_vec().into());
    let version = fill(ws, &mut buf, 12, until).await?;
    if version != b"RFB 003.008\n" {
        return Err(format!("greeting {:?}", String::from_utf8_lossy(&version)));
    }
    ws.send(send(b"RFB 003.008\n"))
        .await
        .map_err(|e| e.to_string())?;
    let types = fill(ws, &mut buf, 2, until).await?;
    if types != [1, 1] {
        return Err(format!("security types {types:?}, not only None"));
    }
    ws.send(send(&[1])).await.map_err(|e| e.to_string())?;
    let result = fill(ws, &mut buf, 4, until).await?;
    if result != [0, 0, 0, 0] {
        return Err(format!("SecurityResult {result:?}"));
    }
    // ClientInit: shared.
    ws.send(send(&[1])).await.map_err(|e| e.to_string())?;
    let init = fill(ws, &mut buf, 24, until).await?;
    let (w, h) = (
        u16::from_be_bytes([init[0], init[1]]),
        u16::from_be_bytes([init[2], init[3]]),
    );
    let len = u32::from_be_bytes([init[20], init[21], init[22], init[23]]);
    let name = fill(ws, &mut buf, len.min(1024) as usize, until).await?;
    if w == 0 || h == 0 {
        return Err(format!("ServerInit with a {w}x{h} framebuffer"));
    }
    Ok(format!("{w}x{h} {:?}", String::from_utf8_lossy(&name)))
}
