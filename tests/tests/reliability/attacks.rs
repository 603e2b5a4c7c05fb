//! Attacks on identities and encryption, against the real programs: a dispatcher and agents
//! serving mutual TLS with certificates from `dispatcher pki`, each role tried on every RPC
//! (the original attack: a caller without the right role registering a blade or starting a
//! desktop), clients without the right certificate refused, a fake agent registered as a
//! blade given nothing, an agent with a certificate for another host given no sessions,
//! plaintext on a non-loopback address refused unless named, a service given another role's
//! certificate, ws-proxy told to reach a remote dispatcher in clear. Each scenario runs in a
//! task of its own: its assertions become the case's result.
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::io::AsyncReadExt;
use tonic::Code;
use vncdispatch_proto::roles::Role;
use vncdispatch_proto::tls::Credentials;
use vncdispatch_proto::v1::blade_agent_client::BladeAgentClient;
use vncdispatch_proto::v1::dispatcher_client::DispatcherClient;
use vncdispatch_proto::v1::{
    AddBladeRequest, AgentHealthRequest, AuditRequest, ConnectionEvent, DispatchRequest,
    DrainBladeRequest, EndSessionRequest, ListBladesRequest, ListSessionsRequest,
    ListSharesRequest, ListVncServersRequest, RemoveBladeRequest, ResolveTokenRequest,
    RevokeShareRequest, ShareSessionRequest, StartSessionRequest, StopSessionRequest,
};
use vncdispatch_tests::agent::{AgentOptions, AgentProc, free_port, new_secret};
use vncdispatch_tests::dispatcher::{DispatcherOptions, DispatcherProc};
use vncdispatch_tests::pki::TestPki;
use vncdispatch_tests::reliability::Record;
use vncdispatch_tests::users::TestUser;
use vncdispatch_tests::{require_root_and_tigervnc, workspace_bin};

/// A dispatcher and `n` agents (127.0.0.2, .3, …) on mutual TLS, sharing a secret.
struct TlsRig {
    pki: TestPki,
    agents: Vec<AgentProc>,
    dispatcher: DispatcherProc,
    _dir: tempfile::TempDir,
}

async fn tls_rig(n: u8) -> TlsRig {
    require_root_and_tigervnc();
    let pki = TestPki::new();
    let dir = tempfile::tempdir().expect("dir");
    let secret = dir.path().join("agent-secret");
    new_secret(&secret);
    let mut agents = Vec::new();
    for i in 0..n {
        let ip = format!("127.0.0.{}", 2 + i);
        agents.push(
            AgentProc::start(AgentOptions {
                ip: ip.parse().expect("ip"),
                secret_file: Some(secret.clone()),
                tls: Some(pki.service(Role::Agent, &ip, Role::Dispatcher)),
                ..Default::default()
            })
            .await,
        );
    }
    let dispatcher = DispatcherProc::start(DispatcherOptions {
        agent_secret: secret.clone(),
        tls: Some(pki.service(Role::Dispatcher, "127.0.0.1", Role::Admin)),
        ..Default::default()
    })
    .await;
    for (i, a) in agents.iter().enumerate() {
        dispatcher.add_agent(&format!("b{}", i + 1), a).await;
    }
    TlsRig {
        pki,
        agents,
        dispatcher,
        _dir: dir,
    }
}

/// The code a call came back with: OK, or its status code.
fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

