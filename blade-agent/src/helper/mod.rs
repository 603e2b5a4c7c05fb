//! The per-session helper: `blade-agent session-helper`, which does a start or a password
//! change as the desktop's user.
//!
//! Everything that touches the user's files or starts the user's programs happens here, once
//! the process has dropped to the user's uid, gid and groups, so the kernel — not a check
//! the agent might get wrong — keeps it inside the user's rights. The agent starts it as root,
//! in a session of its own, with only PATH in its environment, ahead of need (see
//! `agent/spare.rs`), and talks to it over pipes:
//!
//! 0. before any request: it loads NSS's configuration and modules, and the PAM service's
//!    files and modules when its `--pam-service` names one, then waits on stdin.
//! 1. stdin: the request — its length, then its arguments ([`HelperArgs`], `--flag=value`),
//!    each ended by a NUL, read exactly — then the VNC password and a newline, then the
//!    desktop's view-only password and a newline, the line empty when there is none: the
//!    agent keeps stdin open after them (step 3), so an absent line would never end (never
//!    argv or environment),
//!    read only once the helper is the user's; each line is read with a bounded read, the
//!    passwords are checked against the shared rules, and the view-only one must differ from
//!    the password. The helper looks the user up again, sets HOME, USER, LOGNAME and SHELL
//!    from the entry, runs PAM when asked (`login.rs`), and drops to the user.
//! 2. the helper writes `~/.vncpasswd` (O_NOFOLLOW, 0600, checked to be a plain file of the
//!    user's with one link) in the rfbauth format of `vncpasswd -f`: 8 bytes, the obfuscated
//!    password, then 8 more, the obfuscated view-only password, when there is one (Xvnc lets a
//!    login with the second watch but not type, point, paste or resize). For `--action
//!    passwd` it rewrites the running server's private copy (`--rfbauth`) the same way, so a
//!    reused desktop takes the new view-only password too (or loses the old one when none is
//!    sent), then answers `OK` and exits.
//! 3. for `--action start` it makes the desktop's TLS key pair when `--rfb-security` asks for
//!    VeNCrypt (`x509.rs`), starts Xvnc (or the `vncserver` wrapper), waits until the RFB
//!    port answers with an RFB banner, checks the user may run the session command, and
//!    answers one line on stdout: `READY <xvnc pid> [<certificate SHA-256, hex>]`, or
//!    `<KIND> <message>` with KIND one of REFUSED (unsafe home), BUSY (display taken, try
//!    another), TIMEOUT, FAILED (`FailKind`, shared with the agent). On the fast path the
//!    session command starts once stdin closes, which the agent does just after its own
//!    answer (the helper waits 10 s at most), so that the session's start does not compete
//!    with the answer on its way. For a desktop it does not take (rejected after READY, or
//!    its caller gone) the agent writes one byte first ([`NO_SESSION`]): the helper stops
//!    Xvnc and starts nothing. A session command that cannot start stops Xvnc too, and the
//!    helper says why in one more line, `NOSESSION <why>`, for the agent's log. (In wrapper
//!    mode vncserver starts the session itself and the helper is gone after READY: the agent
//!    stops a desktop it does not take.)
//! 4. its stderr is the desktop's log `~/.vnc/HOST:N.log` (before that, none: the agent
//!    reads only the bounded answer line from a process the user controls).
//! 5. after READY (fast path) it stays as the session's supervisor: when the session command
//!    exits it stops Xvnc (vncserver's `-autokill`), and when Xvnc dies it ends the session's
//!    process group. It keeps doing so across agent restarts, as it is not the agent's.
//!
//! Layout: this file holds the protocol (arguments, answers, the steps of [`main`]);
//! `files.rs` opens and writes the user's files without following links; `start.rs` starts
//! Xvnc or the vncserver wrapper and waits for it; `supervise.rs` is what the helper does
//! after READY.
use clap::{Args, FromArgMatches, ValueEnum};
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufRead, Read, Write};
use std::net::IpAddr;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::process::ExitCode;
use vncdispatch_proto::vencrypt::CertPin;
use vncdispatch_proto::vncauth;

mod files;
mod login;
mod start;
mod supervise;
mod x509;

pub use x509::RfbSecurity;

use files::{open_home, open_private, open_vnc_dir, write_copy, write_vncpasswd};
use start::{Desktop, find_xvnc, start_fast, start_wrapper};

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

