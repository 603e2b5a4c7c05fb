//! The scale rig's parts (`tests/benches/scale.rs`): a stand-in Xvnc, accounts by the
//! thousand, blade agents each in its own PID namespace, and reading a process's CPU and
//! memory.
//!
//! Every blade of a real pool is its own machine with its own process table; here hundreds
//! of agents share one kernel. An agent scans /proc when it picks a display, so on one shared
//! /proc every start would read every other blade's processes too — a cost no real blade has.
//! `unshare --pid --mount-proc` gives each agent the process table its blade would have.
use crate::child::{ChildProc, Ready};
use std::collections::HashSet;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the rig keeps what desktop users must be able to run.
const BIN_DIR: &str = "/var/cache/vncdispatch/scale-bin";
/// First uid of the rig's accounts (`vsc00000`, `vsc00001`, …).
const FIRST_UID: u32 = 30000;

/// The stand-in programs, built from `tests/scale/xvnc-standin.c`.
#[derive(Debug, Clone)]
pub struct Standin {
    /// Named `Xtigervnc`, which the agent looks for in /proc.
    pub xvnc: PathBuf,
    /// The desktop session: the same program under another name, which waits for a signal.
    pub session: PathBuf,
}

/// Compiles the stand-in (statically: a few pages per desktop) where every user can run it.
pub fn build_standin() -> Standin {
    let dir = Path::new(BIN_DIR);
    std::fs::create_dir_all(dir).expect("create the rig's bin dir");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let xvnc = dir.join("Xtigervnc");
    let src = crate::repo().join("tests/scale/xvnc-standin.c");
    let status = Command::new("cc")
        .args(["-O2", "-static", "-Wall", "-o"])
        .arg(&xvnc)
        .arg(&src)
        .status()
        .expect("run cc");
    assert!(status.success(), "compiling {}", src.display());
    let session = dir.join("standin-session");
    let _ = std::fs::remove_file(&session);
    std::os::unix::fs::symlink(&xvnc, &session).expect("symlink the session");
    Standin { xvnc, session }
}

/// The name of rig account `i`.
pub fn user_name(i: usize) -> String {
    format!("vsc{i:05}")
}

/// Makes sure accounts `vsc00000`..`vsc{n-1}` exist, with homes only they can enter.
///
/// Written to /etc/passwd and /etc/shadow directly: `useradd` and `newusers` take 20–25 ms
/// an account (a password hash and a rewrite of the files each), 8 minutes for 20,000. The
/// lines are what they would write (a locked password, group `users`); run the rig while
/// nothing else changes accounts. They stay after the run for the next one;
/// `scripts/scale.sh clean` removes them.
pub fn ensure_users(n: usize) -> Vec<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    let shadow = std::fs::read_to_string("/etc/shadow").expect("read /etc/shadow");
    let field = |line: &str, i: usize| line.split(':').nth(i).unwrap_or("").to_owned();
    let names_in = |text: &str| -> HashSet<String> { text.lines().map(|l| field(l, 0)).collect() };
    let (in_passwd, in_shadow) = (names_in(&passwd), names_in(&shadow));
    let uids: std::collections::HashMap<String, String> =
        passwd.lines().map(|l| (field(l, 2), field(l, 0))).collect();
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86400);
    let (mut pw, mut sh) = (String::new(), String::new());
    let names: Vec<String> = (0..n).map(user_name).collect();
    for (i, name) in names.iter().enumerate() {
        let uid = FIRST_UID + i as u32;
        let home = format!("/home/{name}");
        if !in_passwd.contains(name) {
            if let Some(other) = uids.get(&uid.to_string()) {
                panic!(
                    "uid {uid} belongs to {other}: the rig's accounts need uids {FIRST_UID}..{}",
                    FIRST_UID as usize + n
                );
            }
            pw.push_str(&format!("{name}:x:{uid}:100::{home}:/bin/sh\n"));
        }
        // Also for a name whose shadow line a crash between the two appends left out.
        if !in_shadow.contains(name) {
            sh.push_str(&format!("{name}:!:{days}:0:99999:7:::\n"));
        }
        if !Path::new(&home).is_dir() {
            std::fs::create_dir_all(&home).expect("create home");
            std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).expect("chmod");
            nix::unistd::chown(
                Path::new(&home),
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(100)),
            )
            .expect("chown home");
        }
    }
    // Shadow first: a crash between the two leaves a shadow line without an account (inert),
    // never an account without its shadow line.
    for (file, lines) in [("/etc/shadow", sh), ("/etc/passwd", pw)] {
        if !lines.is_empty() {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(file)
                .expect("open for append");
            f.write_all(lines.as_bytes()).expect("append accounts");
        }
    }
    names
}

