//! Choosing a display for a new desktop: the lowest one that no live X server holds, that no
//! other start has reserved and whose RFB port is free on every address family. The display
//! range is the agent's: what desktop users leave or plant there is cleared, as root, since
//! the next user's Xvnc could not remove another user's files from the sticky /tmp:
//! - X lock files of dead servers, and lock files no X server wrote (a FIFO, a symlink, a
//!   huge file, one naming a process that is not an X server of that display run by the
//!   file's owner, such as pid 1), and sockets in /tmp/.X11-unix with no live lock;
//! - a user's second X server in the range (the agent gives each user one desktop): the
//!   youngest are stopped, so no one user can hold every display with fake `Xtigervnc`s.
//!
//! /tmp/.X11-unix is kept root's with mode 1777. All of it is blocking /proc and /tmp work,
//! run off the async runtime, and the reservation lock is held only to claim a display.
use super::{Agent, blocking, lock, ports};
use crate::discover::{self, Process, RunningXvnc};
use crate::error::AgentError;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Holds a display reserved until dropped.
pub(super) struct Reservation {
    /// The display held.
    pub(super) display: u32,
    reserved: Arc<Mutex<HashSet<u32>>>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        lock(&self.reserved).remove(&self.display);
    }
}

/// What a display search needs, owned, so it can run on a blocking thread.
struct Search {
    displays: std::ops::RangeInclusive<u32>,
    port_base: u16,
    comm: String,
    /// Users whose extra X servers in the range are stopped (desktop users; never root).
    users: std::ops::RangeInclusive<u32>,
    reserved: Arc<Mutex<HashSet<u32>>>,
    skip: HashSet<u32>,
    /// Desktops this agent started (pid, start time): never the ones stopped as extras.
    ours: HashSet<(u32, u64)>,
    /// The X servers a scan of /proc begun since the start asked found, when there is one:
    /// a server started since is caught by its lock file, its port, or Xvnc's own refusal.
    found: Option<Arc<Vec<RunningXvnc>>>,
}

impl Agent {
    /// Reserves the lowest free display (see the module documentation).
    pub(super) async fn reserve_display(
        &self,
        skip: &HashSet<u32>,
        found: Option<Arc<Vec<RunningXvnc>>>,
    ) -> Result<Reservation, AgentError> {
        let search = Search {
            displays: self.cfg.display_first..=self.cfg.display_last(),
            port_base: self.cfg.port_base,
            comm: super::xvnc_comm(&self.cfg),
            users: self.cfg.min_uid.max(1)..=self.cfg.max_uid,
            reserved: self.reserved.clone(),
            skip: skip.clone(),
            ours: lock(&self.started).clone(),
            found,
        };
        blocking(move || search.run()).await
    }
}

impl Search {
    fn run(self) -> Result<Reservation, AgentError> {
        let sockets_ours = ensure_x11_socket_dir();
        let mut held = self.holders(sockets_ours)?;
        self.stop_extra_servers(&mut held);
        // Ports held with no X server on the display, by the owners' uids: a squatting user
        // is named in the refusal and the log.
        let mut port_holders: BTreeMap<u32, usize> = BTreeMap::new();
        for display in self.displays.clone() {
            if self.skip.contains(&display)
                || held.contains_key(&display)
                || lock(&self.reserved).contains(&display)
            {
                continue;
            }
            let Some(port) = u16::try_from(u32::from(self.port_base) + display).ok() else {
                break;
            };
            if !ports::port_free(port) {
                for l in ports::listeners_on(port).unwrap_or_default() {
                    *port_holders.entry(l.uid).or_default() += 1;
                }
                continue;
            }
            // Claimed only now, so a search never holds the lock while it reads /proc or /tmp.
            if lock(&self.reserved).insert(display) {
                return Ok(Reservation {
                    display,
                    reserved: self.reserved.clone(),
                });
            }
        }
        let detail = if port_holders.is_empty() {
            String::new()
        } else {
            let who: Vec<String> = port_holders
                .iter()
                .map(|(uid, n)| format!("uid {uid} ({n} listening sockets)"))
                .collect();
            tracing::warn!(holders = %who.join(", "), "RFB ports of free displays are held by other programs");
            format!(
                " (RFB ports of otherwise free displays are held by other programs: {})",
                who.join(", ")
            )
        };
        Err(AgentError::NoFreeDisplay {
            first: *self.displays.start(),
            last: *self.displays.end(),
            detail,
        })
    }

