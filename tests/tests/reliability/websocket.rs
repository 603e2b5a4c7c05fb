//! WebSocket and HTTP abuse of ws-proxy (against a token file and local stand-ins for VNC
//! servers, so no desktop is needed): foreign Origins, redirect and traversal paths, huge and
//! slow handshakes, unanswered closes and pings, a slow reader, oversize and malformed
//! frames, a restart under load, and a VNC server that sends junk.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vncdispatch_tests::reliability::Record;
use vncdispatch_tests::reliability::ws::close_code;
use vncdispatch_tests::wsproxy::WsProxyProc;

/// Sends "ping" and waits up to 2 s for it to come back through the echo target.
async fn echo_once<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> bool
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    if ws
        .send(Message::Binary(b"ping".to_vec().into()))
        .await
        .is_err()
    {
        return false;
    }
    loop {
        match tokio::time::timeout(Duration::from_secs(2), ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => return &b[..] == b"ping",
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            _ => return false,
        }
    }
}

/// Sends `req` on a fresh connection and returns everything the server sends back within
/// `secs` (until it closes), and how long that took.
async fn raw_exchange(addr: SocketAddr, req: &[u8], secs: u64) -> (String, Duration) {
    let started = Instant::now();
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return ("connect failed".into(), started.elapsed());
    };
    let _ = s.write_all(req).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(secs), s.read_to_end(&mut out)).await;
    (
        String::from_utf8_lossy(&out).into_owned(),
        started.elapsed(),
    )
}

/// A WebSocket upgrade done by hand, leaving the raw stream for frame-level abuse.
async fn raw_ws(addr: SocketAddr, token: &str) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "GET /websockify?token={token} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).await.unwrap_or(0) == 0 {
            break;
        }
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

