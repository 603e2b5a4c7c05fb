//! The agent's side of the session helper ([`crate::helper`]): run it as the user with the
//! desktop's settings as arguments, send the password (then the view-only password, if any) on
//! its stdin, a line each, and turn its one-line answer into a pid or an [`AgentError`].
use super::{Agent, Secrets};
use crate::account::Account;
use crate::error::AgentError;
use crate::helper::{FailKind, StartMode};
use crate::privdrop;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use vncdispatch_proto::vencrypt::CertPin;

/// Longest answer line read from the helper (its real answers are under 200 bytes).
const MAX_ANSWER: u64 = 4096;

impl Agent {
    /// Runs the session helper as the user; for `Start`, the started Xvnc's pid and its
    /// certificate's pin when the desktop offers VeNCrypt.
    pub(super) async fn run_helper(
        &self,
        account: &Account,
        secrets: &Secrets,
        request: HelperRequest,
        display: Option<u32>,
        geometry: (u32, u32),
    ) -> Result<Option<(u32, Option<CertPin>)>, HelperError> {
        let display = display.unwrap_or(0);
        let port = self.cfg.port_of(display).unwrap_or(0);
        let mode = match self.cfg.mode {
            StartMode::Fast => "fast",
            StartMode::Wrapper => "wrapper",
        };
        let mut cmd = std::process::Command::new(&self.helper);
        cmd.arg("session-helper");
        match &request {
            HelperRequest::Start => cmd.args(["--action", "start"]),
            HelperRequest::Passwd { rfbauth: None } => cmd.args(["--action", "passwd"]),
            HelperRequest::Passwd {
                rfbauth: Some(path),
            } => cmd.args(["--action", "passwd", "--rfbauth"]).arg(path),
        };
        cmd.args(["--mode", mode])
            .args([
                "--display",
                &display.to_string(),
                "--port",
                &port.to_string(),
            ])
            .arg("--xvnc")
            .arg(&self.cfg.xvnc)
            .arg("--vncserver")
            .arg(&self.cfg.vncserver)
            .arg("--session")
            .arg(&self.cfg.session_command)
            .args(["--geometry", &format!("{}x{}", geometry.0, geometry.1)])
            .args(["--interface", &self.cfg.rfb_listen.to_string()])
            .args([
                "--timeout-ms",
                &self.cfg.start_timeout.as_millis().to_string(),
            ])
            .args(["--rfb-security", self.cfg.rfb_security.xvnc_name()]);
        match self.cfg.pam_service() {
            // The helper starts as root, runs PAM, and drops to the user itself.
            Some(service) => {
                cmd.args(["--pam-service", service, "--user", &account.name])
                    .args(["--uid", &account.uid.to_string()]);
                privdrop::as_root_for(&mut cmd, account);
            }
            None => privdrop::as_user(&mut cmd, account),
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            // A process the user controls must not write into root's log: the helper logs
            // into the desktop's own log, and its answer comes on stdout, bounded.
            .stderr(Stdio::null());
        let user = account.name.clone();
        let helper_err = |detail: String| {
            Other(AgentError::Helper {
                user: user.clone(),
                detail,
            })
        };
        let mut child = tokio::process::Command::from(cmd).spawn().map_err(|e| {
            helper_err(format!(
                "cannot run {} as the user: {e} (it must be executable by desktop users)",
                self.helper.display()
            ))
        })?;
        let helper_pid = child.id();
        let mut stdin = child
            .stdin
            .take()
            .ok_or_else(|| helper_err("no stdin pipe".into()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| helper_err("no stdout pipe".into()))?;
        // One write of both lines: the helper reads them with bounded reads (see
        // `crate::helper`); no view-only password, no second line.
        let mut secret = Vec::with_capacity(32);
        for line in std::iter::once(&secrets.password).chain(&secrets.view_only) {
            secret.extend_from_slice(line.as_bytes());
            secret.push(b'\n');
        }
        stdin
            .write_all(&secret)
            .await
            .map_err(|e| helper_err(format!("sending password: {e}")))?;
        drop(stdin);
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
            ("READY", _) => parse_ready(&rest)
                .map(Some)
                .ok_or_else(|| helper_err(format!("bad answer {line:?}"))),
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
