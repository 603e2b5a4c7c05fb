//! The desktop's own TLS identity for VeNCrypt (X509Vnc): a fresh self-signed key pair made
//! by the helper, as the user, for each desktop it starts, in `~/.vnc/x509-N.{pem,key}`
//! (0600, written without following links like every file here).
//!
//! The key is the session's, never the blade's: the user may read it, and all it can do is
//! impersonate their own desktop. The certificate's SHA-256 (the pin) goes back to the agent
//! on the READY line; the dispatcher hands it to ws-proxy, which accepts only that certificate
//! when it logs in ([`vncdispatch_proto::vencrypt`]). No name or CA is involved, so the
//! certificate only needs a key and a validity.
use super::files::open_private;
use super::{Failure, failed, refused};
use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use vncdispatch_proto::vencrypt::CertPin;

/// Which RFB security types a desktop offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RfbSecurity {
    /// VNC authentication only, in clear (the original's setup).
    Vnc,
    /// VeNCrypt X509Vnc only: every client must speak TLS (ws-proxy in auth-proxy mode does;
    /// noVNC in a browser cannot).
    Tls,
    /// VNC authentication and X509Vnc, in that order: noVNC takes the first type it supports
    /// in the server's order and cannot do TLS inside a WebSocket, so browsers connecting
    /// without auth-proxy get VNC authentication; ws-proxy in auth-proxy mode always takes
    /// X509Vnc when it holds a pin, and never falls back.
    Both,
}

impl RfbSecurity {
    /// Xvnc's `-SecurityTypes` value.
    pub fn xvnc_types(self) -> &'static str {
        match self {
            RfbSecurity::Vnc => "VncAuth",
            RfbSecurity::Tls => "X509Vnc",
            RfbSecurity::Both => "VncAuth,X509Vnc",
        }
    }

    /// The value's name on the helper's command line.
    pub fn xvnc_name(self) -> &'static str {
        match self {
            RfbSecurity::Vnc => "vnc",
            RfbSecurity::Tls => "tls",
            RfbSecurity::Both => "both",
        }
    }

    /// Whether the desktop needs a certificate.
    pub fn uses_tls(self) -> bool {
        self != RfbSecurity::Vnc
    }
}

/// A desktop's certificate and key files, and the certificate's pin.
#[derive(Debug)]
pub(super) struct DesktopCert {
    /// `~/.vnc/x509-N.pem`.
    pub(super) cert: PathBuf,
    /// `~/.vnc/x509-N.key`.
    pub(super) key: PathBuf,
    /// SHA-256 of the DER certificate.
    pub(super) pin: CertPin,
}

/// How long a desktop's certificate is valid: longer than any session lives.
const VALIDITY: time::Duration = time::Duration::days(400);

/// Makes a fresh key pair and self-signed certificate for display `display`.
pub(super) fn make(home: &Path, vnc_dir: &OwnedFd, display: u32) -> Result<DesktopCert, Failure> {
    let key = rcgen::KeyPair::generate().map_err(|e| failed(format!("TLS key: {e}")))?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("vncdispatch desktop :{display}"),
    );
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + VALIDITY;
    let cert = params
        .self_signed(&key)
        .map_err(|e| failed(format!("TLS certificate: {e}")))?;
    let (cert_name, key_name) = (format!("x509-{display}.pem"), format!("x509-{display}.key"));
    write(vnc_dir, &key_name, &key.serialize_pem())?;
    write(vnc_dir, &cert_name, &cert.pem())?;
    Ok(DesktopCert {
        cert: home.join(".vnc").join(cert_name),
        key: home.join(".vnc").join(key_name),
        pin: CertPin::of(cert.der()),
    })
}

fn write(dir: &OwnedFd, name: &str, contents: &str) -> Result<(), Failure> {
    let fd = open_private(dir, name, true).map_err(|e| refused(format!("~/.vnc/{e}")))?;
    File::from(fd)
        .write_all(contents.as_bytes())
        .map_err(|e| failed(format!("writing ~/.vnc/{name}: {e}")))
}
