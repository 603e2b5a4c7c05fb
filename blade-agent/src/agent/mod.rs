//! Starting, finding and stopping users' desktops: the agent's domain logic, used by the gRPC
//! service and by the one-shot `cloudvnc` command alike.
//!
//! One Xvnc per user holds across concurrent calls and across processes: a call takes the
//! user's in-process lock, then an `flock` on `RUN_DIR/users/NAME.lock` (which a concurrent
//! `cloudvnc` also takes), then looks at /proc for the user's running server before starting
//! one. Displays are reserved in-process while a start is under way; a display another program
//! grabbed in the meantime makes Xvnc fail with BUSY and the next display is tried.
//!
//! Layout: this file holds the calls and the per-user locks; `display.rs` picks and reserves a
//! free display (and clears what dead X servers left in /tmp); `session.rs` runs the per-user
//! helper ([`crate::helper`]) and reads its answer; `spare.rs` keeps a helper started ahead
//! for the next call; `registry.rs` keeps the desktops known in
//! the range, so Health and listing check those alone instead of scanning all of /proc.
use crate::account::{self, Account};
use crate::config::{DesktopConfig, check_geometry};
use crate::discover::{self, RunningXvnc};
use crate::error::AgentError;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vncdispatch_proto::rules::{validate_password, validate_username, validate_view_only_password};
use vncdispatch_proto::v1::{AgentHealth, Geometry, VncServer};
use vncdispatch_proto::vencrypt::CertPin;

mod display;
mod ports;
mod registry;
mod session;
mod spare;

use registry::Registry;
use session::HelperError::{Busy, Other};
use session::{HelperRequest, SessionGate};
use spare::Spares;

/// Attempts at starting on successive displays when one turns out to be taken.
const START_ATTEMPTS: usize = 3;
/// How long after a call's answer the helper for the next call is started.
const REFILL_AFTER: Duration = Duration::from_millis(20);
/// How long after an answer the desktop's session command starts: a moment for the answer to
/// leave the agent before the session's start-up takes the blade's cores, short beside a
/// browser's connect.
const SESSION_AFTER: Duration = Duration::from_millis(5);
/// How long a stopped Xvnc gets to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The blade's desktops.
#[derive(Debug)]
pub struct Agent {
    cfg: DesktopConfig,
    /// The per-session helper's binary, and the helper kept waiting for the next call.
    spares: Arc<Spares>,
    /// Host reported to callers.
    host: String,
    /// Serializes calls per user inside this process (the flock does it across processes).
    user_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Displays with a start under way, not yet visible in /proc.
    reserved: Arc<Mutex<HashSet<u32>>>,
    /// Desktops last seen per user, for cheap liveness checks (see [`Agent::find`]).
    seen: Mutex<HashMap<String, RunningXvnc>>,
    /// The desktops in the range, checked by pid and start time at each use and rescanned
    /// from /proc now and then (see [`Agent::desktops`]).
    registry: Arc<Registry>,
    /// Certificate pins of the desktops this process started, by Xvnc pid. Not kept across
    /// restarts: a desktop adopted after one is reported without a pin (the dispatcher keeps
    /// the pin it stored at the start).
    pins: Mutex<HashMap<u32, CertPin>>,
    /// Desktops this process started (pid, start time), which a display search never stops
    /// as a user's extra X server.
    started: Mutex<HashSet<(u32, u64)>>,
    /// Starts under way, which shutdown waits for: one whose caller went away must still be
    /// undone, or its desktop would run on with no session.
    starts: tokio_util::task::TaskTracker,
    /// Desktops whose start's caller went away while another call for the same user waited
    /// for the lock, by user: that call takes the desktop instead of waiting for it to be
    /// stopped and another started (see [`Agent::caller_gone`]); with the gate its session
    /// command waits on, let go by the call that takes it, or after the desktop is stopped.
    unclaimed: Mutex<HashMap<String, (RunningXvnc, Option<SessionGate>)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these plain-data locks leaves the data consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Agent {
    /// Prepares the run directory (0700, root's) and resolves the helper binary.
    pub fn new(cfg: DesktopConfig) -> Result<Self, AgentError> {
        let users = cfg.run_dir.join("users");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&users)
            .map_err(|e| AgentError::io(format!("creating {}", users.display()), e))?;
        fs::set_permissions(&cfg.run_dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| AgentError::io(format!("securing {}", cfg.run_dir.display()), e))?;
        let helper = match &cfg.helper {
            Some(h) => h.clone(),
            None => std::env::current_exe()
                .map_err(|e| AgentError::io("finding own binary for the session helper", e))?,
        };
        // The helper starts as root: a file a user could change would be theirs to run as root.
        check_root_owned(&helper)?;
        if let Some(service) = cfg.pam_service() {
            check_pam_service(service)?;
        }
        let host = cfg.host();
        let pam_service = cfg.pam_service().map(str::to_owned);
        let registry = Arc::new(Registry::new(
            xvnc_comm(&cfg),
            cfg.display_first..=cfg.display_last(),
            cfg.rescan_interval,
        ));
        Ok(Agent {
            registry,
            cfg,
            spares: Arc::new(Spares::new(helper, pam_service)),
            host,
            user_locks: Mutex::default(),
            reserved: Arc::default(),
            seen: Mutex::default(),
            pins: Mutex::default(),
            started: Mutex::default(),
            starts: tokio_util::task::TaskTracker::new(),
            unclaimed: Mutex::default(),
        })
    }

