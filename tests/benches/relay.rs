//! ws-proxy vs Debian's websockify vs raw TCP on loopback, in one run, against the same TCP
//! echo server: throughput with 64 KiB and 1 KiB messages (1 and 8 connections), round trip
//! p50/p99 with 64-byte messages, memory per idle connection, connections opened per second.
//!
//! Run: `cargo bench -p vncdispatch-tests --bench relay` (BENCH_MIB per throughput cell,
//! default 64; BENCH_IDLE idle connections for ws-proxy, default 10000 or what the file
//! descriptor limit allows).
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::net::TcpStream;
use vncdispatch_tests::agent::free_port;
use vncdispatch_tests::bench::{self, Conn, wait_port};
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
    Conn::Ws(Box::new(bench::ws_connect(&url).await.expect("ws connect")))
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

fn main() {
    let mib = bench::mib_per_cell();
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
                cells.push(bench::throughput(|| connect(&s, w), msg, conns, mib).await);
            }
            println!("{:<34} {:>12.0} {:>12.0} {:>12.0}", format!("MiB/s, {} KiB msgs, {conns} conn", msg / 1024), cells[0], cells[1], cells[2]);
        }
        let mut rt_cells = Vec::new();
        for (_, w) in ways {
            rt_cells.push(bench::round_trips(connect(&s, w).await, 5000).await);
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
            open_cells.push(bench::opens_per_sec(|| connect(&s, w), 2.0).await);
        }
        println!("{:<34} {:>12.0} {:>12.0} {:>12.0}", "connections opened per s", open_cells[0], open_cells[1], open_cells[2]);
    });
}
