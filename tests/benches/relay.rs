//! ws-proxy vs Debian's websockify vs raw TCP on loopback, in one run, against the same TCP
//! echo server: throughput with 64 KiB and 1 KiB messages (1 and 8 connections), round trip
//! p50/p99 with 64-byte messages, memory per idle connection, connections opened per second.
//!
//! Run: `cargo bench -p vncdispatch-tests --bench relay` (BENCH_MIB per throughput cell,
//! default 64; BENCH_IDLE idle connections for ws-proxy, default 10000 or what the file
//! descriptor limit allows).
use futures_util::{SinkExt, StreamExt};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use vncdispatch_tests::agent::free_port;
use vncdispatch_tests::workspace_bin;

#[derive(Clone, Copy, PartialEq)]
enum Way {
    Raw,
    WsProxy,
    Websockify,
}

struct Setup {
    echo: u16,
    ws_proxy: u16,
    websockify: u16,
    children: Vec<Child>,
    _dir: tempfile::TempDir,
}

impl Drop for Setup {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn wait_port(port: u16) {
    for _ in 0..500 {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("port {port} never opened");
}

async fn setup() -> Setup {
    let echo = vncdispatch_tests::echo_server().await;
    let dir = tempfile::tempdir().expect("dir");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("bench: 127.0.0.1:{echo}\n")).expect("tokens");
    let (ws_proxy, websockify) = (
        free_port([127, 0, 0, 1].into()),
        free_port([127, 0, 0, 1].into()),
    );
    let p = Command::new(workspace_bin("ws-proxy"))
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{ws_proxy}"),
            "--token-file",
        ])
        .arg(&tokens)
        .args([
            "--max-per-token",
            "1000000",
            "--max-per-ip",
            "1000000",
            "--max-message",
            "1048576",
        ])
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .expect("ws-proxy");
    let w = Command::new("websockify")
        .args(["--token-plugin", "TokenFile", "--token-source"])
        .arg(&tokens)
        .arg(format!("127.0.0.1:{websockify}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("websockify (Debian package websockify)");
    wait_port(ws_proxy).await;
    wait_port(websockify).await;
    Setup {
        echo,
        ws_proxy,
        websockify,
        children: vec![p, w],
        _dir: dir,
    }
}

/// One connection, either raw TCP or WebSocket through a proxy.
enum Conn {
    Tcp(TcpStream),
    Ws(Box<tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>>),
}

async fn connect(s: &Setup, way: Way) -> Conn {
    let port = match way {
        Way::Raw => {
            let t = TcpStream::connect(("127.0.0.1", s.echo))
                .await
                .expect("connect");
            let _ = t.set_nodelay(true);
            return Conn::Tcp(t);
        }
        Way::WsProxy => s.ws_proxy,
        Way::Websockify => s.websockify,
    };
    let url = format!("ws://127.0.0.1:{port}/websockify?token=bench");
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
            .expect("req");
    req.headers_mut()
        .insert("sec-websocket-protocol", "binary".parse().expect("hv"));
    let (ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("ws connect");
    Conn::Ws(Box::new(ws))
}

/// Sends `total` bytes in `msg`-byte messages and reads the echo; returns bytes/s.
async fn pump(conn: Conn, msg: usize, total: usize) -> usize {
    let payload = vec![7u8; msg];
    let n = total / msg;
    match conn {
        Conn::Tcp(t) => {
            let (mut r, mut w) = t.into_split();
            let writer = tokio::spawn(async move {
                for _ in 0..n {
                    w.write_all(&payload).await.expect("write");
                }
                w
            });
            let mut got = 0;
            let mut buf = vec![0u8; 256 * 1024];
            while got < n * msg {
                got += r.read(&mut buf).await.expect("read");
            }
            let _ = writer.await;
            got
        }
        Conn::Ws(ws) => {
            let (mut sink, mut stream) = ws.split();
            let writer = tokio::spawn(async move {
                for _ in 0..n {
                    sink.send(Message::Binary(payload.clone().into()))
                        .await
                        .expect("send");
                }
                sink
            });
            let mut got = 0;
            while got < n * msg {
                match stream.next().await {
                    Some(Ok(Message::Binary(b))) => got += b.len(),
                    Some(Ok(_)) => {}
                    other => panic!("relay ended: {other:?}"),
                }
            }
            let _ = writer.await;
            got
        }
    }
}

async fn throughput(s: &Setup, way: Way, msg: usize, conns: usize, mib: usize) -> f64 {
    let mut cs = Vec::new();
    for _ in 0..conns {
        cs.push(connect(s, way).await);
    }
    let per = mib * 1024 * 1024 / conns;
    let t = Instant::now();
    let tasks: Vec<_> = cs
        .into_iter()
        .map(|c| tokio::spawn(pump(c, msg, per)))
        .collect();
    let mut bytes = 0;
    for task in tasks {
        bytes += task.await.expect("pump");
    }
    bytes as f64 / t.elapsed().as_secs_f64() / (1024.0 * 1024.0)
}

async fn round_trips(s: &Setup, way: Way, n: usize) -> (f64, f64) {
    let mut lat = Vec::with_capacity(n);
    match connect(s, way).await {
        Conn::Tcp(mut t) => {
            let mut buf = [0u8; 64];
            for _ in 0..n {
                let start = Instant::now();
                t.write_all(&[1u8; 64]).await.expect("write");
                t.read_exact(&mut buf).await.expect("read");
                lat.push(start.elapsed());
            }
        }
        Conn::Ws(mut ws) => {
            for _ in 0..n {
                let start = Instant::now();
                ws.send(Message::Binary(vec![1u8; 64].into()))
                    .await
                    .expect("send");
                let mut got = 0;
                while got < 64 {
                    if let Some(Ok(Message::Binary(b))) = ws.next().await {
                        got += b.len();
                    }
                }
                lat.push(start.elapsed());
            }
        }
    }
    lat.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    (us(lat[n / 2]), us(lat[n * 99 / 100]))
}

fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .sum()
}

/// The process and its children (websockify forks one per connection).
fn family(root: u32) -> Vec<u32> {
    let mut out = vec![root];
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let ppid = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<u32>().ok())
                });
            if ppid == Some(root) {
                out.push(pid);
            }
        }
    }
    out
}

