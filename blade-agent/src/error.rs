//! The agent's errors, and the one place they become refusals of the shared contract
//! ([`vncdispatch_proto::refusal`]): gRPC statuses with their detail, and `cloudvnc` exit
//! codes.
use std::time::Duration;
use tonic::{Code, Status};
use vncdispatch_proto::refusal::{self, RefusalKind};
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
    /// PAM's account or session stage refused the user (expired, locked, not allowed here).
    #[error("no desktop for {user:?}: {message}")]
    AccountDenied {
        /// The account.
        user: String,
        /// What PAM said.
        message: String,
    },
    /// Every display in the configured range is taken.
    #[error("no free display in :{first}..:{last} on this blade{detail}")]
    NoFreeDisplay {
        /// First display of the range.
        first: u32,
        /// Last display of the range.
        last: u32,
        /// What else holds displays, when not only desktops (empty, or `" (…)"`).
        detail: String,
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

    /// Which refusal of the shared contract this is: it decides the gRPC code and detail,
    /// the `cloudvnc` exit code and whether the dispatcher tries another blade.
    pub fn kind(&self) -> RefusalKind {
        match self {
            AgentError::Field(_) | AgentError::Geometry { .. } => RefusalKind::InvalidRequest,
            AgentError::UnknownUser(_) => RefusalKind::UnknownAccount,
            AgentError::SystemAccount { .. } => RefusalKind::SystemAccount,
            AgentError::UnsafeHome { .. } => RefusalKind::UnsafeHome,
            AgentError::AccountDenied { .. } => RefusalKind::AccountDenied,
            AgentError::NoFreeDisplay { .. } => RefusalKind::NoFreeDisplay,
            AgentError::StartTimeout { .. } => RefusalKind::StartTimeout,
            AgentError::StartFailed { .. } => RefusalKind::StartFailed,
            AgentError::Helper { .. } | AgentError::Io { .. } => RefusalKind::AgentFailed,
        }
    }

    /// The gRPC code a caller can act on.
    pub fn code(&self) -> Code {
        self.kind().code()
    }
}

impl From<AgentError> for Status {
    fn from(e: AgentError) -> Status {
        refusal::status(e.kind(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vncdispatch_proto::refusal::Scope;

    /// One error of each variant, with the kind and code callers have always seen.
    fn samples() -> Vec<(AgentError, RefusalKind, Code)> {
        let user = || "alice".to_owned();
        vec![
            (
                AgentError::Field(vncdispatch_proto::rules::validate_username("a;b").unwrap_err()),
                RefusalKind::InvalidRequest,
                Code::InvalidArgument,
            ),
            (
                AgentError::Geometry {
                    width: 1,
                    height: 1,
                },
                RefusalKind::InvalidRequest,
                Code::InvalidArgument,
            ),
            (
                AgentError::UnknownUser(user()),
                RefusalKind::UnknownAccount,
                Code::NotFound,
            ),
            (
                AgentError::SystemAccount {
                    user: user(),
                    uid: 1,
                    min_uid: 1000,
                    max_uid: 60000,
                },
                RefusalKind::SystemAccount,
                Code::InvalidArgument,
            ),
            (
                AgentError::UnsafeHome {
                    user: user(),
                    why: "~/.vncpasswd is a symlink".into(),
                },
                RefusalKind::UnsafeHome,
                Code::PermissionDenied,
            ),
            (
                AgentError::AccountDenied {
                    user: user(),
                    message: "PAM account: Your account has expired".into(),
                },
                RefusalKind::AccountDenied,
                Code::PermissionDenied,
            ),
            (
                AgentError::NoFreeDisplay {
                    first: 1,
                    last: 2,
                    detail: String::new(),
                },
                RefusalKind::NoFreeDisplay,
                Code::ResourceExhausted,
            ),
            (
                AgentError::StartTimeout {
                    user: user(),
                    display: 1,
                    after: Duration::from_secs(1),
                },
                RefusalKind::StartTimeout,
                Code::DeadlineExceeded,
            ),
            (
                AgentError::StartFailed {
                    user: user(),
                    display: 1,
                    detail: "exited".into(),
                },
                RefusalKind::StartFailed,
                Code::Internal,
            ),
            (
                AgentError::Helper {
                    user: user(),
                    detail: "no answer".into(),
                },
                RefusalKind::AgentFailed,
                Code::Internal,
            ),
            (
                AgentError::io("reading /proc", std::io::Error::other("gone")),
                RefusalKind::AgentFailed,
                Code::Internal,
            ),
        ]
    }

    #[test]
    fn every_error_maps_to_its_kind_code_and_detail() {
        for (err, kind, code) in samples() {
            let message = err.to_string();
            assert_eq!(err.kind(), kind, "{message}");
            assert_eq!(err.code(), code, "{message}");
            let status = Status::from(err);
            assert_eq!(status.code(), code);
            assert_eq!(
                status.message(),
                message,
                "the message callers see is unchanged"
            );
            assert_eq!(RefusalKind::from_status(&status), Some(kind));
        }
    }

    #[test]
    fn every_kind_is_produced_by_some_error() {
        let produced: Vec<RefusalKind> = samples().iter().map(|(e, _, _)| e.kind()).collect();
        for kind in RefusalKind::ALL {
            assert!(produced.contains(&kind), "no AgentError has kind {kind:?}");
        }
        // Account problems refuse the request; display and start problems fail the blade.
        assert_eq!(
            AgentError::UnknownUser(String::new()).kind().scope(),
            Scope::Request
        );
        assert_eq!(
            AgentError::NoFreeDisplay {
                first: 1,
                last: 1,
                detail: String::new(),
            }
            .kind()
            .scope(),
            Scope::Blade
        );
    }
}
