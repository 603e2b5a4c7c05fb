//! Finding the VNC servers running on this blade by reading /proc.
//!
//! The running processes are the source of truth: the agent keeps no session table that could
//! drift from them, only what it read of them (the agent's registry), checked against /proc by
//! pid and start time at every use. That is what lets a restarted agent (or a one-shot
//! `cloudvnc`) re-adopt desktops it did not start, and makes a killed Xvnc vanish from the list
//! at once. A process counts as a desktop when it is an Xvnc (by `comm`) whose arguments name
//! a display and an rfbauth file; the caller then checks it belongs to a desktop user.
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::OnceLock;

/// One Xvnc process as read from /proc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningXvnc {
    /// Process id.
    pub pid: u32,
    /// Owner of the process.
    pub uid: u32,
    /// X display number from the `:N` argument.
    pub display: u32,
    /// RFB port from `-rfbport` (5900 + display when absent).
    pub port: u16,
    /// The `-rfbauth`/`-PasswordFile` argument: whose password file the server checks.
    pub rfbauth: Option<PathBuf>,
    /// Start time in clock ticks since boot; with the pid it names the process uniquely
    /// (pids are reused, the pair is not).
    pub start_ticks: u64,
}

impl RunningXvnc {
    /// Seconds since the Unix epoch when the process started.
    pub fn started_at_unix(&self) -> i64 {
        let (btime, hz) = boot_clock();
        btime + (self.start_ticks / hz) as i64
    }

    /// True while this very process (same pid and start time) is alive and not a zombie.
    pub fn is_alive(&self) -> bool {
        matches!(stat(self.pid), Ok((state, ticks)) if state != 'Z' && state != 'X' && ticks == self.start_ticks)
    }
}

/// Every live Xvnc process whose `comm` is `comm` (the binary's name, cut to 15 bytes as the
/// kernel does). Processes that vanish mid-scan are skipped.
pub fn scan(comm: &str) -> io::Result<Vec<RunningXvnc>> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(x) = one(comm, pid) {
            found.push(x);
        }
    }
    found.sort_by_key(|x| (x.display, x.pid));
    Ok(found)
}

/// Process `pid` if it is a live `comm` (an Xvnc) with a display on its command line: the
/// same answer [`scan`] gives for it, without reading every process (a start checks the one
/// Xvnc it started; on a blade of thousands of processes a scan costs milliseconds).
pub fn one(comm: &str, pid: u32) -> Option<RunningXvnc> {
    // Cut to 15 bytes, as the kernel keeps it.
    let comm = &comm.as_bytes()[..comm.len().min(15)];
    // One read into a stack buffer (a longer name cannot match anyway): a scan does this for
    // every process on the host, and `fs::read` would add a stat, a second read and a heap
    // buffer each time.
    let mut name = [0u8; 17];
    let n = io::Read::read(
        &mut fs::File::open(format!("/proc/{pid}/comm")).ok()?,
        &mut name,
    )
    .ok()?;
    let name = &name[..n];
    if name.strip_suffix(b"\n").unwrap_or(name) != comm {
        return None;
    }
    read_process(pid)
}

/// A live process's owner, start time and arguments: enough to tell whether it is what a file
/// in /tmp claims (an X lock naming it) and to signal it later without hitting a reused pid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    /// Process id.
    pub pid: u32,
    /// Owner.
    pub uid: u32,
    /// Start time in clock ticks since boot.
    pub start_ticks: u64,
    /// Its command line.
    pub args: Vec<String>,
}

impl Process {
    /// The live, non-zombie process `pid`, if there is one.
    pub fn read(pid: u32) -> Option<Process> {
        let uid = fs::metadata(format!("/proc/{pid}")).ok()?.uid();
        let (state, start_ticks) = stat(pid).ok()?;
        if state == 'Z' || state == 'X' {
            return None;
        }
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let args = cmdline
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        Some(Process {
            pid,
            uid,
            start_ticks,
            args,
        })
    }

    /// True while this very process (same pid and start time) is alive.
    pub fn is_alive(&self) -> bool {
        matches!(stat(self.pid), Ok((state, ticks)) if state != 'Z' && state != 'X' && ticks == self.start_ticks)
    }
}