/// A request to `blade-agent session-helper`, as the agent sends it on stdin (not meant for
/// people).
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
    /// RFB security types the desktop offers (a fresh certificate for the TLS ones).
    #[arg(long, value_enum, default_value = "vnc")]
    pub rfb_security: RfbSecurity,
    /// Run this PAM service's account and session stages before dropping to --user.
    #[arg(long)]
    pub pam_service: Option<String>,
    /// The user to become.
    #[arg(long)]
    pub user: String,
    /// That user's uid, as the agent checked it.
    #[arg(long)]
    pub uid: u32,
    /// Environment the PAM session set, for the desktop's programs.
    #[arg(skip)]
    pub pam_env: Vec<(String, String)>,
}

/// `~/.vnc/HOST:N.log`, the name vncserver uses, so admins find logs where they expect them.
fn log_name(display: u32) -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok());
    format!("{}:{display}.log", host.as_deref().unwrap_or("localhost"))
}

/// How a helper run failed: the first word of its answer, which the agent acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailKind {
    /// REFUSED: the user's home or VNC files are unsafe to write (the agent's unsafe home).
    Refused,
    /// BUSY: the display is taken by someone else; another display may work.
    Busy,
    /// TIMEOUT: Xvnc never answered with an RFB banner in time.
    Timeout,
    /// FAILED: Xvnc or the wrapper could not be started, or the session command is not one
    /// the user can run (checked before READY; it is started after).
    Failed,
    /// DENIED: PAM refused the account or the session (expired, locked, limits).
    Denied,
}

impl FailKind {
    /// Every kind, for parsing.
    const ALL: [FailKind; 5] = [
        FailKind::Refused,
        FailKind::Busy,
        FailKind::Timeout,
        FailKind::Failed,
        FailKind::Denied,
    ];

    /// The word on the answer line.
    pub(crate) fn word(self) -> &'static str {
        match self {
            FailKind::Refused => "REFUSED",
            FailKind::Busy => "BUSY",
            FailKind::Timeout => "TIMEOUT",
            FailKind::Failed => "FAILED",
            FailKind::Denied => "DENIED",
        }
    }

    /// The kind an answer's first word names, if any.
    pub(crate) fn from_word(word: &str) -> Option<FailKind> {
        Self::ALL.into_iter().find(|k| k.word() == word)
    }
}

/// A failure the agent can act on, sent back as `<KIND> <message>`.
#[derive(Debug)]
struct Failure {
    kind: FailKind,
    message: String,
}

fn refused(message: impl Into<String>) -> Failure {
    Failure {
        kind: FailKind::Refused,
        message: message.into(),
    }
}
fn failed(message: impl Into<String>) -> Failure {
    Failure {
        kind: FailKind::Failed,
        message: message.into(),
    }
}

/// What the helper achieved.
#[derive(Debug)]
enum Outcome {
    /// Only the password file was written.
    Passwd,
    /// A fast-path desktop this helper now supervises, and its certificate's pin.
    Supervise(Box<Desktop>, Option<CertPin>),
    /// A wrapper-started desktop (vncserver supervises it): the Xvnc pid and the pin.
    Detached(u32, Option<CertPin>),
}

/// The READY answer: the pid, then the pin when the desktop has a certificate.
fn ready(pid: u32, pin: Option<CertPin>) -> String {
    match pin {
        Some(pin) => format!("READY {pid} {}", pin.to_hex()),
        None => format!("READY {pid}"),
    }
}

/// Runs the helper; the exit code is for humans, the agent reads stdout.
///
/// `pam_service` is the service the agent will name in requests, loaded before one comes.
pub fn main(pam_service: Option<&str>) -> ExitCode {
    let ahead = login::warm_up(pam_service);
    let mut args = match read_request(&mut RawStdin) {
        Ok(args) => args,
        Err(f) => return fail(f),
    };
    match login::begin(&mut args, ahead) {
        Ok(login::After::AsUser) => {}
        Ok(login::After::Done(code)) => return code,
        Err(f) => return fail(f),
    }
    // Bound first: a temporary in the match would hold stdin's lock for the whole match.
    let outcome = run(&args, &mut io::stdin().lock());
    match outcome {
        Ok(Outcome::Supervise(mut desktop, pin)) => {
            answer(&ready(desktop.xvnc_pid, pin));
            if let Err(e) = desktop.start_session() {
                // Stderr is the desktop's log. The agent, which reported the desktop started,
                // reads one more line for its own log: only for a command that could not
                // start (not for the agent's own no, nor an Xvnc stopped meanwhile).
                eprintln!("session-helper: {e}");
                if let start::NoSession::Failed(why) = e {
                    answer(&format!("{NO_SESSION_LINE} {}", why.replace('\n', " ")));
                }
                return ExitCode::FAILURE;
            }
            desktop.supervise();
            ExitCode::SUCCESS
        }
        Ok(Outcome::Detached(pid, pin)) => {
            answer(&ready(pid, pin));
            ExitCode::SUCCESS
        }
        Ok(Outcome::Passwd) => {
            answer("OK");
            ExitCode::SUCCESS
        }
        Err(f) => fail(f),
    }
}

