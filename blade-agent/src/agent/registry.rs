//! The desktops this agent knows in its display range, so that Health and ListSessions cost
//! what the agent's own desktops cost, not what every process on the host does: a full /proc
//! scan reads every process's `comm` (about 90 ms a call at 10,000 processes), and the dispatchers
//! poll every agent's Health every few seconds.
//!
//! An entry is what [`discover`] read of an Xvnc desktop (pid, start time, display, owner,
//! password file). Each use checks the entry's process still runs with that start time — one
//! /proc stat read — and drops it otherwise, so a killed Xvnc leaves the count at once and a
//! reused pid is never taken for the desktop it once was. Entries come from starts (at once)
//! and from full scans: the first use scans (at `serve`, the readiness check right at start),
//! so desktops that outlived an agent restart are found, and a use finding the last scan older
//! than the rescan interval scans again, so an Xvnc started in the range by something else
//! (`cloudvnc` over SSH, by hand) is counted within that time. Concurrent callers share one
//! scan.
use super::{Agent, blocking, lock};
use crate::account::{self, Account};
use crate::discover::{self, RunningXvnc};
use crate::error::AgentError;
use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How fresh a caller needs the registry's view of desktops started by others.
#[derive(Debug, Clone, Copy)]
enum Fresh {
    /// A scan within the rescan interval: counts, lists.
    Recent,
    /// A scan begun at or after this instant: a call that must not miss a desktop started
    /// elsewhere (a user's second Xvnc) before it asked.
    Since(Instant),
}

#[derive(Debug)]
pub(super) struct Registry {
    /// Xvnc's `comm`, as [`discover::scan`] takes it.
    comm: String,
    /// The agent's displays: desktops elsewhere belong to another agent.
    displays: RangeInclusive<u32>,
    /// Longest a scan's view stands for [`Fresh::Recent`].
    rescan: Duration,
    known: Mutex<Known>,
    /// Held while a full scan runs: callers that need one wait for it and take its result
    /// instead of each reading all of /proc again.
    scanning: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct Known {
    /// By pid; an entry counts only while its process has the same start time.
    desktops: HashMap<u32, Entry>,
    /// When the last full scan began; none before the first.
    scanned: Option<Instant>,
    /// Every Xvnc that scan found, in the range or not: a start's display search takes it
    /// rather than reading all of /proc again a millisecond later.
    found: Arc<Vec<RunningXvnc>>,
    /// Full scans so far.
    scans: u64,
}

#[derive(Debug)]
struct Entry {
    running: RunningXvnc,
    /// When it was added (a scan's entries: when that scan began).
    noted: Instant,
}

impl Registry {
    pub(super) fn new(comm: String, displays: RangeInclusive<u32>, rescan: Duration) -> Self {
        Registry {
            comm,
            displays,
            rescan,
            known: Mutex::default(),
            scanning: tokio::sync::Mutex::new(()),
        }
    }

    /// Adds a desktop this agent just started (and checked), so the next call counts it
    /// without waiting for a scan.
    pub(super) fn note(&self, running: &RunningXvnc) {
        if self.counts(running) {
            let entry = Entry {
                running: running.clone(),
                noted: Instant::now(),
            };
            lock(&self.known).desktops.insert(running.pid, entry);
        }
    }

    /// Drops a desktop this agent stopped, so the next call no longer counts it (even while
    /// its process lingers after SIGKILL).
    pub(super) fn forget(&self, running: &RunningXvnc) {
        let mut known = lock(&self.known);
        if known
            .desktops
            .get(&running.pid)
            .is_some_and(|e| e.running.start_ticks == running.start_ticks)
        {
            known.desktops.remove(&running.pid);
        }
    }

    /// Scans /proc when the last scan is not as fresh as `fresh` asks; one scan at a time,
    /// whose result serves every caller that waited for it.
    async fn refresh(&self, fresh: Fresh) -> Result<(), AgentError> {
        let due = |known: &Known| match (known.scanned, fresh) {
            (None, _) => true,
            (Some(at), Fresh::Recent) => at.elapsed() >= self.rescan,
            (Some(at), Fresh::Since(asked)) => at < asked,
        };
        if !due(&lock(&self.known)) {
            return Ok(());
        }
        let _one = self.scanning.lock().await;
        if !due(&lock(&self.known)) {
            return Ok(());
        }
        let began = Instant::now();
        let comm = self.comm.clone();
        let found =
            blocking(move || discover::scan(&comm).map_err(|e| AgentError::io("reading /proc", e)))
                .await?;
        let took = began.elapsed();
        let found = Arc::new(found);
        let mut known = lock(&self.known);
        known.found = Arc::clone(&found);
        // Entries noted while the scan ran stay: it may have read /proc before their Xvnc
        // existed. The rest is replaced by what the scan found, and so re-checked in full.
        known.desktops.retain(|_, e| e.noted >= began);
        for running in found.iter().filter(|r| self.counts(r)).cloned() {
            known.desktops.entry(running.pid).or_insert(Entry {
                running,
                noted: began,
            });
        }
        known.scanned = Some(began);
        known.scans += 1;
        tracing::debug!(
            scans = known.scans,
            desktops = known.desktops.len(),
            ms = took.as_secs_f64() * 1000.0,
            "scanned /proc for desktops"
        );
        Ok(())
    }

