//! The per-session helper: `blade-agent session-helper`, run by the agent as the desktop's user.
//!
//! Everything that touches the user's files or starts the user's programs happens here, in a
//! process that already has only the user's uid, gid and groups, so the kernel — not a check
//! the agent might get wrong — keeps it inside the user's rights. The agent execs it through
//! [`crate::privdrop`] and talks to it over pipes:
//!
//! 1. stdin: the VNC password and a newline (never argv or environment).
//! 2. the helper writes `~/.vncpasswd` (O_NOFOLLOW, 0600, checked to be a plain file of the
//!    user's with one link); for `--action passwd` it then answers `OK` and exits.
//! 3. for `--action start` it starts Xvnc (or the `vncserver` wrapper), waits until the RFB
//!    port answers with an RFB banner, starts the session command, and answers one line on
//!    stdout: `READY <xvnc pid>`, or `<KIND> <message>` with KIND one of REFUSED (unsafe home),
//!    BUSY (display taken, try another), TIMEOUT, FAILED.
//! 4. after READY (fast path) it stays as the session's supervisor: when the session command
//!    exits it stops Xvnc (vncserver's `-autokill`), and when Xvnc dies it ends the session's
//!    process group. It keeps doing so across agent restarts, as it is not the agent's.
use clap::ValueEnum;
use nix::errno::Errno;
use nix::fcntl::{OFlag, openat};
use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::stat::{Mode, SFlag, fchmod, fstat, mkdirat};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Pid, Uid, ftruncate};
use std::fs::File;
use std::io::{self, BufRead, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use crate::discover;
use vncdispatch_proto::vncauth;

/// What the agent asks of the helper.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Action {
    /// Only (re)write `~/.vncpasswd`: the server is already running and rereads it.
    Passwd,
    /// Write `~/.vncpasswd` and start the desktop.
    Start,
}

/// How the desktop is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StartMode {
    /// Xtigervnc directly, then the session command: no Perl, no shell.
    Fast,
    /// TigerVNC's `vncserver` wrapper, as the original `cloudvnc` did.
    Wrapper,
}

/// Arguments of `blade-agent session-helper` (set by the agent, not meant for people).
#[derive(Debug, Clone, clap::Args)]
pub struct HelperArgs {
    /// passwd or start.
    #[arg(long, value_enum)]
    pub action: Action,
    /// For passwd: the password file the running server reads, when not `~/.vncpasswd`
    /// (the vncserver wrapper hands Xvnc a private copy). Rewritten too.
    #[arg(long)]
    pub rfbauth: Option<PathBuf>,
    /// Start mode.
    #[arg(long, value_enum, default_value = "fast")]
    pub mode: StartMode,
    /// X display number.
    #[arg(long, default_value_t = 0)]
    pub display: u32,
    /// RFB port.
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// Xvnc binary.
    #[arg(long, default_value = "/usr/bin/Xtigervnc")]
    pub xvnc: PathBuf,
    /// vncserver wrapper.
    #[arg(long, default_value = "/usr/bin/vncserver")]
    pub vncserver: PathBuf,
    /// Session command run in the desktop.
    #[arg(long, default_value = "/etc/X11/Xtigervnc-session")]
    pub session: PathBuf,
    /// WIDTHxHEIGHT.
    #[arg(long, default_value = "1280x800")]
    pub geometry: String,
    /// Address Xvnc listens on for RFB.
    #[arg(long, default_value = "0.0.0.0")]
    pub interface: IpAddr,
    /// Milliseconds to wait for the RFB port.
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
}

/// `~/.vnc/HOST:N.log`, the name vncserver uses, so admins find logs where they expect them.
fn log_name(display: u32) -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok());
    format!("{}:{display}.log", host.as_deref().unwrap_or("localhost"))
}

/// A failure the agent can act on, sent back as `<KIND> <message>`.
#[derive(Debug)]
struct Failure {
    kind: &'static str,
    message: String,
}

fn refused(message: impl Into<String>) -> Failure {
    Failure {
        kind: "REFUSED",
        message: message.into(),
    }
}
fn failed(message: impl Into<String>) -> Failure {
    Failure {
        kind: "FAILED",
        message: message.into(),
    }
}

/// What the helper achieved.
#[derive(Debug)]
enum Outcome {
    /// Only the password file was written.
    Passwd,
    /// A fast-path desktop this helper now supervises.
    Supervise(Desktop),
    /// A wrapper-started desktop (vncserver supervises it); the Xvnc pid.
    Detached(u32),
}