fn fail(f: Failure) -> ExitCode {
    answer(&format!(
        "{} {}",
        f.kind.word(),
        f.message.replace('\n', " ")
    ));
    ExitCode::FAILURE
}

fn answer(line: &str) {
    let mut out = io::stdout().lock();
    // If the agent is gone there is nobody to tell; the desktop still runs.
    let _ = writeln!(out, "{line}").and_then(|_| out.flush());
}

/// What the agent writes on the helper's stdin, after READY, for a desktop it did not take:
/// the helper then stops Xvnc and starts no session (closing stdin unwritten lets it start).
pub(crate) const NO_SESSION: u8 = b'!';

/// Longest a started desktop waits for the agent to close the helper's stdin: past the
/// agent's stop of an Xvnc that ignores SIGTERM (5 s, then SIGKILL), so that a desktop the
/// agent rejected does not start its session first.
pub(crate) const SESSION_GATE: std::time::Duration = std::time::Duration::from_secs(10);

/// After READY, the helper's line for a desktop whose session command could not start: the
/// word, a space and why. Otherwise nothing follows READY.
pub(crate) const NO_SESSION_LINE: &str = "NOSESSION";

/// Longest request (its real requests are under 1 KiB).
const MAX_REQUEST: usize = 16 * 1024;

/// A request: the body's length in decimal and a newline, then the body, each argument
/// followed by a NUL. Values go as `--flag=value`, so no value is ever taken for a flag.
/// An argument holding a NUL or a newline cannot be sent (none the agent builds does: they
/// are paths from its configuration, names and numbers).
pub(crate) fn encode_request(args: &[OsString]) -> Result<Vec<u8>, String> {
    let mut body = Vec::with_capacity(512);
    for arg in args {
        let bytes = arg.as_bytes();
        if bytes.contains(&0) || bytes.contains(&b'\n') {
            return Err(format!("{arg:?} holds a NUL or a newline"));
        }
        body.extend_from_slice(bytes);
        body.push(0);
    }
    let mut out = format!("{}\n", body.len()).into_bytes();
    out.extend_from_slice(&body);
    Ok(out)
}

/// stdin without std's buffer: the request is read exactly, so the passwords after it stay
/// in the pipe until the process that uses them — with PAM, the child that drops to the
/// user — reads them; the root parent that holds the PAM session never has them.
struct RawStdin;

impl Read for RawStdin {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::fd::AsFd;
        nix::unistd::read(io::stdin().as_fd(), buf).map_err(io::Error::from)
    }
}

/// Reads and parses a request (see [`encode_request`]), and nothing after it.
fn read_request(input: &mut impl Read) -> Result<HelperArgs, Failure> {
    let bad = |what: &str| failed(format!("bad request from the agent: {what}"));
    // The length, a byte at a time (a few bytes), so as not to read past it.
    let mut len = 0usize;
    let mut digits = 0;
    loop {
        let mut byte = [0u8; 1];
        match input.read(&mut byte) {
            Ok(0) => return Err(failed("no request on stdin (the agent sends one)")),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(failed(format!("reading the request from stdin: {e}"))),
        }
        match byte[0] {
            b'\n' if digits > 0 => break,
            d @ b'0'..=b'9' if digits < 6 => {
                len = len * 10 + usize::from(d - b'0');
                digits += 1;
            }
            _ => return Err(bad("no length line")),
        }
    }
    if len > MAX_REQUEST {
        return Err(bad("longer than 16 KiB"));
    }
    let mut body = vec![0u8; len];
    input
        .read_exact(&mut body)
        .map_err(|e| failed(format!("reading the request from stdin: {e}")))?;
    let words: Vec<OsString> = match body.strip_suffix(&[0]) {
        Some(body) => body
            .split(|b| *b == 0)
            .map(|w| OsString::from_vec(w.to_vec()))
            .collect(),
        None if body.is_empty() => Vec::new(),
        None => return Err(bad("an argument without its NUL")),
    };
    let cmd = HelperArgs::augment_args(clap::Command::new("session-helper").no_binary_name(true));
    let matches = cmd.try_get_matches_from(words).map_err(|e| {
        let text = e.to_string();
        bad(text.lines().next().unwrap_or(""))
    })?;
    HelperArgs::from_arg_matches(&matches).map_err(|e| bad(&e.to_string()))
}

