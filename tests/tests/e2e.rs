//! The whole system driven the way its users drive it, with every service started from the
//! example config files in deploy/config/ (command-line flags override only ports and paths),
//! every gRPC hop mutual TLS with certificates from `dispatcher pki` (each client with the
//! role it needs), browsers on HTTPS and ws-proxy's hop to the desktop VeNCrypt:
//! a portal backend in Python (grpcio, stubs generated from proto/) dispatches a desktop, a
//! headless Chromium shows it through ws-proxy, a second Dispatch returns the same session,
//! grpcurl finds every service by reflection and calls Dispatch, an operator drains a blade
//! with the CLI and the next user lands elsewhere, each Dispatch's request id shows up in the
//! dispatcher's log and in the log of the agent that served it, and every service's /metrics
//! has the named series, non-zero.
//!
//! The same scenario runs on the embedded store, on MongoDB (a real FerretDB), and with one
//! blade reached over SSH (a real sshd).
use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use vncdispatch_proto::roles::Role;
use vncdispatch_proto::tls::TlsFiles;
use vncdispatch_tests::agent::{AgentOptions, AgentProc, free_port, new_secret};
use vncdispatch_tests::browser::assert_shows_desktop;
use vncdispatch_tests::dispatcher::{DispatcherOptions, DispatcherProc};
use vncdispatch_tests::ferretdb::FerretDb;
use vncdispatch_tests::pki::TestPki;
use vncdispatch_tests::sshd::Sshd;
use vncdispatch_tests::users::TestUser;
use vncdispatch_tests::wsproxy::{WsProxyProc, demo_session};
use vncdispatch_tests::{artifact, eventually, procs, require_root_and_tigervnc, workspace_bin};

fn repo(path: &str) -> String {
    vncdispatch_tests::repo().join(path).display().to_string()
}

fn metrics_addr() -> SocketAddr {
    ([127, 0, 0, 1], free_port([127, 0, 0, 1].into())).into()
}

/// Runs a command, returning stdout; panics with stderr on failure.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `--ca`, `--cert`, `--key` (or grpcurl's `-cacert`, `-cert`, `-key`) for `files`.
fn tls_flags(files: &TlsFiles, names: [&str; 3]) -> Vec<String> {
    let paths = [&files.ca, &files.cert, &files.key];
    names
        .iter()
        .zip(paths)
        .flat_map(|(n, p)| [n.to_string(), p.display().to_string()])
        .collect()
}

/// The portal backend: tests/portal_client.py on the grpcio environment install-deps made,
/// with its certificate (role portal).
fn portal(
    d: &DispatcherProc,
    tls: &TlsFiles,
    secret: &Path,
    request_id: &str,
    args: &[&str],
) -> Value {
    let python = std::env::var("PORTAL_PYTHON")
        .unwrap_or_else(|_| "/opt/vncdispatch/test-venv/bin/python".into());
    let out = run(Command::new(python)
        .arg(repo("tests/portal_client.py"))
        .args(["--dispatcher", &d.addr.to_string()])
        .args(tls_flags(tls, ["--ca", "--cert", "--key"]))
        .arg("--secret-file")
        .arg(secret)
        .args(["--request-id", request_id])
        .args(args));
    serde_json::from_str(&out).expect("portal client JSON")
}

/// The operator's CLI against the running dispatcher, with its certificate (role admin).
fn operator(d: &DispatcherProc, tls: &TlsFiles, secret: &Path, args: &[&str]) -> String {
    // The client options are global options of the subcommands: they go after them.
    run(Command::new(workspace_bin("dispatcher"))
        .args(args)
        .args(["--dispatcher", &format!("https://{}", d.addr)])
        .args(tls_flags(tls, ["--ca", "--cert", "--key"]))
        .arg("--secret-file")
        .arg(secret))
}

/// grpcurl as an operator would run it: TLS with the admin certificate.
fn grpcurl(tls: &TlsFiles, secret: Option<&Path>, args: &[&str]) -> String {
    let mut cmd = Command::new("grpcurl");
    cmd.args(tls_flags(tls, ["-cacert", "-cert", "-key"]));
    if let Some(secret) = secret {
        let bearer = format!(
            "authorization: Bearer {}",
            std::fs::read_to_string(secret).expect("secret").trim()
        );
        cmd.args(["-H", &bearer]);
    }
    run(cmd.args(args))
}

