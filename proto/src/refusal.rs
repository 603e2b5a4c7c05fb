//! The refusal contract between blade-agent and the dispatcher: every way the agent can turn
//! down a desktop has a [`RefusalKind`], and every kind says whether the dispatcher should
//! refuse the whole request or try the next blade ([`Scope`]).
//!
//! How a kind travels:
//! - **gRPC** (`BladeAgent`): the status code of [`RefusalKind::code`] plus a structured detail,
//!   a `google.rpc.ErrorInfo` with domain [`DOMAIN`] and reason [`RefusalKind::reason`]
//!   (`UNKNOWN_ACCOUNT`, `NO_FREE_DISPLAY`, …) in the standard `grpc-status-details-bin`
//!   trailer. [`status`] builds one, [`scope_of_status`] reads one. The message is for people
//!   only: no decision depends on its text.
//! - **SSH** (`blade-agent cloudvnc`, `status`, `stop`): the process exits with
//!   [`RefusalKind::exit_code`] (table below) and prints the message on stderr.
//!
//! | kind | scope | gRPC code | exit code |
//! |---|---|---|---|
//! | invalid request (username, password, geometry break the rules) | request | INVALID_ARGUMENT | 10 |
//! | unknown account | request | NOT_FOUND | 11 |
//! | system account (root, uid out of range) | request | INVALID_ARGUMENT | 12 |
//! | unsafe home (symlinked `~/.vncpasswd`, foreign home, member of group 0) | request | PERMISSION_DENIED | 13 |
//! | account denied by PAM (expired, locked, `pam_access`, limits) | request | PERMISSION_DENIED | 14 |
//! | no free display | blade | RESOURCE_EXHAUSTED | 20 |
//! | start timeout (Xvnc never accepted connections) | blade | DEADLINE_EXCEEDED | 21 |
//! | start failed (Xvnc or vncserver exited) | blade | INTERNAL | 22 |
//! | agent failed (helper not runnable, OS error) | blade | INTERNAL | 23 |
//!
//! Compatibility: an agent from before this contract sends no detail; then the status code
//! decides, as it always did — INVALID_ARGUMENT, NOT_FOUND and PERMISSION_DENIED refuse the
//! request, every other code (UNAUTHENTICATED, UNAVAILABLE, timeouts…) fails only the blade.
//! A detail from another domain or with a reason this build does not know falls back the same
//! way. Over SSH an exit code outside the table (1 from an old agent, 127 for a missing
//! program, 255 from ssh itself) fails only the blade: another blade may still start the
//! desktop, and if none can the caller hears UNAVAILABLE with every blade's message.
use std::collections::HashMap;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The `ErrorInfo.domain` of every refusal: the package of the contract.
pub const DOMAIN: &str = "vncdispatch.v1";

/// Whom a refusal concerns, which decides what the dispatcher does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// The request is wrong on every blade (unknown account, unsafe home…): refuse it with the
    /// agent's status, do not try another blade.
    Request,
    /// This blade could not do it (out of displays, Xvnc failed, down): try the next blade.
    Blade,
}

/// Every way blade-agent turns down a start, stop or lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalKind {
    /// A field breaks the shared rules (username, password) or the geometry is out of range.
    InvalidRequest,
    /// No account of that name on the blade.
    UnknownAccount,
    /// root, a system account, or a uid outside the blade's allowed range.
    SystemAccount,
    /// The account's home or VNC files are set up so that writing them could go astray, or
    /// the account is in group 0.
    UnsafeHome,
    /// PAM's account or session stage refused the user (expired, locked, not allowed).
    AccountDenied,
    /// Every display in the blade's range is taken.
    NoFreeDisplay,
    /// Xvnc started but never accepted connections in time.
    StartTimeout,
    /// Xvnc or the vncserver wrapper exited before it was ready.
    StartFailed,
    /// The agent itself failed: its session helper could not run, or an OS call failed.
    AgentFailed,
}

impl RefusalKind {
    /// Every kind, for tables and for tests that must cover each one.
    pub const ALL: [RefusalKind; 9] = [
        RefusalKind::InvalidRequest,
        RefusalKind::UnknownAccount,
        RefusalKind::SystemAccount,
        RefusalKind::UnsafeHome,
        RefusalKind::AccountDenied,
        RefusalKind::NoFreeDisplay,
        RefusalKind::StartTimeout,
        RefusalKind::StartFailed,
        RefusalKind::AgentFailed,
    ];

