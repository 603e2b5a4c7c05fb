//! Session start to port-ready, four ways, side by side (issue: blade-agent foundation):
//!
//! - bare Xtigervnc: the floor — the server alone, started as the user, no session, waited
//!   for as the agent's helper does (its `-displayfd` line, then the banner).
//!
//! "Port-ready" is the RFB banner arriving, for all four.
//! - agent fast path: StartSession over gRPC to a real `blade-agent serve` (PAM account and
//!   session stages, helper, password file, X cookie, Xtigervnc, session command), timed
//!   until the call returns; and the same with `--no-pam`, to show what PAM costs.
//! - agent wrapper mode: the same through TigerVNC's `vncserver` Perl wrapper.
//! - the original way: `su - USER -c "vncserver ..."`, as the original cloudvnc script did,
//!   timed until the RFB port answers.
//! - new-session Dispatch: the whole path, portal → dispatcher (embedded store) → the agent's
//!   fast path, with a breakdown: what the dispatcher adds over the agent, the time its store
//!   calls take, and how many durable commits (fsyncs) a new session costs, read from the
//!   dispatcher's own metrics around each call.
//!
//! Each way starts and stops a desktop `BENCH_STARTS` times (default 20) and prints p50/p95.
//! Bare Xtigervnc, the two fast-path ways and Dispatch take turns, a start each per round, and
//! "Dispatch over bare" is the median of the rounds' differences: this machine's speed drifts
//! by more than the difference measured.
//! Run: `cargo bench -p vncdispatch-tests --bench session_start` (as root); `BENCH_ONLY=turns`
//! leaves out the wrapper and `su` ways (3 s a start each); `BENCH_BASELINE=DIR` adds a
//! Dispatch way through DIR's `blade-agent` and `dispatcher` (another build), in turn with
//! the others, and the median of the rounds' differences from it.
use std::io::Read;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vncdispatch_proto::v1::{
    DispatchRequest, EndSessionRequest, StartSessionRequest, StopSessionRequest,
};
use vncdispatch_tests::agent::{AgentClient, AgentOptions, AgentProc, free_port, new_secret};
use vncdispatch_tests::dispatcher::{DispatcherOptions, DispatcherProc};
use vncdispatch_tests::users::TestUser;
use vncdispatch_tests::{procs, require_root_and_tigervnc};

const DISPLAY: u32 = 90;

