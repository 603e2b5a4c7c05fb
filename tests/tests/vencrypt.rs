//! VeNCrypt X509Vnc against a real Xtigervnc: the pinned login gets in and reaches ServerInit,
//! a wrong pin, a wrong password and a server without VeNCrypt are refused, and a tap between
//! client and server sees neither the VNC challenge/response nor what is typed — directly, and
//! between ws-proxy (auth-proxy mode) and a real agent's desktop.
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use vncdispatch_proto::v1;
use vncdispatch_proto::vencrypt::{self, CertPin};
use vncdispatch_tests::agent::free_port;
use vncdispatch_tests::front::{self, Front};
use vncdispatch_tests::{rfb, vnc_echo};

/// An Xtigervnc on a free display and port, killed on drop.
struct Xvnc {
    child: Child,
    port: u16,
}

impl Drop for Xvnc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Displays this binary's tests take, so parallel tests never pick the same one.
static NEXT_DISPLAY: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(150);

fn free_display() -> u32 {
    std::iter::from_fn(|| Some(NEXT_DISPLAY.fetch_add(1, std::sync::atomic::Ordering::Relaxed)))
        .take_while(|d| *d < 250)
        .find(|d| {
            !Path::new(&format!("/tmp/.X{d}-lock")).exists()
                && !Path::new(&format!("/tmp/.X11-unix/X{d}")).exists()
        })
        .expect("a free display between 150 and 250")
}