/// The loopback address of blade `i` (127.1.x.y: every blade its own host).
pub fn blade_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8))
}

/// A blade agent of the rig, in its own PID namespace.
#[derive(Debug)]
pub struct RigAgent {
    /// `unshare`, whose child is the agent; killing it ends the namespace.
    _child: ChildProc,
    /// gRPC address.
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

/// Starts blade agent `i` serving displays `first..first+count` on [`blade_ip`]`(i)`, with the
/// stand-in as session and, unless `real_xvnc`, as Xvnc too (else the real Xtigervnc); VNC
/// authentication only (no certificate per desktop), plain gRPC with `secret`.
pub async fn start_agent(
    i: usize,
    first: u32,
    count: u32,
    standin: &Standin,
    real_xvnc: bool,
    secret: &Path,
) -> RigAgent {
    let dir = tempfile::tempdir().expect("tempdir");
    let ip = blade_ip(i);
    let addr = SocketAddr::new(ip, 7501);
    let child = ChildProc::new(
        "/usr/bin/unshare",
        dir.path().join("blade-agent.log"),
        Ready::Serving(addr, ""),
    )
    .env("RUST_LOG", "warn")
    .args(["--pid", "--fork", "--mount-proc", "--kill-child", "--"])
    .arg(crate::workspace_bin("blade-agent"))
    .args([
        "serve".to_string(),
        "--listen".into(),
        addr.to_string(),
        "--secret-file".into(),
        secret.display().to_string(),
        "--rfb-listen".into(),
        ip.to_string(),
        "--display-first".into(),
        first.to_string(),
        "--display-count".into(),
        count.to_string(),
        "--rfb-security".into(),
        "vnc".into(),
        "--min-uid".into(),
        FIRST_UID.to_string(),
        "--run-dir".into(),
        dir.path().join("run").display().to_string(),
    ])
    .args(
        (!real_xvnc)
            .then(|| ["--xvnc".into(), standin.xvnc.display().to_string()])
            .into_iter()
            .flatten(),
    )
    .arg("--session-command")
    .arg(&standin.session)
    .ready_within(std::time::Duration::from_secs(30))
    .start()
    .await;
    RigAgent {
        _child: child,
        addr,
        _dir: dir,
    }
}

/// How many real Xtigervnc servers run on this machine (the stand-in has the same name: told
/// apart by the program file).
pub fn real_xvnc_running() -> usize {
    let real = std::fs::canonicalize("/usr/bin/Xtigervnc").ok();
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter(|e| real.is_some() && std::fs::read_link(e.path().join("exe")).ok() == real)
                .count()
        })
        .unwrap_or(0)
}

/// A process's resident memory and the CPU time it and its waited-for children used.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// Resident set, KiB.
    pub rss_kib: u64,
    /// User + system CPU seconds.
    pub cpu_s: f64,
}

/// [`Usage`] of `pid` now (zero if it is gone).
pub fn usage(pid: u32) -> Usage {
    let rss_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0);
    // Fields after the command's closing parenthesis; utime and stime are the 14th and 15th
    // of the whole line.
    let cpu_s = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
            Some(ticks as f64 / 100.0)
        })
        .unwrap_or(0.0);
    Usage { rss_kib, cpu_s }
}

/// Raises the kernel's pid limit (32768 by default: 20,000 desktops are 60,000 processes)
/// and this process's open-file limit (every held browser connection is a socket here).
pub fn raise_limits() {
    let _ = std::fs::write("/proc/sys/kernel/pid_max", "4194304");
    let _ = std::fs::write("/proc/sys/kernel/threads-max", "4194304");
    let _ = nix::sys::resource::setrlimit(
        nix::sys::resource::Resource::RLIMIT_NOFILE,
        1 << 20,
        1 << 20,
    );
}
