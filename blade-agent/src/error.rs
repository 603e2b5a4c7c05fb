//! The agent's errors, and the one place they become gRPC statuses and CLI messages.
use std::time::Duration;
use tonic::{Code, Status};
use vncdispatch_proto::rules::FieldError;

/// Everything that can go wrong starting, finding or stopping a desktop.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A request field breaks the shared rules.
    #[error(transparent)]
    Field(#[from] FieldError),
    /// A geometry outside what Xvnc and browsers handle.
    #[error("invalid geometry {width}x{height}: width must be 320-8192 and height 200-8192")]
    Geometry {
        /// Requested width.
        width: u32,
        /// Requested height.
        height: u32,
    },
    /// No account of that name on this blade.
    #[error("no account named {0:?} on this blade")]
    UnknownUser(String),
    /// root, a system account, or an account below the configured minimum uid.
    #[error(
        "account {user:?} has uid {uid}, outside {min_uid}..={max_uid} allowed for desktops (root and system accounts are refused)"
    )]
    SystemAccount {
        /// The account.
        user: String,
        /// Its uid.
        uid: u32,
        /// The configured minimum.
        min_uid: u32,
        /// The configured maximum.
        max_uid: u32,
    },
    /// The user's home or VNC files are set up so that writing them could go astray.
    #[error("refusing to set up a desktop for {user:?}: {why}")]
    UnsafeHome {
        /// The account.
        user: String,
        /// What the helper found (symlinked ~/.vncpasswd, home owned by someone else, ...).
        why: String,
    },
    /// Every display in the configured range is taken.
    #[error("no free display in :{first}..:{last} on this blade")]
    NoFreeDisplay {
        /// First display of the range.
        first: u32,
        /// Last display of the range.
        last: u32,
    },
    /// Xvnc started but never accepted connections on its port.
    #[error(
        "Xvnc for {user:?} on :{display} did not accept connections within {after:?}; it was stopped (see ~{user}/.vnc/*:{display}.log)"
    )]
    StartTimeout {
        /// The account.
        user: String,
        /// The display tried.
        display: u32,
        /// How long the agent waited.
        after: Duration,
    },
    /// Xvnc (or the vncserver wrapper) exited or failed before it was ready.
    #[error("VNC server for {user:?} on :{display} failed to start: {detail}")]
    StartFailed {
        /// The account.
        user: String,
        /// The display tried.
        display: u32,
        /// What the helper reported.
        detail: String,
    },
    /// The per-user helper process could not be run or answered nonsense.
    #[error("session helper for {user:?}: {detail}")]
    Helper {
        /// The account.
        user: String,
        /// What went wrong.
        detail: String,
    },
    /// An operating-system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What the agent was doing.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl AgentError {
    /// Wraps an I/O error with what the agent was doing.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        AgentError::Io {
            context: context.into(),
            source,
        }
    }

    /// The gRPC code a caller can act on.
    pub fn code(&self) -> Code {
        match self {
            // root and system accounts are not valid desktop users: a bad argument, not a
            // question of the caller's rights.
            AgentError::Field(_)
            | AgentError::Geometry { .. }
            | AgentError::SystemAccount { .. } => Code::InvalidArgument,
            AgentError::UnknownUser(_) => Code::NotFound,
            AgentError::UnsafeHome { .. } => Code::PermissionDenied,
            AgentError::NoFreeDisplay { .. } => Code::ResourceExhausted,
            AgentError::StartTimeout { .. } => Code::DeadlineExceeded,
            AgentError::StartFailed { .. } | AgentError::Helper { .. } | AgentError::Io { .. } => {
                Code::Internal
            }
        }
    }
}

impl From<AgentError> for Status {
    fn from(e: AgentError) -> Status {
        Status::new(e.code(), e.to_string())
    }
}