fn run(args: &HelperArgs, input: &mut impl BufRead) -> Result<Outcome, Failure> {
    let passwords = read_passwords(input)?;
    let rfbauth = passwords.rfbauth();
    let home = PathBuf::from(std::env::var_os("HOME").ok_or_else(|| failed("HOME is not set"))?);
    let home_fd = open_home(&home)?;
    write_vncpasswd(&home_fd, ".vncpasswd", &rfbauth).map_err(|e| refused(format!("~/{e}")))?;
    if args.action == Action::Passwd {
        if let Some(path) = args
            .rfbauth
            .as_deref()
            .filter(|p| *p != home.join(".vncpasswd"))
        {
            write_copy(path, &rfbauth)?;
        }
        return Ok(Outcome::Passwd);
    }
    std::env::set_current_dir(&home)
        .map_err(|e| refused(format!("cannot enter home {}: {e}", home.display())))?;
    let vnc_dir = open_vnc_dir(&home_fd)?;
    let log = open_private(&vnc_dir, &log_name(args.display), true)
        .map_err(|e| refused(format!("cannot open ~/.vnc log: {e}")))?;
    let log = File::from(log);
    // The helper's own messages (a panic, a supervisor's notes) go to the desktop's log: the
    // agent gives it no stderr, so nothing a user's process writes reaches root's log.
    let _ = nix::unistd::dup2_stderr(&log);
    let cert = if args.rfb_security.uses_tls() {
        Some(x509::make(&home, &vnc_dir, args.display)?)
    } else {
        None
    };
    let pin = cert.as_ref().map(|c| c.pin);
    match args.mode {
        StartMode::Fast => start_fast(args, &home, &vnc_dir, cert.as_ref(), log)
            .map(|d| Outcome::Supervise(Box::new(d), pin)),
        StartMode::Wrapper => {
            // The wrapper daemonizes Xvnc and supervises the session itself; find its pid.
            start_wrapper(args, &home, cert.as_ref(), log)?;
            find_xvnc(args).map(|pid| Outcome::Detached(pid, pin))
        }
    }
}

/// The desktop's passwords, as read from stdin and checked.
struct Passwords {
    /// Full control.
    full: Vec<u8>,
    /// View only (never equal to `full`), when the agent sent one.
    view_only: Option<Vec<u8>>,
}

impl Passwords {
    /// The rfbauth file's bytes, as `vncpasswd -f` writes them: the obfuscated password, then
    /// the obfuscated view-only password when there is one (16 bytes, else 8).
    fn rfbauth(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16);
        out.extend_from_slice(&vncauth::obfuscate(&self.full));
        if let Some(view) = &self.view_only {
            out.extend_from_slice(&vncauth::obfuscate(view));
        }
        out
    }
}

/// Reads the password line, then the optional view-only password line; each read is bounded.
fn read_passwords(input: &mut impl BufRead) -> Result<Passwords, Failure> {
    let full = read_line(input, "password")?;
    let text = std::str::from_utf8(&full).map_err(|_| failed("password is not UTF-8"))?;
    vncdispatch_proto::rules::validate_password(text).map_err(|e| failed(e.to_string()))?;
    // No second line (EOF) or an empty one: no view-only password.
    let view = read_line(input, "view-only password")?;
    let view_only = if view.is_empty() {
        None
    } else {
        let view_text =
            std::str::from_utf8(&view).map_err(|_| failed("view-only password is not UTF-8"))?;
        vncdispatch_proto::rules::validate_view_only_password(view_text, text)
            .map_err(|e| failed(e.to_string()))?;
        Some(view)
    };
    Ok(Passwords { full, view_only })
}

