//! A minimal RFB 3.8 client (RFC 6143): enough to prove a VNC server is real and checks its
//! password — protocol version, VNC authentication with the DES challenge, SecurityResult, and
//! ClientInit/ServerInit.
//!
//! Also a browser's side of what ws-proxy presents in auth-proxy mode ([`none_login`]), over
//! a WebSocket: server `RFB 003.008\n` → the same back → types `[1, 1]` ("None") → `1` →
//! SecurityResult `0` → ClientInit (shared) → ServerInit (24 bytes, then the name).
use anyhow::{Context, bail};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{self, Message};
use vncdispatch_proto::vncauth::challenge_response;

/// An open WebSocket as the logins here use it: binary messages both ways.
pub trait WsStream:
    Stream<Item = Result<Message, tungstenite::Error>>
    + Sink<Message, Error = tungstenite::Error>
    + Unpin
{
}

impl<S> WsStream for S where
    S: Stream<Item = Result<Message, tungstenite::Error>>
        + Sink<Message, Error = tungstenite::Error>
        + Unpin
{
}

/// What a successful login saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInit {
    /// Framebuffer width.
    pub width: u16,
    /// Framebuffer height.
    pub height: u16,
    /// Desktop name.
    pub name: String,
}

/// Outcome of a login attempt that got as far as SecurityResult.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Login {
    /// Password accepted; the server's ServerInit.
    Accepted(ServerInit),
    /// Password refused, with the server's reason.
    Refused(String),
}

/// Logs in to the RFB server at `addr` with `password` using VNC authentication.
pub async fn login(addr: &str, password: &str) -> anyhow::Result<Login> {
    tokio::time::timeout(Duration::from_secs(10), login_inner(addr, password))
        .await
        .context("RFB login timed out")?
}

async fn login_inner(addr: &str, password: &str) -> anyhow::Result<Login> {
    let mut s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    login_on(&mut s, password).await
}

/// [`login`] on a connection already open (the caller bounds the time); when accepted, `s`
/// is past ServerInit, where the session's messages begin.
pub async fn login_on(s: &mut TcpStream, password: &str) -> anyhow::Result<Login> {
    let mut version = [0u8; 12];
    s.read_exact(&mut version)
        .await
        .context("reading ProtocolVersion")?;
    if &version[..4] != b"RFB " {
        bail!("not an RFB server: {:?}", String::from_utf8_lossy(&version));
    }
    s.write_all(b"RFB 003.008\n").await?;
    let n = s.read_u8().await.context("reading security types")?;
    if n == 0 {
        bail!("server refused the connection: {}", read_reason(s).await?);
    }
    let mut types = vec![0u8; n as usize];
    s.read_exact(&mut types).await?;
    if !types.contains(&2) {
        bail!("server does not offer VNC authentication (offers {types:?})");
    }
    s.write_u8(2).await?;
    let mut challenge = [0u8; 16];
    s.read_exact(&mut challenge)
        .await
        .context("reading the VNC auth challenge")?;
    s.write_all(&challenge_response(password.as_bytes(), &challenge))
        .await?;
    match s.read_u32().await.context("reading SecurityResult")? {
        0 => {}
        _ => {
            return Ok(Login::Refused(read_reason(s).await.unwrap_or_default()));
        }
    }
    s.write_u8(1).await?; // ClientInit: shared
    let width = s.read_u16().await?;
    let height = s.read_u16().await?;
    let mut pixel_format = [0u8; 16];
    s.read_exact(&mut pixel_format).await?;
    let len = s.read_u32().await?;
    if len > 4096 {
        bail!("desktop name of {len} bytes");
    }
    let mut name = vec![0u8; len as usize];
    s.read_exact(&mut name).await?;
    Ok(Login::Accepted(ServerInit {
        width,
        height,
        name: String::from_utf8_lossy(&name).into_owned(),
    }))
}

async fn read_reason(s: &mut TcpStream) -> anyhow::Result<String> {
    let len = s.read_u32().await?;
    let mut reason = vec![0u8; len.min(4096) as usize];
    s.read_exact(&mut reason).await?;
    Ok(String::from_utf8_lossy(&reason).into_owned())
}

/// A browser's side of the "None" handshake ws-proxy presents in auth-proxy mode, on an open
/// WebSocket `ws`, through ClientInit (shared) and ServerInit. Each step waits 10 s at most.
/// Err says which step broke.
pub async fn none_login<S>(ws: &mut S) -> Result<ServerInit, String>
where
    S: WsStream,
{
    none_login_as(ws, true).await
}

