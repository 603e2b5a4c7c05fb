//! Starting, finding and stopping users' desktops: the agent's domain logic, used by the gRPC
//! service and by the one-shot `cloudvnc` command alike.
//!
//! One Xvnc per user holds across concurrent calls and across processes: a call takes the
//! user's in-process lock, then an `flock` on `RUN_DIR/users/NAME.lock` (which a concurrent
//! `cloudvnc` also takes), then looks at /proc for the user's running server before starting
//! one. Displays are reserved in-process while a start is under way; a display another program
//! grabbed in the meantime makes Xvnc fail with BUSY and the next display is tried.
use crate::account::{self, Account};
use crate::config::{DesktopConfig, check_geometry};
use crate::discover::{self, RunningXvnc};
use crate::error::AgentError;
use crate::helper::StartMode;
use crate::privdrop;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use vncdispatch_proto::rules::{validate_password, validate_username};
use vncdispatch_proto::v1::{AgentHealth, Geometry, VncServer};

/// Attempts at starting on successive displays when one turns out to be taken.
const START_ATTEMPTS: usize = 3;
/// How long a stopped Xvnc gets to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The blade's desktops.
#[derive(Debug)]
pub struct Agent {
    cfg: DesktopConfig,
    /// Binary run as the per-session helper.
    helper: PathBuf,
    /// Host reported to callers.
    host: String,
    /// Serializes calls per user inside this process (the flock does it across processes).
    user_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Displays with a start under way, not yet visible in /proc.
    reserved: Arc<Mutex<HashSet<u32>>>,
    /// Desktops last seen per user, for cheap liveness checks (see [`Agent::find`]).
    seen: Mutex<HashMap<String, RunningXvnc>>,
}

