//! Session helpers started ahead of need. Forking the agent and exec'ing, linking and starting
//! a helper takes about 2 ms, on the path of every start and password change; so the server
//! keeps one helper waiting — started, its NSS configuration loaded — for the next request,
//! and starts the next one once a call has taken it and read its answer. A call that finds
//! none waiting (concurrent starts, a one-shot command) starts its own the same way and uses
//! it at once: there is one way to run a helper, only its timing differs.
//!
//! A waiting helper is what every helper is until its request comes: root, in a session of
//! its own, with an empty environment and `/` as its directory ([`privdrop::as_root`]), with
//! NSS and the PAM service's modules loaded (a PAM transaction for no user yet). Its stdin is
//! a pipe only the agent holds; it exits when that closes, the agent gone. It knows nothing
//! of any user until the request names one, so it cannot have been prepared for the wrong
//! one; an edit of the PAM service's file reaches helpers started after it.
use super::lock;
use crate::privdrop;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::process::{Child, ChildStdin, ChildStdout};

/// A running helper waiting for its request.
#[derive(Debug)]
pub(super) struct Helper {
    pub(super) child: Child,
    pub(super) stdin: ChildStdin,
    pub(super) stdout: ChildStdout,
}

/// The helper binary, and the one helper kept waiting.
#[derive(Debug)]
pub(super) struct Spares {
    path: PathBuf,
    /// The PAM service requests name, which a helper loads before its request comes.
    pam_service: Option<String>,
    /// Whether a helper is kept waiting: by `serve`, not by one-shot commands.
    keep: AtomicBool,
    waiting: Mutex<Option<Helper>>,
}

impl Spares {
    pub(super) fn new(path: PathBuf, pam_service: Option<String>) -> Self {
        Spares {
            path,
            pam_service,
            keep: AtomicBool::new(false),
            waiting: Mutex::new(None),
        }
    }

    /// The helper binary.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// From now on, keeps a helper waiting; starts the first.
    pub(super) fn keep_one(&self) {
        self.keep.store(true, Ordering::Relaxed);
        self.refill();
    }

    /// A helper for one request: the waiting one while it still runs, else a new one.
    pub(super) fn take(&self) -> std::io::Result<Helper> {
        let waiting = lock(&self.waiting).take();
        if let Some(mut helper) = waiting {
            match helper.child.try_wait() {
                Ok(None) => return Ok(helper),
                // Killed by someone, or out of memory: a new one serves.
                gone => tracing::warn!(status = ?gone, "the waiting session helper had exited"),
            }
        }
        self.spawn()
    }

    /// Starts a helper to wait for the next request, when none waits and one is kept. Forks
    /// and execs: call it on a blocking thread, off any request's path.
    pub(super) fn refill(&self) {
        if !self.keep.load(Ordering::Relaxed) || lock(&self.waiting).is_some() {
            return;
        }
        match self.spawn() {
            // Two refills racing: the second helper is dropped, and exits on its closed stdin.
            Ok(helper) => {
                lock(&self.waiting).get_or_insert(helper);
            }
            Err(e) => tracing::warn!(
                helper = %self.path.display(),
                error = %e,
                "cannot start a session helper ahead; the next start will start its own"
            ),
        }
    }
}

impl Spares {
    fn spawn(&self) -> std::io::Result<Helper> {
        let mut cmd = std::process::Command::new(&self.path);
        cmd.arg("session-helper");
        if let Some(service) = &self.pam_service {
            cmd.args(["--pam-service", service]);
        }
        privdrop::as_root(&mut cmd);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            // A process the user controls must not write into root's log: the helper logs
            // into the desktop's own log, and its answer comes on stdout, bounded.
            .stderr(Stdio::null());
        let mut child = tokio::process::Command::from(cmd).spawn()?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(std::io::Error::other("no pipes to the session helper"));
        };
        Ok(Helper {
            child,
            stdin,
            stdout,
        })
    }
}
