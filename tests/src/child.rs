//! One child process of a test — a service under test (blade-agent, dispatcher, ws-proxy) or a
//! real dependency (FerretDB, sshd) — and everything the tests do to it, in one place.
//!
//! How a child lives:
//! 1. [`ChildProc::new`] names the program, its log file and how it shows it is [`Ready`];
//!    [`arg`](ChildProc::arg), [`args`](ChildProc::args) and [`env`](ChildProc::env) add to
//!    its command line and environment.
//! 2. [`start`](ChildProc::start) spawns it with stdin closed and stdout and stderr appended to
//!    the log, then polls until it is ready. If it exits or stays unready past its deadline the
//!    test fails with the log, so a service that cannot start says why.
//! 3. The test reads the [`log`](ChildProc::log) at any time, and ends the process as the case
//!    needs: [`stop`](ChildProc::stop) (SIGTERM, then SIGKILL after a grace period),
//!    [`kill`](ChildProc::kill) (SIGKILL: a crash), or [`terminate`](ChildProc::terminate)
//!    (SIGTERM and hand the process over, to watch a drain).
//! 4. [`restart`](ChildProc::restart) runs the same command line again: the same address, the
//!    same files, the log appended to.
//! 5. Dropping it kills the process, so a failing test leaves nothing running.
//!
//! Each wrapper (`AgentProc`, `DispatcherProc`, `WsProxyProc`, `Sshd`; `FerretDb` with its own
//! SIGKILL `stop`) holds a `ChildProc` and gets the same `log`, `pid`, `stop`, `kill`,
//! `terminate` and `restart` methods from `child_methods!`; it adds only what is its own:
//! the command line, the readiness check, its clients.
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How often readiness and exit are polled.
const POLL: Duration = Duration::from_millis(20);

/// How long [`ChildProc::stop`] waits after SIGTERM before it sends SIGKILL, unless
/// [`ChildProc::grace`] says otherwise. Long enough for a clean shutdown of every service here;
/// a process that overruns it is killed rather than hanging the test.
const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// How long a child may take to become ready, unless [`ChildProc::ready_within`] says
/// otherwise.
const DEFAULT_READY_WITHIN: Duration = Duration::from_secs(5);

/// What shows that a started child can be used.
#[derive(Debug, Clone)]
pub enum Ready {
    /// Its gRPC health service at the address reports the named service SERVING ("" for the
    /// server as a whole).
    Serving(SocketAddr, &'static str),
    /// A TCP connection to the address succeeds.
    Listening(SocketAddr),
    /// [`Ready::Serving`] over mutual TLS with these client credentials.
    ServingTls(
        SocketAddr,
        &'static str,
        vncdispatch_proto::tls::Credentials,
    ),
}

impl Ready {
    /// One readiness probe.
    async fn probe(&self) -> bool {
        match self {
            Ready::Serving(addr, service) => crate::serving_now(*addr, service).await,
            Ready::Listening(addr) => tokio::net::TcpStream::connect(addr).await.is_ok(),
            Ready::ServingTls(addr, service, creds) => {
                crate::serving_now_as(*addr, service, Some(creds)).await
            }
        }
    }
}

/// A program the test starts, watches and ends; killed on drop.
#[derive(Debug)]
pub struct ChildProc {
    /// The running process; None before the first start and after it was ended.
    child: Option<Child>,
    /// Program to run, and the arguments and environment it gets on every (re)start.
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    /// Where its stdout and stderr go; appended to, so a restart keeps what came before.
    log: PathBuf,
    ready: Ready,
    ready_within: Duration,
    grace: Duration,
}

impl ChildProc {
    /// A child that will run `program`, log to `log` and be ready when `ready` holds. Nothing
    /// runs until [`start`](Self::start).
    pub fn new(program: impl Into<PathBuf>, log: impl Into<PathBuf>, ready: Ready) -> ChildProc {
        ChildProc {
            child: None,
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            log: log.into(),
            ready,
            ready_within: DEFAULT_READY_WITHIN,
            grace: DEFAULT_GRACE,
        }
    }

    /// One of this workspace's services (`blade-agent`, `dispatcher`, `ws-proxy`), built in
    /// the same target directory, logging at level info to `NAME.log` in `dir`.
    pub fn service(name: &str, dir: &Path, ready: Ready) -> ChildProc {
        ChildProc::service_from(None, name, dir, ready)
    }

    /// [`ChildProc::service`] from `bin_dir` when given (a bench's build to compare with).
    pub fn service_from(bin_dir: Option<&Path>, name: &str, dir: &Path, ready: Ready) -> ChildProc {
        let bin = bin_dir.map_or_else(|| crate::workspace_bin(name), |d| d.join(name));
        ChildProc::new(bin, dir.join(format!("{name}.log")), ready).env("RUST_LOG", "info")
    }

