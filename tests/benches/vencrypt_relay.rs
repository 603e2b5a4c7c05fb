//! What TLS to the desktop costs (issue 12): ws-proxy in auth-proxy mode relaying to a VNC
//! server over VeNCrypt X509Vnc, side by side with the same relay over plain RFB and with a
//! one-hop TCP relay (the limit), in one run.
//!
//! Every way ends at a stand-in VNC server ([`vnc_echo`]) that logs the client in and then
//! echoes, so only the hop differs:
//! - one-hop TCP relay: client → `copy_bidirectional_with_sizes` (64 KiB buffers) → VNC
//!   server with VNC authentication; no WebSocket, no TLS; the client logs in itself;
//! - ws-proxy, plain RFB: browser WebSocket → ws-proxy `--auth-proxy`, which resolves the token
//!   at a stand-in dispatcher ([`front`]) and logs in with VNC authentication → VNC server;
//! - ws-proxy, VeNCrypt: the same, but the target carries the server's certificate pin, so
//!   ws-proxy logs in over VeNCrypt X509Vnc and relays inside TLS.
//!
//! Measured as `benches/relay.rs` measures ([`bench`]); a connection open is the TCP connect,
//! the WebSocket upgrade and the whole RFB login through ServerInit. Each cell runs once per
//! round for the three ways in turn (the order rotating each round), after a warm-up, so noise
//! hits all three alike; the table shows each cell's median over the rounds.
//!
//! Run: `cargo bench -p vncdispatch-tests --bench vencrypt_relay` (BENCH_MIB per throughput
//! cell, default 64; BENCH_ROUNDS, default 3).
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use vncdispatch_proto::v1;
use vncdispatch_proto::vencrypt::CertPin;
use vncdispatch_tests::bench::{self, Conn};
use vncdispatch_tests::front::{self, Front};
use vncdispatch_tests::rfb::{self, Login};
use vncdispatch_tests::vnc_echo::VncEcho;
use vncdispatch_tests::wsproxy::WsProxyProc;

/// The desktop's VNC password in every way.
const PASSWORD: &str = "bench123";

/// The three ways to the echo, in the table's column order.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Way {
    OneHop,
    Plain,
    VeNCrypt,
}

const WAYS: [Way; 3] = [Way::OneHop, Way::Plain, Way::VeNCrypt];

/// What is running for the bench; everything stops when it drops.
struct Setup {
    /// The one-hop TCP relay's port, in front of the plain VNC server.
    hop: u16,
    /// ws-proxy whose dispatcher sends it to the plain VNC server.
    plain: WsProxyProc,
    /// ws-proxy whose dispatcher sends it to the VeNCrypt VNC server, pinned.
    vencrypt: WsProxyProc,
    /// The VNC servers (plain, VeNCrypt), kept for their certificate files.
    _vnc: (VncEcho, VncEcho),
}

/// A one-hop TCP relay to 127.0.0.1:`to` with 64 KiB buffers each way; its port.
async fn one_hop_relay(to: u16) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
    let port = l.local_addr().expect("relay addr").port();
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = l.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            tokio::spawn(async move {
                let Ok(mut server) = TcpStream::connect(("127.0.0.1", to)).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional_with_sizes(
                    &mut client,
                    &mut server,
                    64 * 1024,
                    64 * 1024,
                )
                .await;
            });
        }
    });
    port
}

/// ws-proxy in auth-proxy mode behind a stand-in dispatcher that sends every token to the VNC
/// server on `port`, pinned to `pin` if given. No per-token or per-IP limit gets in the way.
async fn auth_proxy(port: u16, pin: Option<CertPin>) -> WsProxyProc {
    let target = v1::Target {
        host: "127.0.0.1".into(),
        port: u32::from(port),
        username: "bench".into(),
        password: PASSWORD.into(),
        cert_sha256: pin.map(CertPin::to_hex).unwrap_or_default(),
        expires_at: None,
        ..Default::default()
    };
    let url = front::serve(Front { target })
        .await
        .expect("stand-in dispatcher");
    let unpinned = pin.is_none();
    let mut args: Vec<String> = [
        "--dispatcher",
        &url,
        "--auth-proxy",
        "--max-per-token",
        "1000000",
        "--max-per-ip",
        "1000000",
    ]
    .map(String::from)
    .to_vec();
    // The plain way is VNC authentication in clear, which ws-proxy refuses unless told
    // (the bench failed with 502 since that became the default).
    if unpinned {
        args.push("--allow-unpinned".into());
    }
    WsProxyProc::start(&args).await
}

async fn setup() -> Setup {
    let plain_vnc = VncEcho::plain(PASSWORD).await.expect("plain VNC server");
    let tls_vnc = VncEcho::vencrypt(PASSWORD)
        .await
        .expect("VeNCrypt VNC server");
    let hop = one_hop_relay(plain_vnc.port).await;
    let plain = auth_proxy(plain_vnc.port, None).await;
    let vencrypt = auth_proxy(tls_vnc.port, tls_vnc.pin).await;
    bench::wait_port(hop).await;
    Setup {
        hop,
        plain,
        vencrypt,
        _vnc: (plain_vnc, tls_vnc),
    }
}