async fn role_matrix() -> String {
    let rig = tls_rig(1).await;
    let user = TestUser::create();
    // A real session first, through TLS end to end (portal → dispatcher → agent).
    let portal = rig.pki.creds(Role::Portal);
    let session = rig
        .dispatcher
        .client_as(Some(&portal))
        .await
        .dispatch(DispatchRequest {
            username: user.name.clone(),
            remote_ip: "192.0.2.7".into(),
            ..Default::default()
        })
        .await
        .expect("portal dispatches over mTLS")
        .into_inner();
    assert_eq!(session.blade, "b1");

    for role in Role::ALL {
        let creds = rig.pki.creds(role);
        let mut d = rig.dispatcher.client_as(Some(&creds)).await;
        // Calls whose arguments make them harmless when allowed (unknown blade, bad token).
        let calls: Vec<(&str, Code)> = vec![
            (
                "Dispatch",
                code(
                    d.dispatch(DispatchRequest {
                        username: user.name.clone(),
                        remote_ip: "192.0.2.7".into(),
                        ..Default::default()
                    })
                    .await,
                ),
            ),
            (
                "ResolveToken",
                code(
                    d.resolve_token(ResolveTokenRequest {
                        token: session.token.clone(),
                        attached: false,
                    })
                    .await,
                ),
            ),
            (
                "EndSession",
                code(
                    d.end_session(EndSessionRequest {
                        username: "nobody-here".into(),
                    })
                    .await,
                ),
            ),
            (
                "ListSessions",
                code(d.list_sessions(ListSessionsRequest::default()).await),
            ),
            (
                "AddBlade",
                code(d.add_blade(AddBladeRequest::default()).await),
            ),
            (
                "ListBlades",
                code(d.list_blades(ListBladesRequest::default()).await),
            ),
            (
                "DrainBlade",
                code(
                    d.drain_blade(DrainBladeRequest {
                        name: "no-such-blade".into(),
                        draining: true,
                    })
                    .await,
                ),
            ),
            (
                "RemoveBlade",
                code(
                    d.remove_blade(RemoveBladeRequest {
                        name: "no-such-blade".into(),
                        force: false,
                    })
                    .await,
                ),
            ),
            (
                "ShareSession",
                code(
                    d.share_session(ShareSessionRequest {
                        username: "nobody-here".into(),
                        ..Default::default()
                    })
                    .await,
                ),
            ),
            (
                "RevokeShare",
                code(
                    d.revoke_share(RevokeShareRequest {
                        id: "0000000000000000".into(),
                    })
                    .await,
                ),
            ),
            (
                "ListShares",
                code(d.list_shares(ListSharesRequest::default()).await),
            ),
            ("Audit", code(d.audit(AuditRequest::default()).await)),
            (
                "RecordConnection",
                code(
                    d.record_connection(ConnectionEvent {
                        kind: 1,
                        username: user.name.clone(),
                        client_ip: "192.0.2.7".into(),
                        ..Default::default()
                    })
                    .await,
                ),
            ),
        ];
        for (method, got) in calls {
            let allowed = match method {
                "Dispatch" | "EndSession" | "ShareSession" | "RevokeShare" | "ListShares" => {
                    matches!(role, Role::Portal | Role::Admin)
                }
                "ResolveToken" => matches!(role, Role::Proxy | Role::Admin),
                "RecordConnection" => role == Role::Proxy,
                _ => role == Role::Admin,
            };
            if allowed {
                assert!(
                    !matches!(got, Code::PermissionDenied | Code::Unauthenticated),
                    "{role} {method}: refused ({got:?})"
                );
            } else {
                assert_eq!(got, Code::PermissionDenied, "{role} {method}");
            }
        }

        // The agent: only the dispatcher role gets past the role check (and then still
        // needs the secret, which this client does not send: UNAUTHENTICATED).
        let agent = &rig.agents[0];
        let ch = vncdispatch_proto::tls::endpoint(&format!("https://{}", agent.addr), Some(&creds))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect agent");
        let mut a = BladeAgentClient::new(ch);
        let agent_calls = [
            code(
                a.start_session(StartSessionRequest {
                    username: user.name.clone(),
                    password: "attack12".into(),
                    view_only_password: String::new(),
                    geometry: None,
                })
                .await,
            ),
            code(
                a.stop_session(StopSessionRequest {
                    username: user.name.clone(),
                    vnc_pid: 0,
                })
                .await,
            ),
            code(a.list_sessions(ListVncServersRequest::default()).await),
            code(a.health(AgentHealthRequest::default()).await),
        ];
        for got in agent_calls {
            let want = if role == Role::Dispatcher {
                Code::Unauthenticated
            } else {
                Code::PermissionDenied
            };
            assert_eq!(got, want, "{role} on the agent");
        }
    }
    // Nobody's refused attempt changed the desktop: the session still resolves and its
    // Xvnc is the one started first.
    let admin = rig.pki.creds(Role::Admin);
    let target = rig
        .dispatcher
        .client_as(Some(&admin))
        .await
        .resolve_token(ResolveTokenRequest {
            token: session.token.clone(),
            attached: false,
        })
        .await
        .expect("still resolves")
        .into_inner();
    assert_eq!(target.username, user.name);
    let logged = rig.dispatcher.log();
    assert!(
        logged.contains("needs role"),
        "refusals are logged:\n{logged}"
    );
    format!(
        "{} roles x 8 Dispatcher RPCs and 4 BladeAgent RPCs: allowed exactly as the table, PERMISSION_DENIED naming the role elsewhere; the desktop untouched",
        Role::ALL.len()
    )
}