/// Runs the helper; the exit code is for humans, the agent reads stdout.
pub fn main(args: HelperArgs) -> ExitCode {
    match run(&args) {
        Ok(Outcome::Supervise(mut desktop)) => {
            answer(&format!("READY {}", desktop.xvnc_pid));
            desktop.supervise();
            ExitCode::SUCCESS
        }
        Ok(Outcome::Detached(pid)) => {
            answer(&format!("READY {pid}"));
            ExitCode::SUCCESS
        }
        Ok(Outcome::Passwd) => {
            answer("OK");
            ExitCode::SUCCESS
        }
        Err(f) => {
            answer(&format!("{} {}", f.kind, f.message.replace('\n', " ")));
            ExitCode::FAILURE
        }
    }
}

fn answer(line: &str) {
    let mut out = io::stdout().lock();
    // If the agent is gone there is nobody to tell; the desktop still runs.
    let _ = writeln!(out, "{line}").and_then(|_| out.flush());
}

fn run(args: &HelperArgs) -> Result<Outcome, Failure> {
    let password = read_password()?;
    let home = PathBuf::from(std::env::var_os("HOME").ok_or_else(|| failed("HOME is not set"))?);
    let home_fd = open_home(&home)?;
    write_vncpasswd(&home_fd, ".vncpasswd", &password).map_err(|e| refused(format!("~/{e}")))?;
    if args.action == Action::Passwd {
        if let Some(path) = args
            .rfbauth
            .as_deref()
            .filter(|p| *p != home.join(".vncpasswd"))
        {
            write_copy(path, &password)?;
        }
        return Ok(Outcome::Passwd);
    }
    std::env::set_current_dir(&home)
        .map_err(|e| refused(format!("cannot enter home {}: {e}", home.display())))?;
    let vnc_dir = open_vnc_dir(&home_fd)?;
    let log = open_private(&vnc_dir, &log_name(args.display), true)
        .map_err(|e| refused(format!("cannot open ~/.vnc log: {e}")))?;
    let log = File::from(log);
    match args.mode {
        StartMode::Fast => start_fast(args, &home, &vnc_dir, log).map(Outcome::Supervise),
        StartMode::Wrapper => {
            // The wrapper daemonizes Xvnc and supervises the session itself; find its pid.
            start_wrapper(args, &home, log)?;
            find_xvnc(args).map(Outcome::Detached)
        }
    }
}

fn read_password() -> Result<Vec<u8>, Failure> {
    let mut line = Vec::with_capacity(16);
    io::stdin()
        .lock()
        .take(64)
        .read_until(b'\n', &mut line)
        .map_err(|e| failed(format!("reading password from stdin: {e}")))?;
    if line.last() == Some(&b'\n') {
        line.pop();
    }
    let text = std::str::from_utf8(&line).map_err(|_| failed("password is not UTF-8"))?;
    vncdispatch_proto::rules::validate_password(text).map_err(|e| failed(e.to_string()))?;
    Ok(line)
}

/// Opens the home directory and checks it is the user's own.
fn open_home(home: &Path) -> Result<OwnedFd, Failure> {
    let fd = nix::fcntl::open(
        home,
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| refused(format!("cannot open home {}: {}", home.display(), e.desc())))?;
    let st = fstat(&fd).map_err(|e| failed(format!("stat home: {}", e.desc())))?;
    if st.st_uid != Uid::current().as_raw() {
        return Err(refused(format!(
            "home {} is owned by uid {}, not by the user",
            home.display(),
            st.st_uid
        )));
    }
    Ok(fd)
}

/// Opens (creating 0600) a file in `dir` without following a symlink, and checks it is a plain
/// file of the user's with a single link — a hard link could point anywhere the user can write.
fn open_private(dir: &OwnedFd, name: &str, truncate: bool) -> Result<OwnedFd, String> {
    let flags =
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NOCTTY;
    let fd = openat(dir, name, flags, Mode::from_bits_truncate(0o600)).map_err(|e| match e {
        Errno::ELOOP => format!("{name} is a symlink"),
        e => format!("{name}: {}", e.desc()),
    })?;
    let st = fstat(&fd).map_err(|e| format!("stat {name}: {}", e.desc()))?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Err(format!("{name} is not a regular file"));
    }
    if st.st_uid != Uid::current().as_raw() {
        return Err(format!(
            "{name} is owned by uid {}, not by the user",
            st.st_uid
        ));
    }
    if st.st_nlink != 1 {
        return Err(format!("{name} has {} hard links", st.st_nlink));
    }
    fchmod(&fd, Mode::from_bits_truncate(0o600))
        .map_err(|e| format!("chmod {name}: {}", e.desc()))?;
    if truncate {
        ftruncate(&fd, 0).map_err(|e| format!("truncate {name}: {}", e.desc()))?;
    }
    Ok(fd)
}

