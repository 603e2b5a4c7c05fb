//! Mutual TLS between vncdispatch services: every gRPC hop is TLS 1.3 and both ends present a
//! certificate from the operator's CA.
//!
//! A service is given three PEM files — its certificate chain (`--cert`), its private key
//! (`--key`, mode 0600) and the CA bundle it trusts for peers (`--ca`) — so an operator's own
//! CA (step-ca, Vault, cert-manager) works unchanged; `dispatcher pki` makes them for everyone
//! else. What a certificate is allowed to do is its role ([`crate::roles`]).
//!
//! Servers accept TCP themselves and run the TLS handshake in a task of its own with a deadline
//! ([`tls_incoming`]): a peer that opens a connection and says nothing holds one task for at
//! most [`HANDSHAKE_TIMEOUT`], never the accept loop, and a failed handshake never stops
//! accepting (tonic before 0.12.3 did: RUSTSEC-2024-0376). tonic then sees
//! `TlsStream<TcpStream>`, so `Request::peer_certs()` and the role layer see the client's
//! certificate.
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
pub use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

mod client;
mod incoming;

pub use client::{Dial, RoleConnector, causes, dial, endpoint, is_loopback_host, scheme_and_host};
pub use incoming::{HANDSHAKE_TIMEOUT, tls_incoming};

/// Where a service's TLS material is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA bundle (PEM) that peers' certificates must chain to.
    pub ca: PathBuf,
    /// This service's certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// This service's private key (PEM); refused if group or others can read it.
    pub key: PathBuf,
}

impl TlsFiles {
    /// The three files when all are given, None when none are, an error naming the missing
    /// flags otherwise: half a TLS setup is a mistake, never a reason to fall back to plaintext.
    pub fn from_flags(
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<Option<TlsFiles>, TlsError> {
        match (ca, cert, key) {
            (None, None, None) => Ok(None),
            (Some(ca), Some(cert), Some(key)) => Ok(Some(TlsFiles { ca, cert, key })),
            (ca, cert, key) => {
                let missing: Vec<&str> = [("--ca", ca.is_none()), ("--cert", cert.is_none())]
                    .into_iter()
                    .chain([("--key", key.is_none())])
                    .filter_map(|(flag, gone)| gone.then_some(flag))
                    .collect();
                Err(TlsError::Incomplete(missing.join(", ")))
            }
        }
    }
}

/// Why TLS material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Some of --ca/--cert/--key were given, not all.
    #[error(
        "TLS needs --ca, --cert and --key together; missing {0} (make them with `dispatcher pki`)"
    )]
    Incomplete(String),
    /// A file could not be read or parsed.
    #[error("{what} {path}: {why}")]
    File {
        /// Which flag named the file.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What was wrong.
        why: String,
    },
    /// rustls refused the combination (key does not match the certificate, bad CA).
    #[error("TLS setup: {0}")]
    Config(String),
}

fn file_error(what: &'static str, path: &Path, why: impl ToString) -> TlsError {
    TlsError::File {
        what,
        path: path.to_owned(),
        why: why.to_string(),
    }
}

/// Every certificate in a PEM file; an error if there is none.
pub fn load_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect())
        .map_err(|e| file_error(what, path, e))?;
    if certs.is_empty() {
        return Err(file_error(what, path, "no certificate in it"));
    }
    Ok(certs)
}

/// The private key in a PEM file. With `private`, a key that group or others can read is
/// refused: any local user could then act as this service.
pub fn load_key(
    what: &'static str,
    path: &Path,
    private: bool,
) -> Result<PrivateKeyDer<'static>, TlsError> {
    if private {
        let meta = fs::metadata(path).map_err(|e| file_error(what, path, e))?;
        if meta.mode() & 0o077 != 0 {
            return Err(file_error(
                what,
                path,
                format!(
                    "mode {:o}: a private key must not be readable by group or others (chmod 600)",
                    meta.mode() & 0o777
                ),
            ));
        }
    }
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_error(what, path, e))
}

/// A service's loaded identity and trust: what both its server and its client side use.
#[derive(Clone)]
pub struct Credentials {
    roots: Arc<rustls::RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    /// The same three as PEM, for tonic's client TLS settings.
    client: tonic::transport::ClientTlsConfig,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("roots", &self.roots.len())
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Credentials {
    /// Reads and checks the three files; the key must match the certificate.
    pub fn load(files: &TlsFiles) -> Result<Credentials, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for ca in load_certs("--ca", &files.ca)? {
            roots
                .add(ca)
                .map_err(|e| file_error("--ca", &files.ca, e))?;
        }
        let key = load_key("--key", &files.key, true)?;
        let pem =
            |what: &'static str, path: &Path| fs::read(path).map_err(|e| file_error(what, path, e));
        let client = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(pem(
                "--ca", &files.ca,
            )?))
            .identity(tonic::transport::Identity::from_pem(
                pem("--cert", &files.cert)?,
                pem("--key", &files.key)?,
            ));
        let creds = Credentials {
            roots: Arc::new(roots),
            chain: load_certs("--cert", &files.cert)?,
            key: Arc::new(key),
            client,
        };
        // Building a server config checks that key and certificate belong together, so a
        // mismatch is refused at start, not at the first handshake.
        creds.server_config()?;
        crate::metrics::note_certificate(&files.cert, creds.leaf());
        Ok(creds)
    }

    /// This service's own leaf certificate.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// A TLS 1.3 server that requires a client certificate chaining to the CA.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots.clone(),
            provider(),
        )
        .build()
        .map_err(|e| TlsError::Config(format!("--ca: {e}")))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(format!("--cert/--key: {e}")))?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }
}

