//! Starting the desktop, as the user: Xtigervnc directly (fast), or TigerVNC's vncserver
//! wrapper; then waiting until the RFB port answers with a banner (the fast path first waits
//! for Xvnc's `-displayfd` line). The fast path's session command is checked before READY and
//! started after it ([`Desktop::start_session`]). A display someone else holds is reported as
//! BUSY so the agent tries the next one.
use super::files::write_xauthority;
use super::x509::DesktopCert;
use super::{FailKind, Failure, HelperArgs, SESSION_GATE, failed, log_name};
use crate::discover;
use nix::unistd::Uid;
use std::fs::File;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A started fast-path desktop, supervised by this helper.
#[derive(Debug)]
pub(super) struct Desktop {
    /// The Xvnc process, this helper's child.
    pub(super) xvnc: Child,
    /// Its pid, reported in READY.
    pub(super) xvnc_pid: u32,
    /// The session command, until it exits.
    pub(super) session: Option<Child>,
    /// The session command, before [`Desktop::start_session`] runs it.
    pending: Option<Command>,
    /// The read end of Xvnc's `-displayfd` pipe, kept open for Xvnc's life: were it closed
    /// first, Xvnc's write would fail, which it treats as fatal.
    pub(super) _displayfd: std::io::PipeReader,
}

/// `-SecurityTypes`, the blacklist off, and, for VeNCrypt, the desktop's certificate and key.
fn security_args(args: &HelperArgs, cert: Option<&DesktopCert>) -> Vec<std::ffi::OsString> {
    let mut out: Vec<std::ffi::OsString> = vec![
        "-SecurityTypes".into(),
        args.rfb_security.xvnc_types().into(),
        // Xvnc's blacklist refuses an address after five connections that end before a
        // login, and everyone reaching a desktop shares a few addresses (ws-proxy's, the
        // blade's own): a neighbour hanging up five times would lock its owner out, and this
        // helper's own readiness check counts as one. The password is random, and guessing
        // it costs a connection a try either way.
        "-UseBlacklist=0".into(),
    ];
    if let Some(c) = cert {
        out.extend(["-X509Cert".into(), c.cert.clone().into_os_string()]);
        out.extend(["-X509Key".into(), c.key.clone().into_os_string()]);
    }
    out
}

pub(super) fn start_fast(
    args: &HelperArgs,
    home: &Path,
    vnc_dir: &OwnedFd,
    cert: Option<&DesktopCert>,
    log: File,
) -> Result<Desktop, Failure> {
    let xauth_name = format!("Xauthority-{}", args.display);
    write_xauthority(vnc_dir, &xauth_name, args.display)?;
    let xauth = home.join(".vnc").join(&xauth_name);
    let rfbauth = home.join(".vncpasswd");
    let user = std::env::var("USER").unwrap_or_default();
    let log_err = log.try_clone().map_err(|e| failed(format!("log: {e}")))?;
    // Xvnc writes its display number to `-displayfd` once ready for connections, right
    // before its main loop: its stdin is that pipe's write end, and the helper waits for the
    // line instead of polling the port every millisecond (then checks the banner once).
    let (displayfd, ready) =
        std::io::pipe().map_err(|e| failed(format!("pipe for -displayfd: {e}")))?;
    let deadline = Instant::now() + Duration::from_millis(args.timeout_ms);
    let mut xvnc = Command::new(&args.xvnc)
        .envs(args.pam_env.iter().map(|(k, v)| (k, v)))
        .arg(format!(":{}", args.display))
        .arg("-auth")
        .arg(&xauth)
        .arg("-rfbauth")
        .arg(&rfbauth)
        .arg("-rfbport")
        .arg(args.port.to_string())
        .args(interface_args(args))
        .args(security_args(args, cert))
        .arg("-geometry")
        .arg(&args.geometry)
        .arg("-depth")
        .arg("24")
        .arg("-desktop")
        .arg(format!("{user}'s desktop"))
        .args(["-nolisten", "tcp", "-displayfd", "0"])
        .stdin(ready)
        .stdout(log.try_clone().map_err(|e| failed(format!("log: {e}")))?)
        .stderr(log_err)
        .spawn()
        .map_err(|e| failed(format!("cannot run {}: {e}", args.xvnc.display())))?;
    let xvnc_pid = xvnc.id();
    // The write end went with the Command: the pipe reads EOF should Xvnc exit first.
    wait_readable(&displayfd, deadline);
    if let Err(f) = wait_ready(args, Some(&mut xvnc), home, deadline) {
        let _ = xvnc.kill();
        let _ = xvnc.wait();
        return Err(f);
    }
    // The session command runs after READY (see `Desktop::start_session`); one this user
    // cannot run fails the start here, where the agent hears of it.
    if let Err(why) = runnable(&args.session) {
        let _ = xvnc.kill();
        let _ = xvnc.wait();
        return Err(failed(format!(
            "cannot run session command {}: {why}",
            args.session.display()
        )));
    }
    let mut session = Command::new(&args.session);
    session
        .envs(args.pam_env.iter().map(|(k, v)| (k, v)))
        .env("DISPLAY", format!(":{}", args.display))
        .env("XAUTHORITY", &xauth)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| failed(format!("log: {e}")))?)
        .stderr(log);
    Ok(Desktop {
        xvnc,
        xvnc_pid,
        session: None,
        pending: Some(session),
        _displayfd: displayfd,
    })
}