    /// Every Xvnc the last full scan found, if that scan began at or after `since`.
    pub(super) fn found_since(&self, since: Instant) -> Option<Arc<Vec<RunningXvnc>>> {
        let known = lock(&self.known);
        (known.scanned? >= since).then(|| Arc::clone(&known.found))
    }

    /// True when some known desktop (alive or not) is `uid`'s.
    fn knows(&self, uid: u32) -> bool {
        lock(&self.known)
            .desktops
            .values()
            .any(|e| e.running.uid == uid)
    }

    /// The known desktops whose process still runs (same pid and start time), ordered by
    /// display; the others are dropped. Reads /proc: call on a blocking thread.
    fn alive(&self) -> Vec<RunningXvnc> {
        self.alive_of(None)
    }

    /// [`Registry::alive`] for the desktops of `uid` only (all with None): a start, a stop or
    /// a reconnect's liveness check reads the one user's process, not every desktop's.
    fn alive_of(&self, uid: Option<u32>) -> Vec<RunningXvnc> {
        // Copied out, so the lock is not held while /proc is read.
        let known: Vec<RunningXvnc> = lock(&self.known)
            .desktops
            .values()
            .filter(|e| uid.is_none_or(|u| e.running.uid == u))
            .map(|e| e.running.clone())
            .collect();
        let (mut alive, dead): (Vec<_>, Vec<_>) =
            known.into_iter().partition(RunningXvnc::is_alive);
        for gone in &dead {
            self.forget(gone);
        }
        alive.sort_by_key(|r| (r.display, r.pid));
        alive
    }

    /// A desktop as the agent counts them: in its range, checking a password file. Its owner's
    /// uid is checked against the allowed range at each use; listings also look the account
    /// up (Health counts without: an NSS lookup per desktop would cost more than the rest).
    fn counts(&self, running: &RunningXvnc) -> bool {
        self.displays.contains(&running.display) && running.rfbauth.is_some()
    }
}

impl Agent {
    /// Every Xvnc on the blade that is a desktop of a desktop user: owned by an account in the
    /// allowed uid range and checking a VNC password file (the fast path passes `~/.vncpasswd`;
    /// the vncserver wrapper a private copy of it). Only desktops in this agent's display range
    /// are its own: another agent on the same host (tests, a second range) keeps its
    /// desktops, and no stop or reuse here reaches them.
    ///
    /// Taken from the registry: each known desktop's process is checked (same pid and start
    /// time), not every process on the host, so the cost follows the number of desktops. A
    /// desktop started in the range by something else shows within `--rescan-interval`.
    /// /proc reads and NSS lookups: run on a blocking thread.
    pub(super) async fn desktops(&self) -> Result<Vec<(Account, RunningXvnc)>, AgentError> {
        let live = self.desktop_processes().await?;
        let uids = self.uids();
        blocking(move || {
            let mut accounts: HashMap<u32, Option<Account>> = HashMap::new();
            let mut out = Vec::new();
            for running in live {
                let account = accounts
                    .entry(running.uid)
                    .or_insert_with(|| account::lookup_uid(running.uid, uids).ok())
                    .clone();
                if let Some(account) = account {
                    out.push((account, running));
                }
            }
            Ok(out)
        })
        .await
    }

    /// The desktops' processes without their accounts: what Health counts. No NSS lookup per
    /// desktop — with a large passwd file (or a slow directory service) those would cost more
    /// than the rest together.
    pub(super) async fn desktop_processes(&self) -> Result<Vec<RunningXvnc>, AgentError> {
        self.registry.refresh(Fresh::Recent).await?;
        let (registry, uids) = (self.registry.clone(), self.uids());
        blocking(move || {
            Ok(registry
                .alive()
                .into_iter()
                .filter(|r| uids.allows(r.uid))
                .collect())
        })
        .await
    }

    /// The user's desktop. A start or stop must not miss one started elsewhere (`cloudvnc`,
    /// which takes the same user lock, or an earlier agent): when the registry knows none for
    /// the user, /proc is scanned again, as before the registry existed — a scan begun after
    /// this call, shared with concurrent callers.
    pub(super) async fn running_for(
        &self,
        account: &Account,
    ) -> Result<Option<RunningXvnc>, AgentError> {
        let asked = Instant::now();
        if let Some(running) = self.desktop_of(account, Fresh::Recent).await? {
            return Ok(Some(running));
        }
        self.desktop_of(account, Fresh::Since(asked)).await
    }

