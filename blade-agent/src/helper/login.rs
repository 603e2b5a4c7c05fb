//! The helper's root prologue: what `su` or `login` would do before the user's programs run.
//! The agent starts the helper as root (in a session of its own, with only PATH set);
//! here it looks the user up, sets the environment from the entry and, without PAM, drops to
//! the user at once. With PAM it runs the account stage and, for a start, opens the PAM
//! session, then:
//! - for a password change it drops to the user in place and goes on;
//! - for a start it forks: the child drops to the user and goes on as the helper (its rlimits
//!   from pam_limits, its environment from the session modules); the parent stays root,
//!   holding the session, waits for the child — the desktop's supervisor, which lives as long
//!   as the desktop — and then closes the session, as TigerVNC's `vncsession` does.
//!
//! In wrapper mode vncserver daemonizes Xvnc and the helper ends at READY, so the session
//! closes at once; the limits and environment still apply to the desktop.
use super::{Action, FailKind, Failure, HelperArgs, failed};
use crate::account::{self, UidRange};
use crate::pam::{Pam, PamError};
use crate::privdrop;
use nix::sys::wait::{WaitStatus, waitpid};
use std::fs::File;
use std::os::fd::AsFd;
use std::process::ExitCode;

/// Where the caller goes on after the prologue.
pub(super) enum After {
    /// This process is now the user's: go on as the helper.
    AsUser,
    /// This process is the session's root parent, and the desktop's helper has ended.
    Done(ExitCode),
}

/// What the helper loaded before its request came: a PAM transaction of the service it was
/// told, with its modules loaded and no user yet.
pub(super) struct Ahead(Option<(String, Pam)>);

/// Loads what every request needs before one comes: NSS's configuration and the modules a
/// passwd and a group lookup go through, and `pam_service`'s files and modules (together
/// about 1.5 ms of a start otherwise). A PAM failure here is left for the request to meet
/// and report.
pub(super) fn warm_up(pam_service: Option<&str>) -> Ahead {
    let _ = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(0));
    let _ = nix::unistd::getgrouplist(c"root", nix::unistd::Gid::from_raw(0));
    Ahead(pam_service.and_then(|s| Some((s.to_owned(), Pam::start(s).ok()?))))
}

/// Runs the PAM stages for `args.user`, when asked, and drops to the user (see the module doc).
pub(super) fn begin(args: &mut HelperArgs, ahead: Ahead) -> Result<After, Failure> {
    if !nix::unistd::geteuid().is_root() {
        return Err(failed(
            "the helper must start as root (the agent starts it; it drops to the user itself)",
        ));
    }
    // Looked up again as root, and held to the uid the agent checked.
    let (name, uid) = (&args.user, args.uid);
    let account = account::lookup(name, UidRange { min: uid, max: uid })
        .map_err(|e| failed(format!("looking up {name:?}: {e}")))?;
    privdrop::set_user_env(&account);
    let drop_to_user = || {
        privdrop::become_user(&account).map_err(|e| failed(format!("dropping to the user: {e}")))
    };
    let Some(service) = args.pam_service.as_deref() else {
        drop_to_user()?;
        return Ok(After::AsUser);
    };
    // The agent names in requests the service it started the helper with; another (or none
    // loaded, pam_start having failed ahead) is started now, and fails here if it must.
    let mut pam = match ahead.0 {
        Some((loaded, pam)) if loaded == service => pam,
        _ => Pam::start(service).map_err(pam_failure)?,
    };
    pam.for_user(&account.name, &format!("vncdispatch{}", args.display))
        .map_err(pam_failure)?;
    pam.account().map_err(pam_failure)?;
    if args.action == Action::Passwd {
        drop(pam);
        drop_to_user()?;
        return Ok(After::AsUser);
    }
    pam.open_session().map_err(pam_failure)?;
    args.pam_env = pam
        .env()
        .into_iter()
        // Who the user is comes from the passwd entry, as the agent set it.
        .filter(|(k, _)| !matches!(k.as_str(), "HOME" | "USER" | "LOGNAME" | "SHELL"))
        .collect();
    match privdrop::fork_single_threaded().map_err(|e| failed(format!("fork: {e}")))? {
        None => {
            pam.forget();
            drop_to_user()?;
            Ok(After::AsUser)
        }
        Some(child) => {
            // The agent's pipes belong to the child: the answer comes from it alone.
            if let Ok(null) = File::options().read(true).write(true).open("/dev/null") {
                let _ = nix::unistd::dup2_stdin(null.as_fd());
                let _ = nix::unistd::dup2_stdout(null.as_fd());
                let _ = nix::unistd::dup2_stderr(null.as_fd());
            }
            let code = loop {
                match waitpid(child, None) {
                    Ok(WaitStatus::Exited(_, c)) => break c,
                    Ok(WaitStatus::Signaled(..)) => break 1,
                    Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                    Err(_) => break 1,
                }
            };
            // Dropping the transaction closes the session and deletes the credentials.
            drop(pam);
            Ok(After::Done(ExitCode::from(u8::try_from(code).unwrap_or(1))))
        }
    }
}

/// PAM refusing the user is the user's answer on every blade (DENIED); PAM or a module
/// failing is this blade's (FAILED), so the dispatcher tries another.
fn pam_failure(e: PamError) -> Failure {
    Failure {
        kind: if e.is_denial() {
            FailKind::Denied
        } else {
            FailKind::Failed
        },
        message: format!("PAM {e}"),
    }
}