/// One line of at most 64 bytes, without its newline; empty at EOF.
fn read_line(input: &mut impl BufRead, what: &str) -> Result<Vec<u8>, Failure> {
    let mut line = Vec::with_capacity(16);
    input
        .by_ref()
        .take(64)
        .read_until(b'\n', &mut line)
        .map_err(|e| failed(format!("reading {what} from stdin: {e}")))?;
    if line.last() == Some(&b'\n') {
        line.pop();
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::{FailKind, encode_request, read_passwords, read_request};
    use std::ffi::OsString;
    use vncdispatch_proto::vncauth::obfuscate;

    #[test]
    fn a_request_round_trips_and_a_bad_one_is_refused() {
        let args: Vec<OsString> = [
            "--action=start",
            "--user=alice",
            "--uid=1000",
            "--session=/opt/my session",
            // A value that looks like a flag stays a value.
            "--rfbauth=--uid=0",
        ]
        .map(OsString::from)
        .to_vec();
        let mut input = encode_request(&args).expect("encodes");
        input.extend_from_slice(b"secret1\n");
        let mut reader = &input[..];
        let parsed = read_request(&mut reader).expect("parses");
        assert_eq!((parsed.user.as_str(), parsed.uid), ("alice", 1000));
        assert_eq!(parsed.session, std::path::Path::new("/opt/my session"));
        assert_eq!(
            parsed.rfbauth.as_deref(),
            Some(std::path::Path::new("--uid=0"))
        );
        // The passwords after it are left unread.
        assert_eq!(reader, b"secret1\n");
        for bad in ["a\nb", "a\0b"] {
            assert!(encode_request(&[OsString::from(bad)]).is_err(), "{bad:?}");
        }
        let framed = |body: &[u8]| {
            let mut v = format!("{}\n", body.len()).into_bytes();
            v.extend_from_slice(body);
            v
        };
        for input in [
            Vec::new(),                                  // EOF: the agent went away
            b"\n".to_vec(),                              // no length
            b"99999999\n".to_vec(),                      // a length too long to read
            b"20000\n".to_vec(),                         // over the bound
            b"30\n--user=alice\0".to_vec(),              // cut short
            framed(b"--user=alice"),                     // no final NUL
            framed(b"--action=start\0--user=alice\0"),   // no --uid
            framed(b"--user=alice\0--uid=x\0"),          // a bad number
            framed(b"--user=alice\0--uid=1\0--evil\0"),  // an unknown flag
            framed(b"--user=alice\0--uid=1\0--uid=0\0"), // a flag given twice
        ] {
            assert!(read_request(&mut &input[..]).is_err(), "{input:?}");
        }
    }

    #[test]
    fn one_line_gives_8_bytes_two_lines_16() {
        let one = read_passwords(&mut &b"secret1\n"[..]).expect("one line");
        assert_eq!(one.rfbauth(), obfuscate(b"secret1"));
        for input in [&b"secret1\n\n"[..], b"secret1"] {
            let p = read_passwords(&mut &input[..]).expect("no view-only");
            assert!(p.view_only.is_none(), "{input:?}");
        }
        let two = read_passwords(&mut &b"secret1\nwatch12\n"[..]).expect("two lines");
        let mut expected = obfuscate(b"secret1").to_vec();
        expected.extend_from_slice(&obfuscate(b"watch12"));
        assert_eq!(two.rfbauth(), expected);
        // A last line without its newline counts too.
        let two = read_passwords(&mut &b"secret1\nwatch12"[..]).expect("two lines");
        assert_eq!(two.rfbauth(), expected);
    }

    #[test]
    fn a_bad_or_equal_view_only_password_is_refused() {
        for input in [
            &b"secret1\nsecret1\n"[..],
            b"secret1\nshort\n",
            b"secret1\nninechars\n",
            b"secret1\nnul\0byte\n",
            b"short\nwatch12\n",
        ] {
            assert!(read_passwords(&mut &input[..]).is_err(), "{input:?}");
        }
    }

    #[test]
    fn fail_kinds_round_trip_through_their_words() {
        for kind in FailKind::ALL {
            assert_eq!(FailKind::from_word(kind.word()), Some(kind));
        }
        for word in ["OK", "READY", "", "busy", "REFUSED "] {
            assert_eq!(FailKind::from_word(word), None, "{word:?}");
        }
    }
}
