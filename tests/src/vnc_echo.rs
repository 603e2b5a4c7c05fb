//! A stand-in VNC server that logs a client in as Xvnc would and then echoes every byte: a
//! relay target for benches of ws-proxy in auth-proxy mode, with or without TLS to the desktop.
//!
//! How a connection goes (RFB 3.8, RFC 6143 §7.1–7.3; VeNCrypt 0.2 as TigerVNC speaks it):
//! 1. `RFB 003.008\n` → the client's version (12 bytes, not checked further);
//! 2. one security type, `[1, 2]` (VNC authentication) or `[1, 19]` (VeNCrypt), and the
//!    client's choice, which must be that type;
//! 3. VeNCrypt only: version `0 2` → the client's `0 2` → `0`; subtypes `[1]`, `261` (u32,
//!    X509Vnc) → the client's choice (u32, must be 261) → `1`; then a TLS handshake with the
//!    desktop's certificate ([`desktop_cert`]), and everything after it inside TLS;
//! 4. VNC authentication: a random 16-byte challenge → the DES response, checked against the
//!    password → SecurityResult `0` (or `1` and a reason, and the connection ends);
//! 5. ClientInit (1 byte) → ServerInit: 1024×768, 32 bpp true colour, name `echo`;
//! 6. every byte read is written back, until the client closes.
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use vncdispatch_proto::pki::{self, IssueRequest};
use vncdispatch_proto::roles::Role;
use vncdispatch_proto::vencrypt::{CertPin, SECURITY_VENCRYPT, SUBTYPE_X509_VNC};
use vncdispatch_proto::vncauth::challenge_response;

/// RFB security type VNC authentication.
const SECURITY_VNC_AUTH: u8 = 2;

/// A running stand-in VNC server; it serves until the runtime it was started on ends.
#[derive(Debug)]
pub struct VncEcho {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// The SHA-256 pin of its certificate when it speaks VeNCrypt (what the dispatcher's
    /// `Target.cert_sha256` carries), None for VNC authentication in clear.
    pub pin: Option<CertPin>,
    /// Holds the CA, certificate and key while the server lives.
    _dir: Option<tempfile::TempDir>,
}

impl VncEcho {
    /// A server offering VNC authentication in clear, accepting `password`.
    pub async fn plain(password: &str) -> anyhow::Result<VncEcho> {
        let port = listen(password, None).await?;
        Ok(VncEcho {
            port,
            pin: None,
            _dir: None,
        })
    }

    /// A server offering VeNCrypt X509Vnc only, with a fresh certificate, accepting
    /// `password` inside TLS.
    pub async fn vencrypt(password: &str) -> anyhow::Result<VncEcho> {
        let dir = tempfile::tempdir().context("a directory for the desktop's certificate")?;
        let (cert, key, pin) = desktop_cert(dir.path())?;
        let chain = vncdispatch_proto::tls::load_certs("certificate", &cert)?;
        let key = vncdispatch_proto::tls::load_key("key", &key, false)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        let port = listen(password, Some(TlsAcceptor::from(Arc::new(cfg)))).await?;
        Ok(VncEcho {
            port,
            pin: Some(pin),
            _dir: Some(dir),
        })
    }
}

/// A desktop's certificate as the agent makes it, under a fresh CA in `dir`: (certificate
/// path, key path, its pin).
pub fn desktop_cert(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf, CertPin)> {
    pki::init_ca(dir, "session", pki::CA_VALIDITY)?;
    let (cert, key) = pki::issue(
        dir,
        &IssueRequest {
            name: "desktop".into(),
            role: Role::Agent,
            hosts: vec!["127.0.0.1".into()],
            valid_for: pki::CERT_VALIDITY,
        },
    )?;
    let der = vncdispatch_proto::tls::load_certs("certificate", &cert)?
        .into_iter()
        .next()
        .context("no certificate issued")?;
    let pin = CertPin::of(der.as_ref());
    Ok((cert, key, pin))
}

/// Binds a port and serves every connection in its own task; the port.
async fn listen(password: &str, tls: Option<TlsAcceptor>) -> std::io::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let port = l.local_addr()?.port();
    let password: Arc<str> = password.into();
    tokio::spawn(async move {
        loop {
            // An accept error (EMFILE under load) must not end the server.
            let Ok((tcp, _)) = l.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            };
            // A client that breaks off is its own business: nothing to report.
            tokio::spawn(session(tcp, password.clone(), tls.clone()));
        }
    });
    Ok(port)
}

fn refused(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

/// One connection, steps 1–6 of the module's description.
async fn session(
    mut tcp: TcpStream,
    password: Arc<str>,
    tls: Option<TlsAcceptor>,
) -> std::io::Result<()> {
    tcp.set_nodelay(true)?;
    tcp.write_all(b"RFB 003.008\n").await?;
    let mut version = [0u8; 12];
    tcp.read_exact(&mut version).await?;
    let Some(acceptor) = tls else {
        tcp.write_all(&[1, SECURITY_VNC_AUTH]).await?;
        expect_u8(&mut tcp, SECURITY_VNC_AUTH).await?;
        return vnc_auth_then_echo(tcp, &password).await;
    };
    tcp.write_all(&[1, SECURITY_VENCRYPT]).await?;
    expect_u8(&mut tcp, SECURITY_VENCRYPT).await?;
    tcp.write_all(&[0, 2]).await?;
    let mut ver = [0u8; 2];
    tcp.read_exact(&mut ver).await?;
    if ver != [0, 2] {
        return Err(refused(format!("VeNCrypt version {ver:?}")));
    }
    tcp.write_all(&[0, 1]).await?;
    tcp.write_u32(SUBTYPE_X509_VNC).await?;
    let chosen = tcp.read_u32().await?;
    if chosen != SUBTYPE_X509_VNC {
        return Err(refused(format!("subtype {chosen}")));
    }
    tcp.write_u8(1).await?;
    let tls = acceptor.accept(tcp).await?;
    vnc_auth_then_echo(tls, &password).await
}

async fn expect_u8<S: AsyncRead + Unpin>(s: &mut S, want: u8) -> std::io::Result<()> {
    match s.read_u8().await? {
        b if b == want => Ok(()),
        b => Err(refused(format!("the client chose {b}, not {want}"))),
    }
}

/// Steps 4–6 on `s` (TCP, or TLS over it).
async fn vnc_auth_then_echo<S>(mut s: S, password: &str) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let challenge: [u8; 16] = rand::random();
    s.write_all(&challenge).await?;
    s.flush().await?;
    let mut response = [0u8; 16];
    s.read_exact(&mut response).await?;
    if response != challenge_response(password.as_bytes(), &challenge) {
        let reason = b"authentication failed";
        s.write_u32(1).await?;
        s.write_u32(reason.len() as u32).await?;
        s.write_all(reason).await?;
        s.flush().await?;
        return Err(refused("wrong password".into()));
    }
    s.write_u32(0).await?;
    s.flush().await?;
    s.read_u8().await?; // ClientInit
    let mut init = Vec::with_capacity(28);
    init.extend_from_slice(&1024u16.to_be_bytes());
    init.extend_from_slice(&768u16.to_be_bytes());
    // Pixel format: 32 bpp, depth 24, little endian, true colour, 255 per channel, shifts
    // 16/8/0, 3 bytes of padding.
    init.extend_from_slice(&[32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0]);
    init.extend_from_slice(&4u32.to_be_bytes());
    init.extend_from_slice(b"echo");
    s.write_all(&init).await?;
    s.flush().await?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        s.write_all(&buf[..n]).await?;
        s.flush().await?;
    }
}