/// Holds a display reserved until dropped.
struct Reservation {
    display: u32,
    reserved: Arc<Mutex<HashSet<u32>>>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        lock(&self.reserved).remove(&self.display);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these plain-data locks leaves the data consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Agent {
    /// Prepares the run directory (0700, root's) and resolves the helper binary.
    pub fn new(cfg: DesktopConfig) -> Result<Self, AgentError> {
        let users = cfg.run_dir.join("users");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&users)
            .map_err(|e| AgentError::io(format!("creating {}", users.display()), e))?;
        fs::set_permissions(&cfg.run_dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| AgentError::io(format!("securing {}", cfg.run_dir.display()), e))?;
        let helper = match &cfg.helper {
            Some(h) => h.clone(),
            None => std::env::current_exe()
                .map_err(|e| AgentError::io("finding own binary for the session helper", e))?,
        };
        let host = cfg.host();
        Ok(Agent {
            cfg,
            helper,
            host,
            user_locks: Mutex::default(),
            reserved: Arc::default(),
            seen: Mutex::default(),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &DesktopConfig {
        &self.cfg
    }

    /// Starts `username`'s desktop, or returns the running one after writing the new password
    /// (Xvnc rereads the rfbauth file on every login, so the returned server takes it).
    pub async fn start_session(
        &self,
        username: &str,
        password: &str,
        geometry: Option<Geometry>,
    ) -> Result<VncServer, AgentError> {
        validate_password(password)?;
        let geometry = match geometry {
            Some(g) => {
                check_geometry(g.width, g.height)?;
                (g.width, g.height)
            }
            None => self.cfg.geometry,
        };
        let account = self.account(username).await?;
        let _guard = self.lock_user(&account.name).await?;
        if let Some(running) = self.running_for(&account)? {
            let rfbauth = running.rfbauth.clone();
            self.run_helper(
                &account,
                password,
                HelperRequest::Passwd { rfbauth },
                None,
                geometry,
            )
            .await
            .map_err(|e| e.into_agent_error(&account.name, running.display))?;
            tracing::info!(
                display = running.display,
                pid = running.pid,
                "returning running desktop"
            );
            return Ok(self.describe(&account.name, &running, true));
        }
        let mut skip = HashSet::new();
        for attempt in 1..=START_ATTEMPTS {
            let slot = self.reserve_display(&skip)?;
            match self
                .run_helper(
                    &account,
                    password,
                    HelperRequest::Start,
                    Some(slot.display),
                    geometry,
                )
                .await
            {
                Ok(Some(pid)) => {
                    let running = self
                        .running_for(&account)?
                        .filter(|r| r.pid == pid)
                        .ok_or_else(|| AgentError::StartFailed {
                            user: account.name.clone(),
                            display: slot.display,
                            detail: format!("Xvnc (pid {pid}) exited right after starting"),
                        })?;
                    tracing::info!(display = running.display, pid, "started desktop");
                    return Ok(self.describe(&account.name, &running, false));
                }
                Ok(None) => {
                    let detail = "answered OK to a start".into();
                    return Err(AgentError::Helper {
                        user: account.name,
                        detail,
                    });
                }
                Err(Busy(detail)) if attempt < START_ATTEMPTS => {
                    tracing::warn!(display = slot.display, %detail, "display taken, trying another");
                    skip.insert(slot.display);
                }
                Err(Busy(detail)) => {
                    return Err(AgentError::StartFailed {
                        user: account.name,
                        display: slot.display,
                        detail,
                    });
                }
                Err(Other(e)) => return Err(e),
            }
        }
        Err(AgentError::NoFreeDisplay {
            first: self.cfg.display_first,
            last: self.cfg.display_last(),
        })
    }

    /// Stops `username`'s desktop; false if none was running.
    pub async fn stop_session(&self, username: &str) -> Result<bool, AgentError> {
        let account = self.account(username).await?;
        let _guard = self.lock_user(&account.name).await?;
        let Some(running) = self.running_for(&account)? else {
            return Ok(false);
        };
        terminate(&running).await;
        tracing::info!(
            display = running.display,
            pid = running.pid,
            "stopped desktop"
        );
        Ok(true)
    }

    /// The user's running desktop, if any. Cheap when the desktop was seen before: the
    /// remembered process is checked by its /proc entry alone (pid and start time), and only
    /// a miss scans /proc — this is the dispatcher's per-reconnect liveness check.
    pub async fn find(&self, username: &str) -> Result<Option<VncServer>, AgentError> {
        validate_username(username)?;
        let remembered = lock(&self.seen).get(username).cloned();
        if let Some(running) = remembered.filter(RunningXvnc::is_alive) {
            return Ok(Some(self.describe(username, &running, true)));
        }
        let account = self.account(username).await?;
        let running = self.running_for(&account)?;
        let mut seen = lock(&self.seen);
        match &running {
            Some(r) => seen.insert(account.name.clone(), r.clone()),
            None => seen.remove(&account.name),
        };
        Ok(running.map(|r| self.describe(&account.name, &r, true)))
    }

    /// The live desktops, ordered by display.
    pub fn list(&self) -> Result<Vec<VncServer>, AgentError> {
        let mut out = Vec::new();
        for (account, running) in self.desktops()? {
            out.push(self.describe(&account.name, &running, false));
        }
        Ok(out)
    }

    /// Session count, free displays, load and memory.
    pub fn health(&self) -> Result<AgentHealth, AgentError> {
        let live = self.desktops()?;
        let used: HashSet<u32> = live
            .iter()
            .map(|(_, r)| r.display)
            .chain(lock(&self.reserved).iter().copied())
            .collect();
        let in_range = used
            .iter()
            .filter(|d| (self.cfg.display_first..=self.cfg.display_last()).contains(d))
            .count();
        let load1 = fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem = |key: &str| -> u64 {
            meminfo
                .lines()
                .find_map(|l| {
                    l.strip_prefix(key)?
                        .trim()
                        .strip_suffix("kB")?
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
                .unwrap_or(0)
                * 1024
        };
        Ok(AgentHealth {
            sessions: live.len() as u32,
            free_displays: self.cfg.display_count.saturating_sub(in_range as u32),
            load1,
            mem_available_bytes: mem("MemAvailable:"),
            mem_total_bytes: mem("MemTotal:"),
            version: env!("CARGO_PKG_VERSION").into(),
        })
    }

    /// Every Xvnc on the blade that is a desktop of a desktop user: owned by an account in the
    /// allowed uid range and checking a VNC password file (the fast path passes `~/.vncpasswd`;
    /// the vncserver wrapper a private copy of it).
    fn desktops(&self) -> Result<Vec<(Account, RunningXvnc)>, AgentError> {
        let mut accounts: HashMap<u32, Option<Account>> = HashMap::new();
        let mut out = Vec::new();
        for running in
            discover::scan(&self.xvnc_comm()).map_err(|e| AgentError::io("reading /proc", e))?
        {
            let account = accounts
                .entry(running.uid)
                .or_insert_with(|| account::lookup_uid(running.uid, self.uids()).ok())
                .clone();
            if let Some(account) = account
                && running.rfbauth.is_some()
            {
                out.push((account, running));
            }
        }
        Ok(out)
    }

    fn running_for(&self, account: &Account) -> Result<Option<RunningXvnc>, AgentError> {
        Ok(self
            .desktops()?
            .into_iter()
            .find(|(a, _)| a.uid == account.uid)
            .map(|(_, r)| r))
    }

    fn xvnc_comm(&self) -> String {
        self.cfg
            .xvnc
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("Xtigervnc")
            .to_owned()
    }

    fn describe(&self, username: &str, running: &RunningXvnc, reused: bool) -> VncServer {
        VncServer {
            username: username.to_owned(),
            host: self.host.clone(),
            display: running.display,
            port: u32::from(running.port),
            vnc_pid: running.pid,
            reused,
            started_at_unix: running.started_at_unix(),
        }
    }

    async fn account(&self, username: &str) -> Result<Account, AgentError> {
        let (name, uids) = (username.to_owned(), self.uids());
        blocking(move || account::lookup(&name, uids)).await
    }

    fn uids(&self) -> account::UidRange {
        account::UidRange {
            min: self.cfg.min_uid,
            max: self.cfg.max_uid,
        }
    }

    /// Takes the user's in-process lock, then the cross-process flock.
    async fn lock_user(&self, name: &str) -> Result<UserGuard, AgentError> {
        let m = lock(&self.user_locks)
            .entry(name.to_owned())
            .or_default()
            .clone();
        let inproc = m.lock_owned().await;
        let path = self.cfg.run_dir.join("users").join(format!("{name}.lock"));
        let file = blocking(move || {
            let f = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|e| AgentError::io(format!("opening lock {}", path.display()), e))?;
            f.lock()
                .map_err(|e| AgentError::io(format!("locking {}", path.display()), e))?;
            Ok(f)
        })
        .await?;
        Ok(UserGuard {
            _file: file,
            _inproc: inproc,
        })
    }

    /// Picks the lowest free display: not reserved, not served by a live Xvnc, no live X lock
    /// file, and its RFB port bindable. Stale lock files and sockets left by a dead server are
    /// removed here, as root, because the next user's Xvnc could not remove another user's
    /// files from the sticky /tmp.
    fn reserve_display(&self, skip: &HashSet<u32>) -> Result<Reservation, AgentError> {
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

    /// Runs the session helper as the user; `Some(pid)` of the started Xvnc for `Start`.
    async fn run_helper(
        &self,
        account: &Account,
        password: &str,
        request: HelperRequest,
        display: Option<u32>,
        geometry: (u32, u32),
    ) -> Result<Option<u32>, HelperError> {
        let display = display.unwrap_or(0);
        let port = self.cfg.port_of(display).unwrap_or(0);
        let mode = match self.cfg.mode {
            StartMode::Fast => "fast",
            StartMode::Wrapper => "wrapper",
        };
        let mut cmd = std::process::Command::new(&self.helper);
        cmd.arg("session-helper");
        match &request {
            HelperRequest::Start => cmd.args(["--action", "start"]),
            HelperRequest::Passwd { rfbauth: None } => cmd.args(["--action", "passwd"]),
            HelperRequest::Passwd {
                rfbauth: Some(path),
            } => cmd.args(["--action", "passwd", "--rfbauth"]).arg(path),
        };
        cmd.args(["--mode", mode])
            .args([
                "--display",
                &display.to_string(),
                "--port",
                &port.to_string(),
            ])
            .arg("--xvnc")
            .arg(&self.cfg.xvnc)
            .arg("--vncserver")
            .arg(&self.cfg.vncserver)
            .arg("--session")
            .arg(&self.cfg.session_command)
            .args(["--geometry", &format!("{}x{}", geometry.0, geometry.1)])
            .args(["--interface", &self.cfg.rfb_listen.to_string()])
            .args([
                "--timeout-ms",
                &self.cfg.start_timeout.as_millis().to_string(),
            ]);
        privdrop::as_user(&mut cmd, account);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let user = account.name.clone();
        let helper_err = |detail: String| {
            Other(AgentError::Helper {
                user: user.clone(),
                detail,
            })
        };
        let mut child = tokio::process::Command::from(cmd).spawn().map_err(|e| {
            helper_err(format!(
                "cannot run {} as the user: {e} (it must be executable by desktop users)",
                self.helper.display()
            ))
        })?;
        let helper_pid = child.id();
        let mut stdin = child
            .stdin
            .take()
            .ok_or_else(|| helper_err("no stdin pipe".into()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| helper_err("no stdout pipe".into()))?;
        let mut secret = Vec::with_capacity(password.len() + 1);
        secret.extend_from_slice(password.as_bytes());
        secret.push(b'\n');
        stdin
            .write_all(&secret)
            .await
            .map_err(|e| helper_err(format!("sending password: {e}")))?;
        drop(stdin);
        let mut line = String::new();
        let limit = self.cfg.start_timeout + Duration::from_secs(5);
        let read = tokio::time::timeout(limit, BufReader::new(stdout).read_line(&mut line)).await;
        // The helper outlives this call when it supervises a desktop; reap it whenever it ends.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        match read {
            Err(_) => {
                if let Some(pid) = helper_pid {
                    // The helper leads its own session and process group, with Xvnc in it.
                    let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                }
                return Err(Other(AgentError::StartTimeout {
                    user,
                    display,
                    after: limit,
                }));
            }
            Ok(Err(e)) => return Err(helper_err(format!("reading its answer: {e}"))),
            Ok(Ok(_)) => {}
        }
        let (kind, rest) = line
            .trim_end()
            .split_once(' ')
            .unwrap_or((line.trim_end(), ""));
        let rest = rest.to_owned();
        match kind {
            "OK" => Ok(None),
            "READY" => rest
                .parse::<u32>()
                .map(Some)
                .map_err(|_| helper_err(format!("bad answer {line:?}"))),
            "REFUSED" => Err(Other(AgentError::UnsafeHome { user, why: rest })),
            "BUSY" => Err(Busy(rest)),
            "TIMEOUT" => Err(Other(AgentError::StartTimeout {
                user,
                display,
                after: self.cfg.start_timeout,
            })),
            "FAILED" => Err(Other(AgentError::StartFailed {
                user,
                display,
                detail: rest,
            })),
            "" => Err(helper_err(
                "exited without an answer (see the agent's log)".into(),
            )),
            _ => Err(helper_err(format!(
                "unexpected answer {:?}",
                line.chars().take(80).collect::<String>()
            ))),
        }
    }
}

/// What the helper is asked to do.
enum HelperRequest {
    /// Rewrite the password of a running server (`rfbauth`: the file it reads, if not
    /// `~/.vncpasswd`).
    Passwd { rfbauth: Option<PathBuf> },
    /// Start a desktop.
    Start,
}

/// The per-user locks, released on drop.
struct UserGuard {
    _file: File,
    _inproc: tokio::sync::OwnedMutexGuard<()>,
}

/// How a helper run failed: BUSY means another display may work.
enum HelperError {
    Busy(String),
    Other(AgentError),
}
use HelperError::{Busy, Other};

impl HelperError {
    fn into_agent_error(self, user: &str, display: u32) -> AgentError {
        match self {
            Busy(detail) => AgentError::StartFailed {
                user: user.to_owned(),
                display,
                detail,
            },
            Other(e) => e,
        }
    }
}

/// Stops an Xvnc: SIGTERM, then SIGKILL after the grace period. Its helper then ends the
/// session's processes.
async fn terminate(running: &RunningXvnc) {
    let pid = Pid::from_raw(running.pid as i32);
    if !running.is_alive() {
        return;
    }
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = tokio::time::Instant::now() + STOP_GRACE;
    while tokio::time::Instant::now() < deadline {
        if !running.is_alive() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if running.is_alive() {
        tracing::warn!(pid = running.pid, "Xvnc ignored SIGTERM; killing it");
        let _ = kill(pid, Signal::SIGKILL);
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

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AgentError> + Send + 'static,
) -> Result<T, AgentError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::io("blocking task", std::io::Error::other(e.to_string())))?
}
