//! Session helpers started ahead of need. Forking the agent and exec'ing, linking and starting
//! a helper, then loading NSS and the PAM service, takes about 3 ms, on the path of every start
//! and password change; so the server keeps one helper waiting — started, NSS and PAM loaded —
//! for the next request, and starts the next one once a call has its answer. A call that finds
//! none waiting (concurrent starts, a one-shot command) starts its own the same way and uses
//! it at once: there is one way to run a helper, only its timing differs.
//!
//! A waiting helper is what every helper is until its request comes: root, in a session of
//! its own, with only PATH in its environment and `/` as its directory
//! ([`privdrop::as_root`]), with NSS and the PAM service's modules loaded (a PAM transaction
//! for no user yet). Its stdin is a pipe only the agent holds; it exits when that closes, the
//! agent gone. It knows nothing of any user until the request names one, so it cannot have
//! been prepared for the wrong one. What it loaded can grow stale, so it is not used (and is
//! left to exit) once it has waited [`MAX_WAIT`], or when a file in /etc/pam.d,
//! /etc/nsswitch.conf or the helper binary changed after it started (by inode and change
//! times, not by comparing clocks); the server also replaces a stale one within a minute.
use super::lock;
use crate::privdrop;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::process::{Child, ChildStdin, ChildStdout};

/// Longest a helper is kept waiting: what it loaded (PAM modules, NSS configuration) is at
/// most this old when a start uses it.
const MAX_WAIT: Duration = Duration::from_secs(300);

/// A running helper waiting for its request.
#[derive(Debug)]
pub(super) struct Helper {
    pub(super) child: Child,
    pub(super) stdin: ChildStdin,
    pub(super) stdout: ChildStdout,
    /// When it was started.
    started: Instant,
    /// What the files it loads looked like just before it started.
    loaded: Vec<FileStamp>,
}

/// A file's identity and change times: an edit in place changes the times (the change time
/// cannot be set back), a replacement the inode; absent files are recorded as absent.
type FileStamp = (PathBuf, Option<(u64, u64, i64, i64, i64, i64)>);

/// The helper binary, and the one helper kept waiting.
#[derive(Debug)]
pub(super) struct Spares {
    path: PathBuf,
    /// The PAM service requests name, which a helper loads before its request comes.
    pam_service: Option<String>,
    /// Whether a helper is kept waiting: by `serve`, not by one-shot commands.
    keep: AtomicBool,
    /// A refill under way: the calls that end together start one helper, not one each.
    refilling: AtomicBool,
    waiting: Mutex<Option<Helper>>,
}

impl Spares {
    pub(super) fn new(path: PathBuf, pam_service: Option<String>) -> Self {
        Spares {
            path,
            pam_service,
            keep: AtomicBool::new(false),
            refilling: AtomicBool::new(false),
            waiting: Mutex::new(None),
        }
    }

    /// The helper binary.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// From now on, keeps a helper waiting (refills and renewals start one).
    pub(super) fn keep(&self) {
        self.keep.store(true, Ordering::Relaxed);
    }

    /// A helper for one request: the waiting one while it still runs and is fresh, else a
    /// new one. Runs where the call runs: the freshness check is a few dozen stats of files
    /// in the page cache, and the fork only happens when no helper waits (as every start
    /// forked before helpers were kept).
    pub(super) fn take(&self) -> std::io::Result<Helper> {
        let waiting = lock(&self.waiting).take();
        if let Some(mut helper) = waiting {
            match (helper.child.try_wait(), self.stale(&helper)) {
                (Ok(None), None) => return Ok(helper),
                // Dropped: its stdin closes and it exits; tokio reaps it.
                (Ok(None), Some(why)) => tracing::info!(why, "not using a stale waiting helper"),
                // Killed by root, or out of memory: a new one serves.
                (gone, _) => {
                    tracing::warn!(status = ?gone, "the waiting session helper had exited")
                }
            }
        }
        self.start_one()
    }

    /// Starts a helper to wait for the next request, when none waits and one is kept. Forks
    /// and execs: call it on a blocking thread, off any request's path.
    pub(super) fn refill(&self) {
        if !self.keep.load(Ordering::Relaxed) || self.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        // Cleared however this ends, so that refills never stop.
        struct Done<'a>(&'a AtomicBool);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let _done = Done(&self.refilling);
        if lock(&self.waiting).is_some() {
            return;
        }
        // Taken before it starts: an edit meanwhile makes it stale, never the other way.
        match self.spawn(self.stamps()) {
            Ok(helper) => *lock(&self.waiting) = Some(helper),
            Err(e) => tracing::warn!(
                helper = %self.path.display(),
                error = %e,
                "cannot start a session helper ahead; the next start will start its own"
            ),
        }
    }

    /// Replaces the waiting helper when it is stale, and starts one when none waits (an
    /// earlier refill failed), so that a quiet blade's next start still finds a fresh one.
    /// Forks and execs: call it on a blocking thread.
    pub(super) fn renew(&self) {
        let stale = {
            let mut waiting = lock(&self.waiting);
            match waiting.as_ref().and_then(|h| self.stale(h)) {
                Some(why) => {
                    tracing::debug!(why, "replacing the waiting session helper");
                    waiting.take()
                }
                None => None,
            }
        };
        drop(stale);
        self.refill();
    }

    /// Why `helper` should not serve: waited too long, or a file it loaded changed since.
    fn stale(&self, helper: &Helper) -> Option<&'static str> {
        if helper.started.elapsed() > MAX_WAIT {
            return Some("waited over 5 minutes");
        }
        (self.stamps() != helper.loaded).then_some("a file it loaded changed since it started")
    }

    /// The files a helper loads before its request: every file in /etc/pam.d (the service's
    /// and what it includes), /etc/nsswitch.conf and the helper binary. A few dozen stats.
    fn stamps(&self) -> Vec<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let mut files: Vec<PathBuf> = std::fs::read_dir("/etc/pam.d")
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.sort();
        files.push(PathBuf::from("/etc/pam.d"));
        files.push(PathBuf::from("/etc/nsswitch.conf"));
        files.push(self.path.clone());
        files
            .into_iter()
            .map(|f| {
                let stamp = std::fs::metadata(&f).ok().map(|m| {
                    (
                        m.dev(),
                        m.ino(),
                        m.mtime(),
                        m.mtime_nsec(),
                        m.ctime(),
                        m.ctime_nsec(),
                    )
                });
                (f, stamp)
            })
            .collect()
    }

    /// Starts a helper for a request now. What it loads is not stamped: it serves at once,
    /// and only a helper left waiting can grow stale.
    pub(super) fn start_one(&self) -> std::io::Result<Helper> {
        self.spawn(Vec::new())
    }

    /// Starts a helper, `loaded` being the files it loads as they were just before.
    fn spawn(&self, loaded: Vec<FileStamp>) -> std::io::Result<Helper> {
        let mut cmd = std::process::Command::new(&self.path);
        cmd.arg("session-helper");
        if let Some(service) = &self.pam_service {
            cmd.arg(format!("--pam-service={service}"));
        }
        privdrop::as_root(&mut cmd);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            // A process the user controls must not write into root's log: the helper logs
            // into the desktop's own log, and its answer comes on stdout, bounded.
            .stderr(Stdio::null());
        let started = Instant::now();
        let mut child = tokio::process::Command::from(cmd).spawn()?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(std::io::Error::other("no pipes to the session helper"));
        };
        Ok(Helper {
            child,
            stdin,
            stdout,
            started,
            loaded,
        })
    }
}
