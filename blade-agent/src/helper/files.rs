//! The helper's file handling, as the user: the home directory, `~/.vncpasswd` (or the
//! running server's copy of it; 8 bytes, or 16 with a view-only password), `~/.vnc` and its
//! Xauthority file. Everything is opened by fd with O_NOFOLLOW and checked to be the user's
//! own before it is written.
use super::{Failure, failed, refused};
use nix::errno::Errno;
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::{Mode, SFlag, fchmod, fstat, mkdirat};
use nix::unistd::{Uid, ftruncate};
use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::Path;

/// Opens the home directory and checks it is the user's own.
pub(super) fn open_home(home: &Path) -> Result<OwnedFd, Failure> {
    let fd = nix::fcntl::open(
        home,
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| refused(format!("cannot open home {}: {}", home.display(), e.desc())))?;
    let st = fstat(&fd).map_err(|e| failed(format!("stat home: {}", e.desc())))?;
    if st.st_uid != Uid::current().as_raw() {
        return Err(refused(format!(
            "home {} is owned by uid {}, not by the user",
            home.display(),
            st.st_uid
        )));
    }
    Ok(fd)
}

/// Opens (creating 0600) a file in `dir` without following a symlink, and checks it is a plain
/// file of the user's with a single link — a hard link could point anywhere the user can write.
pub(super) fn open_private(dir: &OwnedFd, name: &str, truncate: bool) -> Result<OwnedFd, String> {
    let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NOCTTY
        // A FIFO planted under the name must fail (ENXIO without a reader) or be refused as
        // not a regular file below, never block the helper until its start times out (which
        // would count against the blade). On a regular file the flag changes nothing.
        | OFlag::O_NONBLOCK;
    let fd = openat(dir, name, flags, Mode::from_bits_truncate(0o600)).map_err(|e| match e {
        Errno::ELOOP => format!("{name} is a symlink"),
        e => format!("{name}: {}", e.desc()),
    })?;
    let st = fstat(&fd).map_err(|e| format!("stat {name}: {}", e.desc()))?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Err(format!("{name} is not a regular file"));
    }
    if st.st_uid != Uid::current().as_raw() {
        return Err(format!(
            "{name} is owned by uid {}, not by the user",
            st.st_uid
        ));
    }
    if st.st_nlink != 1 {
        return Err(format!("{name} has {} hard links", st.st_nlink));
    }
    fchmod(&fd, Mode::from_bits_truncate(0o600))
        .map_err(|e| format!("chmod {name}: {}", e.desc()))?;
    if truncate {
        ftruncate(&fd, 0).map_err(|e| format!("truncate {name}: {}", e.desc()))?;
    }
    Ok(fd)
}

/// Writes `rfbauth`, the bytes of an rfbauth file (8: the obfuscated password; 16: then the
/// obfuscated view-only password), to `name` in `dir`, safely (see [`open_private`]).
pub(super) fn write_vncpasswd(dir: &OwnedFd, name: &str, rfbauth: &[u8]) -> Result<(), String> {
    let fd = open_private(dir, name, true)?;
    let mut f = File::from(fd);
    // No fsync: the file only matters while the server that reads it runs, and a crash ends
    // that server too.
    f.write_all(rfbauth)
        .map_err(|e| format!("writing {name}: {e}"))
}

/// Rewrites the running server's own copy of the password file (the same `rfbauth` bytes as
/// `~/.vncpasswd`), in a directory of the user's.
pub(super) fn write_copy(path: &Path, rfbauth: &[u8]) -> Result<(), Failure> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return Err(failed(format!("bad rfbauth path {}", path.display())));
    };
    let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC;
    let dir_fd = nix::fcntl::open(dir, flags, Mode::empty())
        .map_err(|e| refused(format!("cannot open {}: {}", dir.display(), e.desc())))?;
    let st = fstat(&dir_fd).map_err(|e| failed(format!("stat {}: {}", dir.display(), e.desc())))?;
    if st.st_uid != Uid::current().as_raw() {
        return Err(refused(format!("{} is not the user's", dir.display())));
    }
    write_vncpasswd(&dir_fd, name, rfbauth).map_err(|e| refused(format!("{}: {e}", dir.display())))
}

/// `~/.vnc`, created 0700 if missing; a symlink is refused (as TurboVNC does).
pub(super) fn open_vnc_dir(home: &OwnedFd) -> Result<OwnedFd, Failure> {
    match mkdirat(home, ".vnc", Mode::from_bits_truncate(0o700)) {
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(e) => return Err(refused(format!("cannot create ~/.vnc: {}", e.desc()))),
    }
    let fd = openat(
        home,
        ".vnc",
        OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        Errno::ELOOP | Errno::ENOTDIR => refused("~/.vnc is a symlink or not a directory"),
        e => refused(format!("cannot open ~/.vnc: {}", e.desc())),
    })?;
    let st = fstat(&fd).map_err(|e| failed(format!("stat ~/.vnc: {}", e.desc())))?;
    if st.st_uid != Uid::current().as_raw() {
        return Err(refused(format!(
            "~/.vnc is owned by uid {}, not by the user",
            st.st_uid
        )));
    }
    Ok(fd)
}

/// Writes an Xauthority file with a fresh MIT-MAGIC-COOKIE-1 for the display, so only the
/// user's own clients can connect to the X server (without one, any local user could).
pub(super) fn write_xauthority(vnc_dir: &OwnedFd, name: &str, display: u32) -> Result<(), Failure> {
    let mut cookie = [0u8; 16];
    rand::TryRngCore::try_fill_bytes(&mut rand::rngs::OsRng, &mut cookie)
        .map_err(|e| failed(format!("OS random number generator: {e}")))?;
    let mut entry = Vec::with_capacity(64);
    let mut field = |bytes: &[u8]| {
        entry.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
        entry.extend_from_slice(bytes);
    };
    // Family 0xFFFF (FamilyWild) matches any host, so the entry works whatever the host name.
    let mut out = vec![0xff, 0xff];
    field(b"");
    field(display.to_string().as_bytes());
    field(b"MIT-MAGIC-COOKIE-1");
    field(&cookie);
    out.extend_from_slice(&entry);
    let fd = open_private(vnc_dir, name, true).map_err(|e| refused(format!("~/.vnc/{e}")))?;
    File::from(fd)
        .write_all(&out)
        .map_err(|e| failed(format!("writing ~/.vnc/{name}: {e}")))
}
