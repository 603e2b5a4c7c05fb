//! The desktop in a real browser: real Xvnc (through blade-agent), dispatcher and ws-proxy,
//! and noVNC in headless Chromium, proven from what the page shows — noVNC's connected state,
//! a painted canvas, and a screenshot kept in tests/artifacts/.
use std::path::PathBuf;
use vncdispatch_proto::v1::{DispatchRequest, StartSessionRequest};
use vncdispatch_tests::agent::{AgentOptions, AgentProc};
use vncdispatch_tests::browser::assert_shows_desktop;
use vncdispatch_tests::rig::{Rig, RigOptions};
use vncdispatch_tests::users::TestUser;
use vncdispatch_tests::wsproxy::{WsProxyProc, demo_session};
use vncdispatch_tests::{artifact, require_root_and_tigervnc};

async fn agent_with_demo(secret: Option<PathBuf>) -> AgentProc {
    let session_command = Some(demo_session());
    AgentProc::start(AgentOptions {
        secret_file: secret,
        session_command,
        ..Default::default()
    })
    .await
}

async fn shows_desktop(url: &str, shot: &str, proxy: &WsProxyProc) {
    shows_desktop_with(url, shot, proxy, &[]).await
}

async fn shows_desktop_with(url: &str, shot: &str, proxy: &WsProxyProc, flags: &[&str]) {
    assert_shows_desktop(url, &artifact(shot), flags, &|| proxy.log()).await
}

/// The whole stack with the demo desktop: a rig, ws-proxy before its dispatcher with
/// `extra_proxy_args`, and a fresh user's desktop dispatched. Also ws-proxy's arguments, to
/// start it again.
struct Stack {
    proxy: WsProxyProc,
    args: Vec<String>,
    s: vncdispatch_proto::v1::Session,
    // Dropped after the proxy: the user's processes, then the rig.
    _user: TestUser,
    _rig: Rig,
}

async fn stack(extra_proxy_args: &[&str]) -> Stack {
    let rig = Rig::start(RigOptions {
        session_command: Some(demo_session()),
        ..Default::default()
    })
    .await;
    let d = &rig.dispatcher;
    let mut args = vec!["--dispatcher".to_string(), format!("http://{}", d.addr)];
    args.extend(extra_proxy_args.iter().map(|s| s.to_string()));
    let proxy = WsProxyProc::start(&args).await;
    let user = TestUser::create();
    let s = d
        .client()
        .await
        .dispatch(DispatchRequest {
            username: user.name.clone(),
            remote_ip: "127.0.0.1".into(),
            ..Default::default()
        })
        .await
        .expect("Dispatch")
        .into_inner();
    Stack {
        proxy,
        args,
        s,
        _user: user,
        _rig: rig,
    }
}

