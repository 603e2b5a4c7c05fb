//! Running a program as a user: the only module in the workspace with `unsafe`.
//!
//! std's `CommandExt::uid`/`gid` clear supplementary groups to none rather than set the
//! user's own (`CommandExt::groups` is unstable), and do not start a new session. So the child
//! does it itself between fork and exec: new session (no controlling terminal, its own process
//! group, out of reach of signals aimed at the agent's group), the user's groups, gid, uid — in
//! that order, since each step needs the privileges the next one drops.
use crate::account::Account;
use nix::unistd::{Gid, Uid, setgid, setgroups, setsid, setuid};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Makes `cmd` run as `account` in a session of its own, with an environment holding only
/// HOME, USER, LOGNAME, SHELL and PATH (plus what the caller adds afterwards).
pub fn as_user(cmd: &mut Command, account: &Account) {
    cmd.env_clear()
        .env("HOME", &account.home)
        .env("USER", &account.name)
        .env("LOGNAME", &account.name)
        .env("SHELL", &account.shell)
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        // The helper changes into HOME itself, as the user, so a missing or unreadable home is
        // reported as such rather than hidden by root being able to enter it.
        .current_dir("/");
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
