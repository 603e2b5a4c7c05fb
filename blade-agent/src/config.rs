//! Settings for starting desktops, shared by `serve` and `cloudvnc`. Every flag can also be set
//! through the environment variable named in `--help`.
use crate::helper::StartMode;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// How and where desktops are started on this blade.
#[derive(Debug, Clone, clap::Args)]
pub struct DesktopConfig {
    /// Lowest uid that may have a desktop; root and system accounts below it are refused.
    #[arg(long, env = "BLADE_AGENT_MIN_UID", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub min_uid: u32,
    /// Highest uid that may have a desktop; keeps out `nobody` (65534) and other high system
    /// ids (Debian's UID_MAX is 60000).
    #[arg(long, env = "BLADE_AGENT_MAX_UID", default_value_t = 60000)]
    pub max_uid: u32,
    /// First X display number handed out. The range belongs to the agent: pick one no other X
    /// server uses (console X, Xwayland and xrdp often take the low numbers). Lock files and
    /// sockets no live X server holds are removed there, and a desktop user keeps at most one
    /// X server in it (others are stopped).
    #[arg(long, env = "BLADE_AGENT_DISPLAY_FIRST", default_value_t = 1)]
    pub display_first: u32,
    /// How many displays (and so desktops) this blade offers.
    #[arg(long, env = "BLADE_AGENT_DISPLAY_COUNT", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub display_count: u32,
    /// RFB port of display N is PORT_BASE + N (5900 is the VNC convention).
    #[arg(long, env = "BLADE_AGENT_PORT_BASE", default_value_t = 5900)]
    pub port_base: u16,
    /// Address Xvnc listens on for RFB connections (from ws-proxy).
    #[arg(long, env = "BLADE_AGENT_RFB_LISTEN", default_value = "0.0.0.0")]
    pub rfb_listen: IpAddr,
    /// Host name or address reported to callers as where to connect; the machine's host name
    /// when unset, or RFB_LISTEN when that is a specific address.
    #[arg(long, env = "BLADE_AGENT_ADVERTISE_HOST")]
    pub advertise_host: Option<String>,
    /// fast: run Xtigervnc and the session command directly; wrapper: TigerVNC's vncserver.
    #[arg(long, env = "BLADE_AGENT_MODE", value_enum, default_value = "fast")]
    pub mode: StartMode,
    /// RFB security the desktops offer: `both` (VeNCrypt X509Vnc with a fresh certificate per
    /// desktop, whose SHA-256 the agent reports so ws-proxy can pin it, plus VNC
    /// authentication for browsers that connect without auth-proxy), `tls` (X509Vnc only) or
    /// `vnc` (VNC authentication only, in clear).
    #[arg(
        long,
        env = "BLADE_AGENT_RFB_SECURITY",
        value_enum,
        default_value = "both"
    )]
    pub rfb_security: crate::helper::RfbSecurity,
    /// The Xvnc binary.
    #[arg(long, env = "BLADE_AGENT_XVNC", default_value = "/usr/bin/Xtigervnc")]
    pub xvnc: PathBuf,
    /// The vncserver wrapper (wrapper mode).
    #[arg(
        long,
        env = "BLADE_AGENT_VNCSERVER",
        default_value = "/usr/bin/vncserver"
    )]
    pub vncserver: PathBuf,
    /// Program run as the user inside the desktop (an absolute path; no arguments, no shell);
    /// the desktop ends when it exits. Fast mode starts it just after answering the start: a
    /// start fails if it is not a file the user may execute (a script's `#!` interpreter too);
    /// a later failure (the user's process limit) ends the desktop, with the reason in its
    /// ~/.vnc log and in a warning in the agent's log.
    #[arg(
        long,
        env = "BLADE_AGENT_SESSION_COMMAND",
        default_value = "/etc/X11/Xtigervnc-session",
        value_parser = parse_absolute
    )]
    pub session_command: PathBuf,
    /// Screen size when the caller gives none.
    #[arg(long, env = "BLADE_AGENT_GEOMETRY", default_value = "1280x800", value_parser = parse_geometry)]
    pub geometry: (u32, u32),
    /// How long to wait for a new Xvnc to accept connections before giving up.
    #[arg(long, env = "BLADE_AGENT_START_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub start_timeout: Duration,
    /// How often Health and listing reread all of /proc for desktops this agent did not start
    /// (by `cloudvnc`, by hand, from before a restart); in between they check only the
    /// desktops already known, so their cost follows the number of desktops rather than of
    /// processes on the host. Such a desktop is counted within this time; the agent's own
    /// starts and stops show at once. 0s: every call scans.
    #[arg(long, env = "BLADE_AGENT_RESCAN_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub rescan_interval: Duration,
    /// Directory for per-user lock files (root-only).
    #[arg(long, env = "BLADE_AGENT_RUN_DIR", default_value = "/run/blade-agent")]
    pub run_dir: PathBuf,
    /// PAM service whose account and session stages every desktop goes through, as a login
    /// would: an expired or locked account (`chage -E 0`) gets PERMISSION_DENIED, pam_limits
    /// and pam_env apply to the desktop, and where systemd runs pam_systemd puts it in the
    /// user's own slice. Install `deploy/pam/vncdispatch` as /etc/pam.d/vncdispatch (without it
    /// PAM uses /etc/pam.d/other).
    #[arg(long = "pam-service", env = "BLADE_AGENT_PAM_SERVICE", default_value = "vncdispatch", value_parser = parse_pam_service)]
    pub pam_service_name: String,
    /// Start desktops without PAM (no account expiry check, no limits; the helper drops to
    /// the user as soon as it has looked them up): only for blades without a PAM
    /// configuration.
    #[arg(long, env = "BLADE_AGENT_NO_PAM")]
    pub no_pam: bool,
    /// The blade-agent binary run as the per-session helper; this binary when unset. It
    /// starts as root (one is kept started ahead of the next call) and drops to the user
    /// itself: it and every directory above it must be root's and not writable by others
    /// (checked at start).
    #[arg(long, env = "BLADE_AGENT_HELPER")]
    pub helper: Option<PathBuf>,
}

