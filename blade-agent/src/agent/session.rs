//! The agent's side of the session helper ([`crate::helper`]): take one (`spare.rs`), send it
//! the request — the user and the desktop's settings, as arguments — and the password, then
//! the view-only password (an empty line when none), on its stdin, a line each, and turn its
//! one-line answer into a pid or an [`AgentError`].
use super::spare::Helper;
use super::{Agent, Secrets};
use crate::account::Account;
use crate::error::AgentError;
use crate::helper::{
    FailKind, NO_SESSION, NO_SESSION_LINE, SESSION_GATE, StartMode, encode_request,
};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tracing::Instrument;
use vncdispatch_proto::vencrypt::CertPin;

/// Longest answer line read from the helper (its real answers are under 200 bytes).
const MAX_ANSWER: u64 = 4096;

impl Agent {
    /// Runs the session helper for the user; for `Start`, the started Xvnc's pid and its
    /// certificate's pin when the desktop offers VeNCrypt. The helper's stdin is left in
    /// `gate`: after a start the helper starts the session command once that closes (see
    /// [`SessionGate`]); after a password change it has exited and nothing waits on it.
    pub(super) async fn run_helper(
        &self,
        account: &Account,
        secrets: &Secrets,
        request: HelperRequest,
        display: Option<u32>,
        geometry: (u32, u32),
        gate: &mut Option<SessionGate>,
    ) -> Result<Option<(u32, Option<CertPin>)>, HelperError> {
        let display = display.unwrap_or(0);
        let port = self.cfg.port_of(display).unwrap_or(0);
        let mode = match self.cfg.mode {
            StartMode::Fast => "fast",
            StartMode::Wrapper => "wrapper",
        };
        let mut args = Request::default();
        match &request {
            HelperRequest::Start => {
                args.flag("--action", "start");
            }
            HelperRequest::Passwd { rfbauth } => {
                args.flag("--action", "passwd");
                if let Some(path) = rfbauth {
                    args.flag("--rfbauth", path);
                }
            }
        }
        args.flag("--mode", mode)
            .flag("--display", display.to_string())
            .flag("--port", port.to_string())
            .flag("--xvnc", &self.cfg.xvnc)
            .flag("--vncserver", &self.cfg.vncserver)
            .flag("--session", &self.cfg.session_command)
            .flag("--geometry", format!("{}x{}", geometry.0, geometry.1))
            .flag("--interface", self.cfg.rfb_listen.to_string())
            .flag(
                "--timeout-ms",
                self.cfg.start_timeout.as_millis().to_string(),
            )
            .flag("--rfb-security", self.cfg.rfb_security.xvnc_name())
            .flag("--user", &account.name)
            .flag("--uid", account.uid.to_string());
        // Without PAM the helper drops to the user as soon as it has looked them up.
        if let Some(service) = self.cfg.pam_service() {
            args.flag("--pam-service", service);
        }
        let user = account.name.clone();
        let helper_err = |detail: String| {
            Other(AgentError::Helper {
                user: user.clone(),
                detail,
            })
        };
        // The request, then both password lines, in one write: the helper reads them with
        // bounded reads (see `crate::helper`). No view-only password: an empty second line,
        // as the helper's stdin stays open after the request (see SessionGate).
        let mut secret =
            encode_request(&args.0).map_err(|e| helper_err(format!("argument {e}")))?;
        for line in [
            &secrets.password,
            secrets.view_only.as_ref().unwrap_or(&String::new()),
        ] {
            secret.extend_from_slice(line.as_bytes());
            secret.push(b'\n');
        }
        let cannot_run = |e: std::io::Error| {
            helper_err(format!(
                "cannot run {}: {e} (it must be root's, and executable by root)",
                self.spares.path().display()
            ))
        };
        let mut helper = self.spares.take().map_err(&cannot_run)?;
        if let Err(e) = helper.stdin.write_all(&secret).await {
            // Gone as it was taken (killed, out of memory): one more, started now.
            tracing::warn!(error = %e, "the session helper was gone; starting another");
            helper = self.spares.start_one().map_err(&cannot_run)?;
            helper
                .stdin
                .write_all(&secret)
                .await
                .map_err(|e| helper_err(format!("sending the request: {e}")))?;
        }
        let Helper {
            mut child,
            stdin,
            stdout,
            ..
        } = helper;
        let helper_pid = child.id();
        // A gate left from an earlier attempt (its helper answered BUSY, or was rejected and
        // refused already) is not to start anything.
        if let Some(earlier) = gate.replace(SessionGate { stdin }) {
            earlier.refuse();
        }
        let mut line = String::new();
        let limit = self.cfg.start_timeout + Duration::from_secs(5);
        // The helper runs as the user: its answer is bounded, as anything from a user is.
        let mut answer = BufReader::new(stdout.take(MAX_ANSWER));
        let read = tokio::time::timeout(limit, answer.read_line(&mut line)).await;
        if read.is_err()
            && let Some(pid) = helper_pid
        {
            // The helper leads its own session and process group, with Xvnc in it. Signalled
            // before it is reaped: an unreaped leader keeps its pid, so the group id cannot
            // have passed to someone else's processes.
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        // The helper outlives this call when it supervises a desktop; reap it whenever it ends.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        match read {
            Err(_) => {
                return Err(Other(AgentError::StartTimeout {
                    user,
                    display,
                    after: limit,
                }));
            }
            Ok(Err(e)) => return Err(helper_err(format!("reading its answer: {e}"))),
            Ok(Ok(_)) => {}
        }
        let (kind, rest) = line
            .trim_end()
            .split_once(' ')
            .unwrap_or((line.trim_end(), ""));
        let rest = rest.to_owned();
        match (kind, FailKind::from_word(kind)) {
            ("OK", _) => Ok(None),
            ("READY", _) => {
                let ready = parse_ready(&rest)
                    .ok_or_else(|| helper_err(format!("bad answer {line:?}")))?;
                // The desktop's session command starts after the answer; should it fail, the
                // helper says why in one more line, for this log (the caller was told READY).
                let shown = display;
                tokio::spawn(
                    async move {
                        let mut more = String::new();
                        let wait = SESSION_GATE + Duration::from_secs(5);
                        let read = tokio::time::timeout(wait, answer.read_line(&mut more)).await;
                        let more = more.trim_end();
                        if let (Ok(Ok(_)), Some(why)) = (read, more.strip_prefix(NO_SESSION_LINE)) {
                            tracing::warn!(
                                display = shown,
                                why = ?why.trim_start(),
                                "the desktop's session command did not start; its Xvnc is stopped (more in the user's ~/.vnc/HOST:N.log)"
                            );
                        }
                    }
                    .instrument(tracing::Span::current()),
                );
                Ok(Some(ready))
            }
            (_, Some(FailKind::Refused)) => Err(Other(AgentError::UnsafeHome { user, why: rest })),
            (_, Some(FailKind::Busy)) => Err(Busy(rest)),
            (_, Some(FailKind::Denied)) => Err(Other(AgentError::AccountDenied {
                user,
                message: rest,
            })),
            (_, Some(FailKind::Timeout)) => Err(Other(AgentError::StartTimeout {
                user,
                display,
                after: self.cfg.start_timeout,
            })),
            (_, Some(FailKind::Failed)) => Err(Other(AgentError::StartFailed {
                user,
                display,
                detail: rest,
            })),
            ("", None) => Err(helper_err(
                "exited without an answer (once it runs as the user it logs into ~/.vnc/HOST:N.log)".into(),
            )),
            (_, None) => Err(helper_err(format!(
                "unexpected answer {:?}",
                line.chars().take(80).collect::<String>()
            ))),
        }
    }
}