async fn health(addr: SocketAddr, tls: Option<&Credentials>) -> Result<(), String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let ch = vncdispatch_proto::tls::endpoint(&format!("{scheme}://{addr}"), tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    tonic_health::pb::health_client::HealthClient::new(ch)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .map(|_| ())
        .map_err(|s| format!("{s:?}"))
}

async fn refused_clients() -> String {
    let rig = tls_rig(1).await;
    let addr = rig.dispatcher.addr;
    // Plaintext to the TLS port.
    assert!(health(addr, None).await.is_err(), "plaintext accepted");
    // TLS without a client certificate (tonic's client with only the CA).
    let no_cert = tonic::transport::ClientTlsConfig::new().ca_certificate(
        tonic::transport::Certificate::from_pem(std::fs::read(rig.pki.ca()).expect("ca")),
    );
    let anonymous = async {
        let ch = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
            .map_err(|e| e.to_string())?
            .tls_config(no_cert)
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        DispatcherClient::new(ch)
            .list_blades(ListBladesRequest::default())
            .await
            .map(|_| ())
            .map_err(|s| s.to_string())
    };
    assert!(anonymous.await.is_err(), "no client certificate accepted");
    // A certificate from another CA, with the admin role.
    let other = TestPki::new();
    assert!(
        health(addr, Some(&other.creds(Role::Admin))).await.is_err(),
        "foreign CA accepted"
    );
    // The right CA works, so the refusals above are about the certificates.
    health(addr, Some(&rig.pki.creds(Role::Admin)))
        .await
        .expect("admin");
    "plaintext HTTP/2, TLS without a client certificate and a certificate from another CA: all refused; the CA's admin certificate answered".to_owned()
}

