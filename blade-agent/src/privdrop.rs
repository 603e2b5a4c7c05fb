//! Starting the session helper and dropping to a user, and the other process-level steps that
//! need `unsafe` (pre_exec, fork, the environment, descriptor flags): with [`crate::pam`]'s
//! FFI, the crate's only `unsafe`.
//!
//! The agent starts the helper as root in a session of its own ([`as_root`]); the helper, once
//! its request names the user, sets the user's environment and drops to the user's groups,
//! gid and uid ([`become_user`]) — in that order, since each step needs the privileges the next
//! one drops. std's `CommandExt::uid`/`gid` would clear supplementary groups to none rather
//! than set the user's own (`CommandExt::groups` is unstable).
use crate::account::Account;
use nix::unistd::{ForkResult, Uid, fork, setgid, setgroups, setsid, setuid};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Makes `cmd` run as root in a session of its own (no controlling terminal, its own process
/// group, out of reach of signals aimed at the agent's group), with an environment holding
/// only PATH and `/` as its directory: the session helper, which drops to the user itself
/// ([`become_user`]) once its request names them.
pub fn as_root(cmd: &mut Command) {
    cmd.env_clear()
        .env("PATH", PATH)
        // The helper changes into HOME itself, as the user, so a missing or unreadable home is
        // reported as such rather than hidden by root being able to enter it.
        .current_dir("/");
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // calls are allowed: setsid is a thin wrapper over the syscall, and allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            setsid()?;
            Ok(())
        });
    }
}

/// The PATH of the helper and the desktop's programs.
const PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Sets HOME, USER, LOGNAME and SHELL from `account` in this process's environment (PATH is
/// set by [`as_root`]), for the desktop's programs. Call it while single-threaded (the
/// helper is).
pub fn set_user_env(account: &Account) {
    let vars = [
        ("HOME", account.home.as_os_str()),
        ("USER", account.name.as_ref()),
        ("LOGNAME", account.name.as_ref()),
        ("SHELL", account.shell.as_os_str()),
    ];
    for (key, value) in vars {
        // SAFETY: the helper has no other thread that could read the environment meanwhile.
        unsafe { std::env::set_var(key, value) };
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
    // No descriptor root opened (NSS, PAM modules) passes into the programs it runs, and not
    // ptraceable by the user: the kernel marks a process that changed uid so only while
    // fs.suid_dumpable is not 1, and exec makes the desktop's own programs dumpable again.
    cloexec_from_3()?;
    nix::sys::prctl::set_dumpable(false)?;
    Ok(())
}

/// Marks every descriptor from 3 up close-on-exec: close_range where the kernel has it
/// (5.11), else each one /proc/self/fd lists.
fn cloexec_from_3() -> std::io::Result<()> {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: close_range only flags descriptors of this process; it touches no memory.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd >= 3)
        .collect();
    for fd in fds {
        // SAFETY: F_SETFD on a descriptor number touches no memory; one closed since the
        // listing (the listing's own) fails with EBADF, which is fine.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
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
