//! The dispatcher's domain logic: sessions, blade choice, tokens, blades. The gRPC service is a
//! thin layer over [`Dispatcher`]; tests call it directly too.
//!
//! Dispatch for a user goes: claim the user's slot in the store → if a session is there, check
//! with its blade that the Xvnc lives (else drop it and start over), record the new remote IP,
//! return it → if another request holds the claim, wait for it → if we won the claim, pick
//! blades of the pool asked for (healthy, undrained, with room; by placement score or
//! round-robin), start the desktop on the first that can, store the session under our claim.
//!
//! Layout — one concern per file, all of them `impl Dispatcher` blocks:
//! - this file: the [`Dispatcher`] type, its settings ([`DispatchConfig`], [`Policy`]), the
//!   launchers by method, and how a stored record becomes what callers see.
//! - `session.rs`: a session's life — dispatch (claim, reuse or launch), clean-up after a
//!   start that answered too late, and the end of a session.
//! - `placement.rs`: which blades to try, in what order, and the health poller behind it;
//!   `capacity.rs`: a blade's room and placement score, as pure functions; `ranking.rs`:
//!   what is known of each blade's health, and each pool's placement order kept with it;
//!   `directory.rs`: this dispatcher's copy of the registered blades.
//! - `tokens.rs`: resolving a token for ws-proxy, which renews a client's lease.
//! - `lifecycle.rs`: when a desktop is stopped (the policy below), the sweeper, and why each
//!   session ended (the history).
//!
//! The lifecycle policy, in one place: a token resolves for `token_ttl` after the user's
//! latest Dispatch — that governs *connecting*. While ws-proxy relays a client it renews a
//! lease on the session (every re-check, `lease` long); an attached session's token keeps
//! resolving (a browser reconnects after a network blip or a ws-proxy restart without the
//! portal) and the desktop is never stopped. Once no client is attached the desktop lives
//! `idle_grace` more (or until the token expires, if later), then the sweeper stops it —
//! "no client". A session never attached ends when its token expires — "token expired". With
//! `max_age`, a desktop is stopped at that age whatever else holds — "max age". The portal
//! sees the time in `Session.stops_at`.
//! - `admin.rs`: registering, listing, draining and removing blades; listing sessions.
//! - `shares.rs`: sharing a desktop (view-only or full control) and resolving shares' tokens;
//!   `audit.rs`: the audit trail every action above records into.
//!
//! Time comes from the injected [`Clock`]: the wall clock in production, a test clock under
//! `tokio::time::pause()` in tests.
use crate::clock::{Clock, WallClock};
use crate::error::DispatchError;
use crate::launcher::{BladeLoad, LaunchError, Launcher};
use crate::seal::SealKey;
use crate::store::{Method, SessionRecord, Store, StoredSecret};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

mod admin;
pub mod audit;
pub mod capacity;
mod directory;
mod lifecycle;
mod placement;
mod ranking;
mod session;
pub mod shares;
mod tokens;

/// How often the server reads the blade list again in the background.
pub(crate) use directory::REFRESH as BLADE_LIST_REFRESH;

#[cfg(test)]
mod testkit;

/// How blades are chosen for new sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Policy {
    /// The lowest placement score first: desktops, load per CPU and memory in use, each as a
    /// share of the blade's own size (see the README's placement section).
    #[value(alias = "least-loaded")]
    Score,
    /// The original's rotation (one atomic counter in the store), skipping full or unusable
    /// blades.
    RoundRobin,
}

/// Dispatch settings.
#[derive(Debug, Clone)]
pub struct DispatchConfig {
    /// How long a token resolves after the latest Dispatch for its user.
    pub token_ttl: Duration,
    /// Blade choice.
    pub policy: Policy,
    /// Upper bound on one desktop start; also how long a claim holds.
    pub launch_timeout: Duration,
    /// Default agent port for blades added without one.
    pub agent_port: u16,
    /// How long a desktop lives after its last client left (see the module doc).
    pub idle_grace: Duration,
    /// Desktops this old are stopped even with a client attached; None: no limit.
    pub max_age: Option<Duration>,
    /// How long one lease renewal holds; ws-proxy renews at its re-check interval, which
    /// must be shorter.
    pub lease: Duration,
    /// How long a share lasts when its maker names no time.
    pub share_ttl: Duration,
    /// The longest a share may be made for.
    pub max_share_ttl: Duration,
    /// How long audit events are kept in the store.
    pub audit_retention: Duration,
}

