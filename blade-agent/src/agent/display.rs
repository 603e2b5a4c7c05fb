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
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
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
fn ensure_x11_socket_dir() {
    use std::os::unix::fs::MetadataExt;
    let dir = Path::new("/tmp/.X11-unix");
    let fixed = match fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() && m.uid() == 0 && m.mode() & 0o7777 == 0o1777 => return,
        Ok(m) if m.is_dir() => {
            let mode = format!("{:o}", m.mode() & 0o7777);
            tracing::warn!(
                owner = m.uid(),
                mode,
                "fixing owner and mode of /tmp/.X11-unix"
            );
            std::os::unix::fs::chown(dir, Some(0), Some(0))
                .and_then(|()| fs::set_permissions(dir, fs::Permissions::from_mode(0o1777)))
        }
        Ok(_) => {
            tracing::warn!("/tmp/.X11-unix is not a directory; replacing it");
            fs::remove_file(dir).and_then(|()| make_x11_dir(dir))
        }
        Err(_) => make_x11_dir(dir),
    };
    if let Err(e) = fixed {
        tracing::warn!(error = %e, "cannot set up /tmp/.X11-unix; X clients will use abstract sockets");
    }
}

fn make_x11_dir(dir: &Path) -> std::io::Result<()> {
    fs::DirBuilder::new().mode(0o1777).create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o1777))
}

/// True unless a live X server holds the display's lock. A lock or socket left by a dead
/// server is removed.
fn x_display_free(n: u32) -> bool {
    let lock_path = PathBuf::from(format!("/tmp/.X{n}-lock"));
    let socket = PathBuf::from(format!("/tmp/.X11-unix/X{n}"));
    match fs::read_to_string(&lock_path) {
        Ok(text) => {
            let alive = text
                .trim()
                .parse::<i32>()
                .is_ok_and(|pid| pid > 0 && kill(Pid::from_raw(pid), None).is_ok());
            if alive {
                return false;
            }
            tracing::info!("removing stale X lock file and socket of :{n}");
            remove_stale(&lock_path);
            remove_stale(&socket);
            true
        }
        Err(_) => {
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
