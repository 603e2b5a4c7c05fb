//! Running a program as a user, and the other process-level steps that need `unsafe`
//! (with [`crate::pam`]'s FFI, the crate's only `unsafe`).
//!
//! std's `CommandExt::uid`/`gid` clear supplementary groups to none rather than set the
//! user's own (`CommandExt::groups` is unstable), and do not start a new session. So the child
//! does it itself between fork and exec: new session (no controlling terminal, its own process
//! group, out of reach of signals aimed at the agent's group), the user's groups, gid, uid — in
//! that order, since each step needs the privileges the next one drops.
use crate::account::Account;
use nix::unistd::{ForkResult, Gid, Uid, fork, setgid, setgroups, setsid, setuid};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Makes `cmd` run as `account` in a session of its own, with an environment holding only
/// HOME, USER, LOGNAME, SHELL and PATH (plus what the caller adds afterwards).
pub fn as_user(cmd: &mut Command, account: &Account) {
    user_env(cmd, account);
    let groups: Vec<Gid> = account.groups.clone();
    let (uid, gid): (Uid, Gid) = (account.uid, account.gid);
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // calls are allowed. It calls setsid, setgroups, setgid and setuid — thin wrappers over the
    // syscalls of those names — on data captured before the fork, and allocates nothing.
    // In the single-threaded child glibc's set*id broadcast has no other thread to signal.
    unsafe {
        cmd.pre_exec(move || {
            setsid()?;
            setgroups(&groups)?;
            setgid(gid)?;
            setuid(uid)?;
            Ok(())
        });
    }
}

/// Makes `cmd` run still as root, in a session of its own, with the environment of
/// [`as_user`]: for the helper when it runs PAM first and then drops to the user itself
/// ([`become_user`]).
pub fn as_root_for(cmd: &mut Command, account: &Account) {
    user_env(cmd, account);
    // SAFETY: as in `as_user`: only setsid, in the child before exec.
    unsafe {
        cmd.pre_exec(|| {
            setsid()?;
            Ok(())
        });
    }
}

/// Drops this process to `account`: its groups, gid, uid, in that order; then checks root
/// cannot be regained. Call it while single-threaded (the helper is).
pub fn become_user(account: &Account) -> std::io::Result<()> {
    setgroups(&account.groups)?;
    setgid(account.gid)?;
    setuid(account.uid)?;
    if setuid(Uid::from_raw(0)).is_ok() {
        return Err(std::io::Error::other(
            "could regain root after dropping to the user",
        ));
    }
    Ok(())
}

/// Forks this single-threaded process: Some(child pid) in the parent, None in the child.
pub fn fork_single_threaded() -> std::io::Result<Option<nix::unistd::Pid>> {
    // SAFETY: the helper calls this before it starts any thread, so the child is an exact,
    // consistent copy and may go on running ordinary Rust code.
    match unsafe { fork() }? {
        ForkResult::Parent { child } => Ok(Some(child)),
        ForkResult::Child => Ok(None),
    }
}

fn user_env(cmd: &mut Command, account: &Account) {
    cmd.env_clear()
        .env("HOME", &account.home)
        .env("USER", &account.name)
        .env("LOGNAME", &account.name)
        .env("SHELL", &account.shell)
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        // The helper changes into HOME itself, as the user, so a missing or unreadable home is
        // reported as such rather than hidden by root being able to enter it.
        .current_dir("/");
}
