//! The dispatcher's errors, mapped to gRPC statuses in one place.
use crate::launcher::LaunchError;
use crate::store::StoreError;
use tonic::{Code, Status};
use vncdispatch_proto::rules::FieldError;

/// What can go wrong handling a request.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// A field breaks the shared rules.
    #[error(transparent)]
    Field(#[from] FieldError),
    /// Some other argument is wrong (the message says which and why).
    #[error("{0}")]
    BadArgument(String),
    /// No blade can take a session; the message says why.
    #[error("{0}")]
    NoBlade(String),
    /// Every blade that could take a desktop is full: an operator adds blades or displays.
    #[error("{0}")]
    NoCapacity(String),
    /// No blade serves the pool asked for; the message names the pools there are.
    #[error("{0}")]
    EmptyPool(String),
    /// The token is unknown, expired or revoked (deliberately not saying which).
    #[error("unknown or expired token")]
    UnknownToken,
    /// The user has no running desktop (to share).
    #[error("{0:?} has no running desktop; a Dispatch for them starts one")]
    NoSession(String),
    /// The desktop was started before sharing and has no view-only password.
    #[error(
        "{0:?}'s desktop was started before sharing existed and has no view-only password; end it (EndSession) and the next Dispatch starts one that can be shared"
    )]
    NotShareable(String),
    /// The desktop has the most live shares allowed.
    #[error(
        "{0:?}'s desktop already has {max} live shares; revoke some (ListShares, RevokeShare) first",
        max = crate::dispatch::shares::SHARES_PER_SESSION
    )]
    TooManyShares(String),
    /// No such blade.
    #[error("no blade named {0:?}")]
    UnknownBlade(String),
    /// The blade still has sessions.
    #[error(
        "blade {name:?} still has {sessions} session(s); drain it and wait, or remove with --force"
    )]
    BladeBusy {
        /// Blade name.
        name: String,
        /// Sessions on it.
        sessions: usize,
    },
    /// A concurrent request for the same user is starting its desktop and did not finish in time.
    #[error("a desktop for {0:?} is still being started by another request; try again")]
    Busy(String),
    /// The blade refused the request itself (unknown account, system account, unsafe home).
    #[error("{}", .0.message())]
    Refused(tonic::Status),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored secret could not be opened, or randomness failed.
    #[error("{0}")]
    Secret(String),
}

impl From<LaunchError> for DispatchError {
    fn from(e: LaunchError) -> Self {
        match e {
            LaunchError::Refused(s) => DispatchError::Refused(s),
            LaunchError::Blade(msg) => DispatchError::NoBlade(msg),
            LaunchError::Full(msg) => DispatchError::NoCapacity(msg),
        }
    }
}

impl From<DispatchError> for Status {
    fn from(e: DispatchError) -> Status {
        let code = match &e {
            DispatchError::Field(_) | DispatchError::BadArgument(_) => Code::InvalidArgument,
            DispatchError::NoBlade(_) | DispatchError::Busy(_) => Code::Unavailable,
            DispatchError::NoCapacity(_) | DispatchError::TooManyShares(_) => {
                Code::ResourceExhausted
            }
            DispatchError::UnknownToken
            | DispatchError::UnknownBlade(_)
            | DispatchError::NoSession(_) => Code::NotFound,
            DispatchError::BladeBusy { .. }
            | DispatchError::EmptyPool(_)
            | DispatchError::NotShareable(_) => Code::FailedPrecondition,
            DispatchError::Refused(s) => s.code(),
            DispatchError::Store(StoreError::ClaimLost(_)) => Code::Aborted,
            DispatchError::Store(_) => Code::Unavailable,
            DispatchError::Secret(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}
