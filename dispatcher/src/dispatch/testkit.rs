//! What the dispatch tests share: a launcher that records what it was asked instead of
//! reaching a blade, and a dispatcher over a throwaway embedded store whose clock follows
//! tokio's (so a test under `tokio::time::pause()` moves expiry by advancing time).
use super::{DispatchConfig, Dispatcher, Launchers, Policy};
use crate::clock::TokioClock;
use crate::launcher::{BladeLoad, LaunchError, Launched, Launcher};
use crate::seal::SealKey;
use crate::store::embedded::EmbeddedStore;
use crate::store::{BladeRecord, Method, Store};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Records starts per blade; blades named `down*` fail, blades named `slow*` never answer a
/// start (a hung agent), blades named `full*` have no free display (and say so in Health),
/// blades named `quiet*` report no figures in Health (as SSH blades),
/// user `refuse` is refused.
#[derive(Debug, Default)]
pub(super) struct Recording {
    /// Desktops started, by blade name.
    pub(super) starts: Mutex<HashMap<String, usize>>,
    /// Running desktops: (blade, user, pid).
    pub(super) alive: Mutex<HashSet<(String, String, u32)>>,
    /// Stop requests, in order: (blade, user).
    pub(super) stops: Mutex<Vec<(String, String)>>,
    /// Pids handed out, from 100 up.
    next_pid: AtomicU32,
    /// Starts tried on `full*` blades.
    pub(super) full_attempts: AtomicU32,
}

#[async_trait::async_trait]
impl Launcher for Recording {
    async fn start(
        &self,
        blade: &BladeRecord,
        username: &str,
        _pw: &crate::launcher::Passwords,
        _id: &str,
    ) -> Result<Launched, LaunchError> {
        if blade.name.starts_with("down") {
            return Err(LaunchError::Blade(format!("{} is down", blade.name)));
        }
        if blade.name.starts_with("full") {
            self.full_attempts.fetch_add(1, Ordering::Relaxed);
            return Err(LaunchError::Full(format!(
                "{}: no free display",
                blade.name
            )));
        }
        if blade.name.starts_with("slow") {
            // Hung: only the dispatcher's launch timeout ends this.
            std::future::pending::<()>().await;
        }
        if username == "refuse" {
            return Err(LaunchError::Refused(tonic::Status::not_found("no account")));
        }
        *self
            .starts
            .lock()
            .unwrap()
            .entry(blade.name.clone())
            .or_default() += 1;
        let pid = self.next_pid.fetch_add(1, Ordering::Relaxed) + 100;
        self.alive
            .lock()
            .unwrap()
            .insert((blade.name.clone(), username.to_owned(), pid));
        Ok(Launched {
            // What a lying agent might report: never where ws-proxy is sent.
            host: "198.51.100.66".into(),
            display: 1,
            port: 5901,
            vnc_pid: pid,
            cert_sha256: format!("{pid:064x}"),
            view_only: true,
        })
    }
    async fn stop(
        &self,
        blade: &BladeRecord,
        username: &str,
        vnc_pid: Option<u32>,
    ) -> Result<bool, LaunchError> {
        self.stops
            .lock()
            .unwrap()
            .push((blade.name.clone(), username.to_owned()));
        let mut alive = self.alive.lock().unwrap();
        let before = alive.len();
        alive.retain(|(b, u, p)| {
            !(b == &blade.name && u == username && vnc_pid.is_none_or(|v| v == *p))
        });
        Ok(alive.len() < before)
    }
    async fn is_alive(
        &self,
        blade: &BladeRecord,
        username: &str,
        pid: u32,
    ) -> Result<bool, LaunchError> {
        Ok(self
            .alive
            .lock()
            .unwrap()
            .contains(&(blade.name.clone(), username.to_owned(), pid)))
    }
    async fn health(&self, b: &BladeRecord) -> Result<BladeLoad, LaunchError> {
        // `quiet*` blades answer but report no figures, as SSH blades do.
        if b.name.starts_with("quiet") {
            return Ok(BladeLoad::default());
        }
        let full = b.name.starts_with("full");
        let vnc_pids: Vec<u32> = self
            .alive
            .lock()
            .unwrap()
            .iter()
            .filter(|(blade, _, _)| *blade == b.name)
            .map(|(_, _, pid)| *pid)
            .collect();
        let live = vnc_pids.len() as u32;
        Ok(BladeLoad {
            vnc_pids,
            sessions: if full { 60 } else { live },
            free_displays: if full { 0 } else { 60 - live },
            cpus: 2,
            reported: true,
            ..Default::default()
        })
    }
}

/// A dispatcher with `blades` registered (127.0.0.2, .3, …), tokens living `ttl`, launches
/// timing out after 5 s, on a [`TokioClock`]. Keep the directory alive as long as the store.
pub(super) async fn setup(
    blades: &[&str],
    ttl: Duration,
) -> (Arc<Dispatcher>, Arc<Recording>, tempfile::TempDir) {
    setup_with(
        blades,
        DispatchConfig::with_defaults(ttl, Policy::RoundRobin, Duration::from_secs(5)),
    )
    .await
}

/// Like [`setup`], with the settings given.
pub(super) async fn setup_with(
    blades: &[&str],
    cfg: DispatchConfig,
) -> (Arc<Dispatcher>, Arc<Recording>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
    let rec = Arc::new(Recording::default());
    let d = Arc::new(
        Dispatcher::new(
            store,
            Launchers {
                agent: rec.clone(),
                ssh: None,
            },
            SealKey::from_bytes(&[1; 32]),
            cfg,
        )
        .with_clock(Arc::new(TokioClock::new())),
    );
    for (i, b) in blades.iter().enumerate() {
        d.add_blade(
            b,
            &format!("127.0.0.{}", i + 2),
            0,
            Method::Agent,
            None,
            None,
        )
        .await
        .unwrap();
    }
    (d, rec, dir)
}