/// Opens one connection `way` and logs in through ServerInit.
async fn connect(s: &Setup, way: Way) -> Conn {
    let proxy = match way {
        Way::OneHop => {
            let mut t = TcpStream::connect(("127.0.0.1", s.hop))
                .await
                .expect("connect to the relay");
            let _ = t.set_nodelay(true);
            match rfb::login_on(&mut t, PASSWORD).await.expect("RFB login") {
                Login::Accepted(_) => return Conn::Tcp(t),
                Login::Refused(why) => panic!("the VNC server refused: {why}"),
            }
        }
        Way::Plain => s.plain.addr,
        Way::VeNCrypt => s.vencrypt.addr,
    };
    // Any 60 hex digits: the stand-in dispatcher resolves every token.
    let url = format!("ws://{proxy}/websockify?token={}", "ab".repeat(30));
    let mut ws = bench::ws_connect(&url).await.expect("WebSocket");
    rfb::none_login(&mut ws)
        .await
        .expect("RFB login through ws-proxy");
    Conn::Ws(Box::new(ws))
}

/// The table's rows, each measured for every way in every round.
#[derive(Clone, Copy)]
enum Row {
    Throughput { msg: usize, conns: usize },
    RoundTrip,
    Opens,
}

const ROWS: [Row; 5] = [
    Row::Throughput {
        msg: 64 * 1024,
        conns: 1,
    },
    Row::Throughput {
        msg: 64 * 1024,
        conns: 8,
    },
    Row::Throughput {
        msg: 1024,
        conns: 1,
    },
    Row::RoundTrip,
    Row::Opens,
];

/// Round trips per way per round.
const ROUND_TRIPS: usize = 2000;
/// Seconds of opening connections per way per round.
const OPEN_SECS: f64 = 1.0;

/// One cell of `row` for `way`: one number, or two (p50, p99) for round trips.
async fn measure(s: &Setup, way: Way, row: Row, mib: usize) -> Vec<f64> {
    match row {
        Row::Throughput { msg, conns } => {
            vec![bench::throughput(|| connect(s, way), msg, conns, mib).await]
        }
        Row::RoundTrip => {
            let (p50, p99) = bench::round_trips(connect(s, way).await, ROUND_TRIPS).await;
            vec![p50, p99]
        }
        Row::Opens => vec![bench::opens_per_sec(|| connect(s, way), OPEN_SECS).await],
    }
}

fn print_row(label: &str, cells: [f64; 3]) {
    println!(
        "{label:<34} {:>14.0} {:>14.0} {:>14.0} {:>10.2}",
        cells[0],
        cells[1],
        cells[2],
        cells[2] / cells[1]
    );
}

fn main() {
    let mib = bench::mib_per_cell();
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|r| *r > 0)
        .unwrap_or(3);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let s = setup().await;
        // Warm-up: every way once, short, before anything counts.
        for way in WAYS {
            for row in ROWS {
                let row = match row {
                    Row::Opens => continue,
                    r => r,
                };
                measure(&s, way, row, mib.div_ceil(8)).await;
            }
            bench::opens_per_sec(|| connect(&s, way), 0.2).await;
        }
        // samples[row][way]: one Vec per number the row shows (round trips have two).
        let mut samples: Vec<[Vec<Vec<f64>>; 3]> = ROWS.iter().map(|_| Default::default()).collect();
        for round in 0..rounds {
            for (r, row) in ROWS.iter().enumerate() {
                for k in 0..WAYS.len() {
                    let w = (k + round) % WAYS.len();
                    let got = measure(&s, WAYS[w], *row, mib).await;
                    let cell = &mut samples[r][w];
                    cell.resize(got.len(), Vec::new());
                    for (i, v) in got.into_iter().enumerate() {
                        cell[i].push(v);
                    }
                }
            }
        }
        let med = |r: usize, i: usize| -> [f64; 3] {
            [0, 1, 2].map(|w| bench::median(samples[r][w][i].clone()))
        };

        println!("\nvencrypt_relay: ws-proxy --auth-proxy to a VNC server, plain RFB vs VeNCrypt X509Vnc (issue 12)");
        println!("  one-hop TCP : client -> tokio copy_bidirectional (64 KiB buffers) -> VNC server; no WebSocket, no TLS: the limit");
        println!("  plain RFB   : WebSocket -> ws-proxy, VNC auth in clear to the server -> relay over TCP");
        println!("  VeNCrypt    : WebSocket -> ws-proxy, VeNCrypt X509Vnc (TLS, pinned cert, VNC auth inside) -> relay inside TLS");
        println!("  VeNCrypt/plain: the VeNCrypt cell over the plain one: below 1 for MiB/s and opens/s,");
        println!("  above 1 for µs, is what TLS costs. The echo server is the same code for all three.");
        println!("  {mib} MiB per throughput cell, {ROUND_TRIPS} round trips, {OPEN_SECS} s of opens; median of {rounds} interleaved rounds after a warm-up.");
        println!("  An open: TCP connect + WebSocket upgrade (none one-hop) + the whole RFB login through ServerInit;");
        println!("  ws-proxy caches ResolveToken, so opens are mostly the proxy's own work and the login.\n");
        println!(
            "{:<34} {:>14} {:>14} {:>14} {:>10}",
            "measure", "one-hop TCP", "plain RFB", "VeNCrypt", "VeN/plain"
        );
        for (r, row) in ROWS.iter().enumerate() {
            match row {
                Row::Throughput { msg, conns } => print_row(
                    &format!(
                        "MiB/s, {} KiB msgs, {conns} conn{}",
                        msg / 1024,
                        if *conns == 1 { "" } else { "s" }
                    ),
                    med(r, 0),
                ),
                Row::RoundTrip => {
                    print_row("round trip p50 µs, 64 B msgs", med(r, 0));
                    print_row("round trip p99 µs, 64 B msgs", med(r, 1));
                }
                Row::Opens => print_row("connection opens per s", med(r, 0)),
            }
        }
    });
}