impl DispatchConfig {
    /// Settings with the documented lifecycle defaults around the given token TTL.
    pub fn with_defaults(token_ttl: Duration, policy: Policy, launch_timeout: Duration) -> Self {
        DispatchConfig {
            token_ttl,
            policy,
            launch_timeout,
            agent_port: 7501,
            idle_grace: Duration::from_secs(4 * 3600),
            max_age: None,
            lease: Duration::from_secs(90),
            share_ttl: Duration::from_secs(3600),
            max_share_ttl: Duration::from_secs(24 * 3600),
            audit_retention: Duration::from_secs(90 * 24 * 3600),
        }
    }
}

/// What the dispatcher knows about a blade's health (from the poller and from failures).
#[derive(Debug, Clone, PartialEq)]
pub struct BladeHealth {
    /// Reachable at the last check.
    pub healthy: bool,
    /// Load at the last check.
    pub load: BladeLoad,
    /// Starts this dispatcher has under way there (reserved before the agent is asked, so a
    /// burst of Dispatch calls neither piles onto one blade nor overfills it).
    pub starting: u32,
    /// Desktops this dispatcher started there that no report has counted yet: (Xvnc pid,
    /// reports since). A report listing the pid settles one; after two without it, it is
    /// taken as gone.
    pub placed: Vec<(u32, u8)>,
    /// Desktops this dispatcher stopped there that the last report still counted (pid,
    /// reports since): subtracted until a report no longer lists them.
    pub ended: Vec<(u32, u8)>,
    /// A start found no free display: full until the next report.
    pub full: bool,
}

impl BladeHealth {
    /// A blade not checked yet: taken as up, with no figures.
    pub fn unchecked() -> Self {
        BladeHealth {
            healthy: true,
            load: BladeLoad::default(),
            starting: 0,
            placed: Vec::new(),
            ended: Vec::new(),
            full: false,
        }
    }
}

/// The launchers by method.
#[derive(Debug, Clone)]
pub struct Launchers {
    /// gRPC to blade-agent.
    pub agent: Arc<dyn Launcher>,
    /// SSH, when configured.
    pub ssh: Option<Arc<dyn Launcher>>,
}

impl Launchers {
    /// The launcher for `method`; an SSH blade without SSH configured is this blade's failure.
    fn get(&self, method: Method) -> Result<&Arc<dyn Launcher>, LaunchError> {
        match method {
            Method::Agent => Ok(&self.agent),
            Method::Ssh => self.ssh.as_ref().ok_or_else(|| {
                LaunchError::Blade("SSH blades need --ssh-key and --ssh-known-hosts".into())
            }),
        }
    }
}

/// A session as handed to the portal.
pub type Session = vncdispatch_proto::v1::Session;
/// Where ws-proxy relays a token.
pub type Target = vncdispatch_proto::v1::Target;

/// The dispatcher.
#[derive(Debug)]
pub struct Dispatcher {
    /// Sessions, claims and blades; shared with other dispatchers when it is MongoDB.
    store: Arc<dyn Store>,
    /// How desktops are started, stopped and checked on each kind of blade.
    launchers: Launchers,
    /// Seals tokens and passwords before they reach the store.
    seal: SealKey,
    /// Settings from the command line.
    cfg: DispatchConfig,
    /// This process's copy of the registered blades.
    directory: directory::Directory,
    /// This process's view of blade health (the poller's answers, starts under way, launch
    /// failures) and the pools' placement order that follows from it.
    ranking: Arc<RwLock<ranking::Ranking>>,
    /// The time stored expiries and claim deadlines are measured against.
    clock: Arc<dyn Clock>,
    /// Desktops a blade recently confirmed alive, (blade, user, pid) → when: every open
    /// relay's re-check asks, and the blade need not answer each of them.
    alive_seen: std::sync::Mutex<HashMap<(String, String, u32), i64>>,
    /// The audit trail.
    audit: audit::AuditLog,
    /// When the sweeper last dropped audit events past their retention (Unix ms).
    audit_pruned_at: std::sync::atomic::AtomicI64,
}

