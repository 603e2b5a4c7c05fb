//! The original deployment's HTTP route (`dispatcher serve --http-listen`), called exactly as
//! a portal written for the original calls it: a plain HTTP/1.1 GET, JSON back.
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vncdispatch_tests::agent::free_port;
use vncdispatch_tests::rig::{Rig, RigOptions};
use vncdispatch_tests::users::TestUser;
use vncdispatch_tests::{procs, require_root_and_tigervnc};

/// `GET path` as the original's Node portal sent it; the status and the JSON body.
async fn get(
    addr: std::net::SocketAddr,
    path: &str,
    bearer: Option<&str>,
) -> (u16, serde_json::Value) {
    let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    get_on(s, addr, path, bearer).await
}

/// The same over any connection (plain TCP or TLS).
async fn get_on<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
    addr: std::net::SocketAddr,
    path: &str,
    bearer: Option<&str>,
) -> (u16, serde_json::Value) {
    let auth = bearer
        .map(|b| format!("Authorization: Bearer {b}\r\n"))
        .unwrap_or_default();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut raw))
        .await
        .expect("answered in time")
        .expect("read");
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    (status, serde_json::from_str(body).expect("a JSON body"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_portal_of_the_original_gets_a_desktop_over_http() {
    require_root_and_tigervnc();
    let http: std::net::SocketAddr = ([127, 0, 0, 1], free_port([127, 0, 0, 1].into())).into();
    let rig = Rig::start(RigOptions {
        api_secret: true,
        dispatcher_extra: vec!["--http-listen".into(), http.to_string()],
        ..Default::default()
    })
    .await;
    let secret = std::fs::read_to_string(rig.api_secret.as_ref().expect("secret file"))
        .expect("secret")
        .trim()
        .to_owned();
    let user = TestUser::create();
    let path = format!("/vncdispatch/{}/192.0.2.7", user.name);

    // Never a way around Dispatch's rules: no secret, no desktop.
    let (status, body) = get(http, &path, None).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("UNAUTHENTICATED")),
        "{body}"
    );
    assert!(procs::xvnc_of(user.uid).is_empty());

    let (status, doc) = get(http, &path, Some(&secret)).await;
    assert_eq!(status, 200, "{doc}");
    let mut keys: Vec<&str> = doc
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "blade", "display", "password", "remoteip", "token", "username", "vncpid"
        ],
        "the original's document"
    );
    assert_eq!(doc["username"], user.name.as_str());
    assert_eq!(doc["remoteip"], "192.0.2.7");
    assert_eq!(doc["blade"], "b1");
    assert_eq!(doc["token"].as_str().map(str::len), Some(60));
    let pid = doc["vncpid"].as_u64().expect("vncpid is a number");
    assert!(doc["display"].as_u64().is_some(), "display is a number");
    assert!(
        procs::xvnc_of(user.uid)
            .iter()
            .any(|p| u64::from(p.pid) == pid)
    );

    // A reconnect gets the same token, as from the original.
    let (status, again) = get(http, &path, Some(&secret)).await;
    assert_eq!((status, &again["token"]), (200, &doc["token"]));

    // Bad input is the same INVALID_ARGUMENT as over gRPC, as an HTTP status.
    let (status, body) = get(http, "/vncdispatch/a;b/192.0.2.7", Some(&secret)).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("INVALID_ARGUMENT")),
        "{body}"
    );
    let (status, _) = get(
        http,
        &format!("/vncdispatch/{}/999.1.1.1", user.name),
        Some(&secret),
    )
    .await;
    assert_eq!(status, 400);
    let (status, body) = get(http, "/other", Some(&secret)).await;
    assert_eq!(status, 404, "{body}");
}

/// A TLS connection to the route as a client of `role` (HTTP/1.1 offered in ALPN, as curl and
/// Python do); Err if the handshake fails.
async fn tls_to(
    pki: &vncdispatch_tests::pki::TestPki,
    role: vncdispatch_proto::roles::Role,
    addr: std::net::SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let creds = pki.creds(role);
    let mut cfg = (*creds
        .client_config_for(vncdispatch_proto::roles::Role::Dispatcher)
        .expect("client config"))
    .clone();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await?;
    // TLS 1.3 reports a refused client certificate only on the first read or write.
    tokio::io::AsyncWriteExt::flush(&mut tls).await?;
    Ok(tls)
}

#[tokio::test(flavor = "multi_thread")]
async fn over_tls_only_a_portal_or_admin_certificate_gets_a_desktop() {
    use vncdispatch_proto::roles::Role;
    use vncdispatch_tests::agent::{AgentOptions, AgentProc, new_secret};
    use vncdispatch_tests::dispatcher::{DispatcherOptions, DispatcherProc};
    require_root_and_tigervnc();
    let pki = vncdispatch_tests::pki::TestPki::new();
    let dir = tempfile::tempdir().expect("dir");
    let secret = dir.path().join("agent-secret");
    new_secret(&secret);
    let agent = AgentProc::start(AgentOptions {
        secret_file: Some(secret.clone()),
        tls: Some(pki.service(Role::Agent, "127.0.0.1", Role::Dispatcher)),
        ..Default::default()
    })
    .await;
    let http: std::net::SocketAddr = ([127, 0, 0, 1], free_port([127, 0, 0, 1].into())).into();
    let d = DispatcherProc::start(DispatcherOptions {
        agent_secret: secret,
        tls: Some(pki.service(Role::Dispatcher, "127.0.0.1", Role::Admin)),
        extra: vec!["--http-listen".into(), http.to_string()],
        ..Default::default()
    })
    .await;
    d.add_agent("b1", &agent).await;
    let user = TestUser::create();
    let path = format!("/vncdispatch/{}/192.0.2.9", user.name);

    let portal = tls_to(&pki, Role::Portal, http)
        .await
        .expect("a portal's handshake");
    let (status, doc) = get_on(portal, http, &path, None).await;
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["username"], user.name.as_str());

    // Another role's certificate: the same refusal as the Dispatch RPC gives it.
    let proxy = tls_to(&pki, Role::Proxy, http)
        .await
        .expect("a proxy's handshake");
    let (status, body) = get_on(proxy, http, &path, None).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("PERMISSION_DENIED")),
        "{body}"
    );

    // No client certificate: no TLS session at all.
    let anonymous = {
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
        let name =
            tokio_rustls::rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
        match tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
            .connect(name, tcp)
            .await
        {
            Ok(mut tls) => {
                let _ = tokio::io::AsyncWriteExt::write_all(
                    &mut tls,
                    format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await;
                let mut buf = Vec::new();
                tokio::io::AsyncReadExt::read_to_end(&mut tls, &mut buf)
                    .await
                    .is_err()
                    || !String::from_utf8_lossy(&buf).contains("200 OK")
            }
            Err(_) => true,
        }
    };
    assert!(anonymous, "a client without a certificate got an answer");
}