async fn xvnc(dir: &Path, security: &[&str]) -> Xvnc {
    vncdispatch_tests::require_root_and_tigervnc();
    let port = free_port([127, 0, 0, 1].into());
    let passwd = dir.join(format!("passwd-{port}"));
    std::fs::write(&passwd, vncdispatch_proto::vncauth::obfuscate(b"secret12")).expect("passwd");
    let display = free_display();
    let mut args: Vec<String> = vec![
        format!(":{display}"),
        "-rfbport".into(),
        port.to_string(),
        "-localhost".into(),
        "-nolisten".into(),
        "tcp".into(),
        "-PasswordFile".into(),
        passwd.display().to_string(),
    ];
    args.extend(security.iter().map(|s| s.to_string()));
    let child = Command::new("/usr/bin/Xtigervnc")
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("Xtigervnc");
    let up = vncdispatch_tests::eventually(10, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await;
    assert!(up, "Xtigervnc :{display} did not listen on {port}");
    Xvnc { child, port }
}

/// A desktop's certificate as the agent makes it: (cert path, key path, pin).
fn desktop_cert(dir: &Path) -> (String, String, CertPin) {
    let (cert, key, pin) = vnc_echo::desktop_cert(dir).expect("desktop certificate");
    (cert.display().to_string(), key.display().to_string(), pin)
}

async fn login(port: u16, password: &str, pin: CertPin) -> Result<(), String> {
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let mut tls =
        tokio::time::timeout(Duration::from_secs(10), vencrypt::login(tcp, password, pin))
            .await
            .map_err(|_| "timed out".to_owned())??;
    // ClientInit (shared) → ServerInit: width, height, pixel format, name.
    tls.write_all(&[1]).await.map_err(|e| e.to_string())?;
    let mut init = [0u8; 24];
    tls.read_exact(&mut init).await.map_err(|e| e.to_string())?;
    let (w, h) = (
        u16::from_be_bytes([init[0], init[1]]),
        u16::from_be_bytes([init[2], init[3]]),
    );
    if w == 0 || h == 0 {
        return Err(format!("ServerInit says {w}x{h}"));
    }
    Ok(())
}

/// An Xtigervnc offering X509Vnc only, with a desktop certificate made as the agent makes
/// one; with its pin.
async fn x509_xvnc(dir: &Path) -> (Xvnc, CertPin) {
    let (cert, key, pin) = desktop_cert(dir);
    let args = [
        "-SecurityTypes",
        "X509Vnc",
        "-X509Cert",
        &cert,
        "-X509Key",
        &key,
    ];
    (xvnc(dir, &args).await, pin)
}

#[tokio::test(flavor = "multi_thread")]
async fn pinned_x509vnc_login_reaches_server_init_and_refuses_the_wrong_pin_or_password() {
    let dir = tempfile::tempdir().expect("dir");
    let (x, pin) = x509_xvnc(dir.path()).await;
    login(x.port, "secret12", pin).await.expect("pinned login");

    let other = CertPin::from_hex(&"ab".repeat(32)).expect("hex");
    let err = login(x.port, "secret12", other)
        .await
        .expect_err("wrong pin accepted");
    assert!(err.contains("pin"), "{err}");

    let err = login(x.port, "wrong123", pin)
        .await
        .expect_err("wrong password accepted");
    assert!(err.contains("refused"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_without_vencrypt_is_refused_not_downgraded() {
    let dir = tempfile::tempdir().expect("dir");
    let x = xvnc(dir.path(), &["-SecurityTypes", "VncAuth"]).await;
    let pin = CertPin::from_hex(&"00".repeat(32)).expect("hex");
    let err = login(x.port, "secret12", pin)
        .await
        .expect_err("plain VNC auth used");
    assert!(err.contains("does not offer VeNCrypt"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tap_between_client_and_server_sees_no_challenge_and_no_keystrokes() {
    let dir = tempfile::tempdir().expect("dir");
    let (x, pin) = x509_xvnc(dir.path()).await;
    // The tap: a relay that records every byte each way.
    let tap = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let tap_port = tap.local_addr().expect("addr").port();
    let server_port = x.port;
    let recorded = tokio::spawn(async move {
        let (mut client, _) = tap.accept().await.expect("accept");
        let mut server = TcpStream::connect(("127.0.0.1", server_port))
            .await
            .expect("server");
        let (mut cr, mut cw) = client.split();
        let (mut sr, mut sw) = server.split();
        let mut up = Vec::new();
        let mut down = Vec::new();
        let mut b1 = [0u8; 4096];
        let mut b2 = [0u8; 4096];
        loop {
            tokio::select! {
                n = cr.read(&mut b1) => match n { Ok(0) | Err(_) => break, Ok(n) => { up.extend_from_slice(&b1[..n]); if sw.write_all(&b1[..n]).await.is_err() { break } } },
                n = sr.read(&mut b2) => match n { Ok(0) | Err(_) => break, Ok(n) => { down.extend_from_slice(&b2[..n]); if cw.write_all(&b2[..n]).await.is_err() { break } } },
            }
        }
        (up, down)
    });
    let tcp = TcpStream::connect(("127.0.0.1", tap_port))
        .await
        .expect("tap");
    let mut tls = vencrypt::login(tcp, "secret12", pin)
        .await
        .expect("login via tap");
    tls.write_all(&[1]).await.expect("ClientInit");
    let mut init = [0u8; 24];
    tls.read_exact(&mut init).await.expect("ServerInit");
    let name_len = u32::from_be_bytes([init[20], init[21], init[22], init[23]]) as usize;
    let mut name = vec![0u8; name_len];
    tls.read_exact(&mut name).await.expect("name");
    // Type "hunter2-secret" as KeyEvents (down and up for each key).
    let typed = b"hunter2-secret";
    for &k in typed {
        for down in [1u8, 0] {
            let mut ev = vec![4u8, down, 0, 0];
            ev.extend_from_slice(&(k as u32).to_be_bytes());
            tls.write_all(&ev).await.expect("key");
        }
    }
    tls.flush().await.expect("flush");
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(tls);
    let (up, down) = tokio::time::timeout(Duration::from_secs(10), recorded)
        .await
        .expect("tap ends")
        .expect("tap");
    let contains = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    assert!(up.len() > 200, "the client sent {} bytes only", up.len());
    // Keystrokes as the RFB KeyEvent bytes would show in clear: type 4, down, pad, keysym.
    for &k in typed {
        let ev = [4u8, 1, 0, 0, 0, 0, 0, k];
        assert!(
            !contains(&up, &ev),
            "a KeyEvent for {:?} is in clear",
            k as char
        );
    }
    assert!(!contains(&up, typed), "the typed text is in clear");
    // VNC auth in clear would be: server offers type 2, client answers 2, 16-byte challenge.
    assert!(
        !contains(&down[..down.len().min(64)], &[1, 2]),
        "VNC auth offered in clear"
    );
    assert!(
        contains(&down, b"RFB 003.008\n"),
        "the tap saw no RFB at all"
    );
}

/// Serves a stand-in dispatcher answering every token with `target`; its URL.
async fn serve_front(target: v1::Target) -> String {
    front::serve(Front { target })
        .await
        .expect("stand-in dispatcher")
}

/// A relay to `server` that records every byte each way: (port, recording of (up, down)).
async fn tap(server: (String, u16)) -> (u16, tokio::task::JoinHandle<(Vec<u8>, Vec<u8>)>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = l.local_addr().expect("addr").port();
    let handle = tokio::spawn(async move {
        let (mut client, _) = l.accept().await.expect("accept");
        let mut server = TcpStream::connect((server.0.as_str(), server.1))
            .await
            .expect("server");
        let (mut cr, mut cw) = client.split();
        let (mut sr, mut sw) = server.split();
        let (mut up, mut down) = (Vec::new(), Vec::new());
        let (mut b1, mut b2) = ([0u8; 8192], [0u8; 8192]);
        loop {
            tokio::select! {
                n = cr.read(&mut b1) => match n {
                    Ok(0) | Err(_) => break,
                    Ok(n) => { up.extend_from_slice(&b1[..n]); if sw.write_all(&b1[..n]).await.is_err() { break } }
                },
                n = sr.read(&mut b2) => match n {
                    Ok(0) | Err(_) => break,
                    Ok(n) => { down.extend_from_slice(&b2[..n]); if cw.write_all(&b2[..n]).await.is_err() { break } }
                },
            }
        }
        (up, down)
    });
    (port, handle)
}

/// A browser's side of auth-proxy mode over a raw WebSocket: the "None" handshake ws-proxy
/// presents, ClientInit → ServerInit, then KeyEvents typing `typed`. Err: the upgrade was
/// refused (with its HTTP status) or the handshake broke.
async fn browser_types(
    proxy: std::net::SocketAddr,
    token: &str,
    typed: &[u8],
) -> Result<(), String> {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let url = format!("ws://{proxy}/websockify?token={token}");
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .map_err(|e| e.to_string())?;
    rfb::none_login(&mut ws).await?;
    for &k in typed {
        for down in [1u8, 0] {
            let mut ev = vec![4u8, down, 0, 0];
            ev.extend_from_slice(&(k as u32).to_be_bytes());
            ws.send(Message::Binary(ev.into()))
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = ws.close(None).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn through_ws_proxy_the_hop_to_the_desktop_shows_no_challenge_and_no_keystrokes() {
    use vncdispatch_tests::rig::{Rig, RigOptions};
    use vncdispatch_tests::users::TestUser;
    use vncdispatch_tests::wsproxy::WsProxyProc;
    let rig = Rig::start(RigOptions::default()).await;
    let user = TestUser::create();
    let mut d = rig.dispatcher.client().await;
    let s = d
        .dispatch(v1::DispatchRequest {
            username: user.name.clone(),
            remote_ip: "127.0.0.1".into(),
            ..Default::default()
        })
        .await
        .expect("dispatch")
        .into_inner();
    let real = d
        .resolve_token(v1::ResolveTokenRequest {
            token: s.token.clone(),
            attached: false,
        })
        .await
        .expect("resolve")
        .into_inner();
    assert_eq!(real.cert_sha256.len(), 64, "the session has no pin");

    // Through a tap: the desktop shows, and the tap sees TLS only.
    let (tap_port, recorded) = tap((real.host.clone(), real.port as u16)).await;
    let front = serve_front(v1::Target {
        host: "127.0.0.1".into(),
        port: u32::from(tap_port),
        ..real.clone()
    })
    .await;
    let proxy = WsProxyProc::start(&["--dispatcher".into(), front, "--auth-proxy".into()]).await;
    let typed = b"hunter2-secret";
    browser_types(proxy.addr, &s.token, typed)
        .await
        .expect("the desktop through ws-proxy and the tap");
    let (up, _) = tokio::time::timeout(Duration::from_secs(10), recorded)
        .await
        .expect("tap ends")
        .expect("tap");
    let contains = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    assert!(up.len() > 200, "ws-proxy sent {} bytes only", up.len());
    for &k in typed {
        let ev = [4u8, 1, 0, 0, 0, 0, 0, k];
        assert!(!contains(&up, &ev), "KeyEvent {:?} in clear", k as char);
    }
    assert!(!contains(&up, typed), "typed text in clear");
    // The security type ws-proxy chose, right after its 12-byte version: 19 (VeNCrypt), not
    // 2 (VNC authentication, whose challenge and response would follow in clear).
    assert_eq!(up.get(12), Some(&19), "ws-proxy did not choose VeNCrypt");
    assert!(
        proxy.log().contains("logged in over VeNCrypt"),
        "{}",
        proxy.log()
    );

    // The same desktop behind a pin that is not its certificate's: refused, nothing relayed.
    let wrong = serve_front(v1::Target {
        cert_sha256: "ab".repeat(32),
        ..real.clone()
    })
    .await;
    let proxy2 = WsProxyProc::start(&["--dispatcher".into(), wrong, "--auth-proxy".into()]).await;
    let err = browser_types(proxy2.addr, &s.token, b"x")
        .await
        .expect_err("a desktop with another certificate was accepted");
    assert!(err.contains("502"), "{err}");
    assert!(proxy2.log().contains("does not match"), "{}", proxy2.log());

    // A session without a pin (an agent before VeNCrypt): refused by default, since VNC
    // authentication in clear would follow…
    let unpinned = v1::Target {
        cert_sha256: String::new(),
        ..real.clone()
    };
    let strict = WsProxyProc::start(&[
        "--dispatcher".into(),
        serve_front(unpinned.clone()).await,
        "--auth-proxy".into(),
    ])
    .await;
    let err = browser_types(strict.addr, &s.token, b"x")
        .await
        .expect_err("an unpinned session was logged in to in clear");
    assert!(err.contains("502"), "{err}");
    assert!(
        strict.log().contains("no certificate pin"),
        "{}",
        strict.log()
    );
    // …and with --allow-unpinned it is, and the tap does see it: the check above can fail.
    let (tap_port, recorded) = tap((real.host.clone(), real.port as u16)).await;
    let front_unpinned = serve_front(v1::Target {
        host: "127.0.0.1".into(),
        port: u32::from(tap_port),
        ..unpinned
    })
    .await;
    let lax = WsProxyProc::start(&[
        "--dispatcher".into(),
        front_unpinned,
        "--auth-proxy".into(),
        "--allow-unpinned".into(),
    ])
    .await;
    browser_types(lax.addr, &s.token, typed)
        .await
        .expect("unpinned login with --allow-unpinned");
    let (up, _) = tokio::time::timeout(Duration::from_secs(10), recorded)
        .await
        .expect("tap ends")
        .expect("tap");
    assert_eq!(up.get(12), Some(&2), "VNC authentication was not used");
    let ev = [4u8, 1, 0, 0, 0, 0, 0, typed[0]];
    assert!(
        contains(&up, &ev),
        "the tap cannot see keystrokes even in clear"
    );
}
