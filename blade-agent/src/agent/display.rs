//! Choosing a display for a new desktop: the lowest one that no live Xvnc serves, that no
//! other start has reserved, whose X lock file is not held and whose RFB port is free. Stale
//! X lock files and sockets of dead servers are removed here, and /tmp/.X11-unix is kept
//! root's with mode 1777, since users' X servers cannot fix either themselves.
use super::{Agent, lock};
use crate::discover;
use crate::error::AgentError;
use nix::sys::signal::kill;
use nix::unistd::Pid;
use std::collections::HashSet;
use std::fs;
use std::net::{SocketAddr, TcpListener};
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

impl Agent {
    /// Picks the lowest free display: not reserved, not served by a live Xvnc, no live X lock
    /// file, and its RFB port bindable. Stale lock files and sockets left by a dead server are
    /// removed here, as root, because the next user's Xvnc could not remove another user's
    /// files from the sticky /tmp.
    pub(super) fn reserve_display(&self, skip: &HashSet<u32>) -> Result<Reservation, AgentError> {
        let live: HashSet<u32> = discover::scan(&self.xvnc_comm())
            .map_err(|e| AgentError::io("reading /proc", e))?
            .into_iter()
            .map(|r| r.display)
            .collect();
        ensure_x11_socket_dir();
        let mut reserved = lock(&self.reserved);
        for display in self.cfg.display_first..=self.cfg.display_last() {
            if skip.contains(&display) || live.contains(&display) || reserved.contains(&display) {
                continue;
            }
            let Some(port) = self.cfg.port_of(display) else {
                break;
            };
            if !x_display_free(display)
                || TcpListener::bind(SocketAddr::new(self.cfg.rfb_listen, port)).is_err()
            {
                continue;
            }
            reserved.insert(display);
            return Ok(Reservation {
                display,
                reserved: self.reserved.clone(),
            });
        }
        Err(AgentError::NoFreeDisplay {
            first: self.cfg.display_first,
            last: self.cfg.display_last(),
        })
    }
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
fn ensure_x11_socket_dir() {
    if let Err(e) = fix_x11_socket_dir(Path::new("/tmp/.X11-unix")) {
        tracing::warn!(error = %e, "cannot set up /tmp/.X11-unix; X clients will use abstract sockets");
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

/// The pid in an X lock file, read without blocking or following links: None when it is not
/// a small regular file (a FIFO, a symlink to /dev/zero, a huge file — a user's trap for the
/// root agent) or names no pid. Such a display is treated as taken, never read further.
fn lock_file_pid(path: &Path) -> Result<Option<i32>, ()> {
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
        Err(nix::errno::Errno::ENOENT) => return Ok(None),
        Err(_) => return Err(()),
    };
    let st = fstat(&fd).map_err(|_| ())?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG || st.st_size > 64 {
        return Err(());
    }
    let mut text = String::new();
    fs::File::from(fd)
        .take(64)
        .read_to_string(&mut text)
        .map_err(|_| ())?;
    Ok(Some(text.trim().parse::<i32>().unwrap_or(0)))
}

/// True unless a live X server holds the display's lock. A lock or socket left by a dead
/// server is removed; a lock file that is not a small regular file makes the display taken.
fn x_display_free(n: u32) -> bool {
    let lock_path = PathBuf::from(format!("/tmp/.X{n}-lock"));
    let socket = PathBuf::from(format!("/tmp/.X11-unix/X{n}"));
    match lock_file_pid(&lock_path) {
        Err(()) => {
            tracing::warn!("the X lock file of :{n} is not a small regular file; skipping :{n}");
            false
        }
        Ok(Some(pid)) => {
            let alive = pid > 0 && kill(Pid::from_raw(pid), None).is_ok();
            if alive {
                return false;
            }
            tracing::info!("removing stale X lock file and socket of :{n}");
            remove_stale(&lock_path);
            remove_stale(&socket);
            true
        }
        Ok(None) => {
            if socket.exists() && std::os::unix::net::UnixStream::connect(&socket).is_err() {
                remove_stale(&socket);
            }
            !socket.exists()
        }
    }
}

fn remove_stale(path: &Path) {
    if let Err(e) = fs::remove_file(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove stale X file");
    }
}
