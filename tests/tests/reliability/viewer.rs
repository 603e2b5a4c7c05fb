//! The viewer page against links and pages an attacker controls, in a real Chromium: a link
//! that names another server (host/port options, a path on another host), a password in the
//! link, and the page framed by a site on another origin (clickjacking a desktop). Part of
//! the [`crate::websocket`] group.
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use vncdispatch_tests::browser::Browser;
use vncdispatch_tests::reliability::Record;
use vncdispatch_tests::wsproxy::WsProxyProc;

/// A TCP listener that counts (and holds) the connections it gets.
async fn counting_listener() -> (u16, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            held.push(s);
        }
    });
    (port, count)
}

/// Answers every request on `l` (a server on its own origin) with `html`.
fn serve_page(l: tokio::net::TcpListener, html: String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let html = html.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    html.len()
                );
                let _ = s.write_all(format!("{head}{html}").as_bytes()).await;
            });
        }
    });
}

/// Polls until `count` reaches `want` or `secs` pass.
async fn reaches(count: &AtomicUsize, want: usize, secs: u64) -> bool {
    for _ in 0..secs * 20 {
        if count.load(Ordering::SeqCst) >= want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// The targets the cases' tokens lead to, as `token: host:port` lines for ws-proxy's token
/// file, and their counters.
pub(crate) struct Targets {
    /// Token-file lines.
    pub(crate) lines: String,
    linked: Arc<AtomicUsize>,
    framed: Arc<AtomicUsize>,
    framed_allowed: Arc<AtomicUsize>,
}

impl Targets {
    /// Listeners for the viewer cases' tokens.
    pub(crate) async fn start() -> Targets {
        let (linked_port, linked) = counting_listener().await;
        let (framed_port, framed) = counting_listener().await;
        let (allowed_port, framed_allowed) = counting_listener().await;
        Targets {
            lines: format!(
                "viewer: 127.0.0.1:{linked_port}\nframed: 127.0.0.1:{framed_port}\nframed-allowed: 127.0.0.1:{allowed_port}\n"
            ),
            linked,
            framed,
            framed_allowed,
        }
    }
}

/// The cases, against `proxy` (default settings) and a second proxy started with
/// `proxy_args` plus `--allowed-origin` for the framing site (the control: a frame that may
/// load does connect).
pub(crate) async fn viewer_cases(
    rec: &Record,
    proxy: &WsProxyProc,
    proxy_args: &[String],
    t: &Targets,
) {
    let (evil_port, evil) = counting_listener().await;

    // A link naming another server, with the password in it.
    let url = format!(
        "http://{}/vnc.html?autoconnect=1&host=127.0.0.1&port={evil_port}&encrypt=0&pass%77ord=hunter22&path=websockify?token=viewer",
        proxy.addr
    );
    let mut b = Browser::open(&url).await.expect("chromium");
    let own = reaches(&t.linked, 1, 20).await;
    let href = b
        .eval("location.href")
        .await
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    // The same page told to take its WebSocket path from another host: `//host/…` stays a
    // path on this server; an absolute URL is refused.
    let _ = b
        .eval(&format!(
            "location.href = '/vnc.html?path=//127.0.0.1:{evil_port}/websockify'"
        ))
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = b
        .eval(&format!(
            "location.href = '/vnc.html?path=ws://127.0.0.1:{evil_port}/websockify'"
        ))
        .await;
    let refused = b
        .wait_for(
            "document.getElementById('status')?.textContent.includes('another server') === true",
            10,
        )
        .await
        .unwrap_or(false);
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(b);
    let to_evil = evil.load(Ordering::SeqCst);
    rec.bad_inputs(2);
    rec.case(
        "a viewer link that points at another server",
        "vnc.html with host/port of another listener and the password in the link; then paths `//127.0.0.1:PORT/…` and `ws://127.0.0.1:PORT/…`",
        "the page connects only to the ws-proxy that served it (an absolute URL as path is refused), and takes the password out of the address bar",
        &format!(
            "connected through ws-proxy: {own}; connections to the other server: {to_evil}; absolute path refused: {refused}; password left in the address bar: {}",
            href.contains("hunter22")
        ),
        own && to_evil == 0 && refused && !href.contains("hunter22") && href.contains("token=viewer"),
    );

    // A site on another origin framing the viewer (to overlay it and steer clicks).
    let site = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let framer = site.local_addr().expect("addr").port();
    let mut args = proxy_args.to_vec();
    args.extend([
        "--allowed-origin".into(),
        format!("http://127.0.0.1:{framer}"),
    ]);
    let allowing = WsProxyProc::start(&args).await;
    serve_page(
        site,
        format!(
            "<iframe src='http://{}/vnc.html?autoconnect=1&path=websockify?token=framed'></iframe><iframe src='http://{}/vnc.html?autoconnect=1&path=websockify?token=framed-allowed'></iframe>",
            proxy.addr, allowing.addr
        ),
    );
    let b = Browser::open(&format!("http://127.0.0.1:{framer}/")).await;
    let allowed_loaded = reaches(&t.framed_allowed, 1, 20).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(b);
    let framed = t.framed.load(Ordering::SeqCst);
    rec.bad_inputs(1);
    rec.case(
        "the viewer framed by a page on another origin",
        "a page on another origin with two iframes: the viewer of a default ws-proxy, and of one with --allowed-origin naming that page",
        "the default proxy's viewer never runs in the frame (CSP frame-ancestors): no WebSocket from it; the allowed one connects",
        &format!(
            "connections from the framed viewer: {framed}; from the allowed one: {}",
            t.framed_allowed.load(Ordering::SeqCst)
        ),
        framed == 0 && allowed_loaded,
    );
}