/// Waits for the peer to close; returns (bytes read, time until EOF or `secs`).
async fn until_eof(s: &mut tokio::net::TcpStream, secs: u64) -> (Vec<u8>, Option<Duration>) {
    let started = Instant::now();
    let mut out = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(secs), s.read_to_end(&mut out)).await;
    (out, r.ok().map(|_| started.elapsed()))
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// A VNC-server stand-in that writes `junk` endlessly (or once) to whoever connects, and
/// counts what it managed to send.
async fn flood_server(chunk: Vec<u8>, forever: bool) -> (u16, Arc<std::sync::atomic::AtomicU64>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = sent.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let (chunk, counter) = (chunk.clone(), counter.clone());
            tokio::spawn(async move {
                loop {
                    if s.write_all(&chunk).await.is_err() {
                        return;
                    }
                    counter.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    if !forever {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        return;
                    }
                }
            });
        }
    });
    (port, sent)
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let rec = Record::new("websocket");
    let echo = vncdispatch_tests::echo_server().await;
    let (flood, flood_sent) = flood_server(vec![0x5a; 64 * 1024], true).await;
    let mut junk = vec![0u8; 4096];
    rand::Rng::fill(&mut rand::rng(), &mut junk[..]);
    let (junk_port, _) = flood_server(junk, false).await;
    let viewer_targets = crate::viewer::Targets::start().await;
    let dir = tempfile::tempdir().expect("dir");
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        format!(
            "echo: 127.0.0.1:{echo}\nflood: 127.0.0.1:{flood}\njunk: 127.0.0.1:{junk_port}\n{}",
            viewer_targets.lines
        ),
    )
    .expect("tokens");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a = vec![
            "--token-file".to_string(),
            tokens.display().to_string(),
            "--handshake-timeout".into(),
            "2s".into(),
            "--ping-interval".into(),
            "1s".into(),
            "--idle-timeout".into(),
            "3s".into(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let proxy = WsProxyProc::start(&args(&[])).await;
    let strict = WsProxyProc::start(&args(&["--require-origin"])).await;

    // Origins.
    let with_origin = |p: &WsProxyProc, origin: Option<&str>| {
        let mut req = format!("ws://{}/websockify?token=echo", p.addr)
            .into_client_request()
            .expect("request");
        if let Some(o) = origin {
            req.headers_mut()
                .insert("origin", o.parse().expect("origin"));
        }
        req
    };
    let status = |r: Result<_, tokio_tungstenite::tungstenite::Error>| match r {
        Ok(_) => 101,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(_) => 0,
    };
    let own = format!("http://{}", proxy.addr);
    let cases = [
        (
            "wrong Origin",
            status(
                tokio_tungstenite::connect_async(with_origin(&proxy, Some("https://evil.example")))
                    .await,
            ),
            403,
        ),
        (
            "Origin `null`",
            status(tokio_tungstenite::connect_async(with_origin(&proxy, Some("null"))).await),
            403,
        ),
        (
            "same Origin",
            status(tokio_tungstenite::connect_async(with_origin(&proxy, Some(&own))).await),
            101,
        ),
        (
            "no Origin, default",
            status(tokio_tungstenite::connect_async(with_origin(&proxy, None)).await),
            101,
        ),
        (
            "no Origin, --require-origin",
            status(tokio_tungstenite::connect_async(with_origin(&strict, None)).await),
            403,
        ),
    ];
    rec.bad_inputs(3);
    rec.case(
        "cross-site WebSocket hijacking (Origin)",
        "upgrade requests with a foreign Origin, `null`, the proxy's own, none (default: allowed, as non-browser clients send none; with --require-origin: refused)",
        "403 for foreign and `null`; 101 for the proxy's own",
        &cases.iter().map(|(w, got, _)| format!("{w}: {got}")).collect::<Vec<_>>().join(", "),
        cases.iter().all(|(_, got, want)| got == want),
    );

    // Paths that try to make the file server redirect off-site or escape its directory.
    let mut bad = Vec::new();
    for path in [
        "//evil.com/%2F..",
        "//evil.com/",
        "/%2Fevil.com",
        "/..%2F..%2Fetc/passwd",
        "/app/..%2F..%2Fetc/passwd",
    ] {
        let (r, _) = raw_exchange(
            proxy.addr,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            5,
        )
        .await;
        if r.to_ascii_lowercase().contains("\r\nlocation:") || r.contains("root:") {
            bad.push(format!("{path}: {:.60}", r));
        }
    }
    rec.bad_inputs(5);
    rec.case(
        "`//evil.com` and traversal paths",
        "GET //evil.com/%2F.., //evil.com/, /%2Fevil.com, encoded ../ paths",
        "no Location header, nothing outside the noVNC directory",
        &if bad.is_empty() {
            "404/400 for all, no redirect".to_owned()
        } else {
            bad.join("; ")
        },
        bad.is_empty(),
    );

    // 8 MB of headers and a slow-drip handshake.
    let mut huge = b"GET /websockify?token=echo HTTP/1.1\r\nHost: x\r\nX-Junk: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 8 << 20));
    let (r, took) = raw_exchange(proxy.addr, &huge, 10).await;
    rec.bad_inputs(1);
    rec.case(
        "8 MB of request headers",
        "one header of 8 MiB",
        "refused (431) or cut off, promptly",
        &format!(
            "{:?} after {:.1} s",
            r.lines().next().unwrap_or("connection closed"),
            took.as_secs_f64()
        ),
        (r.is_empty() || r.starts_with("HTTP/1.1 431") || r.starts_with("HTTP/1.1 400"))
            && took < Duration::from_secs(9),
    );
    let mut s = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect");
    let started = Instant::now();
    let drip = b"GET /websockify?token=echo HTTP/1.1\r\nHost: x\r\n";
    let mut cut = None;
    for b in drip.iter().cycle().take(200) {
        if s.write_all(&[*b]).await.is_err() {
            cut = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut probe = [0u8; 1];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(1), s.read(&mut probe)).await
        {
            cut = Some(started.elapsed());
            break;
        }
    }
    rec.faults(1);
    rec.case(
        "slow-drip handshake (slowloris)",
        "request head sent one byte per 50 ms (handshake timeout 2 s)",
        "connection closed at the timeout",
        &format!(
            "closed after {:?}",
            cut.map(|d| format!("{:.1} s", d.as_secs_f64()))
        ),
        cut.is_some_and(|d| d < Duration::from_secs(6)),
    );

    // A close the client never answers; a client that never answers pings.
    let mut s = raw_ws(proxy.addr, "echo").await;
    // A masked text frame "x": ws-proxy refuses text with a close frame, then waits for ours.
    s.write_all(&[0x81, 0x81, 1, 2, 3, 4, b'x' ^ 1])
        .await
        .expect("frame");
    let (got, eof) = until_eof(&mut s, 10).await;
    rec.faults(1);
    rec.case(
        "a close frame never answered",
        "text frame (refused with close 1003), then silence: no close reply, no reads",
        "the proxy sends its close and drops the connection after its 2 s wait",
        &format!(
            "close frame sent: {}; dropped after {:?}",
            got.first() == Some(&0x88),
            eof.map(|d| format!("{:.1} s", d.as_secs_f64()))
        ),
        got.first() == Some(&0x88) && eof.is_some_and(|d| d < Duration::from_secs(6)),
    );
    let mut s = raw_ws(proxy.addr, "echo").await;
    let (got, eof) = until_eof(&mut s, 15).await;
    let pings = got.windows(1).filter(|w| w[0] == 0x89).count();
    rec.faults(1);
    rec.case(
        "no pong",
        "a client that completes the handshake and then never answers (ping every 1 s, idle timeout 3 s)",
        "pinged, then closed at the idle timeout",
        &format!("{pings} pings seen; closed after {:?}", eof.map(|d| format!("{:.1} s", d.as_secs_f64()))),
        pings >= 1 && eof.is_some_and(|d| d < Duration::from_secs(10)),
    );

    // A slow reader in front of a VNC server that floods: backpressure, not buffering.
    let pid = proxy.pid().expect("proxy pid");
    let before = rss_kib(pid);
    let s = raw_ws(proxy.addr, "flood").await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let during = rss_kib(pid);
    let flooded = flood_sent.load(std::sync::atomic::Ordering::Relaxed);
    drop(s);
    rec.faults(1);
    rec.case(
        "a slow reader",
        "a browser that reads nothing for 4 s while its VNC server writes as fast as it can",
        "the VNC server is held back (it gets to write little more than the socket buffers); ws-proxy's memory stays flat",
        &format!(
            "VNC server wrote {:.1} MiB in 4 s; ws-proxy RSS {} → {} KiB",
            flooded as f64 / (1 << 20) as f64,
            before,
            during
        ),
        flooded < 64 << 20 && during < before + 32 * 1024,
    );

    // Oversize and malformed frames.
    let (mut ws, _) = tokio_tungstenite::connect_async(with_origin(&proxy, None))
        .await
        .expect("connect");
    let _ = ws.send(Message::Binary(vec![0u8; 2 << 20].into())).await;
    let big = close_code(&mut ws, 10).await;
    let mut s = raw_ws(proxy.addr, "echo").await;
    s.write_all(&[0xff; 64]).await.expect("garbage");
    let (got, eof) = until_eof(&mut s, 10).await;
    let code = (got.len() >= 4 && got[0] == 0x88).then(|| u16::from_be_bytes([got[2], got[3]]));
    rec.bad_inputs(2);
    rec.case(
        "oversize and malformed frames",
        "a 2 MiB message (limit 1 MiB); 64 bytes of 0xFF after the handshake (reserved bits and opcode)",
        "close 1009 for the first, 1002 for the second; connection dropped",
        &format!("oversize: close {big:?}; garbage: close {code:?}, dropped: {}", eof.is_some()),
        big == Some(1009) && code == Some(1002) && eof.is_some(),
    );

    // Restart under load: SIGTERM drains (open relays go on, new connections are refused,
    // the rest are closed with 1001 at the deadline); clients reconnect to the new process.
    let drain_args = args(&["--drain-timeout", "3s", "--max-per-token", "10"]);
    let mut old = WsProxyProc::start(&drain_args).await;
    let addr = old.addr;
    let mut clients = Vec::new();
    for _ in 0..5 {
        let (ws, _) =
            tokio_tungstenite::connect_async(format!("ws://{addr}/websockify?token=echo"))
                .await
                .expect("connect");
        clients.push(ws);
    }
    let child = old.terminate().expect("running");
    rec.faults(1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut during = 0;
    for ws in clients.iter_mut() {
        if echo_once(ws).await {
            during += 1;
        }
    }
    let refused_new =
        tokio_tungstenite::connect_async(format!("ws://{addr}/websockify?token=echo"))
            .await
            .is_err();
    let mut closes = Vec::new();
    for ws in clients.iter_mut() {
        closes.push(close_code(ws, 8).await);
    }
    let exited = tokio::task::spawn_blocking(move || {
        let mut child = child;
        child.wait().map(|s| s.success()).unwrap_or(false)
    })
    .await
    .unwrap_or(false);
    let new = WsProxyProc::start_at(addr, &drain_args).await;
    let mut back = 0;
    for _ in 0..5 {
        if let Ok((mut ws, _)) =
            tokio_tungstenite::connect_async(format!("ws://{}/websockify?token=echo", new.addr))
                .await
            && echo_once(&mut ws).await
        {
            back += 1;
        }
    }
    rec.case(
        "ws-proxy restarted under load",
        "5 relayed connections; SIGTERM with a 3 s drain; a new process on the same port; the clients reconnect",
        "open relays keep working during the drain; new connections refused; the rest closed with 1001 at the deadline; clean exit; all 5 reconnect",
        &format!(
            "echoed during drain {during}/5; new connection refused: {refused_new}; close codes {closes:?}; exited cleanly: {exited}; reconnected {back}/5"
        ),
        during == 5
            && refused_new
            && closes.iter().all(|c| *c == Some(1001))
            && exited
            && back == 5,
    );

    // A "VNC server" that answers with junk.
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/websockify?token=junk", proxy.addr))
            .await
            .expect("connect");
    use futures_util::StreamExt;
    let first = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
    let relayed = matches!(first, Ok(Some(Ok(Message::Binary(ref b)))) if !b.is_empty());
    let still_serving = tokio_tungstenite::connect_async(with_origin(&proxy, None))
        .await
        .is_ok();
    rec.faults(1);
    rec.case(
        "a VNC server that sends junk",
        "the target answers with 4 KiB of random bytes instead of an RFB banner",
        "relayed as bytes (parsing is the client's job in passthrough); ws-proxy unaffected",
        &format!("relayed: {relayed}; still serving others: {still_serving}"),
        relayed && still_serving,
    );
    crate::viewer::viewer_cases(&rec, &proxy, &args(&[]), &viewer_targets).await;
    rec.finish();
}