fn main() -> anyhow::Result<()> {
    require_root_and_tigervnc();
    let n: usize = std::env::var("BENCH_STARTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let rt = tokio::runtime::Runtime::new()?;
    let user = TestUser::create();
    // The ways that take tens of milliseconds take turns, one start each per round, so that
    // a machine slowing down or speeding up during the run (these VMs swing ±20%) weighs on
    // them alike; each round's Dispatch is also compared with that round's bare Xtigervnc.
    // BENCH_BASELINE=DIR: the same Dispatch way with DIR's blade-agent and dispatcher (a
    // build to compare with), taking its turn in each round too.
    let baseline = std::env::var_os("BENCH_BASELINE").map(PathBuf::from);
    let (mut dispatch, mut base, mut fast, mut no_pam) = rt.block_on(async {
        anyhow::Ok((
            DispatchWay::start(&user, None).await?,
            match &baseline {
                Some(dir) => Some(DispatchWay::start(&user, Some(dir.clone())).await?),
                None => None,
            },
            AgentWay::start("fast", &[]).await,
            AgentWay::start("fast", &["--no-pam"]).await,
        ))
    })?;
    let mut bare = Vec::with_capacity(n);
    for _ in 0..n {
        bare.push(bare_xvnc(&user)?);
        rt.block_on(async {
            fast.once(&user).await?;
            no_pam.once(&user).await?;
            if let Some(base) = &mut base {
                base.once(&user).await?;
            }
            dispatch.once(&user).await
        })?;
    }
    let over_base = base
        .as_ref()
        .map(|b| over_ms(&dispatch.samples, &b.samples));
    let over_bare = over_ms(&dispatch.samples, &bare);
    let starts = agent_split(&fast.agent.log());
    let helper_over_bare: Vec<f64> = starts
        .iter()
        .zip(&bare)
        .map(|(s, b)| s[2] - b.as_secs_f64() * 1000.0)
        .collect();
    let (costs, split) = (dispatch.costs(), means(&starts));
    let mut rows = vec![
        ("bare Xtigervnc (floor)", bare),
        ("agent fast path (PAM)", fast.samples),
        ("agent fast path, --no-pam", no_pam.samples),
    ];
    // The two 3-second ways (vncserver's own wait) are skipped with BENCH_ONLY=turns, for a
    // quick turn on the rows that take turns.
    if std::env::var("BENCH_ONLY").map_or(true, |v| v != "turns") {
        rows.push((
            "agent vncserver wrapper",
            rt.block_on(async {
                let mut wrapper = AgentWay::start("wrapper", &[]).await;
                for _ in 0..n {
                    wrapper.once(&user).await?;
                }
                anyhow::Ok(wrapper.samples)
            })?,
        ));
        rows.push((
            "original: su - USER -c vncserver",
            measure(n, || original(&user))?,
        ));
    }
    if let Some(b) = &base {
        rows.push(("new-session Dispatch, baseline", b.samples.clone()));
    }
    rows.push(("new-session Dispatch (embedded)", dispatch.samples));
    println!(
        "\nsession start to port-ready, {n} starts each (ms; the first three ways and the last take turns)"
    );
    println!("{:<34} {:>8} {:>8} {:>8}", "way", "p50", "p95", "max");
    let mut p50 = std::collections::HashMap::new();
    for (name, mut samples) in rows {
        samples.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let p = |q: f64| {
            samples[((samples.len() as f64 * q).ceil() as usize)
                .saturating_sub(1)
                .min(samples.len() - 1)]
        };
        p50.insert(name, p(0.50));
        println!(
            "{name:<34} {:>8.1} {:>8.1} {:>8.1}",
            ms(p(0.50)),
            ms(p(0.95)),
            ms(p(1.0))
        );
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let (bare, whole) = (
        ms(p50["bare Xtigervnc (floor)"]),
        ms(p50["new-session Dispatch (embedded)"]),
    );
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    // The agent's and the store's shares come from the services' own metrics around each
    // Dispatch (means over the same calls), so no two runs are subtracted from each other.
    println!(
        "\nnew-session Dispatch, breakdown (ms; p50 rows, then means over the Dispatch calls)"
    );
    println!("{:<52} {:>8.1}", "bare Xtigervnc, p50", bare);
    println!("{:<52} {:>8.1}", "new-session Dispatch, p50", whole);
    println!("{:<52} {:>8.1}", "difference of the p50s", whole - bare);
    println!(
        "{:<52} {:>8.1}",
        "= Dispatch over bare, median of rounds (goal ≤ 5)",
        median(over_bare)
    );
    if let Some(v) = over_base {
        println!(
            "{:<52} {:>8.2}",
            "  this build over BENCH_BASELINE, median of rounds",
            median(v)
        );
    }
    println!("{:<52} {:>8.1}", "Dispatch, mean", costs.dispatch_ms);
    println!(
        "{:<52} {:>8.1}",
        "  agent StartSession (PAM, helper, files, Xvnc, checks)", costs.agent_ms
    );
    println!(
        "{:<52} {:>8.1}",
        "  dispatcher and the gRPC hops",
        costs.dispatch_ms - costs.agent_ms
    );
    println!("{:<52} {:>8.2}", "    of which store calls", costs.store_ms);
    // Per store call (the claim: one winner per user, not durable; complete: the session,
    // durable; the rest: placement's and the audit trail's), largest first.
    let mut ops: Vec<_> = costs.store_ops.iter().collect();
    ops.sort_by(|a, b| b.1.total_cmp(a.1));
    for (op, ms) in ops.into_iter().filter(|(_, ms)| **ms >= 0.005) {
        println!("{:<52} {:>8.2}", format!("      {op}"), ms);
    }
    println!(
        "{:<52} {:>8.1}",
        "    durable commits (fsyncs) per new session", costs.durable_commits
    );
    println!(
        "{:<52} {:>8.1}",
        "    other commits per new session", costs.other_commits
    );
    // The agent's own split of the fast path's starts, from its log.
    println!("\nagent fast path (PAM), the agent's split of a start (ms, means)");
    for (name, v) in [
        "finding the user's desktop (none) and the account",
        "choosing a display",
        "the helper: PAM, files, key pair, Xvnc until it greets",
        "checking the listener is Xvnc's",
    ]
    .into_iter()
    .zip(split)
    {
        println!("{name:<52} {v:>8.2}");
    }
    println!(
        "{:<52} {:>8.2}",
        "  helper over bare Xtigervnc, median of rounds",
        median(helper_over_bare)
    );
    Ok(())
}

/// What a new session cost, per session (means): the whole call as the client saw it, and
/// from the services' metrics the agent's StartSession and the dispatcher's store calls.
struct Costs {
    dispatch_ms: f64,
    agent_ms: f64,
    store_ms: f64,
    /// Store time per call kind (`op`), ms per new session.
    store_ops: std::collections::BTreeMap<String, f64>,
    durable_commits: f64,
    other_commits: f64,
}

/// Each round's `a` over its `b`, in ms.
fn over_ms(a: &[Duration], b: &[Duration]) -> Vec<f64> {
    a.iter()
        .zip(b)
        .map(|(a, b)| (a.as_secs_f64() - b.as_secs_f64()) * 1000.0)
        .collect()
}

/// The sum of a metric's samples whose line starts with `prefix` (any labels after it).
fn metric_sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The `op` labels of the store-time metric in a scrape.
fn store_ops(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("vncdispatch_dispatcher_store_duration_seconds_sum{op=\""))
        .filter_map(|l| Some(l.split_once('"')?.0.to_owned()))
        .collect()
}

async fn scrape(port: u16) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

/// New-session Dispatch through a dispatcher on the embedded store and a real agent (fast
/// path, PAM), for one user (each session ended and its desktop gone before the next), with
/// the services' metrics read around each call.
struct DispatchWay {
    _agent: AgentProc,
    _dispatcher: DispatcherProc,
    client: vncdispatch_proto::v1::dispatcher_client::DispatcherClient<tonic::transport::Channel>,
    metrics: u16,
    agent_metrics: u16,
    samples: Vec<Duration>,
    agent_s: f64,
    store_s: f64,
    /// `store_s` by call kind (`op`).
    store_ops: std::collections::BTreeMap<String, f64>,
    durable: f64,
    other: f64,
}

impl DispatchWay {
    /// The services from `bin_dir` when given (another build), else this workspace's.
    async fn start(user: &TestUser, bin_dir: Option<PathBuf>) -> anyhow::Result<Self> {
        kill_all(user);
        let dir = tempfile::tempdir()?;
        let secret = dir.path().join("agent-secret");
        new_secret(&secret);
        let agent_metrics = free_port([127, 0, 0, 1].into());
        let agent = AgentProc::start(AgentOptions {
            secret_file: Some(secret.clone()),
            extra: vec![
                "--metrics-listen".into(),
                format!("127.0.0.1:{agent_metrics}"),
            ],
            bin_dir: bin_dir.clone(),
            ..Default::default()
        })
        .await;
        let metrics = free_port([127, 0, 0, 1].into());
        let d = DispatcherProc::start(DispatcherOptions {
            agent_secret: secret,
            extra: vec!["--metrics-listen".into(), format!("127.0.0.1:{metrics}")],
            bin_dir,
            ..Default::default()
        })
        .await;
        d.add_agent("b1", &agent).await;
        let client = d.client().await;
        Ok(DispatchWay {
            _agent: agent,
            _dispatcher: d,
            client,
            metrics,
            agent_metrics,
            samples: Vec::new(),
            agent_s: 0.0,
            store_s: 0.0,
            store_ops: Default::default(),
            durable: 0.0,
            other: 0.0,
        })
    }

    async fn once(&mut self, user: &TestUser) -> anyhow::Result<()> {
        let agent_line = "vncdispatch_agent_session_start_duration_seconds_sum";
        let durable_line = "vncdispatch_dispatcher_store_commits_total{durable=\"true\"}";
        let other_line = "vncdispatch_dispatcher_store_commits_total{durable=\"false\"}";
        let store_line = "vncdispatch_dispatcher_store_duration_seconds_sum";
        let before = scrape(self.metrics).await?;
        let agent_before = scrape(self.agent_metrics).await?;
        let since = Instant::now();
        let s = self
            .client
            .dispatch(DispatchRequest {
                username: user.name.clone(),
                remote_ip: "192.0.2.1".into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        self.samples.push(since.elapsed());
        let after = scrape(self.metrics).await?;
        let agent_after = scrape(self.agent_metrics).await?;
        anyhow::ensure!(!s.reused, "expected a new session");
        let delta = |a: &str, b: &str, line: &str| metric_sum(a, line) - metric_sum(b, line);
        self.agent_s += delta(&agent_after, &agent_before, agent_line);
        self.store_s += delta(&after, &before, store_line);
        for op in store_ops(&after) {
            let line = format!("{store_line}{{op=\"{op}\"}}");
            *self.store_ops.entry(op).or_default() += delta(&after, &before, &line);
        }
        self.durable += delta(&after, &before, durable_line);
        self.other += delta(&after, &before, other_line);
        self.client
            .end_session(EndSessionRequest {
                username: user.name.clone(),
            })
            .await?;
        kill_all(user);
        Ok(())
    }

    /// Means per new session.
    fn costs(&self) -> Costs {
        let per = self.samples.len() as f64;
        Costs {
            dispatch_ms: self.samples.iter().map(Duration::as_secs_f64).sum::<f64>() * 1000.0 / per,
            agent_ms: self.agent_s * 1000.0 / per,
            store_ms: self.store_s * 1000.0 / per,
            store_ops: self
                .store_ops
                .iter()
                .map(|(op, s)| (op.clone(), s * 1000.0 / per))
                .collect(),
            durable_commits: self.durable / per,
            other_commits: self.other / per,
        }
    }
}

fn measure(
    n: usize,
    mut once: impl FnMut() -> anyhow::Result<Duration>,
) -> anyhow::Result<Vec<Duration>> {
    (0..n).map(|_| once()).collect()
}

/// Ready means the server answers with its RFB banner: Xvnc listens within a few ms but only
/// answers once it has finished starting (keymap compiled and so on), which is what a viewer
/// waits for too.
fn port_ready(port: u16) -> bool {
    let Ok(mut s) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(100))
    else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut banner = [0u8; 12];
    s.read_exact(&mut banner).is_ok() && banner.starts_with(b"RFB ")
}

fn wait_port(port: u16, since: Instant) -> anyhow::Result<Duration> {
    while !port_ready(port) {
        anyhow::ensure!(
            since.elapsed() < Duration::from_secs(30),
            "port {port} never opened"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(since.elapsed())
}

fn kill_all(user: &TestUser) {
    let _ = Command::new("pkill")
        .args(["-KILL", "-u", &user.uid.to_string()])
        .status();
    while !procs::of_uid(user.uid).is_empty() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = std::fs::remove_file(format!("/tmp/.X{DISPLAY}-lock"));
    let _ = std::fs::remove_file(format!("/tmp/.X11-unix/X{DISPLAY}"));
}

fn bare_xvnc(user: &TestUser) -> anyhow::Result<Duration> {
    kill_all(user);
    let port = 5900 + DISPLAY as u16;
    // Waited for as the agent's helper does: Xvnc's `-displayfd` line (on its stdin), then
    // the banner; polling alone would add up to a millisecond to the floor.
    let (mut displayfd, ready) = std::io::pipe()?;
    let since = Instant::now();
    let mut child = Command::new("setpriv")
        .args([
            "--reuid",
            &user.uid.to_string(),
            "--regid",
            &user.uid.to_string(),
            "--clear-groups",
        ])
        .args([
            "/usr/bin/Xtigervnc",
            &format!(":{DISPLAY}"),
            "-rfbport",
            &port.to_string(),
        ])
        .args([
            "-interface",
            "127.0.0.1",
            "-SecurityTypes",
            "None",
            "-nolisten",
            "tcp",
            "-displayfd",
            "0",
        ])
        .stdin(ready)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    // The line, or the end should Xvnc exit; the read end stays open until it is stopped.
    let _ = displayfd.read(&mut [0u8; 16]);
    let t = wait_port(port, since);
    let _ = child.kill();
    let _ = child.wait();
    t
}

fn original(user: &TestUser) -> anyhow::Result<Duration> {
    kill_all(user);
    let vnc = user.home.join(".vnc");
    std::fs::create_dir_all(&vnc)?;
    std::fs::write(
        vnc.join("passwd"),
        vncdispatch_proto::vncauth::obfuscate(b"bench123"),
    )?;
    std::fs::set_permissions(
        vnc.join("passwd"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    Command::new("chown")
        .args(["-R", &format!("{0}:{0}", user.name)])
        .arg(&vnc)
        .status()?;
    let port = 5900 + DISPLAY as u16;
    let since = Instant::now();
    let status = Command::new("su")
        .args(["-", &user.name, "-c"])
        .arg(format!(
            "vncserver :{DISPLAY} -localhost=no -geometry 1280x800 -xstartup /usr/bin/twm"
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "su vncserver failed: {status}");
    wait_port(port, since)
}

/// The agent's own split of each start (`started desktop … lookup_ms reserve_ms helper_ms
/// check_ms` in its log): (lookup, reserve, helper, check) in ms, a row per start.
fn agent_split(log: &str) -> Vec<[f64; 4]> {
    let names = ["lookup_ms=", "reserve_ms=", "helper_ms=", "check_ms="];
    let mut rows = Vec::new();
    for line in log.lines().filter(|l| l.contains("started desktop")) {
        // Colours off: `ESC [ … m` runs out.
        let mut plain = String::with_capacity(line.len());
        let mut in_escape = false;
        for c in line.chars() {
            match (in_escape, c) {
                (false, '\u{1b}') => in_escape = true,
                (true, 'm') => in_escape = false,
                (false, c) => plain.push(c),
                _ => {}
            }
        }
        rows.push(names.map(|name| {
            plain
                .split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        }));
    }
    rows
}

/// Starts and stops through an agent in `mode` with `extra` flags, timed.
struct AgentWay {
    agent: AgentProc,
    client: AgentClient,
    samples: Vec<Duration>,
}

impl AgentWay {
    async fn start(mode: &'static str, extra: &[&str]) -> Self {
        let agent = AgentProc::start(AgentOptions {
            mode,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await;
        let client = agent.client().await;
        AgentWay {
            agent,
            client,
            samples: Vec::new(),
        }
    }

    async fn once(&mut self, user: &TestUser) -> anyhow::Result<()> {
        kill_all(user);
        let req = StartSessionRequest {
            username: user.name.clone(),
            password: "bench123".into(),
            view_only_password: String::new(),
            geometry: None,
        };
        let since = Instant::now();
        let server = self.client.start_session(req).await?.into_inner();
        self.samples.push(since.elapsed());
        anyhow::ensure!(!server.reused, "expected a fresh start");
        self.client
            .stop_session(StopSessionRequest {
                username: user.name.clone(),
                vnc_pid: 0,
            })
            .await?;
        kill_all(user);
        Ok(())
    }
}

/// Column means of the agent's split of its starts ([`agent_split`]).
fn means(rows: &[[f64; 4]]) -> [f64; 4] {
    let mut sums = [0.0; 4];
    for row in rows {
        for (sum, v) in sums.iter_mut().zip(row) {
            *sum += v;
        }
    }
    sums.map(|s| s / rows.len() as f64)
}