/// Writes the rfbauth bytes of `password` to `name` in `dir`, safely (see [`open_private`]).
fn write_vncpasswd(dir: &OwnedFd, name: &str, password: &[u8]) -> Result<(), String> {
    let fd = open_private(dir, name, true)?;
    let mut f = File::from(fd);
    // No fsync: the file only matters while the server that reads it runs, and a crash ends
    // that server too.
    f.write_all(&vncauth::obfuscate(password))
        .map_err(|e| format!("writing {name}: {e}"))
}

/// Rewrites the running server's own copy of the password file, in a directory of the user's.
fn write_copy(path: &Path, password: &[u8]) -> Result<(), Failure> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return Err(failed(format!("bad rfbauth path {}", path.display())));
    };
    let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC;
    let dir_fd = nix::fcntl::open(dir, flags, Mode::empty())
        .map_err(|e| refused(format!("cannot open {}: {}", dir.display(), e.desc())))?;
    let st = fstat(&dir_fd).map_err(|e| failed(format!("stat {}: {}", dir.display(), e.desc())))?;
    if st.st_uid != Uid::current().as_raw() {
        return Err(refused(format!("{} is not the user's", dir.display())));
    }
    write_vncpasswd(&dir_fd, name, password).map_err(|e| refused(format!("{}: {e}", dir.display())))
}

/// `~/.vnc`, created 0700 if missing; a symlink is refused (as TurboVNC does).
fn open_vnc_dir(home: &OwnedFd) -> Result<OwnedFd, Failure> {
    match mkdirat(home, ".vnc", Mode::from_bits_truncate(0o700)) {
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(e) => return Err(refused(format!("cannot create ~/.vnc: {}", e.desc()))),
    }
    let fd = openat(
        home,
        ".vnc",
        OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        Errno::ELOOP | Errno::ENOTDIR => refused("~/.vnc is a symlink or not a directory"),
        e => refused(format!("cannot open ~/.vnc: {}", e.desc())),
    })?;
    let st = fstat(&fd).map_err(|e| failed(format!("stat ~/.vnc: {}", e.desc())))?;
    if st.st_uid != Uid::current().as_raw() {
        return Err(refused(format!(
            "~/.vnc is owned by uid {}, not by the user",
            st.st_uid
        )));
    }
    Ok(fd)
}

/// Writes an Xauthority file with a fresh MIT-MAGIC-COOKIE-1 for the display, so only the
/// user's own clients can connect to the X server (without one, any local user could).
fn write_xauthority(vnc_dir: &OwnedFd, name: &str, display: u32) -> Result<(), Failure> {
    let mut cookie = [0u8; 16];
    rand::TryRngCore::try_fill_bytes(&mut rand::rngs::OsRng, &mut cookie)
        .map_err(|e| failed(format!("OS random number generator: {e}")))?;
    let mut entry = Vec::with_capacity(64);
    let mut field = |bytes: &[u8]| {
        entry.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
        entry.extend_from_slice(bytes);
    };
    // Family 0xFFFF (FamilyWild) matches any host, so the entry works whatever the host name.
    let mut out = vec![0xff, 0xff];
    field(b"");
    field(display.to_string().as_bytes());
    field(b"MIT-MAGIC-COOKIE-1");
    field(&cookie);
    out.extend_from_slice(&entry);
    let fd = open_private(vnc_dir, name, true).map_err(|e| refused(format!("~/.vnc/{e}")))?;
    File::from(fd)
        .write_all(&out)
        .map_err(|e| failed(format!("writing ~/.vnc/{name}: {e}")))
}

/// A started fast-path desktop, supervised by this helper.
#[derive(Debug)]
struct Desktop {
    xvnc: Child,
    xvnc_pid: u32,
    session: Option<Child>,
}