    /// The displays in range an X server holds, with its process: live Xvnc desktops, and
    /// X lock files naming a live X server of that display run by the file's owner. Every
    /// other lock file in range, and sockets without a held lock, are removed.
    ///
    /// A display another start has reserved is left alone: its Xvnc may be creating the very
    /// files that would look left over here. Sockets are touched only while /tmp/.X11-unix is
    /// root's (`sockets_ours`), so no unlink goes through a directory a user controls.
    fn holders(&self, sockets_ours: bool) -> Result<BTreeMap<u32, Held>, AgentError> {
        let mut held = BTreeMap::new();
        let found = match &self.found {
            Some(found) => Arc::clone(found),
            None => Arc::new(
                discover::scan(&self.comm).map_err(|e| AgentError::io("reading /proc", e))?,
            ),
        };
        for x in found.iter() {
            // Still the process the scan saw: a pid reused since is not the X server.
            if self.displays.contains(&x.display)
                && let Some(p) = Process::read(x.pid)
                    .filter(|p| p.start_ticks == x.start_ticks && p.uid == x.uid)
            {
                let desktop = x.rfbauth.is_some();
                held.insert(x.display, Held { p, desktop });
            }
        }
        for display in self.displays.clone() {
            if held.contains_key(&display) || lock(&self.reserved).contains(&display) {
                continue;
            }
            if let Some(p) = x_server_holding(display, sockets_ours) {
                held.insert(display, Held { p, desktop: false });
            }
        }
        Ok(held)
    }

    /// Each desktop user holds at most one display of the range. The one kept is, in order:
    /// a desktop this agent started, a desktop (an Xvnc with a password file), the oldest;
    /// the others get SIGTERM, then SIGKILL, and their files are cleared.
    fn stop_extra_servers(&self, held: &mut BTreeMap<u32, Held>) {
        let mut by_user: HashMap<u32, Vec<(u32, Held)>> = HashMap::new();
        for (display, h) in held.iter() {
            if self.users.contains(&h.p.uid) {
                by_user
                    .entry(h.p.uid)
                    .or_default()
                    .push((*display, h.clone()));
            }
        }
        for (uid, mut servers) in by_user {
            if servers.len() < 2 {
                continue;
            }
            servers.sort_by_key(|(_, h)| {
                let ours = self.ours.contains(&(h.p.pid, h.p.start_ticks));
                (!ours, !h.desktop, h.p.start_ticks, h.p.pid)
            });
            for (n, Held { p, .. }) in servers.into_iter().skip(1) {
                tracing::warn!(
                    uid,
                    display = n,
                    pid = p.pid,
                    program = p.args.first().map(String::as_str).unwrap_or(""),
                    "a user's second X server in the agent's display range: stopping it"
                );
                let gone = stop_process(&p);
                if gone {
                    remove_stale(&lock_path(n));
                    remove_stale(&socket_path(n));
                    held.remove(&n);
                }
            }
        }
    }
}

/// An X server holding a display of the range.
#[derive(Debug, Clone)]
struct Held {
    p: Process,
    /// An Xvnc with a password file, as the agent starts them (not a bare lock holder).
    desktop: bool,
}

/// SIGTERM, up to 2 s, then SIGKILL; true once the process is gone. The pid is checked to
/// still be this process (same start time) right before each signal.
fn stop_process(p: &Process) -> bool {
    let wait_gone = |tries: u32| {
        (0..tries).any(|_| {
            let alive = p.is_alive();
            if alive {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            !alive
        })
    };
    for (signal, tries) in [(Signal::SIGTERM, 200), (Signal::SIGKILL, 100)] {
        if !p.is_alive() {
            return true;
        }
        let _ = kill(Pid::from_raw(p.pid as i32), signal);
        if wait_gone(tries) {
            return true;
        }
    }
    false
}

fn lock_path(n: u32) -> PathBuf {
    PathBuf::from(format!("/tmp/.X{n}-lock"))
}

fn socket_path(n: u32) -> PathBuf {
    PathBuf::from(format!("/tmp/.X11-unix/X{n}"))
}

/// X servers put their sockets in /tmp/.X11-unix but, running as a user, cannot create it, and
/// a user who did create it (vncserver tries) owns every display's socket. Keep it as
/// systemd-tmpfiles would: root's, mode 1777. Checked before every start since /tmp cleaners
/// and users can remove it.
///
/// Never by path on something a user may own: a user-owned directory (or anything that is
/// not a directory) is renamed away — rename acts on the entry itself, a symlink included —
/// and a fresh one made; a mode is fixed through an `O_NOFOLLOW|O_DIRECTORY` descriptor of a
/// directory root owns, which no user can swap in the sticky /tmp.
/// True when /tmp/.X11-unix is root's directory with mode 1777 afterwards.
fn ensure_x11_socket_dir() -> bool {
    match fix_x11_socket_dir(Path::new("/tmp/.X11-unix")) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "cannot set up /tmp/.X11-unix; X clients will use abstract sockets");
            false
        }
    }
}

