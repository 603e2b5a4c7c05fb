//! Dispatcher latency and throughput side by side: embedded store over plaintext, embedded
//! store with mutual TLS on every hop (client → dispatcher → agent), and FerretDB:
//!
//! - reconnect Dispatch (the user already has a session; includes the liveness check with the
//!   blade agent) and ResolveToken: p50/p99 of sequential calls, and throughput with 32
//!   concurrent callers;
//! - new-session Dispatch end to end with a real blade-agent and Xvnc: p50/p95.
//!
//! Run as root: `cargo bench -p vncdispatch-tests --bench dispatch`. BENCH_CALLS (default
//! 2000) sets the sequential sample size, BENCH_NEW (default 20) the new sessions per store.
use std::time::{Duration, Instant};
use vncdispatch_proto::roles::Role;
use vncdispatch_proto::v1::dispatcher_client::DispatcherClient;
use vncdispatch_proto::v1::{DispatchRequest, EndSessionRequest, ResolveTokenRequest};
use vncdispatch_tests::agent::{AgentOptions, AgentProc, new_secret};
use vncdispatch_tests::dispatcher::{DispatcherOptions, DispatcherProc};
use vncdispatch_tests::ferretdb::FerretDb;
use vncdispatch_tests::pki::TestPki;
use vncdispatch_tests::require_root_and_tigervnc;
use vncdispatch_tests::users::TestUser;

type Client = DispatcherClient<tonic::transport::Channel>;

struct Row {
    name: String,
    p50: Duration,
    p99: Duration,
    per_sec: Option<f64>,
}

fn pct(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() as f64 * q).ceil() as usize)
        .saturating_sub(1)
        .min(sorted.len() - 1)]
}

async fn sequential<F, Fut>(n: usize, mut call: F) -> anyhow::Result<Vec<Duration>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        call().await?;
        out.push(t.elapsed());
    }
    out.sort();
    Ok(out)
}