/// A Unix-milliseconds time as a protobuf timestamp.
pub(crate) fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// A protobuf timestamp as Unix milliseconds (the inverse of [`timestamp`]).
pub fn millis(t: &prost_types::Timestamp) -> i64 {
    t.seconds.saturating_mul(1000) + i64::from(t.nanos / 1_000_000)
}

impl Dispatcher {
    /// A dispatcher over `store`, launching through `launchers`, on the wall clock.
    pub fn new(
        store: Arc<dyn Store>,
        launchers: Launchers,
        seal: SealKey,
        cfg: DispatchConfig,
    ) -> Self {
        Dispatcher {
            audit: audit::AuditLog::new(store.clone()),
            audit_pruned_at: std::sync::atomic::AtomicI64::new(0),
            store,
            launchers,
            seal,
            cfg,
            directory: directory::Directory::default(),
            ranking: Arc::default(),
            clock: Arc::new(WallClock),
            alive_seen: std::sync::Mutex::default(),
        }
    }

    /// The same dispatcher reading the time from `clock` (tests pass a
    /// [`TokioClock`](crate::clock::TokioClock) and pause tokio's time).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Records an audit event now: `kind` done by `actor` to `username`'s desktop (empty for
    /// blade actions), with `fields`.
    pub fn record(&self, kind: &str, actor: &str, username: &str, fields: &[(&str, String)]) {
        self.audit
            .record(audit::event(self.now_ms(), kind, actor, username, fields));
    }

    /// Waits until the audit events recorded so far are stored (at shutdown).
    pub async fn flush_audit(&self) {
        self.audit.flush().await;
    }

    /// The store (for health checks).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Now, in Unix milliseconds, by the injected clock.
    fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// How long a Dispatch's claim on a user holds: its launch plus a margin for the store.
    fn claim_ttl(&self) -> Duration {
        self.cfg.launch_timeout + Duration::from_secs(10)
    }

    /// The token lifetime in milliseconds, as stored expiries count.
    fn ttl_ms(&self) -> i64 {
        self.cfg.token_ttl.as_millis() as i64
    }

    /// The record's token and password in clear: sealed ones opened, legacy ones as stored.
    fn reveal(&self, rec: &SessionRecord) -> Result<(String, String), DispatchError> {
        Ok((
            self.open_secret(&rec.username, &rec.token)?,
            self.open_secret(&rec.username, &rec.password)?,
        ))
    }

    /// A secret of `owner`'s in clear: a sealed one opened, a legacy one as stored.
    fn open_secret(&self, owner: &str, s: &StoredSecret) -> Result<String, DispatchError> {
        match s {
            StoredSecret::Sealed(v) => self.seal.open(owner, v).map_err(DispatchError::Secret),
            StoredSecret::Plain(v) => Ok(v.clone()),
        }
    }

    /// What the portal is handed for `rec`.
    fn session(
        &self,
        rec: &SessionRecord,
        token: String,
        password: String,
        reused: bool,
    ) -> Session {
        Session {
            username: rec.username.clone(),
            token,
            password,
            blade: rec.blade.clone(),
            display: rec.display,
            port: rec.port,
            vnc_pid: rec.vnc_pid,
            remote_ip: rec.remote_ip.clone(),
            host: rec.host.clone(),
            expires_at: rec.expires_at_ms.map(timestamp),
            reused,
            stops_at: rec.stop_deadline().map(timestamp),
        }
    }
}