/// [`none_login`] with ClientInit's shared flag as given: `false` asks the server to
/// disconnect every other client (what a hostile viewer would try).
pub async fn none_login_as<S>(ws: &mut S, shared: bool) -> Result<ServerInit, String>
where
    S: WsStream,
{
    let bin = |b: &[u8]| Message::Binary(b.to_vec().into());
    let mut got = Vec::new();
    version(ws, &mut got, b"RFB 003.008\n").await?;
    fill(ws, &mut got, 14).await?;
    if got[12..14] != [1, 1] {
        return Err(format!("offered {:?}, not None alone", &got[12..14]));
    }
    ws.send(bin(&[1])).await.map_err(|e| e.to_string())?;
    fill(ws, &mut got, 18).await?;
    if got[14..18] != [0; 4] {
        return Err(format!("SecurityResult {:?}", &got[14..18]));
    }
    ws.send(bin(&[u8::from(shared)]))
        .await
        .map_err(|e| e.to_string())?; // ClientInit
    server_init(ws, &mut got, 18).await
}

/// A browser's VNC-authentication login through a ws-proxy without `--auth-proxy`, on an
/// open WebSocket `ws`, through ClientInit (shared) and ServerInit: what noVNC does with the
/// password. Err says which step broke.
pub async fn vnc_login_ws<S>(ws: &mut S, password: &str) -> Result<ServerInit, String>
where
    S: WsStream,
{
    let bin = |b: &[u8]| Message::Binary(b.to_vec().into());
    let mut got = Vec::new();
    version(ws, &mut got, b"RFB ").await?;
    fill(ws, &mut got, 13).await?;
    let n = usize::from(got[12]);
    if n == 0 {
        // A reason follows ("Too many security failures": Xvnc's blacklist).
        fill(ws, &mut got, 17).await?;
        let len = u32::from_be_bytes([got[13], got[14], got[15], got[16]]).min(4096) as usize;
        fill(ws, &mut got, 17 + len).await?;
        return Err(format!(
            "the server refused the connection: {}",
            String::from_utf8_lossy(&got[17..17 + len])
        ));
    }
    fill(ws, &mut got, 13 + n).await?;
    if !got[13..13 + n].contains(&2) {
        return Err(format!("no VNC authentication in {:?}", &got[13..13 + n]));
    }
    ws.send(bin(&[2])).await.map_err(|e| e.to_string())?;
    let at = 13 + n;
    fill(ws, &mut got, at + 16).await?;
    let mut challenge = [0u8; 16];
    challenge.copy_from_slice(&got[at..at + 16]);
    ws.send(bin(&challenge_response(password.as_bytes(), &challenge)))
        .await
        .map_err(|e| e.to_string())?;
    fill(ws, &mut got, at + 20).await?;
    if got[at + 16..at + 20] != [0; 4] {
        return Err(format!("SecurityResult {:?}", &got[at + 16..at + 20]));
    }
    ws.send(bin(&[1])).await.map_err(|e| e.to_string())?; // ClientInit: shared
    server_init(ws, &mut got, at + 20).await
}

/// Reads the server's ProtocolVersion into `got` (it must start with `expect`) and answers
/// 3.8.
async fn version<S>(ws: &mut S, got: &mut Vec<u8>, expect: &[u8]) -> Result<(), String>
where
    S: WsStream,
{
    fill(ws, got, 12).await?;
    if !got[..12].starts_with(expect) {
        return Err(format!(
            "the server speaks {:?}",
            String::from_utf8_lossy(&got[..12])
        ));
    }
    ws.send(Message::Binary(b"RFB 003.008\n".to_vec().into()))
        .await
        .map_err(|e| e.to_string())
}

/// Reads the ServerInit that starts at `at` in what `ws` sends.
async fn server_init<S>(ws: &mut S, got: &mut Vec<u8>, at: usize) -> Result<ServerInit, String>
where
    S: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    fill(ws, got, at + 24).await?;
    let init = &got[at..at + 24];
    let name_len = u32::from_be_bytes([init[20], init[21], init[22], init[23]]) as usize;
    if name_len > 4096 {
        return Err(format!("desktop name of {name_len} bytes"));
    }
    let (width, height) = (
        u16::from_be_bytes([init[0], init[1]]),
        u16::from_be_bytes([init[2], init[3]]),
    );
    fill(ws, got, at + 24 + name_len).await?;
    Ok(ServerInit {
        width,
        height,
        name: String::from_utf8_lossy(&got[at + 24..at + 24 + name_len]).into_owned(),
    })
}

/// Reads binary messages from `ws` into `got` until it holds `n` bytes.
async fn fill<S>(ws: &mut S, got: &mut Vec<u8>, n: usize) -> Result<(), String>
where
    S: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    while got.len() < n {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => got.extend_from_slice(&b),
            Ok(Some(Ok(_))) => {}
            other => return Err(format!("handshake broke: {other:?}")),
        }
    }
    Ok(())
}