/// Calls per second with `conc` callers making `total` calls in all.
async fn throughput<F, Fut>(total: usize, conc: usize, call: F) -> anyhow::Result<f64>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let t = Instant::now();
    let tasks: Vec<_> = (0..conc)
        .map(|_| {
            let call = call.clone();
            tokio::spawn(async move {
                for _ in 0..total / conc {
                    call().await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok((total / conc * conc) as f64 / t.elapsed().as_secs_f64())
}

async fn measure(
    store: &str,
    d: &DispatcherProc,
    users: &[TestUser],
    calls: usize,
) -> anyhow::Result<Vec<Row>> {
    let c: Client = d.client().await;
    let user = users[0].name.clone();
    let req = DispatchRequest {
        username: user.clone(),
        remote_ip: "192.0.2.1".into(),
        ..Default::default()
    };
    let token = c.clone().dispatch(req.clone()).await?.into_inner().token;
    let mut rows = Vec::new();
    let (cc, r) = (c.clone(), req.clone());
    let lat = sequential(calls, || {
        let (mut c, r) = (cc.clone(), r.clone());
        async move { c.dispatch(r).await.map(drop).map_err(Into::into) }
    })
    .await?;
    let (cc, r) = (c.clone(), req.clone());
    let tput = throughput(calls * 10, 32, move || {
        let (mut c, r) = (cc.clone(), r.clone());
        async move { c.dispatch(r).await.map(drop).map_err(Into::into) }
    })
    .await?;
    rows.push(Row {
        name: format!("reconnect Dispatch, {store}"),
        p50: pct(&lat, 0.5),
        p99: pct(&lat, 0.99),
        per_sec: Some(tput),
    });
    let resolve = ResolveTokenRequest {
        token,
        attached: false,
    };
    let (cc, r) = (c.clone(), resolve.clone());
    let lat = sequential(calls, || {
        let (mut c, r) = (cc.clone(), r.clone());
        async move { c.resolve_token(r).await.map(drop).map_err(Into::into) }
    })
    .await?;
    let (cc, r) = (c.clone(), resolve.clone());
    let tput = throughput(calls * 10, 32, move || {
        let (mut c, r) = (cc.clone(), r.clone());
        async move { c.resolve_token(r).await.map(drop).map_err(Into::into) }
    })
    .await?;
    rows.push(Row {
        name: format!("ResolveToken, {store}"),
        p50: pct(&lat, 0.5),
        p99: pct(&lat, 0.99),
        per_sec: Some(tput),
    });
    // New sessions: each of the other users once, ended afterwards (not timed).
    let mut lat = Vec::new();
    for u in &users[1..] {
        let r = DispatchRequest {
            username: u.name.clone(),
            remote_ip: "192.0.2.1".into(),
            ..Default::default()
        };
        let t = Instant::now();
        let s = c.clone().dispatch(r).await?.into_inner();
        lat.push(t.elapsed());
        anyhow::ensure!(!s.reused, "expected a new session");
        c.clone()
            .end_session(EndSessionRequest {
                username: u.name.clone(),
            })
            .await?;
    }
    lat.sort();
    rows.push(Row {
        name: format!("new-session Dispatch, {store}"),
        p50: pct(&lat, 0.5),
        p99: pct(&lat, 0.95),
        per_sec: None,
    });
    Ok(rows)
}

fn main() -> anyhow::Result<()> {
    require_root_and_tigervnc();
    let calls: usize = std::env::var("BENCH_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let new: usize = std::env::var("BENCH_NEW")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let dir = tempfile::tempdir()?;
        let secret = dir.path().join("agent-secret");
        new_secret(&secret);
        let pki = TestPki::new();
        let agent = AgentProc::start(AgentOptions { secret_file: Some(secret.clone()), ..Default::default() }).await;
        let tls_agent = AgentProc::start(AgentOptions {
            ip: [127, 0, 0, 2].into(),
            secret_file: Some(secret.clone()),
            tls: Some(pki.service(Role::Agent, "127.0.0.2", Role::Dispatcher)),
            ..Default::default()
        })
        .await;
        let users: Vec<TestUser> = (0..=new).map(|_| TestUser::create()).collect();
        let db = FerretDb::start().await;
        let mut rows = Vec::new();
        let configs = [
            ("embedded", None, None),
            ("embedded, mTLS", None, Some(pki.service(Role::Dispatcher, "127.0.0.1", Role::Admin))),
            ("FerretDB", Some(db.uri("vncDispatch")), None),
        ];
        for (name, mongo, tls) in configs {
            let blade = if tls.is_some() { &tls_agent } else { &agent };
            let d = DispatcherProc::start(DispatcherOptions { mongo, agent_secret: secret.clone(), tls, ..Default::default() }).await;
            d.add_agent("b1", blade).await;
            rows.extend(measure(name, &d, &users, calls).await?);
            d.client().await.end_session(EndSessionRequest { username: users[0].name.clone() }).await?;
        }
        println!("\ndispatcher: {calls} sequential calls for latency, {} calls by 32 callers for throughput, {new} new sessions", calls * 10);
        println!("{:<34} {:>10} {:>10} {:>12}", "operation, store", "p50 ms", "p99 ms", "calls/s");
        for r in rows {
            let tput = r.per_sec.map(|t| format!("{t:.0}")).unwrap_or_else(|| "-".into());
            let p99 = if r.name.starts_with("new") { format!("{:.2}*", r.p99.as_secs_f64() * 1e3) } else { format!("{:.2}", r.p99.as_secs_f64() * 1e3) };
            println!("{:<34} {:>10.2} {:>10} {:>12}", r.name, r.p50.as_secs_f64() * 1e3, p99, tput);
        }
        println!("* p95 for new sessions (the original: ~3.2 s per new session)");
        println!("mTLS: TLS 1.3 with client certificates on the client → dispatcher and dispatcher → agent hops; connections are kept, so this is the per-call cost, not the handshake");
        anyhow::Ok(())
    })
}
