//! A minimal RFB 3.8 client (RFC 6143): enough to prove a VNC server is real and checks its
//! password — protocol version, VNC authentication with the DES challenge, SecurityResult, and
//! ClientInit/ServerInit.
use anyhow::{Context, bail};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vncdispatch_proto::vncauth::challenge_response;

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
        bail!(
            "server refused the connection: {}",
            read_reason(&mut s).await?
        );
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
            return Ok(Login::Refused(
                read_reason(&mut s).await.unwrap_or_default(),
            ));
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