    /// Keeps a session helper started ahead of the next call from now on (`serve` does; a
    /// one-shot command, which makes one call, does not): about 3 ms off every start and
    /// password change. The helper waits as root, knowing no user (see `spare.rs`); a stale
    /// one is replaced within a minute.
    pub fn keep_spare_helper(&self) {
        self.spares.keep();
        let spares = Arc::clone(&self.spares);
        tokio::spawn(async move {
            // The first tick is at once and starts the first helper; later ones replace a
            // stale helper (waited too long, its PAM file edited) within a minute, not at the
            // next start's expense, or start one an earlier refill failed to.
            let mut every = tokio::time::interval(Duration::from_secs(60));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let renew = Arc::clone(&spares);
                let _ = tokio::task::spawn_blocking(move || renew.renew()).await;
            }
        });
    }

    /// The configuration in force.
    pub fn config(&self) -> &DesktopConfig {
        &self.cfg
    }

    /// Starts `username`'s desktop, or returns the running one after writing the new password
    /// (Xvnc rereads the rfbauth file on every login, so the returned server takes it).
    /// `view_only_password`, when not empty, is written second in the rfbauth file: a login
    /// with it may watch but not control (it must differ from `password`). Empty: the file
    /// holds `password` alone, and a running desktop's earlier view-only password is dropped.
    ///
    /// Once the user's lock is taken the call runs to its end in a task of its own, holding
    /// the lock, even if the caller goes away (a deadline, a dispatcher killed mid-call): a
    /// helper already started goes on to start Xvnc, and a second start for the user must
    /// wait for it rather than start another beside it. A desktop started for a caller that
    /// is gone by then goes to the call waiting for the lock, if there is one, and is stopped
    /// again otherwise: nobody was told its password and no session points at it.
    pub async fn start_session(
        self: &Arc<Self>,
        username: &str,
        password: &str,
        view_only_password: &str,
        geometry: Option<Geometry>,
    ) -> Result<VncServer, AgentError> {
        use tracing::Instrument;
        validate_password(password)?;
        validate_view_only_password(view_only_password, password)?;
        let geometry = match geometry {
            Some(g) => {
                check_geometry(g.width, g.height)?;
                (g.width, g.height)
            }
            None => self.cfg.geometry,
        };
        let account = self.account(username).await?;
        let guard = self.lock_user(&account.name).await?;
        let (answer, caller) = tokio::sync::oneshot::channel();
        let this = Arc::clone(self);
        let secrets = Secrets {
            password: password.to_owned(),
            view_only: (!view_only_password.is_empty()).then(|| view_only_password.to_owned()),
        };
        self.starts.spawn(
            async move {
                let user = account.name.clone();
                let mut gate = None;
                let result = this
                    .start_locked(account, &secrets, geometry, &mut gate)
                    .await;
                let answered = result.is_ok();
                let caller_gone = answer.send(result);
                // The desktop's session command starts a moment after the answer (see
                // SessionGate), unless nobody took the answer: then `caller_gone` decides.
                // A failed start refuses its gate: a desktop rejected after READY starts no
                // session.
                let gone = match caller_gone {
                    Err(Ok((_, Some(started)))) => Some(started),
                    _ => {
                        match gate.take() {
                            Some(gate) if answered => {
                                tokio::spawn(async move {
                                    tokio::time::sleep(SESSION_AFTER).await;
                                    drop(gate);
                                });
                            }
                            Some(gate) => gate.refuse(),
                            None => {}
                        }
                        None
                    }
                };
                // The next call's helper starts once this call's answer is on its way: a
                // moment later, so that its fork and exec (a few ms of CPU) do not compete
                // with sending it.
                let spares = Arc::clone(&this.spares);
                tokio::spawn(async move {
                    tokio::time::sleep(REFILL_AFTER).await;
                    let _ = tokio::task::spawn_blocking(move || spares.refill()).await;
                });
                if let Some(started) = gone {
                    this.caller_gone(&user, started, guard, gate).await;
                }
            }
            .instrument(tracing::Span::current()),
        );
        match caller.await {
            Ok(result) => result.map(|(server, _)| server),
            Err(_) => Err(AgentError::io(
                "start task",
                std::io::Error::other("ended without an answer"),
            )),
        }
    }

    /// A desktop started for a caller that went away. When another call for the user already
    /// waits for the lock (a retry, typically), the desktop is left for it: stopping it only
    /// to start another would make the retry wait twice as long (past a dispatcher's launch
    /// deadline under load). Otherwise, or when that call went away too before taking it, the
    /// desktop is stopped: nobody was told its password and no session points at it.
    /// The desktop's session command waits on `gate`, refused (no session) once Xvnc is
    /// stopped; a desktop left for the waiting call keeps it, for that call to let go after
    /// its own answer, or to be refused after the stop.
    async fn caller_gone(
        &self,
        user: &str,
        started: RunningXvnc,
        guard: UserGuard,
        gate: Option<SessionGate>,
    ) {
        let (shown, pid) = (started.display, started.pid);
        if !guard.others_waiting() {
            tracing::warn!(
                display = shown,
                pid,
                "the caller went away while its desktop started; stopping it (no session points at it)"
            );
            self.undo(&started, gate).await;
            return;
        }
        tracing::info!(
            display = shown,
            pid,
            "the caller went away while its desktop started; leaving it to the call waiting for the same user"
        );
        let stale = lock(&self.unclaimed).insert(user.to_owned(), (started, gate));
        // One left earlier that the waiting call did not take (its Xvnc was gone, so that call
        // started this one): it is nobody's.
        if let Some((stale, gate)) = stale {
            self.undo(&stale, gate).await;
        }
        drop(guard);
        // The lock is first come, first served: this waits behind the call it was left for.
        let again = self.lock_user(user).await;
        let left = lock(&self.unclaimed).remove(user);
        if let Some((left, gate)) = left {
            tracing::warn!(
                display = shown,
                pid,
                "the call waiting for the user did not take the desktop; stopping it"
            );
            self.undo(&left, gate).await;
        }
        drop(again);
    }

    /// Stops a desktop nobody took, and tells its helper to start no session.
    async fn undo(&self, desktop: &RunningXvnc, gate: Option<SessionGate>) {
        terminate(desktop).await;
        if let Some(gate) = gate {
            gate.refuse();
        }
        self.registry.forget(desktop);
    }

    /// Waits, at most `within`, for the starts under way (see [`Agent::start_session`]);
    /// the server calls this once it has stopped taking calls.
    pub async fn finish_starts(&self, within: Duration) {
        self.starts.close();
        if !self.starts.is_empty() {
            tracing::info!(starts = self.starts.len(), "waiting for starts under way");
        }
        if tokio::time::timeout(within, self.starts.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                starts = self.starts.len(),
                "starts still under way at exit; a desktop they leave runs on, possibly with nobody told of it, until stopped (StopSession)"
            );
        }
        // Desktops whose caller went away, left for a call that will not come now: their
        // helpers stop them and start no session.
        for (_, (left, gate)) in lock(&self.unclaimed).drain() {
            tracing::warn!(
                display = left.display,
                pid = left.pid,
                "a desktop nobody took: its helper stops it if it still waits (10 s after READY), else it runs on until stopped (StopSession)"
            );
            if let Some(gate) = gate {
                gate.refuse();
            }
        }
    }

    /// [`Agent::start_session`] under the user's lock: the server, and the desktop when this
    /// call started it.
    async fn start_locked(
        &self,
        account: Account,
        secrets: &Secrets,
        geometry: (u32, u32),
        gate: &mut Option<SessionGate>,
    ) -> Result<(VncServer, Option<RunningXvnc>), AgentError> {
        let looked = std::time::Instant::now();
        if let Some(running) = self.running_for(&account).await? {
            let rfbauth = running.rfbauth.clone();
            self.run_helper(
                &account,
                secrets,
                HelperRequest::Passwd { rfbauth },
                None,
                geometry,
                gate,
            )
            .await
            .map_err(|e| e.into_agent_error(&account.name, running.display))?;
            tracing::info!(
                display = running.display,
                pid = running.pid,
                "returning running desktop"
            );
            // A desktop left by a start whose caller went away is now this call's to answer
            // for (see [`Agent::caller_gone`]): undone again if this caller is gone too. Its
            // session command waits on the gate it came with, which replaces this call's
            // (the password helper's, which nothing waits on).
            let left = {
                let mut unclaimed = lock(&self.unclaimed);
                match unclaimed.get(&account.name) {
                    Some((l, _)) if l.pid == running.pid => unclaimed.remove(&account.name),
                    _ => None,
                }
            };
            let left = left.map(|(left, left_gate)| {
                *gate = left_gate;
                left
            });
            return Ok((self.describe(&account.name, &running, true), left));
        }
        let lookup = looked.elapsed();
        let mut skip = HashSet::new();
        for attempt in 1..=START_ATTEMPTS {
            // Where a start's time goes, in its log line: the agent's own work before and
            // after the helper, and the helper (PAM, files, Xvnc until it answers, session).
            let began = std::time::Instant::now();
            // The first search takes the scan the lookup just made; a retry scans again.
            let found = (attempt == 1)
                .then(|| self.registry.found_since(looked))
                .flatten();
            let slot = self.reserve_display(&skip, found).await?;
            let reserved = began.elapsed();
            match self
                .run_helper(
                    &account,
                    secrets,
                    HelperRequest::Start,
                    Some(slot.display),
                    geometry,
                    gate,
                )
                .await
            {
                Ok(Some((pid, pin))) => {
                    let helper = began.elapsed() - reserved;
                    let running = match self.check_ready(&account, pid, slot.display).await? {
                        Ok(running) => running,
                        Err(why) if attempt < START_ATTEMPTS => {
                            // Its helper stops what is left of it, with no session.
                            if let Some(gate) = gate.take() {
                                gate.refuse();
                            }
                            skip.insert(slot.display);
                            tracing::warn!(display = slot.display, %why, "trying another display");
                            continue;
                        }
                        Err(why) => {
                            return Err(AgentError::StartFailed {
                                user: account.name,
                                display: slot.display,
                                detail: why,
                            });
                        }
                    };
                    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
                    tracing::info!(
                        display = running.display,
                        pid,
                        tls = pin.is_some(),
                        lookup_ms = ms(lookup),
                        reserve_ms = ms(reserved),
                        helper_ms = ms(helper),
                        check_ms = ms(began.elapsed() - reserved - helper),
                        "started desktop"
                    );
                    {
                        let mut started = lock(&self.started);
                        started.retain(|(p, t)| {
                            discover::Process::read(*p).is_some_and(|x| x.start_ticks == *t)
                        });
                        started.insert((pid, running.start_ticks));
                    }
                    self.registry.note(&running);
                    if let Some(pin) = pin {
                        let mut pins = lock(&self.pins);
                        // Pids are reused: forget pins of desktops that are gone.
                        pins.retain(|p, _| std::path::Path::new(&format!("/proc/{p}")).exists());
                        pins.insert(pid, pin);
                    }
                    return Ok((self.describe(&account.name, &running, false), Some(running)));
                }
                Ok(None) => {
                    let detail = "answered OK to a start".into();
                    return Err(AgentError::Helper {
                        user: account.name,
                        detail,
                    });
                }
                Err(Busy(detail)) if attempt < START_ATTEMPTS => {
                    tracing::warn!(display = slot.display, %detail, "display taken, trying another");
                    skip.insert(slot.display);
                }
                Err(Busy(detail)) => {
                    return Err(AgentError::StartFailed {
                        user: account.name,
                        display: slot.display,
                        detail,
                    });
                }
                Err(Other(e)) => return Err(e),
            }
        }
        Err(AgentError::NoFreeDisplay {
            first: self.cfg.display_first,
            last: self.cfg.display_last(),
            detail: format!(" (the last {START_ATTEMPTS} tried were taken while starting)"),
        })
    }

    /// Takes a desktop the helper reported READY only if its Xvnc runs and every listener on
    /// its port is that Xvnc's own: a user may have bound the port first (then Xvnc exits, and
    /// the helper may have seen the squatter's banner), or beside it on the other address
    /// family. Otherwise the Xvnc is stopped and the reason returned, to try another display.
    async fn check_ready(
        &self,
        account: &Account,
        pid: u32,
        n: u32,
    ) -> Result<Result<RunningXvnc, String>, AgentError> {
        let port = self.cfg.port_of(n).unwrap_or(0);
        // By pid: should the user have another Xvnc too, the first found is not this one. Only
        // this process is read (what a scan would say of it), not all of /proc.
        let (comm, uid) = (xvnc_comm(&self.cfg), account.uid.as_raw());
        let range = self.cfg.display_first..=self.cfg.display_last();
        // One trip to a blocking thread: the process (Err: why it is not there), then who
        // else listens on its port.
        let checked = blocking(move || {
            let found = discover::one(&comm, pid)
                .filter(|r| r.uid == uid && range.contains(&r.display) && r.rfbauth.is_some());
            if let Some(r) = found {
                let foreign = ports::foreign_listener(pid, r.port);
                return Ok(Ok((r, foreign)));
            }
            let holders = ports::listeners_on(port).unwrap_or_default();
            let why = match holders.first() {
                Some(l) => format!(
                    "port {port} was taken by another program (uid {}) as Xvnc started",
                    l.uid
                ),
                None => format!("Xvnc (pid {pid}) exited right after starting"),
            };
            // What the helper started may still run (mid-exit, or not an Xvnc by /proc): the
            // user's, it is stopped here too. Its helper stops it on the agent's no, but
            // hears that only while it waits (10 s), and not at all in wrapper mode.
            let left = discover::Process::read(pid).filter(|p| p.uid == uid);
            Ok(Err((why, left)))
        })
        .await?;
        let (running, foreign) = match checked {
            Ok(found) => found,
            Err((why, left)) => {
                if let Some(p) = left {
                    stop_process(p.pid, || p.is_alive()).await;
                }
                return Ok(Err(why));
            }
        };
        if let Some(why) = foreign {
            let port = running.port;
            tracing::warn!(display = n, port, %why, "RFB port not the desktop's alone; stopping it");
            terminate(&running).await;
            return Ok(Err(why));
        }
        Ok(Ok(running))
    }

    /// Stops `username`'s desktop — only if its Xvnc has pid `expect`, when given; false if
    /// none (or another) was running.
    pub async fn stop_session(
        &self,
        username: &str,
        expect: Option<u32>,
    ) -> Result<bool, AgentError> {
        let account = self.account(username).await?;
        let _guard = self.lock_user(&account.name).await?;
        let Some(running) = self.running_for(&account).await? else {
            return Ok(false);
        };
        if expect.is_some_and(|pid| pid != running.pid) {
            tracing::info!(
                running = running.pid,
                asked = expect,
                "not stopping: the user's desktop is another one"
            );
            return Ok(false);
        }
        terminate(&running).await;
        self.registry.forget(&running);
        tracing::info!(
            display = running.display,
            pid = running.pid,
            "stopped desktop"
        );
        Ok(true)
    }

    /// The user's running desktop, if any. Cheap when the desktop was seen before: the
    /// remembered process is checked by its /proc entry alone (pid and start time), and only
    /// a miss looks further (the registry, then a /proc scan when the user has no desktop
    /// there) — this is the dispatcher's per-reconnect liveness check.
    pub async fn find(&self, username: &str) -> Result<Option<VncServer>, AgentError> {
        validate_username(username)?;
        let remembered = lock(&self.seen).get(username).cloned();
        if let Some(running) = remembered.filter(RunningXvnc::is_alive) {
            return Ok(Some(self.describe(username, &running, true)));
        }
        let account = self.account(username).await?;
        let running = self.running_for(&account).await?;
        let mut seen = lock(&self.seen);
        match &running {
            Some(r) => seen.insert(account.name.clone(), r.clone()),
            None => seen.remove(&account.name),
        };
        Ok(running.map(|r| self.describe(&account.name, &r, true)))
    }

    /// The live desktops, ordered by display.
    pub async fn list(&self) -> Result<Vec<VncServer>, AgentError> {
        let mut out = Vec::new();
        for (account, running) in self.desktops().await? {
            out.push(self.describe(&account.name, &running, false));
        }
        Ok(out)
    }

    /// Session count, free displays, load and memory.
    pub async fn health(&self) -> Result<AgentHealth, AgentError> {
        let live = self.desktop_processes().await?;
        let (load1, meminfo) = blocking(|| {
            let load1 = fs::read_to_string("/proc/loadavg")
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse().ok())
                .unwrap_or(0.0);
            Ok((
                load1,
                fs::read_to_string("/proc/meminfo").unwrap_or_default(),
            ))
        })
        .await?;
        // Both are in the range: the registry keeps to it, and displays are reserved from it.
        let live_displays: HashSet<u32> = live.iter().map(|r| r.display).collect();
        let used: HashSet<u32> = live_displays
            .iter()
            .chain(lock(&self.reserved).iter())
            .copied()
            .collect();
        let mem = |key: &str| -> u64 {
            meminfo
                .lines()
                .find_map(|l| {
                    l.strip_prefix(key)?
                        .trim()
                        .strip_suffix("kB")?
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
                .unwrap_or(0)
                * 1024
        };
        Ok(AgentHealth {
            vnc_pids: live.iter().map(|r| r.pid).collect(),
            // Reserved displays whose desktop does not run yet (live ones are in `used` too).
            starting: (used.len() - live_displays.len()) as u32,
            sessions: live.len() as u32,
            free_displays: self.cfg.display_count.saturating_sub(used.len() as u32),
            load1,
            mem_available_bytes: mem("MemAvailable:"),
            mem_total_bytes: mem("MemTotal:"),
            version: env!("CARGO_PKG_VERSION").into(),
            cpus: std::thread::available_parallelism()
                .map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX)),
        })
    }

    fn describe(&self, username: &str, running: &RunningXvnc, reused: bool) -> VncServer {
        VncServer {
            username: username.to_owned(),
            host: self.host.clone(),
            display: running.display,
            port: u32::from(running.port),
            vnc_pid: running.pid,
            reused,
            started_at_unix: running.started_at_unix(),
            cert_sha256: lock(&self.pins)
                .get(&running.pid)
                .map(|p| p.to_hex())
                .unwrap_or_default(),
            // Set by the StartSession handler, which knows what it was sent.
            view_only: false,
        }
    }

    async fn account(&self, username: &str) -> Result<Account, AgentError> {
        let (name, uids) = (username.to_owned(), self.uids());
        blocking(move || account::lookup(&name, uids)).await
    }

    fn uids(&self) -> account::UidRange {
        account::UidRange {
            min: self.cfg.min_uid,
            max: self.cfg.max_uid,
        }
    }

    /// Takes the user's in-process lock, then the cross-process flock.
    async fn lock_user(&self, name: &str) -> Result<UserGuard, AgentError> {
        let m = lock(&self.user_locks)
            .entry(name.to_owned())
            .or_default()
            .clone();
        let inproc = m.lock_owned().await;
        let path = self.cfg.run_dir.join("users").join(format!("{name}.lock"));
        let file = blocking(move || {
            let f = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|e| AgentError::io(format!("opening lock {}", path.display()), e))?;
            f.lock()
                .map_err(|e| AgentError::io(format!("locking {}", path.display()), e))?;
            Ok(f)
        })
        .await?;
        Ok(UserGuard {
            _file: file,
            inproc,
        })
    }
}