/// `<pid> [<pin>]` of a READY answer.
fn parse_ready(rest: &str) -> Option<(u32, Option<CertPin>)> {
    let mut words = rest.split(' ');
    let pid = words.next()?.parse().ok()?;
    let pin = match words.next() {
        Some(hex) => Some(CertPin::from_hex(hex).ok()?),
        None => None,
    };
    words.next().is_none().then_some((pid, pin))
}

/// A helper request's arguments.
#[derive(Default)]
struct Request(Vec<OsString>);

impl Request {
    /// `--flag=value`, one argument: a value starting with `-` (a path in the user's own
    /// Xvnc command line, for `--rfbauth`) stays a value.
    fn flag(&mut self, flag: &str, value: impl AsRef<OsStr>) -> &mut Self {
        let mut arg = OsString::from(flag);
        arg.push("=");
        arg.push(value);
        self.0.push(arg);
        self
    }
}

/// The write end of a helper's stdin, held open after its request: a helper that started a
/// desktop answers READY, then waits on this before it starts the session command, so that
/// the desktop session's start (a window manager or a whole desktop environment,
/// milliseconds to seconds of CPU) does not compete with the listener check and the answer
/// on their way to the caller. Dropped, it closes and the session starts (as when the agent
/// dies or restarts mid-start: the desktop lives on, and is found again in /proc; the helper
/// also stops waiting after a few seconds). [`SessionGate::refuse`] says no first.
#[derive(Debug)]
pub(super) struct SessionGate {
    stdin: tokio::process::ChildStdin,
}

impl SessionGate {
    /// For a desktop the agent does not take (rejected after READY, its caller gone): a
    /// fast-path helper still waiting stops Xvnc, whether or not it has exited already, and
    /// starts no session.
    pub(super) fn refuse(self) {
        // The pipe holds at most the request (under 20 KiB of its 64 KiB) and tokio made it
        // non-blocking: the byte goes, or the helper is gone (EPIPE) and nobody waits on it.
        match nix::unistd::write(&self.stdin, &[NO_SESSION]) {
            Ok(_) | Err(nix::errno::Errno::EPIPE) => {}
            Err(e) => {
                tracing::warn!(error = %e, "could not tell a session helper to start no session")
            }
        }
    }
}

/// What the helper is asked to do.
pub(super) enum HelperRequest {
    /// Rewrite the passwords of a running server (`rfbauth`: the file it reads, if not
    /// `~/.vncpasswd`).
    Passwd { rfbauth: Option<PathBuf> },
    /// Start a desktop.
    Start,
}

/// How a helper run failed: BUSY means another display may work.
pub(super) enum HelperError {
    /// The display turned out to be taken (the helper's BUSY): try the next one.
    Busy(String),
    /// Anything else, final for this call.
    Other(AgentError),
}
use HelperError::{Busy, Other};

impl HelperError {
    pub(super) fn into_agent_error(self, user: &str, display: u32) -> AgentError {
        match self {
            Busy(detail) => AgentError::StartFailed {
                user: user.to_owned(),
                display,
                detail,
            },
            Other(e) => e,
        }
    }
}
