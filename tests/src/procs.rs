//! What /proc says about processes, for assertions about who runs what.
use std::fs;
use std::os::unix::fs::MetadataExt;

/// A process as seen in /proc.
#[derive(Debug, Clone)]
pub struct Proc {
    /// Process id.
    pub pid: u32,
    /// Parent's pid.
    pub ppid: u32,
    /// Owner.
    pub uid: u32,
    /// `comm`.
    pub comm: String,
    /// Raw NUL-separated command line.
    pub cmdline: Vec<u8>,
    /// Raw NUL-separated environment (empty if unreadable).
    pub environ: Vec<u8>,
}

/// Every live (non-zombie) process.
pub fn all() -> Vec<Proc> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
        let state = fields.next()?.to_owned();
        let ppid = fields.next()?.parse().ok()?;
        if state == "Z" || state == "X" {
            return None;
        }
        Some(Proc {
            pid,
            ppid,
            uid: fs::metadata(format!("/proc/{pid}")).ok()?.uid(),
            comm: fs::read_to_string(format!("/proc/{pid}/comm"))
                .ok()?
                .trim_end()
                .to_owned(),
            cmdline: fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default(),
            environ: fs::read(format!("/proc/{pid}/environ")).unwrap_or_default(),
        })
    })
    .collect()
}

/// Live processes owned by `uid`.
pub fn of_uid(uid: u32) -> Vec<Proc> {
    all().into_iter().filter(|p| p.uid == uid).collect()
}

/// Live Xtigervnc processes owned by `uid`.
pub fn xvnc_of(uid: u32) -> Vec<Proc> {
    of_uid(uid)
        .into_iter()
        .filter(|p| p.comm == "Xtigervnc")
        .collect()
}

/// The session helpers agent `agent` keeps started ahead, waiting for a request: its root
/// `session-helper` children with no child of their own (a helper at work has one: Xvnc, or
/// the user's side of a PAM session).
pub fn waiting_helpers(agent: u32) -> Vec<Proc> {
    let all = all();
    all.iter()
        .filter(|p| p.ppid == agent && p.uid == 0 && contains(&p.cmdline, b"session-helper"))
        .filter(|p| !all.iter().any(|c| c.ppid == p.pid))
        .cloned()
        .collect()
}

/// True if `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}
