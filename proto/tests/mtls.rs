//! The TLS serving path end to end over real sockets: tonic server with [`serve::serve`] and
//! the role layer, clients from [`tls::endpoint`] with certificates made by [`pki`].
use std::path::Path;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use vncdispatch_proto::pki::{self, IssueRequest};
use vncdispatch_proto::roles::Role;
use vncdispatch_proto::serve;
use vncdispatch_proto::tls::{self, Credentials, TlsFiles};
use vncdispatch_proto::v1::dispatcher_client::DispatcherClient;
use vncdispatch_proto::v1::{AddBladeRequest, DispatchRequest};

/// Whether a call got past the role layer: it then reaches routing, which has no Dispatcher
/// here (UNIMPLEMENTED); a refusal is PERMISSION_DENIED naming the role needed.
fn passed<T: std::fmt::Debug>(r: &Result<T, tonic::Status>) -> bool {
    match r {
        Err(s) if s.code() == tonic::Code::Unimplemented => true,
        Err(s) if s.code() == tonic::Code::PermissionDenied => {
            assert!(s.message().contains("needs role"), "{}", s.message());
            false
        }
        other => panic!("unexpected {other:?}"),
    }
}

fn issue(dir: &Path, name: &str, role: Role) -> Credentials {
    let (cert, key) = pki::issue(
        dir,
        &IssueRequest {
            name: name.into(),
            role,
            hosts: vec!["127.0.0.1".into(), "localhost".into()],
            valid_for: pki::CERT_VALIDITY,
        },
    )
    .expect("issue");
    Credentials::load(&TlsFiles {
        ca: dir.join("ca.pem"),
        cert,
        key,
    })
    .expect("load")
}

/// A TLS server with health only (the Dispatcher service is absent, so a call the role layer
/// lets through answers UNIMPLEMENTED); its https URL.
async fn server(creds: &Credentials) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (_reporter, health) = tonic_health::server::health_reporter();
    let router = serve::server(Duration::from_secs(10), true).add_service(health);
    let cfg = creds.server_config().expect("server config");
    tokio::spawn(serve::serve(
        router,
        listener,
        Some(cfg),
        std::future::pending(),
    ));
    format!("https://{addr}")
}

async fn health(url: &str, creds: Option<&Credentials>) -> Result<(), tonic::Status> {
    let channel = tls::endpoint(url, creds)
        .map_err(|e| tonic::Status::unknown(e.to_string()))?
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("{e:?}")))?;
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map(|_| ())
}

#[tokio::test]
async fn roles_are_enforced_over_real_tls() {
    let dir = tempfile::tempdir().expect("dir");
    pki::init_ca(dir.path(), "ca", pki::CA_VALIDITY).expect("ca");
    let srv = issue(dir.path(), "dispatcher", Role::Dispatcher);
    let url = server(&srv).await;
    for role in Role::ALL {
        let creds = issue(dir.path(), &format!("c-{}", role.name()), role);
        health(&url, Some(&creds))
            .await
            .expect("health for any role");
        let channel = tls::endpoint(&url, Some(&creds))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
        let mut client = DispatcherClient::new(channel);
        let add = client.add_blade(AddBladeRequest::default()).await;
        let dispatch = client.dispatch(DispatchRequest::default()).await;
        assert_eq!(passed(&add), role == Role::Admin, "{role} AddBlade");
        assert_eq!(
            passed(&dispatch),
            matches!(role, Role::Admin | Role::Portal),
            "{role} Dispatch"
        );
    }
}

#[tokio::test]
async fn plaintext_foreign_and_expired_clients_are_refused() {
    let (ours, theirs) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    pki::init_ca(ours.path(), "ours", pki::CA_VALIDITY).expect("ca");
    pki::init_ca(theirs.path(), "theirs", pki::CA_VALIDITY).expect("ca");
    let url = server(&issue(ours.path(), "srv", Role::Dispatcher)).await;

    // Plaintext HTTP/2 to the TLS port.
    let plain = url.replace("https://", "http://");
    assert!(health(&plain, None).await.is_err(), "plaintext accepted");
    // https without a client certificate cannot even be configured.
    assert!(tls::endpoint(&url, None).is_err());
    // http:// with credentials is refused rather than silently sent in clear.
    let admin = issue(ours.path(), "admin", Role::Admin);
    assert!(tls::endpoint(&plain, Some(&admin)).is_err());
    // A certificate from another CA.
    let foreign = issue(theirs.path(), "admin", Role::Admin);
    assert!(
        health(&url, Some(&foreign)).await.is_err(),
        "foreign CA accepted"
    );
    // An expired certificate from our CA.
    let expired = expired_cert(ours.path());
    assert!(
        health(&url, Some(&expired)).await.is_err(),
        "expired accepted"
    );
    // And the good one works, so the refusals above are about the certificates.
    health(&url, Some(&admin)).await.expect("admin");
}

/// A certificate from the CA in `dir` that expired yesterday.
fn expired_cert(dir: &Path) -> Credentials {
    use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(dir.join("ca.key")).expect("key"))
        .expect("ca key");
    let ca_pem = std::fs::read_to_string(dir.join("ca.pem")).expect("ca");
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).expect("issuer");
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(Role::Admin.uri().try_into().expect("uri"))];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(30);
    params.not_after = now - time::Duration::days(1);
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &issuer).expect("sign");
    let (cert_path, key_path) = (dir.join("expired.pem"), dir.join("expired.key"));
    std::fs::write(&cert_path, cert.pem()).expect("write");
    std::fs::write(&key_path, key.serialize_pem()).expect("write");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    Credentials::load(&TlsFiles {
        ca: dir.join("ca.pem"),
        cert: cert_path,
        key: key_path,
    })
    .expect("load")
}

#[tokio::test]
async fn silent_connections_from_one_address_cannot_hold_every_handshake_slot() {
    let dir = tempfile::tempdir().expect("dir");
    pki::init_ca(dir.path(), "ca", pki::CA_VALIDITY).expect("ca");
    let url = server(&issue(dir.path(), "srv", Role::Dispatcher)).await;
    let addr = url.trim_start_matches("https://").to_owned();
    // 300 connections that never say a word, from 127.0.0.1: more than all 256 slots.
    let mut silent = Vec::new();
    for _ in 0..300 {
        if let Ok(s) = tokio::net::TcpStream::connect(&addr).await {
            silent.push(s);
        }
    }
    // A real client from another loopback address still gets through at once.
    let admin = issue(dir.path(), "admin", Role::Admin);
    let call = async {
        let ch = tls::endpoint(&url, Some(&admin))
            .expect("endpoint")
            .local_address(Some("127.0.0.2".parse().expect("ip")))
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        HealthClient::new(ch)
            .check(HealthCheckRequest::default())
            .await
            .map_err(|e| e.to_string())
    };
    tokio::time::timeout(Duration::from_secs(4), call)
        .await
        .expect("a client from elsewhere waited behind one address's silent connections")
        .expect("health");
    drop(silent);
}
