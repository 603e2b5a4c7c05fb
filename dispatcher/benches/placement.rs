//! What choosing a blade costs as a pool grows: new-session Dispatch p50/p99 and EndSession
//! p50 with B blades in one pool, in process, over the embedded store, with a launcher that
//! answers at once (no network, no Xvnc) — so what is left is the dispatcher's own work: the
//! store's commits, which do not depend on B, and placement, which should not either.
//!
//! Every blade reports a different load, so the score orders them all. Both policies run.
//!
//! Run: `cargo bench -p dispatcher --bench placement`. PLACEMENT_BLADES (default
//! 10,100,1000,10000) sets the pool sizes, PLACEMENT_CALLS (default 300) the new sessions
//! per size and policy.
use async_trait::async_trait;
use dispatcher::dispatch::{DispatchConfig, Dispatcher, Launchers, Policy};
use dispatcher::launcher::{BladeLoad, LaunchError, Launched, Launcher, Passwords};
use dispatcher::seal::SealKey;
use dispatcher::store::embedded::EmbeddedStore;
use dispatcher::store::{BladeRecord, EndReason, Method, Store};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Starts answer at once; Health reports 60 displays and a load that differs per blade.
#[derive(Debug, Default)]
struct Instant0 {
    next_pid: AtomicU32,
}

#[async_trait]
impl Launcher for Instant0 {
    async fn start(
        &self,
        _blade: &BladeRecord,
        _user: &str,
        _pw: &Passwords,
        _id: &str,
    ) -> Result<Launched, LaunchError> {
        let pid = self.next_pid.fetch_add(1, Ordering::Relaxed) + 1000;
        Ok(Launched {
            host: "127.0.0.1".into(),
            display: 1,
            port: 5901,
            vnc_pid: pid,
            cert_sha256: String::new(),
            view_only: true,
        })
    }
    async fn stop(&self, _: &BladeRecord, _: &str, _: Option<u32>) -> Result<bool, LaunchError> {
        Ok(true)
    }
    async fn is_alive(&self, _: &BladeRecord, _: &str, _: u32) -> Result<bool, LaunchError> {
        Ok(true)
    }
    async fn health(&self, b: &BladeRecord) -> Result<BladeLoad, LaunchError> {
        // A spread of loads, fixed by the name, so no two blades tie.
        let h = b
            .name
            .bytes()
            .fold(7u64, |h, c| h.wrapping_mul(31) + u64::from(c));
        Ok(BladeLoad {
            free_displays: 60,
            cpus: 8,
            load1: (h % 1000) as f64 / 250.0,
            mem_total: 1 << 34,
            mem_available: (1 << 34) - (h % 4096) * (1 << 20),
            reported: true,
            ..Default::default()
        })
    }
}

fn pct(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() as f64 * q).ceil() as usize)
        .saturating_sub(1)
        .min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

/// (Dispatch p50, p99, EndSession p50) over `calls` new sessions on `blades` blades.
async fn measure(
    blades: usize,
    policy: Policy,
    calls: usize,
) -> anyhow::Result<(Duration, Duration, Duration)> {
    let dir = tempfile::tempdir()?;
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb"))?);
    for i in 0..blades {
        store
            .put_blade(&BladeRecord {
                name: format!("b{i:05}"),
                host: format!("127.1.{}.{}", i / 250, i % 250 + 1),
                port: 7501,
                method: Method::Agent,
                draining: false,
                pool: "default".into(),
                max_sessions: 0,
            })
            .await?;
    }
    let d = Arc::new(Dispatcher::new(
        store,
        Launchers {
            agent: Arc::new(Instant0::default()),
            ssh: None,
        },
        SealKey::from_bytes(&[1; 32]),
        DispatchConfig::with_defaults(Duration::from_secs(3600), policy, Duration::from_secs(5)),
    ));
    d.check_blades().await;
    // One unmeasured call reads the blade list into the dispatcher's copy.
    d.dispatch("warm", "192.0.2.1", "bench").await?;
    let (mut dispatches, mut ends) = (Vec::with_capacity(calls), Vec::with_capacity(calls));
    for i in 0..calls {
        let user = format!("u{i}");
        let t = Instant::now();
        d.dispatch(&user, "192.0.2.1", "bench").await?;
        dispatches.push(t.elapsed());
    }
    for i in 0..calls {
        let t = Instant::now();
        d.end(&format!("u{i}"), EndReason::Portal, "portal:bench")
            .await?;
        ends.push(t.elapsed());
    }
    dispatches.sort();
    ends.sort();
    Ok((
        pct(&dispatches, 0.5),
        pct(&dispatches, 0.99),
        pct(&ends, 0.5),
    ))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let sizes: Vec<usize> = std::env::var("PLACEMENT_BLADES")
        .unwrap_or_else(|_| "10,100,1000,10000".into())
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let calls: usize = std::env::var("PLACEMENT_CALLS")
        .ok()
        .map(|v| v.parse())
        .transpose()?
        .unwrap_or(300);
    println!("new-session Dispatch and EndSession by pool size, ms ({calls} sessions each)");
    println!("| blades | score p50 | score p99 | round-robin p50 | round-robin p99 | end p50 |");
    println!("|---|---|---|---|---|---|");
    for b in sizes {
        let (s50, s99, end) = measure(b, Policy::Score, calls).await?;
        let (r50, r99, _) = measure(b, Policy::RoundRobin, calls).await?;
        println!(
            "| {b} | {} | {} | {} | {} | {} |",
            ms(s50),
            ms(s99),
            ms(r50),
            ms(r99),
            ms(end)
        );
    }
    Ok(())
}
