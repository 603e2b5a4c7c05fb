//! Starting desktops on blades: the [`Launcher`] trait and its implementations.
//!
//! - [`agent`]: gRPC to `blade-agent serve` (the default), authenticated with the agents'
//!   shared secret.
//! - [`ssh`]: SSH (russh) running `blade-agent cloudvnc --user USER` with the password on
//!   stdin, for blades reached the way the original reached them.
//!
//! Both turn an agent's failure into a [`LaunchError`] by the shared refusal contract
//! ([`vncdispatch_proto::refusal`]) — the `ErrorInfo` kind of a gRPC status, the exit code of
//! `cloudvnc` — never by its message, so one kind leads to one decision whichever way the
//! blade is reached.
pub mod agent;
pub mod ssh;

use crate::store::BladeRecord;

/// The VNC passwords a desktop is started with: the full one, and the view-only one that
/// Xvnc's password file carries second (a login with it can watch but not type or point).
/// Never logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Passwords {
    /// Full control.
    pub full: String,
    /// Viewing only; always different from `full`.
    pub view_only: String,
}

impl std::fmt::Debug for Passwords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passwords(<redacted>)")
    }
}

/// Where a started desktop is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launched {
    /// Host ws-proxy connects to.
    pub host: String,
    /// X display.
    pub display: u32,
    /// RFB port.
    pub port: u32,
    /// Xvnc pid.
    pub vnc_pid: u32,
    /// SHA-256 (hex) of the desktop's VeNCrypt certificate, as the agent made it; empty when
    /// it offers none (SSH blades report none).
    pub cert_sha256: String,
    /// The desktop's password file holds the view-only password (false from agents that
    /// predate it: such a desktop cannot be shared view-only).
    pub view_only: bool,
}

/// Load figures of a blade.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BladeLoad {
    /// Live desktops.
    pub sessions: u32,
    /// Their Xvnc pids (agents; for SSH blades the poller fills those stored).
    pub vnc_pids: Vec<u32>,
    /// Displays still free.
    pub free_displays: u32,
    /// Starts under way on the agent (displays neither free nor live yet).
    pub starting: u32,
    /// 1-minute load average.
    pub load1: f64,
    /// CPUs the agent may use (0: not reported).
    pub cpus: u32,
    /// MemAvailable and MemTotal in bytes (0: not reported).
    pub mem_available: u64,
    /// See `mem_available`.
    pub mem_total: u64,
    /// True when the blade reported these figures (an agent's Health); SSH blades report
    /// none, and are placed as if they had room.
    pub reported: bool,
}

/// Why a launcher call failed.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The blade could not do it (down, timed out, out of displays, Xvnc failed — refusals of
    /// [`Scope::Blade`](vncdispatch_proto::refusal::Scope::Blade)): another blade may.
    #[error("{0}")]
    Blade(String),
    /// The blade has no free display (NO_FREE_DISPLAY; `cloudvnc` exit 20): another blade
    /// may, and if every blade says so the dispatcher is out of capacity.
    #[error("{0}")]
    Full(String),
    /// The request itself is wrong (unknown or system account, unsafe home — refusals of
    /// [`Scope::Request`](vncdispatch_proto::refusal::Scope::Request)): no blade will do
    /// better, so the caller gets this status.
    #[error("{}", .0.message())]
    Refused(tonic::Status),
}

/// Starts, checks and stops desktops on one kind of blade.
#[async_trait::async_trait]
pub trait Launcher: Send + Sync + std::fmt::Debug + 'static {
    /// Starts (or finds) the user's desktop with these passwords.
    async fn start(
        &self,
        blade: &BladeRecord,
        username: &str,
        passwords: &Passwords,
        request_id: &str,
    ) -> Result<Launched, LaunchError>;
    /// Stops the user's desktop — only the Xvnc with pid `vnc_pid`, when given, so a stale
    /// or late stop never ends a newer desktop; false if none (or another) ran.
    async fn stop(
        &self,
        blade: &BladeRecord,
        username: &str,
        vnc_pid: Option<u32>,
    ) -> Result<bool, LaunchError>;
    /// Whether the user's Xvnc with this pid still runs there.
    async fn is_alive(
        &self,
        blade: &BladeRecord,
        username: &str,
        vnc_pid: u32,
    ) -> Result<bool, LaunchError>;
    /// The blade's load.
    async fn health(&self, blade: &BladeRecord) -> Result<BladeLoad, LaunchError>;
}
