//! ws-proxy against the limit and its peers, in one run, against the same TCP echo server:
//! raw TCP (no hop), a one-hop TCP relay (tokio's `copy_bidirectional_with_sizes`, 64 KiB
//! buffers, in a process of its own: the fair limit, as every proxy pays its extra hop),
//! ws-proxy, optionally an earlier ws-proxy build, Debian's websockify, and websocat when it
//! is installed. Throughput with 64 KiB and 1 KiB messages (1 and 8 connections), CPU seconds
//! per GiB relayed, round trip p50/p99 with 64-byte messages, memory per idle connection,
//! connections opened per second, and opened with one echo through.
//!
//! Run: `cargo build --release --workspace && cargo bench -p vncdispatch-tests --bench relay`
//! (the bench runs the release `ws-proxy` binary, which `cargo bench` does not rebuild). `BENCH_MIB` per throughput cell
//! (default 64); `BENCH_ROUNDS` (default 3): each cell is measured that many times, the ways
//! taking turns, and the median shown; `BENCH_IDLE` idle connections for ws-proxy (default
//! 10000 or what the file descriptor limit allows); `BENCH_BASELINE=/path/to/ws-proxy` adds a
//! column for another build (the one before a change); `websocat` on PATH or in ~/.cargo/bin
//! adds its column (`cargo install websocat`). `BENCH_ONLY` (a comma-separated list of
//! `throughput`, `rtt`, `idle`, `opens`) measures only those rows, for quick turns on one.
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::net::TcpStream;
use vncdispatch_tests::agent::free_port;
use vncdispatch_tests::bench::{self, Conn, wait_port};
use vncdispatch_tests::workspace_bin;

/// Environment variable that makes this binary the one-hop relay: `LISTEN_PORT:TARGET_PORT`.
const ONE_HOP: &str = "VNCDISPATCH_BENCH_ONE_HOP";

/// A way to an echo server, and the process (if any) doing the relaying.
struct Way {
    name: &'static str,
    /// The way's own echo server: connections opened through one way leave their loopback
    /// ports in TIME_WAIT towards its echo port only, not slowing the next way's connects.
    echo: u16,
    /// Raw TCP when None; else the port of a relay.
    port: Option<u16>,
    /// WebSocket (true) or TCP (false) at `port`.
    ws: bool,
    /// The relay process, for CPU and memory.
    child: Option<Child>,
}

