//! ws-proxy refusals and relay behaviour, with real WebSocket clients against a real
//! ws-proxy process in front of a TCP echo server (and, for revocation and IP binding, a real
//! dispatcher and desktop).
use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use vncdispatch_proto::v1::{DispatchRequest, EndSessionRequest};
use vncdispatch_tests::rig::{Rig, RigOptions};
use vncdispatch_tests::users::TestUser;
use vncdispatch_tests::wsproxy::WsProxyProc;

/// A token long enough to have a prefix in the logs (token files allow any token).
const LONG_TOKEN: &str = "0123456789abcdef0123456789abcdef";

async fn proxy_with_tokens(extra: &[&str]) -> (WsProxyProc, tempfile::TempDir) {
    let port = vncdispatch_tests::echo_server().await;
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("tokens");
    std::fs::write(
        &file,
        format!("good: 127.0.0.1:{port}\nclosed: 127.0.0.1:1\n{LONG_TOKEN}: 127.0.0.1:{port}\n"),
    )
    .expect("tokens");
    // The default --web: the noVNC library scripts/install-deps.sh installs.
    let mut args = vec!["--token-file".to_string(), file.display().to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    (WsProxyProc::start(&args).await, dir)
}

fn request(
    proxy: &WsProxyProc,
    path: &str,
    origin: Option<&str>,
    protocol: Option<&str>,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let mut req = format!("ws://{}{path}", proxy.addr)
        .into_client_request()
        .expect("request");
    if let Some(o) = origin {
        req.headers_mut()
            .insert("origin", HeaderValue::from_str(o).expect("origin"));
    }
    if let Some(p) = protocol {
        req.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_str(p).expect("protocol"),
        );
    }
    req
}