    /// The account's desktop as the registry (at least as fresh as `fresh`) knows it.
    async fn desktop_of(
        &self,
        account: &Account,
        fresh: Fresh,
    ) -> Result<Option<RunningXvnc>, AgentError> {
        self.registry.refresh(fresh).await?;
        let (registry, uid) = (self.registry.clone(), account.uid.as_raw());
        // No entry, nothing to check in /proc: a new user's start skips the blocking thread.
        if !registry.knows(uid) {
            return Ok(None);
        }
        blocking(move || Ok(registry.alive_of(Some(uid)).into_iter().next())).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry for process `pid` started at `start_ticks`.
    fn desktop(pid: u32, start_ticks: u64, display: u32) -> RunningXvnc {
        RunningXvnc {
            pid,
            uid: 1000,
            display,
            port: 5900 + display as u16,
            rfbauth: Some("/home/u/.vncpasswd".into()),
            start_ticks,
        }
    }

    fn own_start_ticks() -> u64 {
        discover::Process::read(std::process::id())
            .expect("own /proc entry")
            .start_ticks
    }

    fn registry() -> Registry {
        Registry::new("Xtigervnc".into(), 10..=19, Duration::from_secs(30))
    }

    #[test]
    fn dead_and_reused_entries_are_dropped_live_ones_kept() {
        let r = registry();
        // A process that has exited (and been reaped): its pid names nothing, or another
        // process with another start time.
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let dead_pid = child.id();
        child.wait().expect("wait");
        let me = std::process::id();
        let ticks = own_start_ticks();
        r.note(&desktop(dead_pid, 1, 11));
        r.note(&desktop(me, ticks, 12));
        assert_eq!(r.alive(), vec![desktop(me, ticks, 12)]);
        // The same pid, started at another time: a reused pid, not the desktop.
        r.note(&desktop(me, ticks + 1, 12));
        assert!(r.alive().is_empty());
        assert!(
            lock(&r.known).desktops.is_empty(),
            "dropped, not only hidden"
        );
    }

    #[test]
    fn only_desktops_of_the_range_with_a_password_file_are_noted_and_forget_matches_start_time() {
        let r = registry();
        let (me, ticks) = (std::process::id(), own_start_ticks());
        r.note(&desktop(me, ticks, 9));
        r.note(&RunningXvnc {
            rfbauth: None,
            ..desktop(me, ticks, 12)
        });
        assert!(r.alive().is_empty());
        r.note(&desktop(me, ticks, 12));
        // Another process that had this pid: not the entry to drop.
        r.forget(&desktop(me, ticks + 1, 12));
        assert_eq!(r.alive().len(), 1);
        r.forget(&desktop(me, ticks, 12));
        assert!(r.alive().is_empty());
    }

    #[tokio::test]
    async fn scans_first_then_only_when_stale_or_asked_for_a_newer_one() {
        let r = Registry::new("Xtigervnc".into(), 10..=19, Duration::from_secs(3600));
        let scans = |r: &Registry| lock(&r.known).scans;
        r.refresh(Fresh::Recent).await.expect("scan");
        assert_eq!(scans(&r), 1, "the first use scans");
        let first = lock(&r.known).scanned.expect("scanned");
        r.refresh(Fresh::Recent).await.expect("no scan");
        r.refresh(Fresh::Since(first)).await.expect("no scan");
        assert_eq!(
            scans(&r),
            1,
            "within the interval, or begun late enough: no scan"
        );
        let asked = Instant::now();
        r.refresh(Fresh::Since(asked)).await.expect("scan");
        assert_eq!(scans(&r), 2);
        // Past the interval (zero here) a scan runs, and what it did not find is gone: the
        // test process is no Xvnc, so its entry noted before the scan is dropped.
        let stale = Registry::new("Xtigervnc".into(), 10..=19, Duration::ZERO);
        let (me, ticks) = (std::process::id(), own_start_ticks());
        stale.note(&desktop(me, ticks, 15));
        stale.refresh(Fresh::Recent).await.expect("scan");
        stale.refresh(Fresh::Recent).await.expect("scan");
        assert_eq!(scans(&stale), 2);
        assert!(stale.alive().is_empty());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn concurrent_callers_share_one_scan() {
        let r = std::sync::Arc::new(registry());
        let asked = Instant::now();
        let calls: Vec<_> = (0..16)
            .map(|_| {
                let r = r.clone();
                tokio::spawn(async move { r.refresh(Fresh::Since(asked)).await })
            })
            .collect();
        for c in calls {
            c.await.expect("task").expect("scan");
        }
        assert_eq!(lock(&r.known).scans, 1);
    }
}