impl Drop for Way {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Way {
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    async fn connect(&self) -> Conn {
        match (self.port, self.ws) {
            (Some(port), true) => {
                let url = format!("ws://127.0.0.1:{port}/websockify?token=bench");
                Conn::Ws(Box::new(bench::ws_connect(&url).await.expect("ws connect")))
            }
            (port, _) => {
                let t = TcpStream::connect(("127.0.0.1", port.unwrap_or(self.echo)))
                    .await
                    .expect("connect");
                let _ = t.set_nodelay(true);
                Conn::Tcp(t)
            }
        }
    }
}

/// Starts `cmd` quietly as the relay on `port` to `echo`.
async fn relay(name: &'static str, (port, echo): (u16, u16), ws: bool, mut cmd: Command) -> Way {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    wait_port(port).await;
    Way {
        name,
        echo,
        port: Some(port),
        ws,
        child: Some(child),
    }
}

fn port() -> u16 {
    free_port([127, 0, 0, 1].into())
}

/// A token file in `dir` naming `echo` as the desktop of the token `bench`.
fn token_file(dir: &std::path::Path, echo: u16) -> std::path::PathBuf {
    let tokens = dir.join(format!("tokens-{echo}"));
    std::fs::write(&tokens, format!("bench: 127.0.0.1:{echo}\n")).expect("tokens");
    tokens
}

fn ws_proxy(bin: &std::path::Path, port: u16, tokens: &std::path::Path) -> Command {
    let mut c = Command::new(bin);
    c.args([
        "serve",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--token-file",
    ])
    .arg(tokens)
    .args([
        "--max-per-token",
        "1000000",
        "--max-per-ip",
        "1000000",
        "--max-message",
        "1048576",
    ])
    .env("RUST_LOG", "warn");
    c
}

fn websocat() -> Option<std::path::PathBuf> {
    let home = std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cargo/bin"));
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(home)
        .map(|d| d.join("websocat"))
        .find(|p| p.is_file())
}

/// Every way, each with an echo server of its own; token files go in `dir`.
async fn ways(dir: &std::path::Path) -> Vec<Way> {
    let echo = vncdispatch_tests::echo_server;
    let mut ways = vec![Way {
        name: "raw TCP",
        echo: echo().await,
        port: None,
        ws: false,
        child: None,
    }];
    let (p, e) = (port(), echo().await);
    let mut hop = Command::new(std::env::current_exe().expect("own binary"));
    hop.env(ONE_HOP, format!("{p}:{e}"));
    ways.push(relay("one-hop TCP", (p, e), false, hop).await);
    let (p, e) = (port(), echo().await);
    let cmd = ws_proxy(&workspace_bin("ws-proxy"), p, &token_file(dir, e));
    ways.push(relay("ws-proxy", (p, e), true, cmd).await);
    if let Some(old) = std::env::var_os("BENCH_BASELINE") {
        let (p, e) = (port(), echo().await);
        let cmd = ws_proxy(std::path::Path::new(&old), p, &token_file(dir, e));
        ways.push(relay("ws-proxy before", (p, e), true, cmd).await);
    }
    let (p, e) = (port(), echo().await);
    let mut w = Command::new("websockify");
    w.args(["--token-plugin", "TokenFile", "--token-source"])
        .arg(token_file(dir, e))
        .arg(format!("127.0.0.1:{p}"));
    ways.push(relay("websockify", (p, e), true, w).await);
    if let Some(bin) = websocat() {
        let (p, e) = (port(), echo().await);
        let mut w = Command::new(bin);
        w.args([
            "-b",
            "-E",
            &format!("ws-l:127.0.0.1:{p}"),
            &format!("tcp:127.0.0.1:{e}"),
        ]);
        ways.push(relay("websocat", (p, e), true, w).await);
    }
    ways
}

/// The one-hop relay: every accepted connection copied both ways to the target.
fn one_hop(spec: &str) {
    let (listen, target) = spec.split_once(':').expect("LISTEN:TARGET");
    let target: u16 = target.parse().expect("target port");
    let listen: u16 = listen.parse().expect("listen port");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    // Accepting in a task, as ws-proxy does: each connection then starts on the worker that
    // accepted it, not handed over from the thread running block_on.
    let _ = rt.block_on(rt.spawn(async move {
        let l = tokio::net::TcpListener::bind(format!("127.0.0.1:{listen}"))
            .await
            .expect("bind");
        loop {
            let Ok((mut c, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let Ok(mut t) = TcpStream::connect(("127.0.0.1", target)).await else {
                    return;
                };
                let _ = (c.set_nodelay(true), t.set_nodelay(true));
                let _ =
                    tokio::io::copy_bidirectional_with_sizes(&mut c, &mut t, 65536, 65536).await;
            });
        }
    }));
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

/// Fields after the command name in /proc/PID/stat.
fn stat_fields(pid: u32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.to_owned()))
        .map(|r| r.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// The process and its children (websockify forks one per connection).
fn family(root: u32) -> Vec<u32> {
    let mut out = vec![root];
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if stat_fields(pid).get(1).and_then(|p| p.parse().ok()) == Some(root) {
                out.push(pid);
            }
        }
    }
    out
}

