//! The attacks group's case for the original's HTTP route (`dispatcher serve --http-listen`):
//! it is never a way around Dispatch's rules. A network peer without the API secret, with a
//! wrong one, with another role's certificate or with none gets no desktop.
use vncdispatch_proto::roles::Role;
use vncdispatch_tests::agent::{AgentOptions, AgentProc, free_port, new_secret};
use vncdispatch_tests::dispatcher::{DispatcherOptions, DispatcherProc};
use vncdispatch_tests::original_route::{get, get_on, tls_to};
use vncdispatch_tests::pki::TestPki;
use vncdispatch_tests::procs;
use vncdispatch_tests::rig::{Rig, RigOptions};
use vncdispatch_tests::users::TestUser;

/// A free loopback address for the route.
fn route_addr() -> std::net::SocketAddr {
    ([127, 0, 0, 1], free_port([127, 0, 0, 1].into())).into()
}

/// Status and gRPC code name of an answer, as the report shows it.
fn shown((status, body): &(u16, serde_json::Value)) -> String {
    format!("{status} {}", body["code"].as_str().unwrap_or("-"))
}

/// Plaintext on loopback with `--api-secret-file`: no bearer, a wrong one; then mutual TLS: a
/// proxy's certificate, no certificate, and the portal's (the one that works).
pub(crate) async fn without_credentials() -> String {
    let dir = tempfile::tempdir().expect("dir");
    let secret = dir.path().join("agent-secret");
    new_secret(&secret);
    let user = TestUser::create();
    let path = format!("/vncdispatch/{}/192.0.2.9", user.name);

    let http = route_addr();
    let rig = Rig::start(RigOptions {
        api_secret: true,
        dispatcher_extra: vec!["--http-listen".into(), http.to_string()],
        ..Default::default()
    })
    .await;
    let none = get(http, &path, None).await;
    let wrong = get(http, &path, Some("0123456789abcdef0123456789abcdef")).await;
    assert_eq!(
        (none.0, wrong.0),
        (401, 401),
        "plaintext without the API secret: {none:?}, {wrong:?}"
    );
    assert!(procs::xvnc_of(user.uid).is_empty(), "a desktop was started");
    drop(rig);

    let pki = TestPki::new();
    let agent = AgentProc::start(AgentOptions {
        secret_file: Some(secret.clone()),
        tls: Some(pki.service(Role::Agent, "127.0.0.1", Role::Dispatcher)),
        ..Default::default()
    })
    .await;
    let http = route_addr();
    let d = DispatcherProc::start(DispatcherOptions {
        agent_secret: secret,
        tls: Some(pki.service(Role::Dispatcher, "127.0.0.1", Role::Admin)),
        extra: vec!["--http-listen".into(), http.to_string()],
        ..Default::default()
    })
    .await;
    d.add_agent("b1", &agent).await;

    // Another role's certificate: the same refusal as the Dispatch RPC gives it.
    let proxy = tls_to(&pki, Role::Proxy, http)
        .await
        .expect("a proxy's handshake");
    let as_proxy = get_on(proxy, http, &path, None).await;
    assert_eq!(
        (as_proxy.0, as_proxy.1["code"].as_str()),
        (403, Some("PERMISSION_DENIED")),
        "{as_proxy:?}"
    );
    assert!(procs::xvnc_of(user.uid).is_empty(), "a desktop was started");

    // No client certificate: no TLS session at all, or at least no answer.
    let anonymous = anonymous_get(&pki, http, &path).await;
    assert!(
        !anonymous.contains("200 OK"),
        "a client without a certificate got {anonymous}"
    );

    let portal = tls_to(&pki, Role::Portal, http)
        .await
        .expect("a portal's handshake");
    let as_portal = get_on(portal, http, &path, None).await;
    assert_eq!(as_portal.0, 200, "{as_portal:?}");
    assert_eq!(procs::xvnc_of(user.uid).len(), 1);
    format!(
        "plaintext: no secret {}, wrong secret {}; TLS: proxy certificate {}, no certificate {anonymous}, portal certificate {} with one desktop",
        shown(&none),
        shown(&wrong),
        shown(&as_proxy),
        as_portal.0
    )
}

/// `GET path` over TLS without a client certificate: how it ended.
async fn anonymous_get(pki: &TestPki, http: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut cfg = tokio_rustls::rustls::ClientConfig::builder()
        .with_root_certificates({
            let mut roots = tokio_rustls::rustls::RootCertStore::empty();
            for c in vncdispatch_proto::tls::load_certs("--ca", &pki.ca()).expect("ca") {
                roots.add(c).expect("root");
            }
            roots
        })
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(http).await.expect("tcp");
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let mut tls = match tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await
    {
        Ok(tls) => tls,
        Err(e) => return format!("handshake refused ({})", e.kind()),
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    if let Err(e) = tls.write_all(request.as_bytes()).await {
        return format!("refused at the first write ({})", e.kind());
    }
    let mut buf = Vec::new();
    match tls.read_to_end(&mut buf).await {
        // TLS 1.3 reports a refused client certificate at the first read.
        Err(e) => format!("refused at the first read ({})", e.kind()),
        Ok(_) => String::from_utf8_lossy(&buf)
            .lines()
            .next()
            .unwrap_or("nothing")
            .to_owned(),
    }
}