impl DesktopConfig {
    /// The host callers should connect to.
    pub fn host(&self) -> String {
        if let Some(h) = &self.advertise_host {
            return h.clone();
        }
        if !self.rfb_listen.is_unspecified() {
            return self.rfb_listen.to_string();
        }
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "localhost".into())
    }

    /// RFB port of a display, if it fits in a port number.
    pub fn port_of(&self, display: u32) -> Option<u16> {
        u16::try_from(u32::from(self.port_base) + display).ok()
    }

    /// The PAM service desktops go through, unless PAM is off.
    pub fn pam_service(&self) -> Option<&str> {
        (!self.no_pam).then_some(self.pam_service_name.as_str())
    }

    /// The last display in range.
    pub fn display_last(&self) -> u32 {
        self.display_first + self.display_count - 1
    }
}

/// A program the agent runs for users is named by its absolute path, never looked up on a
/// PATH (whose, as the helper has changed into the user's home?).
fn parse_absolute(s: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(s);
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(format!(
            "{s:?} is not an absolute path (give it as /usr/bin/…)"
        ))
    }
}

/// A PAM service is a file name in /etc/pam.d.
fn parse_pam_service(s: &str) -> Result<String, String> {
    if !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !s.starts_with('.')
    {
        Ok(s.to_owned())
    } else {
        Err("a PAM service is a file name in /etc/pam.d: letters, digits, - _ .".into())
    }
}

/// Parses `WIDTHxHEIGHT` within what Xvnc and browsers handle.
pub fn parse_geometry(s: &str) -> Result<(u32, u32), String> {
    let (w, h) = s
        .split_once('x')
        .ok_or("expected WIDTHxHEIGHT, e.g. 1280x800")?;
    let w: u32 = w.parse().map_err(|_| format!("bad width {w:?}"))?;
    let h: u32 = h.parse().map_err(|_| format!("bad height {h:?}"))?;
    check_geometry(w, h).map_err(|e| e.to_string())?;
    Ok((w, h))
}

/// Checks a screen size.
pub fn check_geometry(width: u32, height: u32) -> Result<(), crate::error::AgentError> {
    if (320..=8192).contains(&width) && (200..=8192).contains(&height) {
        Ok(())
    } else {
        Err(crate::error::AgentError::Geometry { width, height })
    }
}
