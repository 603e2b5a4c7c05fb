//! The scale rig: how the dispatcher, ws-proxy and the store behave as blades and sessions
//! grow. Not part of CI; run it with `scripts/scale.sh` (root), which builds, runs this and
//! plots the tables into `docs/scale/`.
//!
//! What runs: N real blade agents, each on its own 127.1.x.y address and in its own PID
//! namespace (see `vncdispatch_tests::scale`), starting a stand-in Xvnc as real accounts
//! through the real start path (PAM, the helper, the listener check); one dispatcher on the
//! embedded store, or two on one FerretDB; two ws-proxies. Every session is a live "desktop"
//! (the stand-in and its session process, under the agent's helper); the first two blades run
//! the real Xtigervnc instead, and every point logs in to each of their desktops through
//! ws-proxy.
//!
//! Two curves per store: blades grow (10 → max) with the first session count, then sessions
//! grow (→ max) on all blades. At each point, sequentially and then with 32 callers:
//! reconnect Dispatch (random users, each checked alive with its blade), ResolveToken; new-
//! session Dispatch for sample users (ended afterwards); browser opens through ws-proxy (the
//! stand-in's RFB banner read through the relay, the connection held) and ws-proxy's memory
//! per held connection; the dispatchers' and FerretDB's memory and their CPU while idle (the
//! health poller and the sweeper: what grows with blades and sessions without requests).
//!
//! Env: SCALE_BLADES (10,50,100,200), SCALE_SESSIONS (1000,5000,10000: each desktop here costs
//! 1.4 MiB, 20,000 need more than 24 GiB), SCALE_STORES
//! (embedded,ferretdb), SCALE_SESSIONS_FERRETDB / _EMBEDDED (that store's own session
//! counts), SCALE_OUT (docs/scale), SCALE_CALLS (300 sequential calls; ten times that with 32
//! callers; SCALE_CALLS_FERRETDB / _EMBEDDED for one store), SCALE_OPENS (600 browser opens; _FERRETDB / _EMBEDDED).
use futures_util::StreamExt;
use rand::Rng;
use std::io::Write;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use vncdispatch_proto::v1::dispatcher_client::DispatcherClient;
use vncdispatch_proto::v1::{
    AddBladeRequest, DispatchRequest, EndSessionRequest, ResolveTokenRequest,
};
use vncdispatch_tests::agent::new_secret;
use vncdispatch_tests::bench::ws_connect;
use vncdispatch_tests::dispatcher::{DispatcherOptions, DispatcherProc};
use vncdispatch_tests::ferretdb::FerretDb;
use vncdispatch_tests::rfb::vnc_login_ws;
use vncdispatch_tests::scale::{self, RigAgent, Standin, usage};
use vncdispatch_tests::wsproxy::WsProxyProc;

type Client = DispatcherClient<Channel>;

/// Sample users for new-session Dispatch at each point (ended after).
const NEW_SAMPLES: usize = 30;
/// The first blades run the real Xtigervnc, each capped at [`REAL_XVNC_CAP`] desktops (a real
/// one holds tens of MiB): a sample that the stand-in behaves like the real thing where it
/// counts — started by the same path, reached through ws-proxy, greeting with RFB.
const REAL_XVNC_BLADES: usize = 2;
const REAL_XVNC_CAP: u32 = 8;
/// Browser connections opened and held at each point (SCALE_OPENS, or SCALE_OPENS_<STORE>).
fn opens(store: &str) -> usize {
    let var = format!("SCALE_OPENS_{}", store.to_uppercase());
    match std::env::var(&var) {
        Ok(_) => numbers(&var, "")[0],
        Err(_) => numbers("SCALE_OPENS", "600")[0],
    }
}
/// The idle window CPU is measured over.
const IDLE: Duration = Duration::from_secs(10);