fn refused_status(r: Result<impl std::fmt::Debug, WsError>) -> u16 {
    match r {
        Err(WsError::Http(resp)) => resp.status().as_u16(),
        other => panic!("expected an HTTP refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn relays_binary_with_and_without_the_binary_subprotocol() {
    let (proxy, _dir) = proxy_with_tokens(&[]).await;
    for protocol in [None, Some("binary"), Some("base64, binary")] {
        let (mut ws, resp) = tokio_tungstenite::connect_async(request(
            &proxy,
            "/websockify?token=good",
            None,
            protocol,
        ))
        .await
        .expect("connect");
        let echoed = resp
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap_or("").to_owned());
        assert_eq!(
            echoed.as_deref(),
            protocol.map(|_| "binary"),
            "{protocol:?}"
        );
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        ws.send(Message::Binary(payload.clone().into()))
            .await
            .expect("send");
        let mut back = Vec::new();
        while back.len() < payload.len() {
            match tokio::time::timeout(Duration::from_secs(5), ws.next())
                .await
                .expect("echo in time")
            {
                Some(Ok(Message::Binary(b))) => back.extend_from_slice(&b),
                Some(Ok(_)) => {}
                other => panic!("relay ended: {other:?}"),
            }
        }
        assert_eq!(back, payload);
    }
    let r = tokio_tungstenite::connect_async(request(
        &proxy,
        "/websockify?token=good",
        None,
        Some("base64"),
    ))
    .await;
    assert_eq!(refused_status(r), 400, "only binary is spoken");
}

#[tokio::test(flavor = "multi_thread")]
async fn refuses_bad_tokens_origins_and_excess_connections() {
    let (proxy, _dir) = proxy_with_tokens(&[
        "--max-per-token",
        "1",
        "--allowed-origin",
        "https://portal.example.com",
    ])
    .await;
    let host_origin = format!("http://{}", proxy.addr);
    assert_eq!(
        refused_status(
            tokio_tungstenite::connect_async(request(&proxy, "/websockify?token=nope", None, None))
                .await
        ),
        403
    );
    assert_eq!(
        refused_status(
            tokio_tungstenite::connect_async(request(&proxy, "/websockify", None, None)).await
        ),
        400
    );
    assert_eq!(
        refused_status(
            tokio_tungstenite::connect_async(request(
                &proxy,
                "/websockify?token=closed",
                None,
                None
            ))
            .await
        ),
        502
    );
    let evil = request(
        &proxy,
        "/websockify?token=good",
        Some("https://evil.example"),
        None,
    );
    assert_eq!(
        refused_status(tokio_tungstenite::connect_async(evil).await),
        403,
        "cross-site WebSocket hijacking"
    );
    let (first, _) = tokio_tungstenite::connect_async(request(
        &proxy,
        "/websockify?token=good",
        Some(&host_origin),
        None,
    ))
    .await
    .expect("same origin");
    let second = request(
        &proxy,
        "/websockify?token=good",
        Some("https://portal.example.com"),
        None,
    );
    assert_eq!(
        refused_status(tokio_tungstenite::connect_async(second).await),
        429,
        "one connection per token"
    );
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again = request(
        &proxy,
        "/websockify?token=good",
        Some("https://portal.example.com"),
        None,
    );
    tokio_tungstenite::connect_async(again)
        .await
        .expect("the slot is free again");
    let log = proxy.log();
    assert!(
        log.contains("origin not allowed") && log.contains("unknown or expired token"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn oversize_frames_are_refused_with_1009() {
    let (proxy, _dir) = proxy_with_tokens(&["--max-message", "65536"]).await;
    let (mut ws, _) =
        tokio_tungstenite::connect_async(request(&proxy, "/websockify?token=good", None, None))
            .await
            .expect("connect");
    let _ = ws.send(Message::Binary(vec![0u8; 1 << 20].into())).await;
    let mut code = None;
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        match msg {
            Ok(Message::Close(Some(f))) => {
                code = Some(u16::from(f.code));
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    assert_eq!(code, Some(1009), "a 1 MiB frame must be refused as too big");
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_and_huge_handshakes_are_cut_off() {
    let (proxy, _dir) = proxy_with_tokens(&["--handshake-timeout", "1s"]).await;
    // Slow drip: a request head that never completes.
    let mut s = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect");
    s.write_all(b"GET /websockify?token=good HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(
        closed.is_ok(),
        "a handshake that never completes was kept open"
    );
    // 8 MB of headers.
    let mut s = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect");
    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Junk: ").await;
    let junk = vec![b'a'; 1 << 20];
    let mut sent = 0;
    for _ in 0..8 {
        if s.write_all(&junk).await.is_err() {
            break;
        }
        sent += junk.len();
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    let head = String::from_utf8_lossy(&buf);
    assert!(
        sent < 8 << 20 || head.is_empty() || head.starts_with("HTTP/1.1 431"),
        "huge header accepted: {head:.80}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn static_files_never_redirect_off_site() {
    let (proxy, _dir) = proxy_with_tokens(&[]).await;
    let get = |path: &'static str| {
        let addr = proxy.addr;
        async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .expect("write");
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
            String::from_utf8_lossy(&out).into_owned()
        }
    };
    let root = get("/").await;
    assert!(
        root.starts_with("HTTP/1.1 200") && root.contains("noVNC"),
        "{root:.200}"
    );
    assert!(
        root.to_ascii_lowercase()
            .contains("referrer-policy: no-referrer")
    );
    assert!(get("/vnc.html").await.starts_with("HTTP/1.1 200"));
    // The viewer page may load scripts and open WebSockets on this server only, and be framed
    // by it alone (no --allowed-origin here); the library it imports is there.
    let csp = root
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-security-policy:")
                .map(str::to_owned)
        })
        .unwrap_or_default();
    assert!(
        csp.contains("script-src 'self'")
            && csp.contains("connect-src 'self'")
            && csp.contains("frame-ancestors 'self'"),
        "{root:.600}"
    );
    assert!(get("/core/rfb.js").await.starts_with("HTTP/1.1 200"));
    for evil in [
        "//evil.com/%2F..",
        "//evil.com/",
        "/%2Fevil.com",
        "/app",
        "/../etc/passwd",
        "/app/..%2F..%2Fetc/passwd",
    ] {
        let r = get(evil).await;
        assert!(
            !r.to_ascii_lowercase().contains("\r\nlocation:"),
            "{evil} redirected: {r:.200}"
        );
        assert!(
            r.starts_with("HTTP/1.1 404") || r.starts_with("HTTP/1.1 400"),
            "{evil}: {r:.80}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ended_session_closes_its_connection_and_ip_binding_holds() {
    let rig = Rig::start(RigOptions::default()).await;
    let d = &rig.dispatcher;
    let proxy = WsProxyProc::start(&[
        "--dispatcher".into(),
        format!("http://{}", d.addr),
        "--recheck-interval".into(),
        "1s".into(),
        "--bind-token-to-ip".into(),
    ])
    .await;
    let user = TestUser::create();
    let mut c = d.client().await;
    // Recorded from another address: refused while binding is on.
    let s = c
        .dispatch(DispatchRequest {
            username: user.name.clone(),
            remote_ip: "192.0.2.50".into(),
            ..Default::default()
        })
        .await
        .expect("Dispatch")
        .into_inner();
    let path = format!("/websockify?token={}", s.token);
    assert_eq!(
        refused_status(tokio_tungstenite::connect_async(request(&proxy, &path, None, None)).await),
        403
    );
    let s = c
        .dispatch(DispatchRequest {
            username: user.name.clone(),
            remote_ip: "127.0.0.1".into(),
            ..Default::default()
        })
        .await
        .expect("Dispatch")
        .into_inner();
    tokio::time::sleep(Duration::from_millis(5200)).await; // the proxy's positive cache
    let (mut ws, _) = tokio_tungstenite::connect_async(request(&proxy, &path, None, None))
        .await
        .expect("connect");
    let banner = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("banner");
    assert!(matches!(banner, Some(Ok(Message::Binary(b))) if b.starts_with(b"RFB ")));
    c.end_session(EndSessionRequest {
        username: user.name.clone(),
    })
    .await
    .expect("end");
    let mut closed_with = None;
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        if let Ok(Message::Close(f)) = msg {
            closed_with = f.map(|f| f.reason.to_string());
            break;
        }
        if msg.is_err() {
            closed_with = Some("error".into());
            break;
        }
    }
    assert!(
        closed_with.is_some(),
        "the relayed connection outlived its session"
    );
    let _ = s;
}

/// A log with its colour codes taken out, so fields read `name=value`.
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ parameters, ending in a letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The proxy's log, colourless, once it holds every one of `needles` (lines are written
/// after the 101, by the relay task); fails after 5 s.
async fn log_with(proxy: &WsProxyProc, needles: &[&str]) -> String {
    for _ in 0..50 {
        let log = plain(&proxy.log());
        if needles.iter().all(|n| log.contains(n)) {
            return log;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{needles:?} not all in the log: {}", plain(&proxy.log()));
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_logs_carry_the_client_and_a_token_prefix_only() {
    let (proxy, _dir) = proxy_with_tokens(&[]).await;
    let path = format!("/websockify?token={LONG_TOKEN}");
    let (mut ws, _) = tokio_tungstenite::connect_async(request(&proxy, &path, None, None))
        .await
        .expect("connect");
    ws.send(Message::Binary(b"ping".to_vec().into()))
        .await
        .expect("send");
    let echo = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("echo in time");
    assert!(matches!(echo, Some(Ok(Message::Binary(b))) if &b[..] == b"ping"));
    ws.close(None).await.expect("close");
    while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {}
    let unknown = "feedfacecafebeef0011223344556677";
    let r = tokio_tungstenite::connect_async(request(
        &proxy,
        &format!("/websockify?token={unknown}"),
        None,
        None,
    ))
    .await;
    assert_eq!(refused_status(r), 403);
    let log = log_with(&proxy, &["relay ended", "unknown or expired token"]).await;
    let span_lines = |message: &str, prefix: &str| {
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(message)).collect();
        assert_eq!(lines.len(), 1, "one `{message}` line in {log}");
        for l in lines {
            assert!(
                l.contains("ws{client=127.0.0.1") && l.contains(&format!("token=\"{prefix}\"")),
                "`{message}` not in the connection's span: {l}"
            );
        }
    };
    span_lines("relaying", &LONG_TOKEN[..8]);
    span_lines("relay ended", &LONG_TOKEN[..8]);
    span_lines("unknown or expired token", &unknown[..8]);
    for whole in [LONG_TOKEN, unknown] {
        assert!(
            !log.contains(&whole[..9]),
            "more than a token's prefix logged: {log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn forwarded_for_counts_only_from_a_trusted_proxy() {
    for trusted in [false, true] {
        let mut args = vec!["--max-per-ip", "1"];
        if trusted {
            args.extend(["--trusted-proxy", "127.0.0.1"]);
        }
        let (proxy, _dir) = proxy_with_tokens(&args).await;
        let forwarded = |client: &str| {
            let mut r = request(&proxy, "/websockify?token=good", None, None);
            r.headers_mut().insert(
                "x-forwarded-for",
                HeaderValue::from_str(client).expect("header"),
            );
            r
        };
        let (_first, _) = tokio_tungstenite::connect_async(forwarded("192.0.2.1"))
            .await
            .expect("first connection");
        let second = tokio_tungstenite::connect_async(forwarded("192.0.2.2")).await;
        if trusted {
            // Another client behind the proxy: its own per-IP slot, named in the log.
            second.expect("a second client behind a trusted proxy");
            log_with(&proxy, &["ws{client=192.0.2.1", "ws{client=192.0.2.2"]).await;
        } else {
            // A spoofed header from an untrusted peer changes nothing: one peer, one slot.
            assert_eq!(refused_status(second), 429, "spoofed X-Forwarded-For");
            let log = log_with(&proxy, &["relaying", "connection limit"]).await;
            assert!(
                log.contains("client=127.0.0.1") && !log.contains("192.0.2."),
                "{log}"
            );
        }
    }
}
