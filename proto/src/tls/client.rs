//! The client side of mutual TLS: plaintext allowed only to loopback hosts, and channels whose
//! TLS is ours (rustls, TLS 1.3) so that a server must prove both its host name and its role.
use super::{Credentials, TlsError, provider};
use std::io;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::CertificateDer;

/// True for a host that is this machine by definition: a loopback address (also written
/// IPv4-mapped, or in brackets) or the name `localhost`. Other names are not resolved: what
/// they point to can change.
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// The scheme (lowercase) and host of a URL, as the HTTP stack will read it; None when it
/// does not parse.
pub fn scheme_and_host(url: &str) -> Option<(String, String)> {
    let uri: tonic::codegen::http::Uri = url.parse().ok()?;
    Some((
        uri.scheme_str()?.to_ascii_lowercase(),
        uri.host()?.to_owned(),
    ))
}

/// The chain of causes under a failed call's status (": invalid peer certificate:
/// NotValidForName" for a server whose certificate names another host), empty when there is
/// none: tonic's own message for a transport failure does not say why.
pub fn causes(status: &tonic::Status) -> String {
    let mut out = String::new();
    let mut next = std::error::Error::source(status);
    while let Some(e) = next {
        out.push_str(": ");
        out.push_str(&e.to_string());
        next = e.source();
    }
    out
}

/// A gRPC endpoint for `url`. With `tls`, `url` must be `https://` and the connection is
/// mutual TLS: the server's certificate must chain to the CA and name the URL's host (so a
/// registered blade's agent is verified for the host it was registered with), and this
/// service presents its own certificate. Without, `url` must be `http://`.
pub fn endpoint(
    url: &str,
    tls: Option<&Credentials>,
) -> Result<tonic::transport::Endpoint, TlsError> {
    let https = scheme_and_host(url).is_some_and(|(scheme, _)| scheme == "https");
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())
        .map_err(|e| TlsError::Config(format!("{url}: {e}")))?;
    match (tls, https) {
        (Some(creds), true) => endpoint
            .tls_config(creds.client.clone())
            .map_err(|e| TlsError::Config(format!("{url}: {e}"))),
        (None, false) => Ok(endpoint),
        (Some(_), false) => Err(TlsError::Config(format!(
            "{url}: with --ca/--cert/--key the address must be https://"
        ))),
        (None, true) => Err(TlsError::Config(format!(
            "{url}: https:// needs --ca, --cert and --key (mutual TLS)"
        ))),
    }
}

/// Checks a server's certificate as usual (chain to the CA, the host name), and then that it
/// names `role`: a portal's or another blade's certificate valid for the same name is not an
/// agent, and a certificate that merely names the dispatcher's host is not the dispatcher.
#[derive(Debug)]
struct RoleVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    role: crate::roles::Role,
}

impl rustls::client::danger::ServerCertVerifier for RoleVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        match crate::roles::role_of(end_entity) {
            Ok(role) if role == self.role => Ok(verified),
            Ok(role) => Err(rustls::Error::General(format!(
                "the server's certificate is role {role}, not {}",
                self.role
            ))),
            Err(e) => Err(rustls::Error::General(format!(
                "the server's certificate: {e}; expected role {}",
                self.role
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

impl Credentials {
    /// A TLS 1.3 client presenting this identity, trusting only the CA, and accepting only a
    /// server whose certificate names `peer_role`.
    pub fn client_config_for(
        &self,
        peer_role: crate::roles::Role,
    ) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            self.roots.clone(),
            provider(),
        )
        .build()
        .map_err(|e| TlsError::Config(format!("--ca: {e}")))?;
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(RoleVerifier {
                inner,
                role: peer_role,
            }))
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(format!("--cert/--key: {e}")))?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }
}

/// Dials a server over TLS with [`Credentials::client_config_for`]: tonic's own client TLS
/// settings cannot check the server's role, so the channel runs over this connector.
#[derive(Clone)]
pub struct RoleConnector {
    cfg: Arc<rustls::ClientConfig>,
    name: rustls::pki_types::ServerName<'static>,
}

impl std::fmt::Debug for RoleConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoleConnector")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

type Dialed = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

impl tower::Service<tonic::codegen::http::Uri> for RoleConnector {
    type Response = Dialed;
    type Error = io::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = io::Result<Dialed>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: tonic::codegen::http::Uri) -> Self::Future {
        let (cfg, name) = (self.cfg.clone(), self.name.clone());
        Box::pin(async move {
            let host = uri.host().unwrap_or_default();
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let tcp = TcpStream::connect((host.as_str(), uri.port_u16().unwrap_or(443))).await?;
            let _ = tcp.set_nodelay(true);
            let tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

/// How to reach a gRPC server: plaintext, or mutual TLS through a [`RoleConnector`].
#[derive(Debug)]
pub enum Dial {
    /// `http://`, no credentials.
    Plain(tonic::transport::Endpoint),
    /// `https://` with credentials, checking the server's role.
    Tls(tonic::transport::Endpoint, RoleConnector),
}

impl Dial {
    /// A channel that connects on first use.
    pub fn lazy(self) -> tonic::transport::Channel {
        match self {
            Dial::Plain(e) => e.connect_lazy(),
            Dial::Tls(e, c) => e.connect_with_connector_lazy(c),
        }
    }

    /// A channel connected now.
    pub async fn connect(self) -> Result<tonic::transport::Channel, tonic::transport::Error> {
        match self {
            Dial::Plain(e) => e.connect().await,
            Dial::Tls(e, c) => e.connect_with_connector(c).await,
        }
    }
}

/// How to reach the gRPC server at `url`, set up by `configure` (timeouts, keepalives). With
/// `tls`, `url` must be `https://`, and the server must prove a certificate from the CA valid
/// for the URL's host *and* naming `peer_role` before anything is sent; without, `url` must
/// be `http://` (see [`endpoint`]).
pub fn dial(
    url: &str,
    tls: Option<&Credentials>,
    peer_role: crate::roles::Role,
    configure: impl FnOnce(tonic::transport::Endpoint) -> tonic::transport::Endpoint,
) -> Result<Dial, TlsError> {
    let Some(creds) = tls else {
        return Ok(Dial::Plain(configure(endpoint(url, None)?)));
    };
    let (scheme, host) =
        scheme_and_host(url).ok_or_else(|| TlsError::Config(format!("{url}: not a URL")))?;
    if scheme != "https" {
        return Err(TlsError::Config(format!(
            "{url}: with --ca/--cert/--key the address must be https://"
        )));
    }
    let name = rustls::pki_types::ServerName::try_from(
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
    )
    .map_err(|e| TlsError::Config(format!("{url}: {e}")))?;
    let connector = RoleConnector {
        cfg: creds.client_config_for(peer_role)?,
        name,
    };
    // The TLS is the connector's; tonic sees a plain connection.
    let plain = format!("http{}", &url[scheme.len()..]);
    let endpoint = tonic::transport::Endpoint::from_shared(plain)
        .map_err(|e| TlsError::Config(format!("{url}: {e}")))?;
    Ok(Dial::Tls(configure(endpoint), connector))
}