async fn full_stack(extra_proxy_args: &[&str], password_in_url: bool, shot: &str) {
    let Stack { proxy, s, .. } = &stack(extra_proxy_args).await;
    let password = if password_in_url {
        format!("&password={}", s.password)
    } else {
        String::new()
    };
    let url = format!(
        "http://{}/vnc.html?autoconnect=1{password}&path=websockify?token={}",
        proxy.addr, s.token
    );
    shows_desktop(&url, shot, proxy).await;
    let log = proxy.log();
    assert!(
        !log.contains(&s.token) && !log.contains(&s.password),
        "a secret reached ws-proxy's log"
    );
    // In auth-proxy mode the proxy's hop to the desktop is TLS, pinned to the desktop's own
    // certificate; passing through, the browser logs in itself (VNC authentication).
    let auth_proxy = extra_proxy_args.contains(&"--auth-proxy");
    assert_eq!(
        log.contains("logged in over VeNCrypt"),
        auth_proxy,
        "VeNCrypt use does not match the mode:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn novnc_shows_the_desktop_through_ws_proxy() {
    full_stack(&[], true, "novnc-passthrough.png").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_proxy_mode_shows_the_desktop_without_the_password_in_the_browser() {
    full_stack(&["--auth-proxy"], false, "novnc-auth-proxy.png").await;
}

// A browser whose connection drops (here: ws-proxy killed and started again on its port)
// comes back by itself: the URL carries noVNC's reconnect options, and in auth-proxy mode no
// password is needed to get back in. The page reports the noVNC release it runs on.
#[tokio::test(flavor = "multi_thread")]
async fn novnc_reconnects_by_itself_after_ws_proxy_restarts() {
    require_root_and_tigervnc();
    // Held whole: the rig and the user live to the end.
    let mut st = stack(&["--auth-proxy"]).await;
    let url = format!(
        "http://{}/vnc.html?autoconnect=1&reconnect=true&reconnect_delay=1000&path=websockify?token={}",
        st.proxy.addr, st.s.token
    );
    let connected = "document.documentElement.classList.contains('noVNC_connected')";
    let mut b = vncdispatch_tests::browser::Browser::open(&url)
        .await
        .expect("chromium");
    assert!(
        b.wait_for(connected, 30).await.expect("eval"),
        "never connected"
    );
    // The viewer runs on the noVNC release the install scripts pin, and says which.
    let pinned = std::fs::read_to_string(vncdispatch_tests::repo().join("scripts/install-deps.sh"))
        .expect("install-deps.sh")
        .lines()
        .find_map(|l| l.strip_prefix("NOVNC_VERSION=").map(str::to_owned))
        .expect("NOVNC_VERSION in install-deps.sh");
    assert_eq!(
        b.eval("document.documentElement.dataset.novncVersion")
            .await
            .expect("eval"),
        serde_json::json!(pinned),
        "the page does not run on the pinned noVNC"
    );
    let addr = st.proxy.addr;
    st.proxy.kill();
    assert!(
        b.wait_for(&format!("!{connected}"), 10)
            .await
            .expect("eval"),
        "noVNC did not notice ws-proxy going away"
    );
    let restarted = std::time::Instant::now();
    st.proxy = WsProxyProc::start_at(addr, &st.args).await;
    assert!(
        b.wait_for(connected, 10).await.expect("eval"),
        "noVNC did not reconnect within 10 s of the restart; log:\n{}",
        st.proxy.log()
    );
    b.screenshot(&artifact("novnc-reconnected.png"))
        .await
        .expect("screenshot");
    assert!(restarted.elapsed() < std::time::Duration::from_secs(12));
}

/// A desktop started through a real agent (no dispatcher) and a websockify token file
/// naming it. Fields drop in order: the user's processes go before the agent.
struct TokenFileDesktop {
    _user: TestUser,
    _agent: AgentProc,
    dir: tempfile::TempDir,
    tokens: PathBuf,
}

impl TokenFileDesktop {
    async fn start(password: &str, token: &str) -> TokenFileDesktop {
        require_root_and_tigervnc();
        let agent = agent_with_demo(None).await;
        let user = TestUser::create();
        let req = StartSessionRequest {
            username: user.name.clone(),
            password: password.into(),
            view_only_password: String::new(),
            geometry: None,
        };
        let server = agent
            .client()
            .await
            .start_session(req)
            .await
            .expect("StartSession")
            .into_inner();
        let dir = tempfile::tempdir().expect("dir");
        let tokens = dir.path().join("tokens.cfg");
        let line = format!(
            "# websockify format\n{token}: {}:{}\n",
            server.host, server.port
        );
        std::fs::write(&tokens, line).expect("tokens");
        TokenFileDesktop {
            _user: user,
            _agent: agent,
            dir,
            tokens,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_websockify_token_file_works_without_a_dispatcher() {
    let d = TokenFileDesktop::start("filepw12", "filetoken1").await;
    let proxy = WsProxyProc::start(&["--token-file".into(), d.tokens.display().to_string()]).await;
    let url = format!(
        "http://{}/vnc.html?autoconnect=1&password=filepw12&path=websockify?token=filetoken1",
        proxy.addr
    );
    shows_desktop(&url, "novnc-token-file.png", &proxy).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_desktop_over_https_and_wss() {
    let d = TokenFileDesktop::start("tlspw123", "tlstoken").await;
    let dir = &d.dir;
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
        ])
        .args(["-addext", "subjectAltName=IP:127.0.0.1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl");
    assert!(made.success());
    let proxy = WsProxyProc::start(&[
        "--token-file".into(),
        d.tokens.display().to_string(),
        "--tls-cert".into(),
        cert.display().to_string(),
        "--tls-key".into(),
        key.display().to_string(),
    ])
    .await;
    let url = format!(
        "https://{}/vnc.html?autoconnect=1&password=tlspw123&path=websockify?token=tlstoken",
        proxy.addr
    );
    shows_desktop_with(
        &url,
        "novnc-wss.png",
        &proxy,
        &["--ignore-certificate-errors"],
    )
    .await;
    // Plain HTTP to the TLS port gets nowhere.
    let mut s = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect");
    tokio::io::AsyncWriteExt::write_all(&mut s, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_end(&mut s, &mut buf),
    )
    .await;
    assert!(
        !String::from_utf8_lossy(&buf).contains("noVNC"),
        "served files without TLS"
    );
}