fn fix_x11_socket_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    for _ in 0..3 {
        match fs::symlink_metadata(dir) {
            Ok(m) if m.is_dir() && m.uid() == 0 => {
                if m.mode() & 0o7777 != 0o1777 {
                    tracing::warn!(
                        mode = format!("{:o}", m.mode() & 0o7777),
                        "fixing the mode of /tmp/.X11-unix"
                    );
                    chmod_root_dir(dir)?;
                }
                return Ok(());
            }
            Ok(m) => {
                let away = dir.with_file_name(format!(
                    ".X11-unix.foreign-{}-{}",
                    m.uid(),
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_nanos())
                        .unwrap_or(0)
                ));
                tracing::warn!(owner = m.uid(), is_dir = m.is_dir(), moved_to = %away.display(),
                    "/tmp/.X11-unix is not root's directory; moving it aside");
                fs::rename(dir, &away)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                match fs::DirBuilder::new().mode(0o700).create(dir) {
                    // Made by root, 0700 until the mode is set through its descriptor.
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("/tmp/.X11-unix keeps being replaced"))
}

/// Sets mode 1777 on root's directory `dir` through a descriptor opened without following a
/// link, after checking the descriptor's owner.
fn chmod_root_dir(dir: &Path) -> std::io::Result<()> {
    use nix::fcntl::{OFlag, open};
    use nix::sys::stat::{Mode, fchmod, fstat};
    let fd = open(
        dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    if fstat(&fd)?.st_uid != 0 {
        return Err(std::io::Error::other(
            "/tmp/.X11-unix changed owner under us",
        ));
    }
    fchmod(&fd, Mode::from_bits_truncate(0o1777))?;
    Ok(())
}

/// What an X lock file says, read without blocking or following links.
#[derive(Debug, PartialEq, Eq)]
enum LockFile {
    /// None there.
    Absent,
    /// A small regular file: its owner and the pid it names (0 when unreadable).
    Names { owner: u32, pid: u32 },
    /// Not something an X server writes: a FIFO, a symlink (to /dev/zero…), a directory, a
    /// huge file. A user's trap for the root agent; never read further.
    Trap,
}

fn read_lock_file(path: &Path) -> LockFile {
    use nix::fcntl::{OFlag, open};
    use nix::sys::stat::{Mode, SFlag, fstat};
    use std::io::Read;
    let fd = match open(
        path,
        OFlag::O_RDONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_CLOEXEC
            | OFlag::O_NOCTTY,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => return LockFile::Absent,
        Err(_) => return LockFile::Trap,
    };
    let Ok(st) = fstat(&fd) else {
        return LockFile::Trap;
    };
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG || st.st_size > 64 {
        return LockFile::Trap;
    }
    let mut text = String::new();
    if fs::File::from(fd)
        .take(64)
        .read_to_string(&mut text)
        .is_err()
    {
        return LockFile::Trap;
    }
    LockFile::Names {
        owner: st.st_uid,
        pid: text.trim().parse().unwrap_or(0),
    }
}

/// The live X server holding display `n`, if any: its lock file names a process of the
/// file's owner whose arguments name `:n`. Anything else in the display's lock file or
/// socket is left over or planted, and removed.
fn x_server_holding(n: u32, sockets_ours: bool) -> Option<Process> {
    let (lock_file, socket) = (lock_path(n), socket_path(n));
    match read_lock_file(&lock_file) {
        LockFile::Names { owner, pid } => {
            let name = format!(":{n}");
            if let Some(p) = Process::read(pid)
                .filter(|p| p.uid == owner && p.args.iter().skip(1).any(|a| *a == name))
            {
                return Some(p);
            }
            tracing::info!(
                owner,
                pid,
                "removing the X lock file of :{n}: it names no X server of :{n} run by its owner"
            );
        }
        LockFile::Trap => {
            tracing::warn!("removing the X lock file of :{n}: not a small regular file (a trap)");
        }
        LockFile::Absent => {}
    }
    remove_stale(&lock_file);
    // An X server always holds its lock: a socket without one is left over or a decoy.
    if sockets_ours {
        remove_stale(&socket);
    }
    None
}

fn remove_stale(path: &Path) {
    if let Err(e) = fs::remove_file(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove stale X file");
    }
}