/// Asks ws-proxy's HTTPS port for a WebSocket upgrade with `token`; its status line.
async fn forged_upgrade(proxy: SocketAddr, ca: &Path, token: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use vncdispatch_proto::tls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    for c in vncdispatch_proto::tls::load_certs("--ca", ca).expect("ca") {
        roots.add(c).expect("root");
    }
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await
        .expect("HTTPS to ws-proxy");
    let req = format!(
        "GET /websockify?token={token} HTTP/1.1\r\nHost: {proxy}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    tls.write_all(req.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 256];
    let n = tls.read(&mut buf).await.expect("read");
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

/// The value of the first sample of `series` whose labels contain `labels`, from `curl`.
fn metric(addr: SocketAddr, series: &str, labels: &str) -> f64 {
    let body = run(Command::new("curl").args(["-sf", &format!("http://{addr}/metrics")]));
    body.lines()
        .filter(|l| {
            l.starts_with(series) && l[series.len()..].starts_with(['{', ' ']) && l.contains(labels)
        })
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// The agent daemon behind blade `name` as the scenario registers them: b1 is `agent1`, b2
/// is `agent2`, or the blade over SSH (None: the SSH launcher runs `blade-agent cloudvnc` for
/// each call, with no log of its own and no request id).
fn agent_of<'a>(
    name: &str,
    agent1: &'a AgentProc,
    agent2: Option<&'a AgentProc>,
) -> Option<&'a AgentProc> {
    match name {
        "b1" => Some(agent1),
        "b2" => agent2,
        other => panic!("the scenario registers b1 and b2, not {other}"),
    }
}

/// Where the blades are: two gRPC agents, or one agent and one blade over SSH.
enum Blades {
    Agents,
    WithSsh,
}

async fn scenario(store: Option<String>, blades: Blades, name: &str) {
    require_root_and_tigervnc();
    let dir = tempfile::tempdir().expect("dir");
    let agent_secret = dir.path().join("agent-secret");
    let api_secret = dir.path().join("api-secret");
    new_secret(&agent_secret);
    new_secret(&api_secret);
    let (m_dispatcher, m_proxy) = (metrics_addr(), metrics_addr());
    // The operator's CA, and a certificate for each service and client.
    let pki = TestPki::new();
    let (portal_tls, admin_tls, proxy_tls) = (
        pki.files(Role::Portal, &[]),
        pki.files(Role::Admin, &[]),
        pki.files(Role::Proxy, &[]),
    );
    let web_tls = pki.files(Role::Proxy, &["127.0.0.1"]);

    let agent = |ip: [u8; 4], m: SocketAddr| {
        let host = std::net::IpAddr::from(ip).to_string();
        AgentProc::start(AgentOptions {
            ip: ip.into(),
            secret_file: Some(agent_secret.clone()),
            tls: Some(pki.service(Role::Agent, &host, Role::Dispatcher)),
            session_command: Some(demo_session()),
            extra: vec![
                "--config".into(),
                repo("deploy/config/blade-agent.toml"),
                "--metrics-listen".into(),
                m.to_string(),
            ],
            ..Default::default()
        })
    };
    let m_agent1 = metrics_addr();
    let agent1 = agent([127, 0, 0, 2], m_agent1).await;
    let m_agent2 = metrics_addr();
    let (agent2, sshd) = match blades {
        Blades::Agents => (Some(agent([127, 0, 0, 3], m_agent2).await), None),
        Blades::WithSsh => (None, Some(Sshd::start().await)),
    };

    let mut extra = vec![
        "--config".into(),
        repo("deploy/config/dispatcher.toml"),
        "--api-secret-file".into(),
        api_secret.display().to_string(),
        "--metrics-listen".into(),
        m_dispatcher.to_string(),
    ];
    if let Some(sshd) = &sshd {
        let agent_args = format!(
            "--rfb-listen 127.0.0.1 --session-command {} --display-first 440 --display-count 20 --run-dir {}",
            demo_session().display(),
            dir.path().join("ssh-run").display()
        );
        extra.extend([
            "--ssh-key".into(),
            sshd.client_key.display().to_string(),
            "--ssh-known-hosts".into(),
            sshd.known_hosts.display().to_string(),
            "--ssh-program".into(),
            workspace_bin("blade-agent").display().to_string(),
            format!("--ssh-agent-args={agent_args}"),
        ]);
    }
    let d = DispatcherProc::start(DispatcherOptions {
        mongo: store,
        agent_secret: agent_secret.clone(),
        tls: Some(pki.service(Role::Dispatcher, "127.0.0.1", Role::Admin)),
        extra,
        ..Default::default()
    })
    .await;

    // The operator registers the blades.
    let port = |a: &AgentProc| a.addr.port().to_string();
    operator(
        &d,
        &admin_tls,
        &api_secret,
        &["blade", "add", "b1", "127.0.0.2", "--port", &port(&agent1)],
    );
    match (&agent2, &sshd) {
        (Some(a2), _) => {
            operator(
                &d,
                &admin_tls,
                &api_secret,
                &["blade", "add", "b2", "127.0.0.3", "--port", &port(a2)],
            );
        }
        (None, Some(s)) => {
            let p = s.port.to_string();
            operator(
                &d,
                &admin_tls,
                &api_secret,
                &[
                    "blade",
                    "add",
                    "b2",
                    "127.0.0.1",
                    "--port",
                    &p,
                    "--method",
                    "ssh",
                ],
            );
        }
        (None, None) => unreachable!("one of the two is set"),
    }

    let mut proxy_args = vec![
        "--config".into(),
        repo("deploy/config/ws-proxy.toml"),
        "--dispatcher".into(),
        format!("https://{}", d.addr),
        "--dispatcher-secret-file".into(),
        api_secret.display().to_string(),
        "--metrics-listen".into(),
        m_proxy.to_string(),
        "--tls-cert".into(),
        web_tls.cert.display().to_string(),
        "--tls-key".into(),
        web_tls.key.display().to_string(),
    ];
    proxy_args.extend(tls_flags(&proxy_tls, ["--ca", "--cert", "--key"]));
    let proxy = WsProxyProc::start(&proxy_args).await;

    // The portal dispatches alice's desktop; the browser shows it.
    let (alice, bob) = (TestUser::create(), TestUser::create());
    let request_id = format!("e2e-{name}-{}", std::process::id());
    // One request id per Dispatch, so each can be followed to the agent that served it alone.
    let (alice_request, bob_request) = (format!("{request_id}-alice"), format!("{request_id}-bob"));
    let s1 = portal(
        &d,
        &portal_tls,
        &api_secret,
        &alice_request,
        &["dispatch", &alice.name, "127.0.0.1"],
    );
    let token = s1["token"].as_str().expect("token").to_owned();
    let blade1 = s1["blade"].as_str().expect("blade").to_owned();
    assert_ne!(s1["reused"], Value::Bool(true), "{s1}");
    // HTTPS with the test CA's certificate, which this Chromium does not know.
    let url = format!(
        "https://{}/vnc.html?autoconnect=1&path=websockify?token={token}",
        proxy.addr
    );
    assert_shows_desktop(
        &url,
        &artifact(&format!("e2e-{name}.png")),
        &["--ignore-certificate-errors"],
        &|| proxy.log(),
    )
    .await;
    // The config's auth-proxy mode: ws-proxy logged in to the desktop itself, over VeNCrypt
    // pinned to the desktop's certificate — on an agent blade and over SSH alike (cloudvnc
    // prints the pin after `HOST PID DISPLAY`).
    assert!(
        proxy.log().contains("logged in over VeNCrypt"),
        "blade {blade1}: {}",
        proxy.log()
    );

    // Coming back: same session (grpcurl, as any gRPC tool would).
    let again: Value = serde_json::from_str(&grpcurl(
        &admin_tls,
        Some(&api_secret),
        &[
            "-d",
            &format!(r#"{{"username":"{}","remote_ip":"127.0.0.9"}}"#, alice.name),
            &d.addr.to_string(),
            "vncdispatch.v1.Dispatcher/Dispatch",
        ],
    ))
    .expect("grpcurl JSON");
    assert_eq!(again["token"].as_str(), Some(token.as_str()), "{again}");
    assert_eq!(again["reused"], Value::Bool(true), "{again}");
    assert_eq!(again["remoteIp"].as_str(), Some("127.0.0.9"), "{again}");
    let services = grpcurl(
        &admin_tls,
        Some(&api_secret),
        &[&d.addr.to_string(), "list"],
    );
    for s in [
        "vncdispatch.v1.Dispatcher",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(services.contains(s), "reflection lacks {s}: {services}");
    }
    let agent_services = grpcurl(&admin_tls, None, &[&agent1.addr.to_string(), "list"]);
    assert!(
        agent_services.contains("vncdispatch.v1.BladeAgent"),
        "agent reflection: {agent_services}"
    );

    // The operator drains alice's blade; bob lands on the other one.
    operator(&d, &admin_tls, &api_secret, &["blade", "drain", &blade1]);
    let s2 = portal(
        &d,
        &portal_tls,
        &api_secret,
        &bob_request,
        &["dispatch", &bob.name, "127.0.0.1"],
    );
    assert_ne!(s2["blade"].as_str(), Some(blade1.as_str()), "{s2}");

    // Each Dispatch's request id reached the dispatcher's log and the log of the agent that
    // served the session, whichever blade that was.
    let mut followed = 0;
    for (session, id) in [(&s1, &alice_request), (&s2, &bob_request)] {
        assert!(
            d.log().contains(id.as_str()),
            "request id {id} not in the dispatcher log"
        );
        let blade = session["blade"].as_str().expect("blade");
        if let Some(agent) = agent_of(blade, &agent1, agent2.as_ref()) {
            assert!(
                agent.log().contains(id.as_str()),
                "request id {id} not in the log of blade {blade}'s agent, which started the session"
            );
            followed += 1;
        }
    }
    // alice and bob are on different blades: with two agents both ids were followed; with a
    // blade over SSH, the one session on the agent.
    let agents = if agent2.is_some() { 2 } else { 1 };
    assert_eq!(followed, agents, "sessions {s1} and {s2}");
    let listed = operator(&d, &admin_tls, &api_secret, &["blade", "list"]);
    assert!(listed.contains(&blade1), "{listed}");

    // Every service's metrics, as curl sees them after the run.
    let ok = eventually(10, || {
        metric(m_dispatcher, "vncdispatch_dispatcher_sessions_live", "") >= 1.0
            && metric(m_agent1, "vncdispatch_agent_sessions_live", "") >= 1.0
    })
    .await;
    assert!(ok, "live-session gauges never rose");
    let checks: Vec<(&str, SocketAddr, &str, &str)> = vec![
        (
            "dispatcher",
            m_dispatcher,
            "vncdispatch_dispatcher_dispatches_total",
            "result=\"started\"",
        ),
        (
            "dispatcher",
            m_dispatcher,
            "vncdispatch_dispatcher_dispatches_total",
            "result=\"reused\"",
        ),
        (
            "dispatcher",
            m_dispatcher,
            "vncdispatch_dispatcher_sessions_started_total",
            "",
        ),
        (
            "dispatcher",
            m_dispatcher,
            "vncdispatch_dispatcher_dispatch_duration_seconds_count",
            "",
        ),
        (
            "dispatcher",
            m_dispatcher,
            "vncdispatch_dispatcher_store_duration_seconds_count",
            "op=\"claim\"",
        ),
        (
            "dispatcher",
            m_dispatcher,
            "vncdispatch_grpc_requests_total",
            "Dispatch",
        ),
        (
            "dispatcher",
            m_dispatcher,
            "vncdispatch_grpc_request_duration_seconds_count",
            "ResolveToken",
        ),
        (
            "agent",
            m_agent1,
            "vncdispatch_agent_session_starts_total",
            "",
        ),
        (
            "agent",
            m_agent1,
            "vncdispatch_agent_session_start_duration_seconds_count",
            "",
        ),
        (
            "agent",
            m_agent1,
            "vncdispatch_grpc_requests_total",
            "Health",
        ),
        (
            "ws-proxy",
            m_proxy,
            "vncdispatch_wsproxy_connections_total",
            "",
        ),
        (
            "ws-proxy",
            m_proxy,
            "vncdispatch_wsproxy_relayed_bytes_total",
            "direction=\"down\"",
        ),
        (
            "ws-proxy",
            m_proxy,
            "vncdispatch_wsproxy_relayed_bytes_total",
            "direction=\"up\"",
        ),
    ];
    for (service, addr, series, labels) in checks {
        assert!(
            metric(addr, series, labels) > 0.0,
            "{service} /metrics: {series}{{{labels}}} is zero or missing"
        );
    }
    if agent2.is_some() {
        assert!(metric(m_agent2, "vncdispatch_agent_session_starts_total", "") > 0.0);
    }
    // Refusals are counted by reason: a forged token (over wss, trusting the test CA).
    let status = forged_upgrade(proxy.addr, &pki.ca(), &"ab".repeat(30)).await;
    assert!(status.starts_with("HTTP/1.1 403"), "{status}");
    assert!(metric(m_proxy, "vncdispatch_auth_refusals_total", "unknown_token") > 0.0);

    // The portal ends both sessions; their desktops go away.
    for u in [&alice, &bob] {
        let ended = portal(&d, &portal_tls, &api_secret, &request_id, &["end", &u.name]);
        assert_eq!(ended["ended"], Value::Bool(true), "{ended}");
    }
    let gone = eventually(10, || {
        procs::xvnc_of(alice.uid).is_empty() && procs::xvnc_of(bob.uid).is_empty()
    })
    .await;
    assert!(gone, "a desktop outlived EndSession");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_whole_system_on_the_embedded_store() {
    scenario(None, Blades::Agents, "embedded").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_whole_system_on_mongodb() {
    let db = FerretDb::start().await;
    scenario(Some(db.uri("vncDispatch")), Blades::Agents, "mongodb").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_whole_system_with_a_blade_over_ssh() {
    scenario(None, Blades::WithSsh, "ssh").await;
}