fn list(var: &str, default: &str) -> Vec<String> {
    std::env::var(var)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

fn numbers(var: &str, default: &str) -> Vec<usize> {
    list(var, default)
        .iter()
        .map(|s| {
            s.parse()
                .unwrap_or_else(|_| panic!("{var}: {s} is not a number"))
        })
        .collect()
}

/// One point of a curve.
#[derive(Debug, Default)]
struct Row {
    store: String,
    blades: usize,
    sessions: usize,
    reconnect: (f64, f64, f64),
    new: (f64, f64),
    resolve: (f64, f64, f64),
    opens_per_s: f64,
    proxy_kib_per_conn: f64,
    dispatcher_rss_mib: f64,
    dispatcher_idle_cpu_pct: f64,
    db_rss_mib: f64,
    db_idle_cpu_pct: f64,
    /// Desktops on the real-Xvnc blades, and how many of them were logged in to through
    /// ws-proxy.
    real_xvnc: (usize, usize),
}

const HEADER: &str = "store\tblades\tsessions\treconnect_p50_ms\treconnect_p99_ms\treconnect_per_s\tnew_p50_ms\tnew_p99_ms\tresolve_p50_ms\tresolve_p99_ms\tresolve_per_s\tws_opens_per_s\tws_kib_per_conn\tdispatcher_rss_mib\tdispatcher_idle_cpu_pct\tdb_rss_mib\tdb_idle_cpu_pct\treal_xvnc_desktops\treal_xvnc_logged_in";

impl Row {
    fn tsv(&self) -> String {
        format!(
            "{}\t{}\t{}\t{:.2}\t{:.2}\t{:.0}\t{:.1}\t{:.1}\t{:.2}\t{:.2}\t{:.0}\t{:.0}\t{:.1}\t{:.1}\t{:.2}\t{:.1}\t{:.2}\t{}\t{}",
            self.store,
            self.blades,
            self.sessions,
            self.reconnect.0,
            self.reconnect.1,
            self.reconnect.2,
            self.new.0,
            self.new.1,
            self.resolve.0,
            self.resolve.1,
            self.resolve.2,
            self.opens_per_s,
            self.proxy_kib_per_conn,
            self.dispatcher_rss_mib,
            self.dispatcher_idle_cpu_pct,
            self.db_rss_mib,
            self.db_idle_cpu_pct,
            self.real_xvnc.0,
            self.real_xvnc.1
        )
    }
}

fn pct(sorted: &[Duration], q: f64) -> f64 {
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1e3
}

/// The system under test for one store.
struct System {
    store: String,
    db: Option<FerretDb>,
    dispatchers: Vec<DispatcherProc>,
    clients: Vec<Client>,
    proxies: Vec<WsProxyProc>,
    /// The proxies' resident memory before their first connection, KiB.
    proxies_rss_idle: u64,
    users: Vec<String>,
    /// Token of each user with a session, by user index.
    tokens: Vec<Option<String>>,
    /// Users whose desktop is on a real-Xvnc blade, with its VNC password.
    on_real_xvnc: Vec<(usize, String)>,
    /// Users 0..live have sessions.
    live: usize,
    registered: usize,
}

fn dispatch_req(user: &str) -> DispatchRequest {
    DispatchRequest {
        username: user.to_owned(),
        remote_ip: "192.0.2.1".into(),
        ..Default::default()
    }
}

impl System {
    async fn start(store: &str, secret: &std::path::Path, users: Vec<String>) -> System {
        let seal = tempfile::NamedTempFile::new()
            .expect("seal key file")
            .into_temp_path();
        let _ = std::fs::remove_file(&seal);
        let seal = seal.keep().expect("keep the seal key path");
        let db = (store == "ferretdb").then(FerretDb::start);
        let db = match db {
            Some(f) => Some(f.await),
            None => None,
        };
        let mongo = db.as_ref().map(|d| d.uri("vncDispatch"));
        let count = if mongo.is_some() { 2 } else { 1 };
        let mut dispatchers = Vec::new();
        for _ in 0..count {
            dispatchers.push(
                DispatcherProc::start(DispatcherOptions {
                    mongo: mongo.clone(),
                    agent_secret: secret.to_owned(),
                    seal_key: Some(seal.clone()),
                    // Production settings: a day-long token, the default 5 s health poll.
                    extra: ["--token-ttl", "24h", "--health-interval", "5s"]
                        .map(String::from)
                        .to_vec(),
                    ..Default::default()
                })
                .await,
            );
        }
        let mut clients = Vec::new();
        let mut proxies = Vec::new();
        for d in &dispatchers {
            clients.push(d.client().await);
            // Every browser here comes from 127.0.0.1: lift the per-address and per-token
            // caps, which stand for thousands of different browsers.
            let args = [
                "--dispatcher".into(),
                format!("http://{}", d.addr),
                "--max-per-ip".into(),
                "1000000".into(),
                "--max-per-token".into(),
                "1000".into(),
            ];
            proxies.push(WsProxyProc::start(&args).await);
        }
        let proxies_rss_idle = proxies
            .iter()
            .map(|p| usage(p.pid().unwrap_or(0)).rss_kib)
            .sum();
        let n = users.len();
        System {
            store: store.into(),
            db,
            dispatchers,
            clients,
            proxies,
            proxies_rss_idle,
            users,
            tokens: vec![None; n],
            on_real_xvnc: Vec::new(),
            live: 0,
            registered: 0,
        }
    }

    fn client(&self, i: usize) -> Client {
        self.clients[i % self.clients.len()].clone()
    }

    async fn register(&mut self, agents: &[RigAgent], upto: usize) {
        for (i, a) in agents.iter().enumerate().take(upto).skip(self.registered) {
            let req = AddBladeRequest {
                name: format!("blade{i:03}"),
                host: a.addr.ip().to_string(),
                port: u32::from(a.addr.port()),
                method: 1,
                max_sessions: (i < REAL_XVNC_BLADES).then_some(REAL_XVNC_CAP),
                ..Default::default()
            };
            self.client(0).add_blade(req).await.expect("AddBlade");
        }
        self.registered = upto;
        // Two health rounds, so every dispatcher knows the new blades' room.
        tokio::time::sleep(Duration::from_secs(11)).await;
    }

    /// Starts sessions for users live..upto, 16 at a time over the dispatchers.
    async fn grow(&mut self, upto: usize) {
        let t = Instant::now();
        let from = self.live;
        let results = futures_util::stream::iter(from..upto)
            .map(|i| {
                let (mut c, user) = (self.client(i), self.users[i].clone());
                async move {
                    let s = c.dispatch(dispatch_req(&user)).await;
                    (i, s.map(|r| r.into_inner()))
                }
            })
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await;
        for (i, r) in results {
            match r {
                Ok(s) => {
                    let real = (0..REAL_XVNC_BLADES).any(|b| s.blade == format!("blade{b:03}"));
                    if real {
                        self.on_real_xvnc.push((i, s.password));
                    }
                    self.tokens[i] = Some(s.token);
                }
                Err(e) => panic!("Dispatch for {}: {e}", self.users[i]),
            }
        }
        self.live = upto;
        let secs = t.elapsed().as_secs_f64();
        eprintln!(
            "[{}] {} new sessions in {secs:.0} s ({:.0}/s)",
            self.store,
            upto - from,
            (upto - from) as f64 / secs
        );
    }

    fn random_live(&self) -> usize {
        rand::rng().random_range(0..self.live)
    }

    /// A random user with a session on a stand-in: the browser opens below read the banner
    /// and hang up, and the real-Xvnc sample is checked by a full login instead (an Xvnc
    /// with its blacklist on, as agents before `-UseBlacklist=0` started it, refuses an
    /// address after five such hang-ups).
    fn random_on_standin(&self) -> usize {
        loop {
            let i = self.random_live();
            if !self.on_real_xvnc.iter().any(|(r, _)| *r == i) {
                return i;
            }
        }
    }

    fn usage_of(&self) -> (scale::Usage, scale::Usage) {
        let mut d = scale::Usage::default();
        for p in &self.dispatchers {
            let u = usage(p.pid().unwrap_or(0));
            d.rss_kib += u.rss_kib;
            d.cpu_s += u.cpu_s;
        }
        let db = self
            .db
            .as_ref()
            .and_then(FerretDb::pid)
            .map(usage)
            .unwrap_or_default();
        (d, db)
    }

    async fn measure(&self, calls: usize) -> Row {
        let mut row = Row {
            store: self.store.clone(),
            blades: self.registered,
            sessions: self.live,
            ..Default::default()
        };
        // Idle first: what the poller and sweeper cost with nothing asked.
        let (d0, db0) = self.usage_of();
        tokio::time::sleep(IDLE).await;
        let (d1, db1) = self.usage_of();
        row.dispatcher_idle_cpu_pct = (d1.cpu_s - d0.cpu_s) / IDLE.as_secs_f64() * 100.0;
        row.db_idle_cpu_pct = (db1.cpu_s - db0.cpu_s) / IDLE.as_secs_f64() * 100.0;
        row.dispatcher_rss_mib = d1.rss_kib as f64 / 1024.0;
        row.db_rss_mib = db1.rss_kib as f64 / 1024.0;

        let users = &self.users;
        let pick: Vec<usize> = (0..calls * 11).map(|_| self.random_live()).collect();
        let lat = self
            .timed_dispatches(pick[..calls].iter().copied(), true)
            .await;
        let tput = self
            .concurrently(&pick[calls..], |mut c, user, _| async move {
                c.dispatch(dispatch_req(&user)).await.map(drop)
            })
            .await;
        row.reconnect = (pct(&lat, 0.5), pct(&lat, 0.99), tput);

        let mut lat = Vec::with_capacity(calls);
        for (n, &i) in pick[..calls].iter().enumerate() {
            let token = self.tokens[i].clone().expect("token");
            let t = Instant::now();
            self.client(n)
                .resolve_token(ResolveTokenRequest {
                    token,
                    attached: false,
                })
                .await
                .expect("resolve");
            lat.push(t.elapsed());
        }
        lat.sort();
        let tput = self
            .concurrently(&pick[calls..], |mut c, _, token| async move {
                c.resolve_token(ResolveTokenRequest {
                    token,
                    attached: false,
                })
                .await
                .map(drop)
            })
            .await;
        row.resolve = (pct(&lat, 0.5), pct(&lat, 0.99), tput);

        let samples = users.len() - NEW_SAMPLES..users.len();
        let lat = self.timed_dispatches(samples.clone(), false).await;
        for i in samples {
            self.client(0)
                .end_session(EndSessionRequest {
                    username: users[i].clone(),
                })
                .await
                .expect("EndSession");
        }
        row.new = (pct(&lat, 0.5), pct(&lat, 0.99));

        let rss = |s: &System| -> u64 {
            s.proxies
                .iter()
                .map(|p| usage(p.pid().unwrap_or(0)).rss_kib)
                .sum()
        };
        let t = Instant::now();
        let opens = opens(&self.store);
        let mut held = Vec::with_capacity(opens);
        for n in 0..opens {
            let token = self.tokens[self.random_on_standin()]
                .clone()
                .expect("token");
            let proxy = &self.proxies[n % self.proxies.len()];
            let mut ws = ws_connect(&format!("ws://{}/websockify?token={token}", proxy.addr))
                .await
                .unwrap_or_else(|e| {
                    let log = proxy.log();
                    let tail = &log[log.len().saturating_sub(1500)..];
                    panic!("ws open: {e}; ws-proxy's log ends: {tail}")
                });
            let banner = ws.next().await.expect("a message").expect("banner");
            assert!(
                banner.into_data().starts_with(b"RFB "),
                "no RFB banner through ws-proxy"
            );
            held.push(ws);
        }
        row.opens_per_s = opens as f64 / t.elapsed().as_secs_f64();
        // Over the proxies' memory before their first connection: the allocator keeps what
        // freed connections held, so a difference from just before would read near zero.
        row.proxy_kib_per_conn =
            rss(self).saturating_sub(self.proxies_rss_idle) as f64 / opens as f64;
        drop(held);

        // The real-Xvnc sample: each of its desktops is logged in to through ws-proxy as
        // noVNC would, with the session's password.
        let mut greeted = 0;
        for (n, (i, password)) in self.on_real_xvnc.iter().enumerate() {
            let token = self.tokens[*i].clone().expect("token");
            let proxy = &self.proxies[n % self.proxies.len()];
            let url = format!("ws://{}/websockify?token={token}", proxy.addr);
            let login = match ws_connect(&url).await {
                Ok(mut ws) => vnc_login_ws(&mut ws, password).await,
                Err(e) => Err(e),
            };
            match login {
                Ok(_) => greeted += 1,
                Err(e) => eprintln!("[{}] real Xvnc of {}: {e}", self.store, self.users[*i]),
            }
        }
        row.real_xvnc = (self.on_real_xvnc.len(), greeted);
        eprintln!(
            "[{}] real Xvnc sample: {greeted} of {} desktops logged in to through ws-proxy; {} real Xtigervnc running",
            self.store,
            self.on_real_xvnc.len(),
            scale::real_xvnc_running()
        );
        row
    }

    /// Sequential Dispatch calls for `users` (by index), each timed and checked to be a
    /// reconnect (`reused`) or a new session; the times sorted.
    async fn timed_dispatches(
        &self,
        users: impl IntoIterator<Item = usize>,
        reused: bool,
    ) -> Vec<Duration> {
        let mut lat = Vec::new();
        for (n, i) in users.into_iter().enumerate() {
            let user = &self.users[i];
            let t = Instant::now();
            let s = self
                .client(n)
                .dispatch(dispatch_req(user))
                .await
                .unwrap_or_else(|e| panic!("Dispatch for {user}: {e}"));
            lat.push(t.elapsed());
            let why = if reused {
                "lost its session"
            } else {
                "already had a session"
            };
            assert_eq!(s.into_inner().reused, reused, "{user} {why}");
        }
        lat.sort();
        lat
    }

    /// `pick`'s calls by 32 callers spread over the dispatchers; calls per second.
    async fn concurrently<F, Fut>(&self, pick: &[usize], call: F) -> f64
    where
        F: Fn(Client, String, String) -> Fut + Clone + Send + 'static,
        Fut: std::future::Future<Output = Result<(), tonic::Status>> + Send,
    {
        let t = Instant::now();
        let tasks: Vec<_> = pick
            .chunks(pick.len().div_ceil(32))
            .enumerate()
            .map(|(n, chunk)| {
                let work: Vec<(String, String)> = chunk
                    .iter()
                    .map(|&i| {
                        (
                            self.users[i].clone(),
                            self.tokens[i].clone().unwrap_or_default(),
                        )
                    })
                    .collect();
                let (c, call) = (self.client(n), call.clone());
                tokio::spawn(async move {
                    for (user, token) in work {
                        call(c.clone(), user, token).await.expect("call under load");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("caller task");
        }
        pick.len() as f64 / t.elapsed().as_secs_f64()
    }
}

async fn run_store(
    store: &str,
    blades: &[usize],
    sessions: &[usize],
    standin: &Standin,
    users: &[String],
    calls: usize,
    out: &mut Vec<Row>,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("agent-secret");
    new_secret(&secret);
    let max_blades = *blades.iter().max().expect("blade counts");
    let max_sessions = *sessions.iter().max().expect("session counts");
    // Room for every session and the samples with 15% to spare, spread evenly; also for the
    // first session count on the fewest blades.
    // The capped real-Xvnc blades take few: the rest must hold the others.
    let room = |sessions: usize, blades: usize| {
        ((sessions + NEW_SAMPLES) as f64 * 1.15
            / blades.saturating_sub(REAL_XVNC_BLADES).max(1) as f64)
            .ceil() as usize
    };
    let per_blade = room(max_sessions, max_blades).max(room(sessions[0], blades[0])) as u32;
    let t = Instant::now();
    let mut agents = Vec::new();
    for chunk in (0..max_blades).collect::<Vec<_>>().chunks(25) {
        let starts = chunk.iter().map(|&i| {
            let real = i < REAL_XVNC_BLADES;
            scale::start_agent(
                i,
                100 + i as u32 * per_blade,
                per_blade,
                standin,
                real,
                &secret,
            )
        });
        agents.extend(futures_util::future::join_all(starts).await);
    }
    eprintln!(
        "[{store}] {max_blades} agents ({per_blade} displays each) up in {:.0} s",
        t.elapsed().as_secs_f64()
    );
    let mut sys = System::start(store, &secret, users.to_vec()).await;
    sys.register(&agents, blades[0]).await;
    sys.grow(sessions[0]).await;
    for &b in blades {
        if b > sys.registered {
            sys.register(&agents, b).await;
        }
        let row = sys.measure(calls).await;
        eprintln!("{}", row.tsv());
        out.push(row);
    }
    for &s in &sessions[1..] {
        sys.grow(s).await;
        let row = sys.measure(calls).await;
        eprintln!("{}", row.tsv());
        out.push(row);
    }
    // Desktops end with their agents' namespaces.
    drop(sys);
    drop(agents);
}

fn main() -> anyhow::Result<()> {
    vncdispatch_tests::require_root_and_tigervnc();
    let blades = numbers("SCALE_BLADES", "10,50,100,200");
    let sessions = numbers("SCALE_SESSIONS", "1000,5000,10000");
    let stores = list("SCALE_STORES", "embedded,ferretdb");
    let calls = numbers("SCALE_CALLS", "300")[0];
    let out_dir = std::path::PathBuf::from(std::env::var("SCALE_OUT").unwrap_or_else(|_| {
        vncdispatch_tests::repo()
            .join("docs/scale")
            .display()
            .to_string()
    }));
    scale::raise_limits();
    let standin = scale::build_standin();
    let max_sessions = *sessions.iter().max().expect("session counts");
    let t = Instant::now();
    let users = scale::ensure_users(max_sessions + NEW_SAMPLES);
    eprintln!(
        "{} accounts ready in {:.1} s",
        users.len(),
        t.elapsed().as_secs_f64()
    );
    let rt = tokio::runtime::Runtime::new()?;
    let mut rows = Vec::new();
    for store in &stores {
        // FerretDB v1 on SQLite costs more per session than a real MongoDB (see
        // docs/scale.md): its curve can be cut shorter with SCALE_SESSIONS_FERRETDB.
        let var = format!("SCALE_SESSIONS_{}", store.to_uppercase());
        let sessions = match std::env::var(&var) {
            Ok(_) => numbers(&var, ""),
            Err(_) => sessions.clone(),
        };
        let var = format!("SCALE_CALLS_{}", store.to_uppercase());
        let calls = std::env::var(&var).map_or(calls, |_| numbers(&var, "")[0]);
        rt.block_on(run_store(
            store, &blades, &sessions, &standin, &users, calls, &mut rows,
        ));
    }
    std::fs::create_dir_all(&out_dir)?;
    let path = out_dir.join("scale.tsv");
    let mut f = std::fs::File::create(&path)?;
    writeln!(f, "{HEADER}")?;
    for r in &rows {
        writeln!(f, "{}", r.tsv())?;
    }
    println!("{HEADER}");
    for r in &rows {
        println!("{}", r.tsv());
    }
    println!("written to {}", path.display());
    Ok(())
}