/// Why `path` cannot be exec'd by this process (the user), as far as can be told ahead: not a
/// regular file, not executable, or a script whose `#!` interpreter is not. What is left —
/// the user's process limit, a binary for another machine — shows only at exec, after READY.
fn runnable(path: &Path) -> Result<(), String> {
    use nix::unistd::{AccessFlags, access};
    let is_file = |p: &Path| match std::fs::metadata(p) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(format!("{} is not a file", p.display())),
        Err(e) => Err(format!("{}: {e}", p.display())),
    };
    is_file(path)?;
    access(path, AccessFlags::X_OK).map_err(|e| e.to_string())?;
    // A script: its interpreter must be there too (unreadable: exec will tell). Opened without
    // blocking and read only if what was opened is a file: a path swapped for a FIFO since
    // the check above would otherwise hold the helper until the agent's deadline.
    let mut head = [0u8; 256];
    let n = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)
        .and_then(|mut f| match f.metadata()?.is_file() {
            true => f.read(&mut head),
            false => Ok(0),
        })
        .unwrap_or(0);
    if let Some(line) = head[..n].strip_prefix(b"#!") {
        let line = line.split(|b| *b == b'\n').next().unwrap_or_default();
        let word = line
            .split(|b| *b == b' ' || *b == b'\t')
            .find(|w| !w.is_empty())
            .unwrap_or_default();
        let interpreter = Path::new(std::ffi::OsStr::from_bytes(word));
        is_file(interpreter).map_err(|e| format!("its interpreter {e}"))?;
        access(interpreter, AccessFlags::X_OK)
            .map_err(|e| format!("its interpreter {}: {e}", interpreter.display()))?;
    }
    Ok(())
}

impl Desktop {
    /// Starts the session command once READY is out and the agent has closed the helper's
    /// stdin, just after its answer; this waits [`SESSION_GATE`] at most, then starts the
    /// session anyway. The agent's [`NO_SESSION`](super::NO_SESSION) byte first (it did not
    /// take the desktop), or Xvnc already gone, means no session.
    pub(super) fn start_session(&mut self) -> Result<(), NoSession> {
        let Some(mut command) = self.pending.take() else {
            return Ok(());
        };
        if wait_readable(std::io::stdin(), Instant::now() + SESSION_GATE) {
            // From the fd itself, as polled: std's buffer (empty after the password lines)
            // and its lock are not involved.
            let mut said = [0u8; 1];
            if matches!(
                nix::unistd::read(std::io::stdin().as_fd(), &mut said),
                Ok(1)
            ) {
                self.stop_xvnc();
                return Err(NoSession::Refused);
            }
        }
        match self.xvnc.try_wait() {
            Ok(None) => {}
            Ok(Some(_)) => return Err(NoSession::XvncGone),
            Err(e) => {
                let _ = self.xvnc.kill();
                let _ = self.xvnc.wait();
                return Err(NoSession::Failed(format!(
                    "cannot tell whether Xvnc runs: {e}; stopped it"
                )));
            }
        }
        match command.spawn() {
            Ok(child) => {
                self.session = Some(child);
                Ok(())
            }
            Err(e) => {
                let _ = self.xvnc.kill();
                let _ = self.xvnc.wait();
                Err(NoSession::Failed(format!(
                    "cannot run session command {}: {e}; Xvnc stopped",
                    command.get_program().to_string_lossy()
                )))
            }
        }
    }
}

/// Why a started desktop has no session.
pub(super) enum NoSession {
    /// The agent did not take the desktop (see [`NO_SESSION`](super::NO_SESSION)).
    Refused,
    /// Xvnc ended before the session command started (stopped, or crashed).
    XvncGone,
    /// The session command could not start; Xvnc is stopped.
    Failed(String),
}

impl std::fmt::Display for NoSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoSession::Refused => f.write_str(
                "the agent did not take this desktop (rejected after READY, or its caller went away): Xvnc stopped, no session",
            ),
            NoSession::XvncGone => f.write_str("Xvnc exited before the session command started"),
            NoSession::Failed(why) => f.write_str(why),
        }
    }
}

