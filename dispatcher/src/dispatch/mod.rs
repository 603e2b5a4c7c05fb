//! The dispatcher's domain logic: sessions, blade choice, tokens, blades. The gRPC service is a
//! thin layer over [`Dispatcher`]; tests call it directly too.
//!
//! Dispatch for a user goes: claim the user's slot in the store → if a session is there, check
//! with its blade that the Xvnc lives (else drop it and start over), record the new remote IP,
//! return it → if another request holds the claim, wait for it → if we won the claim, pick
//! blades (round-robin over healthy, undrained ones, or least-loaded), start the desktop on the
//! first that can, store the session under our claim.
use crate::error::DispatchError;
use crate::launcher::{BladeLoad, LaunchError, Launcher};
use crate::seal::SealKey;
use crate::secrets;
use crate::store::{BladeRecord, Claim, ClaimOutcome, Method, SessionRecord, Store, StoredSecret};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use vncdispatch_proto::rules::{parse_remote_ip, validate_token, validate_username};

/// How blades are chosen for new sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Policy {
    /// The original's rotation (one atomic counter in the store), skipping unusable blades.
    RoundRobin,
    /// Fewest sessions, then lowest load, from the agents' health reports.
    LeastLoaded,
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
}

/// What the dispatcher knows about a blade's health (from the poller and from failures).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BladeHealth {
    /// Reachable at the last check.
    pub healthy: bool,
    /// Load at the last check.
    pub load: BladeLoad,
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
    store: Arc<dyn Store>,
    launchers: Launchers,
    seal: SealKey,
    cfg: DispatchConfig,
    health: RwLock<HashMap<String, BladeHealth>>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

impl Dispatcher {
    /// A dispatcher over `store`, launching through `launchers`.
    pub fn new(
        store: Arc<dyn Store>,
        launchers: Launchers,
        seal: SealKey,
        cfg: DispatchConfig,
    ) -> Self {
        Dispatcher {
            store,
            launchers,
            seal,
            cfg,
            health: RwLock::default(),
        }
    }

    /// The store (for health checks).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// How long a Dispatch's claim on a user holds: its launch plus a margin for the store.
    fn claim_ttl(&self) -> Duration {
        self.cfg.launch_timeout + Duration::from_secs(10)
    }

    fn ttl_ms(&self) -> i64 {
        self.cfg.token_ttl.as_millis() as i64
    }