/// What a server's TLS flags come to: the rustls server config when `--ca/--cert/--key` are
/// given (None for plaintext), after refusing a plaintext listener on a non-loopback address
/// without `--insecure-plaintext` ([`crate::serve::check_listen`]). Errors are for the
/// operator, naming the flag.
///
/// The service's own certificate must name `own_role`: an agent started with the
/// dispatcher's certificate would hand whoever is root on that blade the power to command
/// every other agent.
pub fn server_setup(
    listen: std::net::SocketAddr,
    files: Option<&TlsFiles>,
    insecure_plaintext: bool,
    own_role: crate::roles::Role,
) -> Result<Option<Arc<rustls::ServerConfig>>, String> {
    crate::serve::check_listen(listen, files.is_some(), insecure_plaintext)?;
    let Some(files) = files else {
        return Ok(None);
    };
    let creds = Credentials::load(files).map_err(|e| e.to_string())?;
    match crate::roles::role_of(creds.leaf()) {
        Ok(role) if role == own_role => {
            tracing::info!(%role, %listen, "serving mutual TLS 1.3")
        }
        Ok(role) => {
            return Err(format!(
                "--cert {} names role {role}; this service needs a certificate of role \
                 {own_role} (`dispatcher pki issue --role {own_role} …`)",
                files.cert.display()
            ));
        }
        Err(e) => {
            return Err(format!(
                "--cert {}: {e}; this service needs role {own_role}",
                files.cert.display()
            ));
        }
    }
    creds.server_config().map(Some).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{self, IssueRequest};
    use crate::roles::{Role, role_of};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn issue(dir: &Path, name: &str, role: Role) -> TlsFiles {
        let (cert, key) = pki::issue(
            dir,
            &IssueRequest {
                name: name.into(),
                role,
                hosts: vec!["localhost".into(), "127.0.0.1".into()],
                valid_for: pki::CERT_VALIDITY,
            },
        )
        .expect("issue");
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert,
            key,
        }
    }

    /// Runs one handshake between `client` and `server` over an in-memory pipe; the error
    /// text of whichever side failed.
    async fn handshake(client: &Credentials, server: &Credentials) -> Result<(), String> {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor =
            tokio_rustls::TlsAcceptor::from(server.server_config().map_err(|e| e.to_string())?);
        let connector = tokio_rustls::TlsConnector::from(
            client
                .client_config_for(Role::Agent)
                .map_err(|e| e.to_string())?,
        );
        let name =
            rustls::pki_types::ServerName::try_from("localhost").map_err(|e| e.to_string())?;
        let srv = tokio::spawn(async move {
            let mut s = acceptor.accept(b).await.map_err(|e| e.to_string())?;
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(buf)
        });
        let cli = async {
            let mut c = connector
                .connect(name, a)
                .await
                .map_err(|e| e.to_string())?;
            c.write_all(b"ping").await.map_err(|e| e.to_string())?;
            c.flush().await.map_err(|e| e.to_string())?;
            // Kept open until the server has read: TLS 1.3 servers write session tickets
            // after the handshake, which a closed pipe would fail.
            Ok::<_, String>(c)
        };
        let (c, s) = tokio::join!(cli, srv);
        let got = s
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("server: {e}"))?;
        drop(c.map_err(|e| format!("client: {e}"))?);
        assert_eq!(&got, b"ping");
        Ok(())
    }

    #[tokio::test]
    async fn issued_certificates_shake_hands_and_carry_their_role() {
        let dir = tempfile::tempdir().expect("dir");
        pki::init_ca(dir.path(), "test CA", pki::CA_VALIDITY).expect("ca");
        let server = Credentials::load(&issue(dir.path(), "agent", Role::Agent)).expect("load");
        let client = Credentials::load(&issue(dir.path(), "disp", Role::Dispatcher)).expect("load");
        assert_eq!(role_of(server.leaf()), Ok(Role::Agent));
        assert_eq!(role_of(client.leaf()), Ok(Role::Dispatcher));
        handshake(&client, &server).await.expect("same CA");
    }

    #[tokio::test]
    async fn a_certificate_from_another_ca_is_refused_both_ways() {
        let (ours, theirs) = (
            tempfile::tempdir().expect("dir"),
            tempfile::tempdir().expect("dir"),
        );
        pki::init_ca(ours.path(), "ours", pki::CA_VALIDITY).expect("ca");
        pki::init_ca(theirs.path(), "theirs", pki::CA_VALIDITY).expect("ca");
        let server = Credentials::load(&issue(ours.path(), "srv", Role::Agent)).expect("load");
        let good = Credentials::load(&issue(ours.path(), "cli", Role::Admin)).expect("load");
        let foreign = Credentials::load(&issue(theirs.path(), "cli", Role::Admin)).expect("load");
        handshake(&good, &server).await.expect("ours");
        assert!(
            handshake(&foreign, &server).await.is_err(),
            "foreign client accepted"
        );
        let foreign_srv =
            Credentials::load(&issue(theirs.path(), "srv", Role::Agent)).expect("load");
        assert!(
            handshake(&good, &foreign_srv).await.is_err(),
            "foreign server trusted"
        );
    }

    #[test]
    fn the_role_table_holds_for_issued_certificates() {
        use crate::roles::authorize;
        let dir = tempfile::tempdir().expect("dir");
        pki::init_ca(dir.path(), "ca", pki::CA_VALIDITY).expect("ca");
        let d = "/vncdispatch.v1.Dispatcher/";
        let cases: [(&str, &[Role]); 9] = [
            ("Dispatch", &[Role::Portal, Role::Admin]),
            ("EndSession", &[Role::Portal, Role::Admin]),
            ("ResolveToken", &[Role::Proxy, Role::Admin]),
            ("ListSessions", &[Role::Admin]),
            ("AddBlade", &[Role::Admin]),
            ("ListBlades", &[Role::Admin]),
            ("DrainBlade", &[Role::Admin]),
            ("RemoveBlade", &[Role::Admin]),
            ("Unknown", &[]),
        ];
        for role in Role::ALL {
            let files = issue(dir.path(), role.name(), role);
            let creds = Credentials::load(&files).expect("load");
            for (method, allowed) in cases {
                let got = authorize(&format!("{d}{method}"), Some(creds.leaf()));
                match got {
                    Ok(r) => assert!(allowed.contains(&role) && r == role, "{role} {method}"),
                    Err(s) => {
                        assert!(!allowed.contains(&role), "{role} {method}: {s:?}");
                        assert_eq!(s.code(), tonic::Code::PermissionDenied);
                    }
                }
            }
            let agent = authorize(
                "/vncdispatch.v1.BladeAgent/StartSession",
                Some(creds.leaf()),
            );
            assert_eq!(
                agent.is_ok(),
                role == Role::Dispatcher,
                "{role} StartSession"
            );
            let health = authorize("/grpc.health.v1.Health/Check", Some(creds.leaf()));
            assert!(health.is_ok(), "{role} health");
        }
    }

    #[test]
    fn loopback_hosts_and_url_schemes() {
        for yes in [
            "127.0.0.1",
            "127.9.9.9",
            "::1",
            "[::1]",
            "::ffff:127.0.0.1",
            "localhost",
            "LocalHost",
        ] {
            assert!(is_loopback_host(yes), "{yes}");
        }
        for no in [
            "0.0.0.0",
            "::",
            "10.0.0.5",
            "localhost.evil.org",
            "blade1",
            "",
            "::ffff:10.0.0.1",
        ] {
            assert!(!is_loopback_host(no), "{no}");
        }
        assert_eq!(
            scheme_and_host("HTTP://10.0.0.5:7500"),
            Some(("http".into(), "10.0.0.5".into()))
        );
        assert_eq!(
            scheme_and_host("https://[::1]:7500/x"),
            Some(("https".into(), "[::1]".into()))
        );
        assert_eq!(scheme_and_host("10.0.0.5:7500"), None);
    }

    #[test]
    fn a_readable_key_and_half_a_setup_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("dir");
        pki::init_ca(dir.path(), "ca", pki::CA_VALIDITY).expect("ca");
        let files = issue(dir.path(), "p", Role::Portal);
        std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
        let err = Credentials::load(&files).expect_err("0644 key accepted");
        assert!(err.to_string().contains("chmod 600"), "{err}");
        let err = TlsFiles::from_flags(Some(files.ca.clone()), None, Some(files.key.clone()))
            .expect_err("half accepted");
        assert!(err.to_string().contains("--cert"), "{err}");
        assert_eq!(TlsFiles::from_flags(None, None, None).ok(), Some(None));
    }

    #[test]
    fn pki_never_overwrites() {
        let dir = tempfile::tempdir().expect("dir");
        pki::init_ca(dir.path(), "ca", pki::CA_VALIDITY).expect("ca");
        assert!(matches!(
            pki::init_ca(dir.path(), "ca", pki::CA_VALIDITY),
            Err(pki::PkiError::Exists(_))
        ));
        issue(dir.path(), "p", Role::Portal);
        let again = pki::issue(
            dir.path(),
            &IssueRequest {
                name: "p".into(),
                role: Role::Admin,
                hosts: vec![],
                valid_for: pki::CERT_VALIDITY,
            },
        );
        assert!(matches!(again, Err(pki::PkiError::Exists(_))));
        let bad = pki::issue(
            dir.path(),
            &IssueRequest {
                name: "../evil".into(),
                role: Role::Admin,
                hosts: vec![],
                valid_for: pki::CERT_VALIDITY,
            },
        );
        assert!(matches!(bad, Err(pki::PkiError::Invalid(_))));
    }
}