/// A TCP listener that records what any client sends it (the fake agent).
async fn recorder() -> (SocketAddr, Arc<std::sync::Mutex<Vec<u8>>>, Arc<AtomicBool>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let contacted = Arc::new(AtomicBool::new(false));
    let (s2, c2) = (seen.clone(), contacted.clone());
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = l.accept().await {
            c2.store(true, Ordering::SeqCst);
            let s3 = s2.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = sock.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    s3.lock().expect("lock").extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    (addr, seen, contacted)
}

async fn fake_agent() -> String {
    let rig = tls_rig(1).await;
    let (fake, seen, contacted) = recorder().await;
    let admin = rig.pki.creds(Role::Admin);
    let mut d = rig.dispatcher.client_as(Some(&admin)).await;
    d.add_blade(AddBladeRequest {
        name: "evil".into(),
        host: fake.ip().to_string(),
        port: u32::from(fake.port()),
        method: 1,
        ..Default::default()
    })
    .await
    .expect("admin registers a blade");
    // Round-robin would reach it: several users dispatch; every one lands on b1.
    let users: Vec<TestUser> = (0..3).map(|_| TestUser::create()).collect();
    let portal = rig.pki.creds(Role::Portal);
    let mut p = rig.dispatcher.client_as(Some(&portal)).await;
    for u in &users {
        let s = p
            .dispatch(DispatchRequest {
                username: u.name.clone(),
                remote_ip: "192.0.2.8".into(),
                ..Default::default()
            })
            .await
            .expect("dispatch")
            .into_inner();
        assert_eq!(s.blade, "b1", "a session landed on the fake blade");
    }
    // Give the health poller (1 s) time to try the fake too.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert!(contacted.load(Ordering::SeqCst), "the fake was never tried");
    let bytes = seen.lock().expect("lock").clone();
    let secret = std::fs::read_to_string(rig._dir.path().join("agent-secret")).expect("secret");
    let hay = String::from_utf8_lossy(&bytes);
    assert!(
        !hay.contains(secret.trim()),
        "the agent secret reached the fake"
    );
    assert!(
        !hay.contains("authorization"),
        "a gRPC request reached the fake in clear"
    );
    // What it got is a TLS ClientHello (record type 22), nothing in clear.
    assert_eq!(bytes.first(), Some(&22), "first byte {:?}", bytes.first());
    format!(
        "{} users all on b1; the fake saw {} bytes starting with a TLS ClientHello, no secret, no gRPC request",
        users.len(),
        bytes.len()
    )
}

async fn misnamed_agent() -> String {
    let rig = tls_rig(1).await;
    // The same real agent registered under another name for its address: IPv4-mapped IPv6
    // reaches the same socket, but the certificate names 127.0.0.2 only. To the dispatcher
    // this is an agent presenting a certificate for another host.
    let agent = &rig.agents[0];
    let admin = rig.pki.creds(Role::Admin);
    let mut d = rig.dispatcher.client_as(Some(&admin)).await;
    d.drain_blade(DrainBladeRequest {
        name: "b1".into(),
        draining: true,
    })
    .await
    .expect("drain b1");
    d.add_blade(AddBladeRequest {
        name: "misnamed".into(),
        host: format!("::ffff:{}", agent.addr.ip()),
        port: u32::from(agent.addr.port()),
        method: 1,
        ..Default::default()
    })
    .await
    .expect("register");
    let user = TestUser::create();
    let portal = rig.pki.creds(Role::Portal);
    let got = rig
        .dispatcher
        .client_as(Some(&portal))
        .await
        .dispatch(DispatchRequest {
            username: user.name.clone(),
            remote_ip: "192.0.2.9".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(
        code(got),
        Code::Unavailable,
        "a session landed on the misnamed blade"
    );
    assert!(
        vncdispatch_tests::procs::xvnc_of(user.uid).is_empty(),
        "a desktop was started"
    );
    let log = rig.dispatcher.log();
    assert!(
        log.contains("NotValidForName") || log.contains("not valid for"),
        "the log does not say the certificate names another host:\n{log}"
    );
    "UNAVAILABLE, no Xvnc started; the dispatcher log names the certificate error (NotValidForName)"
        .to_owned()
}

async fn plaintext_off_loopback() -> String {
    let dir = tempfile::tempdir().expect("dir");
    let secret = dir.path().join("secret");
    new_secret(&secret);
    let port = free_port("127.0.0.1".parse().expect("ip"));
    let listen = format!("0.0.0.0:{port}");
    let store = dir.path().join("d.redb");
    let runs: [(&str, Vec<String>); 2] = [
        (
            "dispatcher",
            vec![
                "serve".into(),
                "--listen".into(),
                listen.clone(),
                "--store".into(),
                store.display().to_string(),
                "--agent-secret-file".into(),
                secret.display().to_string(),
            ],
        ),
        (
            "blade-agent",
            vec![
                "serve".into(),
                "--listen".into(),
                listen.clone(),
                "--secret-file".into(),
                secret.display().to_string(),
                "--run-dir".into(),
                dir.path().join("run").display().to_string(),
            ],
        ),
    ];
    for (bin, args) in runs {
        let out = Command::new(workspace_bin(bin))
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{bin}: {err}");
        for way in [
            "--ca, --cert and --key",
            "127.0.0.1",
            "--insecure-plaintext",
        ] {
            assert!(err.contains(way), "{bin} does not name `{way}`: {err}");
        }
        // With the insecure choice named it starts, and says so.
        let mut child = Command::new(workspace_bin(bin))
            .args(&args)
            .arg("--insecure-plaintext")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let up = vncdispatch_tests::eventually(10, || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        })
        .await;
        let _ = child.kill();
        let out = child.wait_with_output().expect("wait");
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(up, "{bin} --insecure-plaintext did not listen: {log}");
        assert!(
            log.contains("WARN") && log.contains("insecure-plaintext"),
            "{bin} did not warn: {log}"
        );
    }
    "dispatcher and blade-agent: exit 64 naming --ca/--cert/--key, loopback and --insecure-plaintext; with --insecure-plaintext both listen and log a WARN".to_owned()
}

/// A TLS server with a certificate from the CA, valid for the blade's host, but of role
/// portal (someone else's key for that name), registered as a blade: the dispatcher checks the
/// role too, so it gets no secret and no session.
async fn agent_of_another_role() -> String {
    let rig = tls_rig(1).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let impostor = rig.pki.creds(Role::Portal);
    let (_health, health_service) = tonic_health::server::health_reporter();
    let router = vncdispatch_proto::serve::server(std::time::Duration::from_secs(10), true)
        .add_service(health_service);
    let cfg = impostor.server_config().expect("server config");
    tokio::spawn(vncdispatch_proto::serve::serve(
        router,
        listener,
        Some(cfg),
        std::future::pending(),
    ));
    let admin = rig.pki.creds(Role::Admin);
    let mut d = rig.dispatcher.client_as(Some(&admin)).await;
    d.drain_blade(DrainBladeRequest {
        name: "b1".into(),
        draining: true,
    })
    .await
    .expect("drain b1");
    d.add_blade(AddBladeRequest {
        name: "impostor".into(),
        host: addr.ip().to_string(),
        port: u32::from(addr.port()),
        method: 1,
        ..Default::default()
    })
    .await
    .expect("register");
    let user = TestUser::create();
    let portal = rig.pki.creds(Role::Portal);
    let got = rig
        .dispatcher
        .client_as(Some(&portal))
        .await
        .dispatch(DispatchRequest {
            username: user.name.clone(),
            remote_ip: "192.0.2.9".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(
        code(got),
        Code::Unavailable,
        "a session landed on the impostor"
    );
    let log = rig.dispatcher.log();
    assert!(
        log.contains("role portal, not agent"),
        "the log does not say why:\n{log}"
    );
    "UNAVAILABLE; the dispatcher's log: the server's certificate is role portal, not agent"
        .to_owned()
}

/// A service handed a certificate of another role refuses to start: an agent holding the
/// dispatcher's certificate would let root on that blade command every other agent.
async fn wrong_own_role() -> String {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().expect("dir");
    let secret = dir.path().join("secret");
    new_secret(&secret);
    let files = pki.files(Role::Dispatcher, &["127.0.0.1"]);
    let out = Command::new(workspace_bin("blade-agent"))
        .args(["serve", "--listen", "127.0.0.1:0", "--secret-file"])
        .arg(&secret)
        .arg("--run-dir")
        .arg(dir.path().join("run"))
        .arg("--ca")
        .arg(&files.ca)
        .arg("--cert")
        .arg(&files.cert)
        .arg("--key")
        .arg(&files.key)
        .stdin(Stdio::null())
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("role dispatcher") && err.contains("role agent"),
        "{err}"
    );
    "blade-agent with a dispatcher-role certificate: exit 64 naming both roles".to_owned()
}

/// ws-proxy told to resolve tokens at a dispatcher off loopback in clear, however the
/// scheme is spelled, refuses to start.
async fn proxy_to_a_remote_dispatcher_in_clear() -> String {
    let mut seen = Vec::new();
    for url in [
        "http://192.0.2.10:7500",
        "HTTP://192.0.2.10:7500",
        "http://[2001:db8::1]:7500",
    ] {
        let out = Command::new(workspace_bin("ws-proxy"))
            .args(["serve", "--listen", "127.0.0.1:0", "--dispatcher", url])
            .stdin(Stdio::null())
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{url}: {err}");
        assert!(err.contains("in clear"), "{url}: {err}");
        seen.push(url);
    }
    format!(
        "{}: exit 64, naming --ca/--cert/--key and https://",
        seen.join(", ")
    )
}

/// The panic message of a scenario that failed.
fn panic_text(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panicked".into()),
        Err(e) => e.to_string(),
    }
}

type Scenario = std::pin::Pin<Box<dyn std::future::Future<Output = String> + Send>>;

#[tokio::test(flavor = "multi_thread")]
async fn attacks() {
    require_root_and_tigervnc();
    let rec = Record::new("attacks");
    let cases: Vec<(&str, &str, &str, Scenario)> = vec![
        (
            "Role x RPC matrix",
            "each role's certificate (portal, proxy, admin, dispatcher, agent) calls every Dispatcher and BladeAgent RPC over mutual TLS; a portal dispatches a real desktop first",
            "portal: Dispatch, EndSession, ShareSession, RevokeShare, ListShares; proxy: ResolveToken, RecordConnection; admin: every Dispatcher RPC but RecordConnection; dispatcher: only BladeAgent; PERMISSION_DENIED naming the role elsewhere (so no AddBlade, no StartSession, no share and no audit trail without the role)",
            Box::pin(role_matrix()),
        ),
        (
            "Clients without a good certificate",
            "plaintext to the TLS port; TLS without a client certificate; an admin certificate from another CA",
            "each refused; the real admin certificate answers",
            Box::pin(refused_clients()),
        ),
        (
            "A fake agent registered as a blade",
            "an admin registers a blade whose address is a recorder; three users dispatch",
            "no session on it; it receives a TLS ClientHello and nothing else (no agent secret, no request)",
            Box::pin(fake_agent()),
        ),
        (
            "An agent with another host's certificate",
            "the only undrained blade is registered under an address its agent's certificate does not name",
            "no session, no Xvnc; the dispatcher's log says why",
            Box::pin(misnamed_agent()),
        ),
        (
            "Plaintext off loopback",
            "dispatcher and blade-agent on 0.0.0.0 without TLS, then with --insecure-plaintext",
            "refused (64) naming the ways forward; with the flag, serving and warning",
            Box::pin(plaintext_off_loopback()),
        ),
        (
            "A server of another role as a blade",
            "a TLS server whose certificate is from the CA and valid for its address, but of role portal, registered as the only blade",
            "no session; the dispatcher's log names the role it found",
            Box::pin(agent_of_another_role()),
        ),
        (
            "A certificate of another role",
            "blade-agent started with the dispatcher's certificate",
            "refused at start (64)",
            Box::pin(wrong_own_role()),
        ),
        (
            "The original's HTTP route without the right credentials",
            "GET /vncdispatch/USER/IP: plaintext on loopback with --api-secret-file, without the secret and with a wrong one; over mutual TLS with a proxy's certificate, with none, and with a portal's",
            "401, 401, 403 (PERMISSION_DENIED, as the Dispatch RPC answers that role), no answer without a certificate, and no desktop until the portal's certificate gets one",
            Box::pin(crate::http_route::without_credentials()),
        ),
        (
            "ws-proxy to a remote dispatcher in clear",
            "ws-proxy --dispatcher http://, HTTP:// and an IPv6 http:// URL off loopback, no TLS flags",
            "refused at start (64)",
            Box::pin(proxy_to_a_remote_dispatcher_in_clear()),
        ),
    ];
    let tried = cases.len() as u64;
    for (case, done, expected, scenario) in cases {
        match tokio::spawn(scenario).await {
            Ok(observed) => rec.case(case, done, expected, &observed, true),
            Err(e) => rec.case(case, done, expected, &panic_text(e), false),
        }
    }
    rec.bad_inputs(tried);
    rec.finish();
}