/// CPU seconds (user + system) the process has used, with its reaped children's and those of
/// its live children (websockify's per-connection forks).
fn cpu_secs(root: u32) -> f64 {
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let ticks = |pid: u32, with_reaped: bool| -> u64 {
        let f = stat_fields(pid);
        // utime, stime, cutime, cstime are fields 14..17 of stat, 11..14 after the name.
        let n = if with_reaped { 4 } else { 2 };
        f.iter()
            .skip(11)
            .take(n)
            .filter_map(|x| x.parse::<u64>().ok())
            .sum()
    };
    let mut t = ticks(root, true);
    for child in family(root).into_iter().skip(1) {
        t += ticks(child, false);
    }
    t as f64 / hz
}

async fn idle_kib_per_conn(way: &Way, n: usize) -> f64 {
    let Some(pid) = way.pid() else {
        return f64::NAN;
    };
    let before = rss_kib(&family(pid));
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let mut c = way.connect().await;
        bench::echo_once(&mut c).await;
        held.push(c);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(&family(pid));
    drop(held);
    after.saturating_sub(before) as f64 / n as f64
}

/// One table row: a label, then one cell per way and the ws-proxy / one-hop ratio.
fn row(label: &str, cells: &[f64], precision: usize) {
    let ratio = cells[2] / cells[1];
    println!("{} {ratio:>11.2}", cells_line(label, cells, precision));
}

/// A row without the ratio column (one of differences, where a ratio means nothing).
fn cells_line(label: &str, cells: &[f64], precision: usize) -> String {
    let mut line = format!("{label:<30}");
    for c in cells {
        if c.is_nan() {
            line.push_str(&format!(" {:>11}", "-"));
        } else {
            line.push_str(&format!(" {c:>11.precision$}"));
        }
    }
    line
}

fn main() {
    if let Ok(spec) = std::env::var(ONE_HOP) {
        return one_hop(&spec);
    }
    let mib = bench::mib_per_cell();
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    // Each idle connection costs this process two descriptors (client and echo side), and a
    // relay two: where the hard limit may be raised (CAP_SYS_RESOURCE), room for the 10,000 of
    // issue 16; else stay within it (20,000 on these machines, whose root cannot raise it:
    // 9,500 connections). The relays inherit it.
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((1024, 1024));
    let hard = if setrlimit(Resource::RLIMIT_NOFILE, hard.max(65536), hard.max(65536)).is_ok() {
        hard.max(65536)
    } else {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        hard
    };
    let fits = usize::try_from(hard).unwrap_or(1024).saturating_sub(1000) / 2;
    let idle: usize = std::env::var("BENCH_IDLE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
        .min(fits);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("dir");
        let ways = ways(dir.path()).await;
        println!(
            "\nrelay bench: echo target on loopback, {mib} MiB per throughput cell, median of {rounds} rounds (ways take turns)"
        );
        let mut head = format!("{:<30}", "measure");
        for w in &ways {
            head.push_str(&format!(" {:>11}", w.name));
        }
        head.push_str(&format!(" {:>11}", "ws-proxy/1hop"));
        println!("{head}");
        let mut cpu = vec![0.0; ways.len()];
        let mut relayed_gib = 0.0;
        let only = std::env::var("BENCH_ONLY").unwrap_or_default();
        let wanted = |part: &str| only.is_empty() || only.split(',').any(|p| p.trim() == part);
        let cells = if wanted("throughput") {
            &[(65536, 1), (65536, 8), (1024, 1), (1024, 8)][..]
        } else {
            &[]
        };
        for &(msg, conns) in cells {
            let mut samples = vec![Vec::new(); ways.len()];
            for _ in 0..rounds {
                for (i, w) in ways.iter().enumerate() {
                    let before = w.pid().map(cpu_secs);
                    let mibs = bench::throughput(|| w.connect(), msg, conns, mib).await;
                    if let (Some(b), Some(pid)) = (before, w.pid()) {
                        cpu[i] += cpu_secs(pid) - b;
                    }
                    samples[i].push(mibs);
                }
                relayed_gib += mib as f64 / 1024.0;
            }
            let cells: Vec<f64> = samples.into_iter().map(bench::median).collect();
            row(
                &format!("MiB/s, {} KiB msgs, {conns} conn", msg / 1024),
                &cells,
                0,
            );
        }
        if !cells.is_empty() {
            let per_gib: Vec<f64> = ways
            .iter()
            .zip(&cpu)
            .map(|(w, c)| if w.pid().is_some() { c / relayed_gib } else { f64::NAN })
            .collect();
            row("CPU s per GiB relayed", &per_gib, 2);
        }
        if wanted("rtt") {
            round_trip_rows(&ways, rounds).await;
        }
        if wanted("idle") {
            idle_row(&ways, idle).await;
        }
        // Last: it leaves tens of thousands of loopback ports in TIME_WAIT.
        if wanted("opens") {
            open_rows(&ways, rounds).await;
        }
    });
}