    /// Whether the request or only this blade is refused.
    pub fn scope(self) -> Scope {
        match self {
            RefusalKind::InvalidRequest
            | RefusalKind::UnknownAccount
            | RefusalKind::SystemAccount
            | RefusalKind::UnsafeHome
            | RefusalKind::AccountDenied => Scope::Request,
            RefusalKind::NoFreeDisplay
            | RefusalKind::StartTimeout
            | RefusalKind::StartFailed
            | RefusalKind::AgentFailed => Scope::Blade,
        }
    }

    /// The gRPC status code the agent answers with (what callers have always seen).
    pub fn code(self) -> Code {
        match self {
            // root and system accounts are not valid desktop users: a bad argument, not a
            // question of the caller's rights.
            RefusalKind::InvalidRequest | RefusalKind::SystemAccount => Code::InvalidArgument,
            RefusalKind::UnknownAccount => Code::NotFound,
            RefusalKind::UnsafeHome | RefusalKind::AccountDenied => Code::PermissionDenied,
            RefusalKind::NoFreeDisplay => Code::ResourceExhausted,
            RefusalKind::StartTimeout => Code::DeadlineExceeded,
            RefusalKind::StartFailed | RefusalKind::AgentFailed => Code::Internal,
        }
    }

    /// The `ErrorInfo.reason`: UPPER_SNAKE_CASE, stable, part of the wire contract.
    pub fn reason(self) -> &'static str {
        match self {
            RefusalKind::InvalidRequest => "INVALID_REQUEST",
            RefusalKind::UnknownAccount => "UNKNOWN_ACCOUNT",
            RefusalKind::SystemAccount => "SYSTEM_ACCOUNT",
            RefusalKind::UnsafeHome => "UNSAFE_HOME",
            RefusalKind::AccountDenied => "ACCOUNT_DENIED",
            RefusalKind::NoFreeDisplay => "NO_FREE_DISPLAY",
            RefusalKind::StartTimeout => "START_TIMEOUT",
            RefusalKind::StartFailed => "START_FAILED",
            RefusalKind::AgentFailed => "AGENT_FAILED",
        }
    }

    /// The exit code of `blade-agent cloudvnc|status|stop`: 10-19 refuse the request, 20-29
    /// fail the blade (0 is success, 1 any other failure, 2 a usage error).
    pub fn exit_code(self) -> u8 {
        match self {
            RefusalKind::InvalidRequest => 10,
            RefusalKind::UnknownAccount => 11,
            RefusalKind::SystemAccount => 12,
            RefusalKind::UnsafeHome => 13,
            RefusalKind::AccountDenied => 14,
            RefusalKind::NoFreeDisplay => 20,
            RefusalKind::StartTimeout => 21,
            RefusalKind::StartFailed => 22,
            RefusalKind::AgentFailed => 23,
        }
    }

    /// The kind an `ErrorInfo.reason` names, if this build knows it.
    pub fn from_reason(reason: &str) -> Option<RefusalKind> {
        Self::ALL.into_iter().find(|k| k.reason() == reason)
    }

    /// The kind an exit code of `blade-agent cloudvnc|status|stop` stands for, if any.
    pub fn from_exit_code(code: u32) -> Option<RefusalKind> {
        Self::ALL
            .into_iter()
            .find(|k| u32::from(k.exit_code()) == code)
    }

    /// The kind a status carries in its `ErrorInfo` detail; `None` when it has no detail of
    /// ours (an old agent, a transport error, the secret check) or names an unknown reason.
    pub fn from_status(status: &Status) -> Option<RefusalKind> {
        let info = status.get_details_error_info()?;
        if info.domain != DOMAIN {
            return None;
        }
        Self::from_reason(&info.reason)
    }
}

/// A status for `kind`: its code, `message` for people, and the `ErrorInfo` detail.
pub fn status(kind: RefusalKind, message: impl Into<String>) -> Status {
    let details = ErrorDetails::with_error_info(kind.reason(), DOMAIN, HashMap::new());
    Status::with_error_details(kind.code(), message, details)
}

/// Whom a status from an agent concerns: the detail's kind when there is one, otherwise the
/// code alone (see the module doc on old agents).
pub fn scope_of_status(status: &Status) -> Scope {
    match RefusalKind::from_status(status) {
        Some(kind) => kind.scope(),
        None => scope_of_code(status.code()),
    }
}

/// The fallback for a status without a detail: the codes agents have always used for a bad
/// request refuse it; anything else is this blade's failure.
pub fn scope_of_code(code: Code) -> Scope {
    match code {
        Code::InvalidArgument | Code::NotFound | Code::PermissionDenied => Scope::Request,
        _ => Scope::Blade,
    }
}

