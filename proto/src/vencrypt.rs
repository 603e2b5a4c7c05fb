//! The client side of an RFB login over VeNCrypt's X509Vnc (RFB security type 19, subtype
//! 261): TLS to the VNC server, its certificate pinned by SHA-256, then VNC authentication
//! inside the tunnel — so neither the challenge/response nor anything typed afterwards crosses
//! the network in clear.
//!
//! How it goes (RFB 3.8, RFC 6143 §7.1–7.2, and VeNCrypt 0.2 as TigerVNC speaks it):
//! 1. server `RFB 003.00x\n` → client `RFB 003.008\n`;
//! 2. server: count, security types → client: `19` (a server that does not offer 19 is
//!    refused: with a pin there is no falling back to plain VNC auth);
//! 3. server: VeNCrypt version `0 2` → client `0 2` → server: `0` (accepted);
//! 4. server: count (u8), subtypes (u32 each) → client: `261` (u32) → server: `1` (accepted);
//! 5. TLS handshake; the server's leaf certificate must hash to the pin (no name check: the
//!    pin comes from the agent that made the key for this one desktop), and its signature over
//!    the handshake is verified as usual, so only the key's holder passes;
//! 6. inside TLS: challenge (16 bytes) → DES response → SecurityResult (u32, 0 = ok).
//!
//! Afterwards the caller continues with ClientInit over the returned TLS stream.
use sha2::{Digest, Sha256};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};

/// RFB security type VeNCrypt.
pub const SECURITY_VENCRYPT: u8 = 19;
/// VeNCrypt subtype: X.509 certificate, then VNC authentication.
pub const SUBTYPE_X509_VNC: u32 = 261;

/// The SHA-256 of a VNC server's DER certificate, as the agent reports it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CertPin([u8; 32]);

impl std::fmt::Debug for CertPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CertPin({})", self.to_hex())
    }
}

impl CertPin {
    /// The pin of a DER certificate.
    pub fn of(cert: &[u8]) -> CertPin {
        CertPin(Sha256::digest(cert).into())
    }

    /// Parses 64 hex digits.
    pub fn from_hex(hex_pin: &str) -> Result<CertPin, String> {
        let bytes = hex::decode(hex_pin).map_err(|_| "a certificate pin is 64 hex digits")?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| "a certificate pin is 64 hex digits (SHA-256)")?;
        Ok(CertPin(arr))
    }

    /// 64 lowercase hex digits.
    pub fn to_hex(self) -> String {
        hex::encode(self.0)
    }
}

/// Accepts exactly the pinned certificate, checking handshake signatures as usual.
#[derive(Debug)]
struct Pinned {
    pin: CertPin,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if CertPin::of(end_entity.as_ref()) == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the VNC server's certificate does not match the session's pin".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn io(what: &'static str) -> impl Fn(std::io::Error) -> String {
    move |e| format!("{what}: {e}")
}

/// Reads the reason string that follows an RFB refusal (bounded to 1 KiB).
pub async fn reason<S: AsyncRead + Unpin>(s: &mut S) -> String {
    let Ok(len) = s.read_u32().await else {
        return String::new();
    };
    let mut buf = vec![0u8; len.min(1024) as usize];
    let _ = s.read_exact(&mut buf).await;
    String::from_utf8_lossy(&buf).into_owned()
}

/// Logs in to the VNC server on `stream` over X509Vnc, the certificate pinned to `pin`.
/// Returns the TLS stream, positioned where the client sends ClientInit. The caller bounds
/// the time it may take.
pub async fn login<S>(mut s: S, password: &str, pin: CertPin) -> Result<TlsStream<S>, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut version = [0u8; 12];
    s.read_exact(&mut version)
        .await
        .map_err(io("reading the server's version"))?;
    if !version.starts_with(b"RFB 003.") || version[..] < b"RFB 003.007\n"[..] {
        return Err("the target is not an RFB 3.7+ server".into());
    }
    s.write_all(b"RFB 003.008\n").await.map_err(io("writing"))?;
    let n = s.read_u8().await.map_err(io("reading security types"))?;
    if n == 0 {
        return Err(format!("the server refused: {}", reason(&mut s).await));
    }
    let mut types = vec![0u8; n as usize];
    s.read_exact(&mut types)
        .await
        .map_err(io("reading security types"))?;
    if !types.contains(&SECURITY_VENCRYPT) {
        return Err(format!(
            "the server does not offer VeNCrypt (offers {types:?}); refusing to log in without TLS"
        ));
    }
    s.write_u8(SECURITY_VENCRYPT).await.map_err(io("writing"))?;
    let mut ver = [0u8; 2];
    s.read_exact(&mut ver)
        .await
        .map_err(io("reading the VeNCrypt version"))?;
    if ver != [0, 2] {
        return Err(format!(
            "unsupported VeNCrypt version {}.{}",
            ver[0], ver[1]
        ));
    }
    s.write_all(&[0, 2]).await.map_err(io("writing"))?;
    if s.read_u8().await.map_err(io("reading"))? != 0 {
        return Err("the server refused VeNCrypt 0.2".into());
    }
    let count = s.read_u8().await.map_err(io("reading subtypes"))?;
    let mut subtypes = Vec::with_capacity(count as usize);
    for _ in 0..count {
        subtypes.push(s.read_u32().await.map_err(io("reading subtypes"))?);
    }
    if !subtypes.contains(&SUBTYPE_X509_VNC) {
        return Err(format!(
            "the server does not offer X509Vnc (offers {subtypes:?})"
        ));
    }
    s.write_u32(SUBTYPE_X509_VNC).await.map_err(io("writing"))?;
    if s.read_u8().await.map_err(io("reading"))? != 1 {
        return Err("the server refused X509Vnc".into());
    }

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned { pin, provider }))
        .with_no_client_auth();
    // The name is not checked (the pin is); it only fills SNI.
    let name = ServerName::try_from("vnc.invalid").map_err(|e| e.to_string())?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, s)
        .await
        .map_err(io("TLS to the VNC server"))?;

    let mut challenge = [0u8; 16];
    tls.read_exact(&mut challenge)
        .await
        .map_err(io("reading the VNC challenge"))?;
    tls.write_all(&crate::vncauth::challenge_response(
        password.as_bytes(),
        &challenge,
    ))
    .await
    .map_err(io("writing"))?;
    tls.flush().await.map_err(io("writing"))?;
    match tls.read_u32().await.map_err(io("reading the result"))? {
        0 => Ok(tls),
        _ => Err(format!(
            "the VNC server refused the session's password: {}",
            reason(&mut tls).await
        )),
    }
}