fn start_fast(
    args: &HelperArgs,
    home: &Path,
    vnc_dir: &OwnedFd,
    log: File,
) -> Result<Desktop, Failure> {
    let xauth_name = format!("Xauthority-{}", args.display);
    write_xauthority(vnc_dir, &xauth_name, args.display)?;
    let xauth = home.join(".vnc").join(&xauth_name);
    let rfbauth = home.join(".vncpasswd");
    let user = std::env::var("USER").unwrap_or_default();
    let log_err = log.try_clone().map_err(|e| failed(format!("log: {e}")))?;
    let mut xvnc = Command::new(&args.xvnc)
        .arg(format!(":{}", args.display))
        .arg("-auth")
        .arg(&xauth)
        .arg("-rfbauth")
        .arg(&rfbauth)
        .arg("-rfbport")
        .arg(args.port.to_string())
        .arg("-interface")
        .arg(args.interface.to_string())
        .arg("-SecurityTypes")
        .arg("VncAuth")
        .arg("-geometry")
        .arg(&args.geometry)
        .arg("-depth")
        .arg("24")
        .arg("-desktop")
        .arg(format!("{user}'s desktop"))
        .args(["-nolisten", "tcp"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| failed(format!("log: {e}")))?)
        .stderr(log_err)
        .spawn()
        .map_err(|e| failed(format!("cannot run {}: {e}", args.xvnc.display())))?;
    let xvnc_pid = xvnc.id();
    if let Err(f) = wait_ready(args, Some(&mut xvnc), home) {
        let _ = xvnc.kill();
        let _ = xvnc.wait();
        return Err(f);
    }
    let session = Command::new(&args.session)
        .env("DISPLAY", format!(":{}", args.display))
        .env("XAUTHORITY", &xauth)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| failed(format!("log: {e}")))?)
        .stderr(log)
        .spawn();
    let session = match session {
        Ok(s) => Some(s),
        Err(e) => {
            let _ = xvnc.kill();
            let _ = xvnc.wait();
            return Err(failed(format!(
                "cannot run session command {}: {e}",
                args.session.display()
            )));
        }
    };
    Ok(Desktop {
        xvnc,
        xvnc_pid,
        session,
    })
}

fn start_wrapper(args: &HelperArgs, home: &Path, log: File) -> Result<(), Failure> {
    let out = Command::new(&args.vncserver)
        .arg(format!(":{}", args.display))
        .arg("-rfbport")
        .arg(args.port.to_string())
        .arg("-PasswordFile")
        .arg(home.join(".vncpasswd"))
        .arg("-SecurityTypes")
        .arg("VncAuth")
        .arg("-geometry")
        .arg(&args.geometry)
        .arg("-localhost=no")
        .arg("-interface")
        .arg(args.interface.to_string())
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
            kind: if busy { "BUSY" } else { "FAILED" },
            message,
        });
    }
    wait_ready(args, None, home)
}

fn find_xvnc(args: &HelperArgs) -> Result<u32, Failure> {
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
fn wait_ready(args: &HelperArgs, mut xvnc: Option<&mut Child>, home: &Path) -> Result<(), Failure> {
    let ip = if args.interface.is_unspecified() {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        args.interface
    };
    let addr = SocketAddr::new(ip, args.port);
    let deadline = Instant::now() + Duration::from_millis(args.timeout_ms);
    // Xvnc is typically ready in 10-40 ms: poll often, a connect attempt costs microseconds.
    let mut pause = Duration::from_millis(1);
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
                kind: if busy { "BUSY" } else { "FAILED" },
                message: format!("Xvnc exited with {status} before accepting connections: {tail}"),
            });
        }
        if Instant::now() >= deadline {
            return Err(Failure {
                kind: "TIMEOUT",
                message: format!("no RFB banner on {addr} after {} ms", args.timeout_ms),
            });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(4));
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

impl Desktop {
    /// Detaches from the agent's pipes and ties the session's life to Xvnc's and back.
    fn supervise(&mut self) {
        // The agent reads until READY; from here on stdout and stderr go nowhere so a vanished
        // agent (or SSH channel) cannot stall or kill us.
        if let Ok(null) = File::options().write(true).open("/dev/null") {
            let _ = nix::unistd::dup2_stdout(null.as_fd());
            let _ = nix::unistd::dup2_stderr(null.as_fd());
        }
        let xvnc = Pid::from_raw(self.xvnc_pid as i32);
        let session = self.session.as_ref().map(|s| Pid::from_raw(s.id() as i32));
        loop {
            match nix::sys::wait::wait() {
                Ok(WaitStatus::Exited(pid, _) | WaitStatus::Signaled(pid, _, _)) if pid == xvnc => {
                    if let Some(s) = session {
                        let _ = killpg(s, Signal::SIGTERM);
                    }
                    return;
                }
                Ok(WaitStatus::Exited(pid, _) | WaitStatus::Signaled(pid, _, _))
                    if Some(pid) == session =>
                {
                    // The session ended: stop Xvnc as vncserver's -autokill would.
                    self.session = None;
                    let _ = kill(xvnc, Signal::SIGTERM);
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while Instant::now() < deadline {
                        if !matches!(
                            waitpid(xvnc, Some(WaitPidFlag::WNOHANG)),
                            Ok(WaitStatus::StillAlive)
                        ) {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    let _ = self.xvnc.kill();
                    let _ = self.xvnc.wait();
                    return;
                }
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(_) => return,
            }
        }
    }
}