/// Connections opened one after the other, the ways taking turns for a second each round:
/// as each counts an open (TCP's connect; the 101 of a WebSocket relay, which ws-proxy sends
/// only once it has reached the target, websocat before), and opened with one 64-byte echo
/// through (what a viewer waits for, the same for every way; the WebSocket ways' echo goes
/// through tungstenite, as a viewer's would go through its library).
async fn open_rows(ways: &[Way], rounds: usize) {
    let mut opens = vec![Vec::new(); ways.len()];
    let mut echoed = vec![Vec::new(); ways.len()];
    for _ in 0..rounds {
        for (i, w) in ways.iter().enumerate() {
            opens[i].push(bench::opens_per_sec(|| w.connect(), 1.0).await);
            let open_and_echo = || async {
                let mut c = w.connect().await;
                bench::echo_once(&mut c).await;
                c
            };
            echoed[i].push(bench::opens_per_sec(open_and_echo, 1.0).await);
        }
    }
    let median = |v: Vec<Vec<f64>>| v.into_iter().map(bench::median).collect::<Vec<_>>();
    row("connections opened per s", &median(opens), 0);
    row("opened + one echo, per s", &median(echoed), 0);
}

/// Round trips of 64-byte messages, the ways taking turns 5 times a round (3,000 a turn, on a
/// fresh connection): each cell is the median of a way's turns.
async fn round_trip_rows(ways: &[Way], rounds: usize) {
    let mut p50 = vec![Vec::new(); ways.len()];
    let mut p99 = vec![Vec::new(); ways.len()];
    for _ in 0..rounds * 5 {
        for (i, w) in ways.iter().enumerate() {
            let (a, b) = bench::round_trips(w.connect().await, 3000).await;
            p50[i].push(a);
            p99[i].push(b);
        }
    }
    // Each turn against the one-hop relay's turn of the same round: this VM drifts by more
    // than the goal (5 µs) between runs, and within a run between rounds.
    let over: Vec<Vec<f64>> = p50
        .iter()
        .map(|way| way.iter().zip(&p50[1]).map(|(w, hop)| w - hop).collect())
        .collect();
    let median = |v: Vec<Vec<f64>>| v.into_iter().map(bench::median).collect::<Vec<_>>();
    row("round trip p50 µs, 64 B", &median(p50), 1);
    println!(
        "{}",
        cells_line("  over one-hop, paired µs", &median(over), 1)
    );
    row("round trip p99 µs, 64 B", &median(p99), 0);
}

async fn idle_row(ways: &[Way], idle: usize) {
    let mut rss = Vec::new();
    let forks_n = 300;
    for w in ways {
        // websockify forks a process per connection: a few hundred tell its cost.
        let n = if w.name == "websockify" {
            forks_n
        } else {
            idle
        };
        rss.push(idle_kib_per_conn(w, n).await);
    }
    row("RSS KiB per idle connection", &rss, 1);
    println!(
        "(idle: {idle} connections held through each relay after one 64-byte echo each; {forks_n} through websockify, which forks a process per connection)"
    );
}