async fn idle_kib_per_conn(s: &Setup, way: Way, pid: u32, n: usize) -> f64 {
    let before = rss_kib(&family(pid));
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        held.push(connect(s, way).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(&family(pid));
    drop(held);
    after.saturating_sub(before) as f64 / n as f64
}

async fn opens_per_sec(s: &Setup, way: Way, secs: f64) -> f64 {
    let t = Instant::now();
    let mut n = 0;
    while t.elapsed().as_secs_f64() < secs {
        let c = connect(s, way).await;
        drop(c);
        n += 1;
    }
    n as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    let mib: usize = std::env::var("BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    // Each idle connection costs this process two descriptors (client and echo side): stay
    // within the hard limit (20,000 on these machines).
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .unwrap_or((1024, 1024));
    let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    let fits = usize::try_from(hard).unwrap_or(1024).saturating_sub(1000) / 2;
    let idle: usize = std::env::var("BENCH_IDLE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
        .min(fits);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let s = setup().await;
        let ways = [("raw TCP", Way::Raw), ("ws-proxy", Way::WsProxy), ("websockify", Way::Websockify)];
        println!("\nrelay bench: echo target on loopback, {mib} MiB per throughput cell");
        println!("{:<34} {:>12} {:>12} {:>12}", "measure", "raw TCP", "ws-proxy", "websockify");
        for (msg, conns) in [(65536, 1), (65536, 8), (1024, 1), (1024, 8)] {
            let mut cells = Vec::new();
            for (_, w) in ways {
                cells.push(throughput(&s, w, msg, conns, mib).await);
            }
            println!("{:<34} {:>12.0} {:>12.0} {:>12.0}", format!("MiB/s, {} KiB msgs, {conns} conn", msg / 1024), cells[0], cells[1], cells[2]);
        }
        let mut rt_cells = Vec::new();
        for (_, w) in ways {
            rt_cells.push(round_trips(&s, w, 5000).await);
        }
        println!("{:<34} {:>12.0} {:>12.0} {:>12.0}", "round trip p50 µs, 64 B", rt_cells[0].0, rt_cells[1].0, rt_cells[2].0);
        println!("{:<34} {:>12.0} {:>12.0} {:>12.0}", "round trip p99 µs, 64 B", rt_cells[0].1, rt_cells[1].1, rt_cells[2].1);
        let wsp = idle_kib_per_conn(&s, Way::WsProxy, s.children[0].id(), idle).await;
        let wsf_n = 300;
        let wsf = idle_kib_per_conn(&s, Way::Websockify, s.children[1].id(), wsf_n).await;
        println!("{:<34} {:>12} {:>12.1} {:>12.1}", "RSS KiB per idle connection", "-", wsp, wsf);
        println!("(idle: {idle} connections held through ws-proxy; {wsf_n} through websockify, which forks a process per connection)");
        // Last: it leaves tens of thousands of loopback ports in TIME_WAIT.
        let mut open_cells = Vec::new();
        for (_, w) in ways {
            open_cells.push(opens_per_sec(&s, w, 2.0).await);
        }
        println!("{:<34} {:>12.0} {:>12.0} {:>12.0}", "connections opened per s", open_cells[0], open_cells[1], open_cells[2]);
    });
}