/// The Xvnc binary's name, as /proc shows it in `comm`.
fn xvnc_comm(cfg: &DesktopConfig) -> String {
    cfg.xvnc
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("Xtigervnc")
        .to_owned()
}

/// Refuses a helper that anyone but root could replace: the file and every directory above
/// it must be root's and not writable by others (a sticky directory such as /tmp is fine:
/// no one else can replace root's entries in it).
fn check_root_owned(path: &std::path::Path) -> Result<(), AgentError> {
    use std::os::unix::fs::MetadataExt;
    let bad = |why: String| {
        AgentError::io(
            format!(
                "refusing the session helper {}: {why}; it runs as root before it drops to the user, so it and every directory above it must be root's and not writable by others",
                path.display()
            ),
            std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        )
    };
    let real = fs::canonicalize(path).map_err(|e| bad(e.to_string()))?;
    let mut at = Some(real.as_path());
    let mut first = true;
    while let Some(p) = at {
        let m = fs::metadata(p).map_err(|e| bad(format!("{}: {e}", p.display())))?;
        let writable_by_others = m.mode() & 0o022 != 0;
        let sticky_dir = m.is_dir() && m.mode() & 0o1000 != 0;
        if m.uid() != 0 || (writable_by_others && (first || !sticky_dir)) {
            return Err(bad(format!(
                "{} is owned by uid {} with mode {:o}",
                p.display(),
                m.uid(),
                m.mode() & 0o7777
            )));
        }
        first = false;
        at = p.parent();
    }
    Ok(())
}