fn read_process(pid: u32) -> Option<RunningXvnc> {
    let p = Process::read(pid)?;
    let (display, port, rfbauth) = parse_args(&p.args)?;
    Some(RunningXvnc {
        pid,
        uid: p.uid,
        display,
        port,
        rfbauth,
        start_ticks: p.start_ticks,
    })
}

/// Display, port and rfbauth path from an Xvnc command line (TigerVNC parameters are
/// case-insensitive and take `-name value` or `-name=value`).
fn parse_args(args: &[String]) -> Option<(u32, u16, Option<PathBuf>)> {
    let mut display = None;
    let mut port = None;
    let mut rfbauth = None;
    let mut it = args.iter().skip(1).peekable();
    while let Some(arg) = it.next() {
        if let Some(d) = arg.strip_prefix(':') {
            display = d.parse::<u32>().ok();
            continue;
        }
        let Some(name) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
            continue;
        };
        let (name, inline) = match name.split_once('=') {
            Some((n, v)) => (n, Some(v.to_owned())),
            None => (name, None),
        };
        let name = name.to_ascii_lowercase();
        if !matches!(name.as_str(), "rfbport" | "rfbauth" | "passwordfile") {
            continue;
        }
        let Some(value) = inline.or_else(|| it.next().cloned()) else {
            break;
        };
        match name.as_str() {
            "rfbport" => port = value.parse::<u16>().ok(),
            _ => rfbauth = Some(PathBuf::from(value)),
        }
    }
    let display = display?;
    let port = port.or_else(|| u16::try_from(5900 + display).ok())?;
    Some((display, port, rfbauth))
}

/// State letter and start time (field 22) from /proc/PID/stat. The command name in field 2
/// may hold spaces and parentheses, so parsing starts after the last `)`.
fn stat(pid: u32) -> io::Result<(char, u64)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unparsable /proc/{pid}/stat"),
        )
    };
    let rest = s.rsplit_once(')').ok_or_else(bad)?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields
        .first()
        .and_then(|f| f.chars().next())
        .ok_or_else(bad)?;
    let ticks = fields
        .get(19)
        .and_then(|f| f.parse().ok())
        .ok_or_else(bad)?;
    Ok((state, ticks))
}

/// Boot time (seconds since the epoch) and clock ticks per second, read once.
fn boot_clock() -> (i64, u64) {
    static CLOCK: OnceLock<(i64, u64)> = OnceLock::new();
    *CLOCK.get_or_init(|| {
        let btime = fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())
            })
            .unwrap_or(0);
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .and_then(|v| u64::try_from(v).ok())
            .filter(|&v| v > 0)
            .unwrap_or(100);
        (btime, hz)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split(' ').map(String::from).collect()
    }

    #[test]
    fn parses_fast_path_and_wrapper_command_lines() {
        assert_eq!(
            parse_args(&args(
                "/usr/bin/Xtigervnc :3 -auth /h/.vnc/x -rfbport 5999 -rfbauth /home/a/.vncpasswd"
            )),
            Some((3, 5999, Some("/home/a/.vncpasswd".into())))
        );
        assert_eq!(
            parse_args(&args(
                "/usr/bin/Xtigervnc :7 -desktop d -PasswordFile=/home/b/.vncpasswd"
            )),
            Some((7, 5907, Some("/home/b/.vncpasswd".into())))
        );
        assert_eq!(parse_args(&args("/usr/bin/Xtigervnc -rfbport 5901")), None);
    }

    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        let (state, ticks) = stat(me).unwrap();
        assert!(state == 'R' || state == 'S');
        let x = RunningXvnc {
            pid: me,
            uid: 0,
            display: 0,
            port: 0,
            rfbauth: None,
            start_ticks: ticks,
        };
        assert!(x.is_alive());
        assert!(
            !RunningXvnc {
                start_ticks: ticks + 1,
                ..x.clone()
            }
            .is_alive()
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!((x.started_at_unix() - now).abs() < 3600 * 24 * 365);
    }
}