pub(super) fn start_wrapper(
    args: &HelperArgs,
    home: &Path,
    cert: Option<&DesktopCert>,
    log: File,
) -> Result<(), Failure> {
    let out = Command::new(&args.vncserver)
        .envs(args.pam_env.iter().map(|(k, v)| (k, v)))
        .arg(format!(":{}", args.display))
        .arg("-rfbport")
        .arg(args.port.to_string())
        .arg("-PasswordFile")
        .arg(home.join(".vncpasswd"))
        .args(security_args(args, cert))
        .arg("-geometry")
        .arg(&args.geometry)
        .arg("-localhost=no")
        .args(interface_args(args))
        .arg("-xstartup")
        .arg(&args.session)
        .arg("-autokill")
        .arg("yes")
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| failed(format!("log: {e}")))?)
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| failed(format!("cannot run {}: {e}", args.vncserver.display())))?;
    if !out.status.success() {
        let text = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = text.lines().rev().take(3).collect();
        let busy = text.contains("already") || text.contains("in use");
        let message = format!(
            "vncserver exited with {}: {}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
        );
        return Err(Failure {
            kind: if busy {
                FailKind::Busy
            } else {
                FailKind::Failed
            },
            message,
        });
    }
    let deadline = Instant::now() + Duration::from_millis(args.timeout_ms);
    wait_ready(args, None, home, deadline)
}

/// Waits until `fd` has something to read or its end, or `deadline`: Xvnc's `-displayfd` line
/// or Xvnc's exit (what it says is not needed: the banner check follows), or the agent's
/// word on the helper's stdin; false when the deadline came first.
fn wait_readable(fd: impl std::os::fd::AsFd, deadline: Instant) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Err(nix::errno::Errno::EINTR) => continue,
            Ok(n) => return n > 0,
            Err(_) => return false,
        }
    }
}

/// `-interface ADDR` for a specific address; none for "any", so that Xvnc listens on IPv4
/// and IPv6 both: with only `0.0.0.0` a local user could hold `[::]:PORT` beside it and
/// answer every client that reaches the blade over IPv6.
fn interface_args(args: &HelperArgs) -> Vec<String> {
    if args.interface.is_unspecified() {
        Vec::new()
    } else {
        vec!["-interface".into(), args.interface.to_string()]
    }
}

pub(super) fn find_xvnc(args: &HelperArgs) -> Result<u32, Failure> {
    let comm = args
        .xvnc
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("Xtigervnc");
    let me = Uid::current().as_raw();
    discover::scan(comm)
        .map_err(|e| failed(format!("reading /proc: {e}")))?
        .into_iter()
        .find(|x| x.uid == me && x.display == args.display && x.rfbauth.is_some())
        .map(|x| x.pid)
        .ok_or_else(|| {
            failed(format!(
                "vncserver reported success but no Xvnc runs on :{}",
                args.display
            ))
        })
}

/// Waits until the RFB port answers with an RFB version banner, Xvnc exits, or time runs out.
fn wait_ready(
    args: &HelperArgs,
    mut xvnc: Option<&mut Child>,
    home: &Path,
    deadline: Instant,
) -> Result<(), Failure> {
    let ip = if args.interface.is_unspecified() {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        args.interface
    };
    let addr = SocketAddr::new(ip, args.port);
    // The fast path comes here once Xvnc said it is ready, so the first try answers. The
    // wrapper, or an Xvnc that said nothing: poll every millisecond (a refused connect costs
    // microseconds), so the desktop is reported at most a millisecond after it is ready.
    let pause = Duration::from_millis(1);
    loop {
        if rfb_banner(addr) {
            return Ok(());
        }
        if let Some(child) = xvnc.as_deref_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            let tail = log_tail(home, args);
            let busy = tail.contains("already active")
                || tail.contains("in use")
                || tail.contains("Cannot establish");
            return Err(Failure {
                kind: if busy {
                    FailKind::Busy
                } else {
                    FailKind::Failed
                },
                message: format!("Xvnc exited with {status} before accepting connections: {tail}"),
            });
        }
        if Instant::now() >= deadline {
            return Err(Failure {
                kind: FailKind::Timeout,
                message: format!("no RFB banner on {addr} after {} ms", args.timeout_ms),
            });
        }
        std::thread::sleep(pause);
    }
}

fn rfb_banner(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut banner = [0u8; 12];
    s.read_exact(&mut banner).is_ok() && banner.starts_with(b"RFB ")
}

/// The last lines of the Xvnc log, for error messages.
fn log_tail(home: &Path, args: &HelperArgs) -> String {
    let path = home.join(".vnc").join(log_name(args.display));
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join(" / ")
}