    /// Returns the user's live session or starts one.
    pub async fn dispatch(
        &self,
        username: &str,
        remote_ip: &str,
        request_id: &str,
    ) -> Result<Session, DispatchError> {
        validate_username(username)?;
        let remote_ip = parse_remote_ip(remote_ip)?.to_string();
        // Wait out another Dispatch's claim, up to its expiry: a claim left by a dispatcher
        // that died mid-launch then lapses and this call takes over (adopting any desktop
        // the dead one had started) instead of failing.
        let give_up = tokio::time::Instant::now() + self.claim_ttl() + Duration::from_secs(2);
        loop {
            let now = now_ms();
            let claim = Claim {
                id: secrets::new_token().map_err(DispatchError::Secret)?,
                expires_at_ms: now + self.claim_ttl().as_millis() as i64,
            };
            match self.store.claim(username, &claim, now).await? {
                ClaimOutcome::Won => {
                    return self
                        .start_new(username, &remote_ip, &claim, request_id)
                        .await;
                }
                ClaimOutcome::Existing(rec) => {
                    if let Some(session) = self.reuse(*rec, &remote_ip, now).await? {
                        return Ok(session);
                    }
                }
                ClaimOutcome::Pending => {
                    if tokio::time::Instant::now() >= give_up {
                        return Err(DispatchError::Busy(username.to_owned()));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    /// Returns the existing session if it is still good (recording the new IP), or drops it
    /// and returns None so the caller starts a new one.
    async fn reuse(
        &self,
        mut rec: SessionRecord,
        remote_ip: &str,
        now: i64,
    ) -> Result<Option<Session>, DispatchError> {
        self.fill_host(&mut rec).await?;
        let (token, password) = self.reveal(&rec)?;
        let hash = secrets::token_hash(&token);
        if rec.is_expired(now) {
            tracing::info!(user = %rec.username, "session expired; starting a new one");
            self.store
                .delete_session(&rec.username, Some(&rec_hash(&rec, &hash)))
                .await?;
            return Ok(None);
        }
        if !self.alive(&rec).await {
            tracing::warn!(user = %rec.username, blade = %rec.blade, pid = rec.vnc_pid, "desktop is gone; starting a new one");
            self.store
                .delete_session(&rec.username, Some(&rec_hash(&rec, &hash)))
                .await?;
            return Ok(None);
        }
        // Write only when something changed enough to matter: reconnects stay read-only.
        let expires = now + self.ttl_ms();
        let stale_expiry = rec
            .expires_at_ms
            .is_none_or(|e| expires - e > self.ttl_ms() / 20);
        let rec = if rec.remote_ip != remote_ip || stale_expiry || rec.token_hash.is_empty() {
            match self
                .store
                .touch(&rec.username, &hash, remote_ip, expires)
                .await?
            {
                Some(mut updated) => {
                    self.fill_host(&mut updated).await?;
                    updated
                }
                None => return Ok(None), // replaced or ended meanwhile: look again
            }
        } else {
            rec
        };
        Ok(Some(self.session(&rec, token, password, true)))
    }

    /// Rows the original wrote name a blade but no host: the blade's host it is (its name, as
    /// the original's blade names were host names, if it is not registered).
    async fn fill_host(&self, rec: &mut SessionRecord) -> Result<(), DispatchError> {
        if rec.host.is_empty() {
            let blade = self
                .store
                .list_blades()
                .await?
                .into_iter()
                .find(|b| b.name == rec.blade);
            rec.host = blade.map(|b| b.host).unwrap_or_else(|| rec.blade.clone());
        }
        Ok(())
    }

    async fn alive(&self, rec: &SessionRecord) -> bool {
        let blades = match self.store.list_blades().await {
            Ok(b) => b,
            Err(_) => return true, // cannot tell; the store error surfaces elsewhere
        };
        let Some(blade) = blades.into_iter().find(|b| b.name == rec.blade) else {
            return false;
        };
        let Ok(launcher) = self.launchers.get(blade.method) else {
            return false;
        };
        match launcher.is_alive(&blade, &rec.username, rec.vnc_pid).await {
            Ok(alive) => alive,
            // Cannot tell (blade busy or briefly unreachable): keep the session. Replacing it
            // would revoke the token of a browser that may well be connected right now; if
            // the desktop really is gone, the next Dispatch that reaches the blade finds out.
            Err(e) => {
                tracing::warn!(blade = %blade.name, error = %e, "cannot check the desktop; keeping the session");
                true
            }
        }
    }

    async fn start_new(
        &self,
        username: &str,
        remote_ip: &str,
        claim: &Claim,
        request_id: &str,
    ) -> Result<Session, DispatchError> {
        let result = self.launch(username, remote_ip, claim, request_id).await;
        if result.is_err()
            && let Err(e) = self.store.abandon(username, &claim.id).await
        {
            tracing::warn!(error = %e, "could not release the claim; it expires by itself");
        }
        result
    }

    async fn launch(
        &self,
        username: &str,
        remote_ip: &str,
        claim: &Claim,
        request_id: &str,
    ) -> Result<Session, DispatchError> {
        let order = self.choose_blades().await?;
        let token = secrets::new_token().map_err(DispatchError::Secret)?;
        let password = secrets::new_password().map_err(DispatchError::Secret)?;
        let mut failures = Vec::new();
        for blade in order {
            let launcher = match self.launchers.get(blade.method) {
                Ok(l) => l,
                Err(e) => {
                    failures.push(format!("{}: {e}", blade.name));
                    continue;
                }
            };
            let started = tokio::time::timeout(
                self.cfg.launch_timeout,
                launcher.start(&blade, username, &password, request_id),
            )
            .await;
            let launched = match started {
                Ok(Ok(l)) => l,
                Ok(Err(LaunchError::Refused(status))) => {
                    return Err(DispatchError::Refused(status));
                }
                Ok(Err(LaunchError::Blade(why))) => {
                    metrics::counter!("vncdispatch_dispatcher_session_start_failures_total", "blade" => blade.name.clone(), "reason" => "blade_error").increment(1);
                    tracing::warn!(blade = %blade.name, %why, "blade could not start the desktop; trying the next");
                    self.mark(&blade.name, false, None);
                    failures.push(why);
                    continue;
                }
                Err(_) => {
                    metrics::counter!("vncdispatch_dispatcher_session_start_failures_total", "blade" => blade.name.clone(), "reason" => "timeout").increment(1);
                    self.clean_up_late_start(launcher.clone(), blade.clone(), username);
                    let why = format!(
                        "{}: no answer within {:?}",
                        blade.name, self.cfg.launch_timeout
                    );
                    tracing::warn!(blade = %blade.name, "start timed out; trying the next blade");
                    self.mark(&blade.name, false, None);
                    failures.push(why);
                    continue;
                }
            };
            metrics::counter!("vncdispatch_dispatcher_sessions_started_total", "blade" => blade.name.clone())
                .increment(1);
            let now = now_ms();
            let rec = SessionRecord {
                username: username.to_owned(),
                claim: None,
                token_hash: secrets::token_hash(&token),
                token: StoredSecret::Sealed(
                    self.seal
                        .seal(username, &token)
                        .map_err(DispatchError::Secret)?,
                ),
                password: StoredSecret::Sealed(
                    self.seal
                        .seal(username, &password)
                        .map_err(DispatchError::Secret)?,
                ),
                blade: blade.name.clone(),
                host: launched.host,
                display: launched.display,
                port: launched.port,
                vnc_pid: launched.vnc_pid,
                remote_ip: remote_ip.to_owned(),
                created_at_ms: now,
                expires_at_ms: Some(now + self.ttl_ms()),
            };
            if let Err(e) = self.store.complete(&rec, &claim.id).await {
                // A desktop no session points at would run on unseen: stop it.
                tracing::error!(blade = %blade.name, error = %e, "could not store the session; stopping the desktop just started");
                if let Err(stop) = launcher.stop(&blade, username).await {
                    tracing::warn!(blade = %blade.name, error = %stop, "could not stop it either; the blade's sweep will");
                }
                return Err(e.into());
            }
            tracing::info!(blade = %rec.blade, display = rec.display, pid = rec.vnc_pid, "session started");
            return Ok(self.session(&rec, token, password, false));
        }
        Err(DispatchError::NoBlade(format!(
            "no blade could start a desktop for {username:?}: {}",
            failures.join("; ")
        )))
    }

    /// A blade that did not answer a start in time may still carry it out when it recovers
    /// (a stopped or overloaded agent works through its queue), leaving a desktop no session
    /// points at. After a grace period, and while the user's session (if any) is elsewhere,
    /// ask that blade to stop the user's desktop; retried for a few minutes in the background.
    fn clean_up_late_start(&self, launcher: Arc<dyn Launcher>, blade: BladeRecord, username: &str) {
        let (store, username, grace) = (
            self.store.clone(),
            username.to_owned(),
            self.cfg.launch_timeout,
        );
        tokio::spawn(async move {
            for attempt in 0..8u32 {
                tokio::time::sleep(grace.max(Duration::from_secs(1)) * (attempt + 1)).await;
                match store.get_session(&username).await {
                    // The user's session is on that blade after all: the desktop is in use.
                    Ok(Some(rec)) if rec.is_ready() && rec.blade == blade.name => return,
                    // Another Dispatch is under way and may pick that blade; look again later.
                    Ok(Some(rec)) if !rec.is_ready() => continue,
                    Ok(_) => {}
                    Err(_) => continue,
                }
                match launcher.stop(&blade, &username).await {
                    Ok(stopped) => {
                        if stopped {
                            tracing::info!(blade = %blade.name, user = %username, "stopped a desktop started after its Dispatch had given up on the blade");
                        }
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(blade = %blade.name, error = %e, "late-start cleanup: blade still unreachable");
                    }
                }
            }
        });
    }

    /// The blades to try, in order: usable ones (registered, not draining, not known to be
    /// down) by the configured policy, then the ones last seen down. Health is a periodic
    /// view and may be stale (a blade back up a moment ago): a blade marked down is tried
    /// after the others rather than never.
    async fn choose_blades(&self) -> Result<Vec<BladeRecord>, DispatchError> {
        let all = self.store.list_blades().await?;
        if all.is_empty() {
            return Err(DispatchError::NoBlade(
                "no blades are registered (dispatcher blade add NAME HOST)".into(),
            ));
        }
        let health = self
            .health
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let (usable, last_resort): (Vec<BladeRecord>, Vec<BladeRecord>) = all
            .iter()
            .filter(|b| !b.draining)
            .cloned()
            .partition(|b| health.get(&b.name).is_none_or(|h| h.healthy));
        if usable.is_empty() && last_resort.is_empty() {
            return Err(DispatchError::NoBlade(format!(
                "no usable blade: all {} registered blades are draining",
                all.len()
            )));
        }
        if usable.is_empty() {
            return Ok(last_resort);
        }
        let mut ordered: Vec<BladeRecord> = match self.cfg.policy {
            Policy::RoundRobin => {
                let n = self.store.next_round_robin().await?;
                let start = (n % usable.len() as u64) as usize;
                usable[start..]
                    .iter()
                    .chain(&usable[..start])
                    .cloned()
                    .collect()
            }
            Policy::LeastLoaded => {
                let mut sorted = usable;
                let load =
                    |b: &BladeRecord| health.get(&b.name).map(|h| h.load).unwrap_or_default();
                sorted.sort_by(|a, b| {
                    let (la, lb) = (load(a), load(b));
                    la.sessions
                        .cmp(&lb.sessions)
                        .then(la.load1.total_cmp(&lb.load1))
                });
                sorted
            }
        };
        ordered.extend(last_resort);
        Ok(ordered)
    }

    fn mark(&self, blade: &str, healthy: bool, load: Option<BladeLoad>) {
        let mut map = self.health.write().unwrap_or_else(|p| p.into_inner());
        let entry = map.entry(blade.to_owned()).or_insert(BladeHealth {
            healthy,
            load: BladeLoad::default(),
        });
        entry.healthy = healthy;
        if let Some(l) = load {
            entry.load = l;
        }
    }

    /// Asks every blade for its health and records the answers (run periodically).
    pub async fn check_blades(&self) {
        let Ok(blades) = self.store.list_blades().await else {
            return;
        };
        // Each blade is marked as its answer comes: a hung blade must not hold up the news
        // that another is back.
        let checks = blades.iter().map(|blade| async move {
            let result = match self.launchers.get(blade.method) {
                Ok(l) => tokio::time::timeout(Duration::from_secs(5), l.health(blade))
                    .await
                    .ok(),
                Err(_) => None,
            };
            match result {
                Some(Ok(load)) => self.mark(&blade.name, true, Some(load)),
                Some(Err(e)) => {
                    tracing::warn!(blade = %blade.name, error = %e, "blade unhealthy");
                    self.mark(&blade.name, false, None)
                }
                None => {
                    tracing::warn!(blade = %blade.name, "blade health check timed out");
                    self.mark(&blade.name, false, None)
                }
            }
        });
        futures_util::future::join_all(checks).await;
        // Per-blade gauges ride on this periodic pass rather than on every Dispatch.
        let health = self
            .health
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let sessions = self.store.list_sessions().await.unwrap_or_default();
        for blade in blades {
            let live = sessions.iter().filter(|s| s.blade == blade.name).count();
            let healthy = health.get(&blade.name).is_some_and(|h| h.healthy);
            metrics::gauge!("vncdispatch_dispatcher_sessions_live", "blade" => blade.name.clone())
                .set(live as f64);
            metrics::gauge!("vncdispatch_dispatcher_blade_healthy", "blade" => blade.name)
                .set(f64::from(u8::from(healthy)));
        }
    }

    /// Where a token's desktop is.
    pub async fn resolve(&self, token: &str) -> Result<Target, DispatchError> {
        validate_token(token).map_err(|_| DispatchError::UnknownToken)?;
        let mut rec = self
            .store
            .find_by_token(&secrets::token_hash(token), token)
            .await?
            .ok_or(DispatchError::UnknownToken)?;
        self.fill_host(&mut rec).await?;
        if rec.is_expired(now_ms()) {
            return Err(DispatchError::UnknownToken);
        }
        let (_, password) = self.reveal(&rec)?;
        Ok(Target {
            host: rec.host,
            port: rec.port,
            username: rec.username,
            remote_ip: rec.remote_ip,
            expires_at: rec.expires_at_ms.map(timestamp),
            blade: rec.blade,
            password,
        })
    }

    /// Revokes the user's token and stops the desktop; false if there was no session.
    pub async fn end(&self, username: &str) -> Result<bool, DispatchError> {
        validate_username(username)?;
        let Some(rec) = self.store.delete_session(username, None).await? else {
            return Ok(false);
        };
        self.stop_desktop(&rec).await;
        Ok(true)
    }

    async fn stop_desktop(&self, rec: &SessionRecord) {
        let blades = self.store.list_blades().await.unwrap_or_default();
        let Some(blade) = blades.into_iter().find(|b| b.name == rec.blade) else {
            return;
        };
        let Ok(launcher) = self.launchers.get(blade.method) else {
            return;
        };
        if let Err(e) = launcher.stop(&blade, &rec.username).await {
            tracing::warn!(blade = %blade.name, user = %rec.username, error = %e, "could not stop the desktop; the token is revoked anyway");
        }
    }

    /// Removes expired sessions and stops their desktops (run periodically).
    pub async fn sweep(&self) -> Result<usize, DispatchError> {
        let swept = self.store.sweep_expired(now_ms()).await?;
        for rec in &swept {
            tracing::info!(user = %rec.username, blade = %rec.blade, "session expired; stopping its desktop");
            self.stop_desktop(rec).await;
        }
        Ok(swept.len())
    }

    /// Sessions (no secrets), optionally of one blade.
    pub async fn list(
        &self,
        blade: &str,
    ) -> Result<Vec<vncdispatch_proto::v1::SessionInfo>, DispatchError> {
        if !blade.is_empty() {
            validate_blade_name(blade)?;
        }
        let mut out: Vec<_> = self
            .store
            .list_sessions()
            .await?
            .into_iter()
            .filter(|s| blade.is_empty() || s.blade == blade)
            .map(|s| vncdispatch_proto::v1::SessionInfo {
                username: s.username,
                blade: s.blade,
                display: s.display,
                port: s.port,
                vnc_pid: s.vnc_pid,
                remote_ip: s.remote_ip,
                expires_at: s.expires_at_ms.map(timestamp),
            })
            .collect();
        out.sort_by(|a, b| a.username.cmp(&b.username));
        Ok(out)
    }

    /// Registers (or updates) a blade.
    pub async fn add_blade(
        &self,
        name: &str,
        host: &str,
        port: u32,
        method: Method,
    ) -> Result<BladeRecord, DispatchError> {
        validate_blade_name(name)?;
        validate_host(host)?;
        let port = match port {
            0 => match method {
                Method::Agent => self.cfg.agent_port,
                Method::Ssh => 22,
            },
            p => u16::try_from(p)
                .map_err(|_| DispatchError::BadArgument(format!("port {p} is not a TCP port")))?,
        };
        let existing = self
            .store
            .list_blades()
            .await?
            .into_iter()
            .find(|b| b.name == name);
        let blade = BladeRecord {
            name: name.to_owned(),
            host: host.to_owned(),
            port,
            method,
            draining: existing.is_some_and(|b| b.draining),
        };
        self.store.put_blade(&blade).await?;
        self.health
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        Ok(blade)
    }

    /// Blades with what the dispatcher knows of them.
    pub async fn blades(
        &self,
    ) -> Result<Vec<(BladeRecord, Option<BladeHealth>, usize)>, DispatchError> {
        let blades = self.store.list_blades().await?;
        let sessions = self.store.list_sessions().await?;
        let health = self
            .health
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Ok(blades
            .into_iter()
            .map(|b| {
                let n = sessions.iter().filter(|s| s.blade == b.name).count();
                let h = health.get(&b.name).copied();
                (b, h, n)
            })
            .collect())
    }

    /// Drains (or undrains) a blade.
    pub async fn drain(&self, name: &str, draining: bool) -> Result<BladeRecord, DispatchError> {
        validate_blade_name(name)?;
        self.store
            .set_draining(name, draining)
            .await?
            .ok_or_else(|| DispatchError::UnknownBlade(name.to_owned()))
    }

    /// Forgets a blade; with `force`, revokes and stops its sessions first.
    pub async fn remove_blade(&self, name: &str, force: bool) -> Result<bool, DispatchError> {
        validate_blade_name(name)?;
        let on_blade: Vec<SessionRecord> = self
            .store
            .list_sessions()
            .await?
            .into_iter()
            .filter(|s| s.blade == name)
            .collect();
        if !on_blade.is_empty() && !force {
            return Err(DispatchError::BladeBusy {
                name: name.to_owned(),
                sessions: on_blade.len(),
            });
        }
        for rec in &on_blade {
            if self
                .store
                .delete_session(&rec.username, None)
                .await?
                .is_some()
            {
                self.stop_desktop(rec).await;
            }
        }
        self.health
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        Ok(self.store.remove_blade(name).await?)
    }

    fn reveal(&self, rec: &SessionRecord) -> Result<(String, String), DispatchError> {
        let open = |s: &StoredSecret| match s {
            StoredSecret::Sealed(v) => self
                .seal
                .open(&rec.username, v)
                .map_err(DispatchError::Secret),
            StoredSecret::Plain(v) => Ok(v.clone()),
        };
        Ok((open(&rec.token)?, open(&rec.password)?))
    }

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
        }
    }
}

/// The stored hash, or for a legacy row (no hash yet) the one computed from its token.
fn rec_hash(rec: &SessionRecord, computed: &str) -> String {
    if rec.token_hash.is_empty() {
        computed.to_owned()
    } else {
        rec.token_hash.clone()
    }
}

/// Blade names: 1-64 characters of `[A-Za-z0-9._-]`.
fn validate_blade_name(name: &str) -> Result<(), DispatchError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(DispatchError::BadArgument(format!(
            "invalid blade name {name:?}: use 1-64 of A-Z a-z 0-9 . _ -"
        )))
    }
}

/// Hosts: an IP address or a DNS name.
fn validate_host(host: &str) -> Result<(), DispatchError> {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let ok = !host.is_empty()
        && host.len() <= 253
        && !host.starts_with('-')
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(DispatchError::BadArgument(format!(
            "invalid blade host {host:?}: not an IP address or host name"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launcher::Launched;
    use crate::store::embedded::EmbeddedStore;
    use std::sync::Mutex;

    /// Records starts per blade; blades named `down*` fail, user `refuse` is refused.
    #[derive(Debug, Default)]
    struct Recording {
        starts: Mutex<HashMap<String, usize>>,
        alive: Mutex<HashSet<(String, u32)>>,
        next_pid: std::sync::atomic::AtomicU32,
    }
    use std::collections::HashSet;

    #[async_trait::async_trait]
    impl Launcher for Recording {
        async fn start(
            &self,
            blade: &BladeRecord,
            username: &str,
            _pw: &str,
            _id: &str,
        ) -> Result<Launched, LaunchError> {
            if blade.name.starts_with("down") {
                return Err(LaunchError::Blade(format!("{} is down", blade.name)));
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
            let pid = self
                .next_pid
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 100;
            self.alive
                .lock()
                .unwrap()
                .insert((username.to_owned(), pid));
            Ok(Launched {
                host: blade.host.clone(),
                display: 1,
                port: 5901,
                vnc_pid: pid,
            })
        }
        async fn stop(&self, _b: &BladeRecord, username: &str) -> Result<bool, LaunchError> {
            self.alive.lock().unwrap().retain(|(u, _)| u != username);
            Ok(true)
        }
        async fn is_alive(
            &self,
            _b: &BladeRecord,
            username: &str,
            pid: u32,
        ) -> Result<bool, LaunchError> {
            Ok(self
                .alive
                .lock()
                .unwrap()
                .contains(&(username.to_owned(), pid)))
        }
        async fn health(&self, _b: &BladeRecord) -> Result<BladeLoad, LaunchError> {
            Ok(BladeLoad::default())
        }
    }

    async fn setup(
        blades: &[&str],
        ttl: Duration,
    ) -> (Arc<Dispatcher>, Arc<Recording>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
        let rec = Arc::new(Recording::default());
        let cfg = DispatchConfig {
            token_ttl: ttl,
            policy: Policy::RoundRobin,
            launch_timeout: Duration::from_secs(5),
            agent_port: 7501,
        };
        let d = Arc::new(Dispatcher::new(
            store,
            Launchers {
                agent: rec.clone(),
                ssh: None,
            },
            SealKey::from_bytes(&[1; 32]),
            cfg,
        ));
        for (i, b) in blades.iter().enumerate() {
            d.add_blade(b, &format!("127.0.0.{}", i + 2), 0, Method::Agent)
                .await
                .unwrap();
        }
        (d, rec, dir)
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_thousand_new_sessions_spread_within_one_over_four_blades() {
        let (d, rec, _dir) = setup(&["b1", "b2", "b3", "b4"], Duration::from_secs(3600)).await;
        let tasks: Vec<_> = (0..1000)
            .map(|i| {
                let d = d.clone();
                tokio::spawn(async move { d.dispatch(&format!("user{i}"), "192.0.2.1", "t").await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let starts = rec.starts.lock().unwrap().clone();
        let (min, max) = (
            starts.values().min().copied().unwrap(),
            starts.values().max().copied().unwrap(),
        );
        assert_eq!(starts.values().sum::<usize>(), 1000);
        assert!(max - min <= 1, "uneven: {starts:?}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_failing_blade_is_skipped_and_remembered() {
        let (d, rec, _dir) = setup(&["down1", "b2"], Duration::from_secs(3600)).await;
        for i in 0..6 {
            let s = d
                .dispatch(&format!("u{i}"), "192.0.2.1", "t")
                .await
                .unwrap();
            assert_eq!(s.blade, "b2");
        }
        assert_eq!(rec.starts.lock().unwrap().get("b2"), Some(&6));
        let blades = d.blades().await.unwrap();
        assert!(
            !blades[0].1.unwrap().healthy,
            "the failed blade is marked down"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_refusal_is_not_retried_elsewhere_and_stores_nothing() {
        let (d, rec, _dir) = setup(&["b1", "b2"], Duration::from_secs(3600)).await;
        let err = d.dispatch("refuse", "192.0.2.1", "t").await.unwrap_err();
        assert_eq!(tonic::Status::from(err).code(), tonic::Code::NotFound);
        assert!(rec.starts.lock().unwrap().is_empty());
        assert!(
            d.store().get_session("refuse").await.unwrap().is_none(),
            "the claim was released"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn no_usable_blade_says_why() {
        let (d, _rec, _dir) = setup(&["b1"], Duration::from_secs(3600)).await;
        d.drain("b1", true).await.unwrap();
        let err = tonic::Status::from(d.dispatch("u", "192.0.2.1", "t").await.unwrap_err());
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(
            err.message()
                .contains("all 1 registered blades are draining"),
            "{}",
            err.message()
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn expiry_and_sweep() {
        let (d, rec, _dir) = setup(&["b1"], Duration::from_millis(300)).await;
        let s = d.dispatch("u", "192.0.2.1", "t").await.unwrap();
        assert!(d.resolve(&s.token).await.is_ok());
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(matches!(
            d.resolve(&s.token).await,
            Err(DispatchError::UnknownToken)
        ));
        assert_eq!(d.sweep().await.unwrap(), 1);
        assert!(
            rec.alive.lock().unwrap().is_empty(),
            "the sweeper stopped the expired desktop"
        );
        assert!(d.store().get_session("u").await.unwrap().is_none());
    }
}