/// PAM falls back to /etc/pam.d/other for a service without a file, which is a different
/// policy on every distribution (pam_deny on some): refuse to guess.
fn check_pam_service(service: &str) -> Result<(), AgentError> {
    let found = ["/etc/pam.d", "/usr/lib/pam.d"]
        .iter()
        .any(|d| std::path::Path::new(d).join(service).is_file());
    if found {
        Ok(())
    } else {
        Err(AgentError::io(
            format!(
                "PAM service {service:?} has no /etc/pam.d/{service}: install deploy/pam/vncdispatch there (Debian; on other distributions write one with their account and session stacks), name another with --pam-service, or run without PAM (--no-pam)"
            ),
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ))
    }
}

/// The passwords a desktop's rfbauth file gets, validated: the full one, then the optional
/// view-only one.
pub(crate) struct Secrets {
    /// Full control.
    pub(crate) password: String,
    /// View only; never equal to `password`.
    pub(crate) view_only: Option<String>,
}

/// The per-user locks, released on drop.
struct UserGuard {
    _file: File,
    inproc: tokio::sync::OwnedMutexGuard<()>,
}

impl UserGuard {
    /// Whether another call for the user waits for this lock (or is about to): the map and
    /// this guard hold the only other references to it.
    fn others_waiting(&self) -> bool {
        Arc::strong_count(tokio::sync::OwnedMutexGuard::mutex(&self.inproc)) > 2
    }
}

/// Stops an Xvnc: SIGTERM, then SIGKILL after the grace period. Its helper then ends the
/// session's processes.
async fn terminate(running: &RunningXvnc) {
    stop_process(running.pid, || running.is_alive()).await;
}

/// SIGTERM to `pid` while `alive` (the same process: pid and start time), then SIGKILL after
/// the grace period.
async fn stop_process(pid: u32, alive: impl Fn() -> bool) {
    let target = Pid::from_raw(pid as i32);
    if !alive() {
        return;
    }
    let _ = kill(target, Signal::SIGTERM);
    let deadline = tokio::time::Instant::now() + STOP_GRACE;
    while tokio::time::Instant::now() < deadline {
        if !alive() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if alive() {
        tracing::warn!(pid, "the desktop's server ignored SIGTERM; killing it");
        let _ = kill(target, Signal::SIGKILL);
        // Gone once its parent (the helper) reaps it, or a zombie: either counts as dead.
        for _ in 0..50 {
            if !alive() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AgentError> + Send + 'static,
) -> Result<T, AgentError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::io("blocking task", std::io::Error::other(e.to_string())))?
}