/// Whom a failed `blade-agent cloudvnc|status|stop` run concerns, from its exit code alone;
/// also the kind, when the code is one of the table's.
pub fn scope_of_exit(code: u32) -> (Scope, Option<RefusalKind>) {
    match RefusalKind::from_exit_code(code) {
        Some(kind) => (kind.scope(), Some(kind)),
        None => (Scope::Blade, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn every_kind_round_trips_through_a_status_and_an_exit_code() {
        for kind in RefusalKind::ALL {
            let s = status(kind, format!("message of {kind:?}"));
            assert_eq!(s.code(), kind.code(), "{kind:?}");
            assert_eq!(s.message(), format!("message of {kind:?}"));
            assert_eq!(RefusalKind::from_status(&s), Some(kind));
            assert_eq!(scope_of_status(&s), kind.scope());
            // Through the wire encoding: the trailers tonic would send, parsed back.
            let wire: tonic::codegen::http::Response<()> = s.clone().into_http();
            let back = Status::from_header_map(wire.headers()).expect("a status in the headers");
            assert_eq!(RefusalKind::from_status(&back), Some(kind), "{kind:?}");
            let exit = u32::from(kind.exit_code());
            assert_eq!(RefusalKind::from_exit_code(exit), Some(kind));
            assert_eq!(scope_of_exit(exit), (kind.scope(), Some(kind)));
        }
    }

    #[test]
    fn reasons_and_exit_codes_are_distinct_and_exit_codes_follow_the_scope() {
        let reasons: HashSet<_> = RefusalKind::ALL.iter().map(|k| k.reason()).collect();
        let exits: HashSet<_> = RefusalKind::ALL.iter().map(|k| k.exit_code()).collect();
        assert_eq!(reasons.len(), RefusalKind::ALL.len());
        assert_eq!(exits.len(), RefusalKind::ALL.len());
        for kind in RefusalKind::ALL {
            let range = match kind.scope() {
                Scope::Request => 10..=19,
                Scope::Blade => 20..=29,
            };
            assert!(range.contains(&kind.exit_code()), "{kind:?}");
            assert!(
                kind.reason()
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b == b'_'),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn both_scopes_have_kinds() {
        let scopes: HashSet<_> = RefusalKind::ALL.iter().map(|k| k.scope()).collect();
        assert_eq!(scopes.len(), 2);
    }

    #[test]
    fn a_status_without_our_detail_is_judged_by_its_code() {
        for (code, scope) in [
            (Code::InvalidArgument, Scope::Request),
            (Code::NotFound, Scope::Request),
            (Code::PermissionDenied, Scope::Request),
            (Code::ResourceExhausted, Scope::Blade),
            (Code::DeadlineExceeded, Scope::Blade),
            (Code::Internal, Scope::Blade),
            (Code::Unauthenticated, Scope::Blade),
            (Code::Unavailable, Scope::Blade),
        ] {
            let plain = Status::new(code, "an old agent");
            assert_eq!(RefusalKind::from_status(&plain), None);
            assert_eq!(scope_of_status(&plain), scope, "{code:?}");
        }
    }

    #[test]
    fn the_detail_decides_over_the_code_and_foreign_or_unknown_details_fall_back() {
        // A kind saying "blade" under a code that alone would refuse: the kind wins.
        let details = ErrorDetails::with_error_info("NO_FREE_DISPLAY", DOMAIN, HashMap::new());
        let s = Status::with_error_details(Code::InvalidArgument, "x", details);
        assert_eq!(scope_of_status(&s), Scope::Blade);
        // Another service's ErrorInfo, or a reason from a newer agent: the code decides.
        let details =
            ErrorDetails::with_error_info("UNKNOWN_ACCOUNT", "example.com", HashMap::new());
        let s = Status::with_error_details(Code::Internal, "x", details);
        assert_eq!(RefusalKind::from_status(&s), None);
        assert_eq!(scope_of_status(&s), Scope::Blade);
        let details = ErrorDetails::with_error_info("SOMETHING_NEW", DOMAIN, HashMap::new());
        let s = Status::with_error_details(Code::NotFound, "x", details);
        assert_eq!(RefusalKind::from_status(&s), None);
        assert_eq!(scope_of_status(&s), Scope::Request);
    }

    #[test]
    fn exit_codes_outside_the_table_fail_only_the_blade() {
        for code in [1, 2, 9, 15, 19, 24, 64, 126, 127, 255] {
            assert_eq!(scope_of_exit(code), (Scope::Blade, None), "{code}");
        }
    }
}