    /// Adds one argument.
    pub fn arg(mut self, arg: impl Into<OsString>) -> ChildProc {
        self.args.push(arg.into());
        self
    }

    /// Adds arguments.
    pub fn args<I, S>(mut self, args: I) -> ChildProc
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable (the rest of the environment is inherited).
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> ChildProc {
        self.env.push((key.into(), value.into()));
        self
    }

    /// How long it may take to become ready.
    pub fn ready_within(mut self, limit: Duration) -> ChildProc {
        self.ready_within = limit;
        self
    }

    /// How long [`stop`](Self::stop) waits after SIGTERM before SIGKILL.
    pub fn grace(mut self, grace: Duration) -> ChildProc {
        self.grace = grace;
        self
    }

    /// Starts it and waits until it is ready.
    pub async fn start(mut self) -> ChildProc {
        self.spawn().await;
        self
    }

    /// Spawns the process (if none runs) and waits until it is ready; panics with the log if
    /// it exits first or is not ready in time.
    pub async fn spawn(&mut self) {
        if self.child.is_none() {
            self.child = Some(self.command().spawn().unwrap_or_else(|e| {
                panic!("spawn {}: {e}", self.program.display());
            }));
        }
        let deadline = tokio::time::Instant::now() + self.ready_within;
        loop {
            if let Some(status) = self.exited() {
                panic!(
                    "{} exited ({status}) before it was ready; log:\n{}",
                    self.name(),
                    self.log()
                );
            }
            if self.ready.probe().await {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "{} was not ready ({:?}) within {:?}; log:\n{}",
                    self.name(),
                    self.ready,
                    self.ready_within,
                    self.log()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The command line, with stdin closed and both output streams appended to the log.
    fn command(&self) -> Command {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("open log {}: {e}", self.log.display()));
        let err = out
            .try_clone()
            .unwrap_or_else(|e| panic!("duplicate log {}: {e}", self.log.display()));
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        cmd
    }

    /// The program's file name, for messages.
    fn name(&self) -> String {
        self.program.file_name().map_or_else(
            || self.program.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
    }

    /// Its exit status, if it has exited (the process stays reaped and recorded).
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Sets `flag`'s value for the next (re)start: the value after an existing `flag`, or
    /// both appended.
    pub fn set_option(&mut self, flag: &str, value: &str) {
        match self.args.iter().position(|a| a == flag) {
            Some(i) if i + 1 < self.args.len() => self.args[i + 1] = value.into(),
            _ => self.args.extend([flag.into(), value.into()]),
        }
    }

    /// What it wrote to stdout and stderr so far, over all its starts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Its pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Ends it gracefully: SIGTERM, then SIGKILL if it is still running after the grace
    /// period; returns once it has exited. Nothing happens if it is not running.
    pub fn stop(&mut self) {
        let Some(mut child) = self.terminate() else {
            return;
        };
        let deadline = Instant::now() + self.grace;
        // Blocking, as the callers are (Drop and sync test steps): the child is ours alone.
        while Instant::now() < deadline {
            if !matches!(child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(POLL);
        }
        eprintln!(
            "{} ignored SIGTERM for {:?}: killing it",
            self.name(),
            self.grace
        );
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Kills it with SIGKILL (a crash) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and hands the process over, for a test that watches how it winds down;
    /// None if it is not running.
    pub fn terminate(&mut self) -> Option<Child> {
        let child = self.child.take()?;
        if let Ok(pid) = i32::try_from(child.id()) {
            // ESRCH only: it already exited, and the caller's wait will say so.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        Some(child)
    }

    /// Stops it gracefully and starts it again with the same command line.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Gives a wrapper that holds a [`ChildProc`] in the field named the process-handling
/// methods its tests call — `log`, `pid`, `stop`, `kill`, `terminate`, `restart` — as inherent
/// methods, so every wrapper offers the same ones, written once, and callers need no import.
macro_rules! child_methods {
    ($wrapper:ty, $field:ident) => {
        impl $wrapper {
            /// Its log so far: stdout and stderr, over all its starts.
            pub fn log(&self) -> String {
                self.$field.log()
            }

            /// Its pid, while it runs.
            pub fn pid(&self) -> Option<u32> {
                self.$field.pid()
            }

            /// Stops it with SIGTERM and waits for it to exit (SIGKILL after a grace period).
            pub fn stop(&mut self) {
                self.$field.stop();
            }

            /// Kills it with SIGKILL, as a crash would.
            pub fn kill(&mut self) {
                self.$field.kill();
            }

            /// Sends SIGTERM (a graceful drain) and returns the process to wait on.
            pub fn terminate(&mut self) -> Option<std::process::Child> {
                self.$field.terminate()
            }

            /// Stops it and starts it again with the same settings: same address, same files.
            pub async fn restart(&mut self) {
                self.$field.restart().await;
            }
        }
    };
}
pub(crate) use child_methods;

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;
    use std::os::unix::process::ExitStatusExt;

    /// A child running `script` under sh, logging into a fresh directory, and ready as soon as
    /// it runs (the listener it waits for is already there). The directory and listener are
    /// returned to be held while the child lives.
    fn sh(script: &str) -> (tempfile::TempDir, std::net::TcpListener, ChildProc) {
        let dir = tempfile::tempdir().expect("dir");
        let ready = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = ready.local_addr().expect("addr");
        let child = ChildProc::new("/bin/sh", dir.path().join("sh.log"), Ready::Listening(addr))
            .args(["-c", script])
            .ready_within(Duration::from_secs(2));
        (dir, ready, child)
    }

    /// True while `/proc/PID` exists: the process runs or is an unreaped zombie.
    fn exists(pid: u32) -> bool {
        Path::new(&format!("/proc/{pid}")).exists()
    }

    /// Lines of the log that start with `prefix`.
    fn lines_with(c: &ChildProc, prefix: &str) -> usize {
        c.log().lines().filter(|l| l.starts_with(prefix)).count()
    }

    #[tokio::test]
    async fn stop_kills_a_child_that_ignores_sigterm_after_the_grace() {
        let (_dir, _ready, c) = sh("trap '' TERM; echo trapped; while :; do sleep 0.05; done");
        let mut c = c.grace(Duration::from_millis(300)).start().await;
        // Ready at once; the trap is set when the log says so.
        assert!(crate::eventually(5, || lines_with(&c, "trapped") == 1).await);
        let pid = c.pid().expect("running");
        let t0 = Instant::now();
        c.stop();
        assert!(t0.elapsed() >= Duration::from_millis(300), "no grace given");
        assert!(!exists(pid), "pid {pid} outlived stop");
        assert_eq!(c.pid(), None);
    }

    #[tokio::test]
    async fn stop_returns_as_soon_as_a_child_exits_on_sigterm() {
        let (_dir, _ready, c) = sh("exec sleep 30");
        let mut c = c.start().await;
        let pid = c.pid().expect("running");
        let t0 = Instant::now();
        c.stop();
        let waited = t0.elapsed();
        assert!(waited < DEFAULT_GRACE / 2, "stop took {waited:?}");
        assert!(!exists(pid), "pid {pid} outlived stop");
    }

    #[tokio::test]
    async fn restart_runs_the_same_command_again_and_keeps_the_log() {
        let (_dir, _ready, c) = sh("echo started $$; exec sleep 30");
        let mut c = c.start().await;
        // Each process writes its line a moment after it is ready.
        assert!(crate::eventually(5, || lines_with(&c, "started") == 1).await);
        let first = c.pid().expect("running");
        c.restart().await;
        let second = c.pid().expect("running again");
        assert_ne!(first, second);
        assert!(!exists(first), "the first process outlived the restart");
        let both = crate::eventually(5, || lines_with(&c, "started") == 2).await;
        assert!(both, "log: {}", c.log());
        drop(c);
        assert!(!exists(second), "pid {second} outlived drop");
    }

    #[tokio::test]
    async fn a_child_that_exits_before_it_is_ready_fails_with_its_log() {
        let (_dir, ready, c) = sh("echo no config >&2; exit 3");
        // Nothing listens any more: only the exit can end the wait early.
        drop(ready);
        let c = c.ready_within(Duration::from_secs(30));
        let t0 = Instant::now();
        let err = tokio::spawn(c.start()).await.expect_err("start must fail");
        let msg = err
            .into_panic()
            .downcast::<String>()
            .map(|m| *m)
            .unwrap_or_default();
        assert!(msg.contains("exited"), "{msg}");
        assert!(msg.contains("no config"), "{msg}");
        let waited = t0.elapsed();
        assert!(waited < Duration::from_secs(10), "waited {waited:?}");
    }

    #[tokio::test]
    async fn terminate_hands_over_the_process_after_sigterm() {
        let (_dir, _ready, c) = sh("exec sleep 30");
        let mut c = c.start().await;
        let mut child = c.terminate().expect("running");
        let status = child.wait().expect("wait");
        assert_eq!(status.signal(), Some(Signal::SIGTERM as i32), "{status}");
        assert!(c.terminate().is_none(), "handed over twice");
    }
}
