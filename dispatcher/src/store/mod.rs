//! Where sessions and blades live: the [`Store`] trait and its two implementations.
//!
//! - [`embedded`]: one redb file, the default for a single dispatcher; crash-safe (redb
//!   commits are atomic and, by default, durable when they return).
//! - [`mongo`]: MongoDB (or FerretDB), shared by several dispatchers, in the original
//!   deployment's schema (database `vncDispatch`, collections `config` and `tokenizer`).
//!
//! Both pass one conformance suite (`conformance.rs`, built only with the `conformance`
//! feature: it is test support, not part of the shipped library), which the integration
//! tests (`tests/tests/store_conformance.rs`) run against each.
//!
//! A session's life (the policy is [`crate::dispatch`]'s): its token resolves until
//! `expires_at` (set by Dispatch) or while a ws-proxy holds a lease on it (`lease_until`,
//! renewed while a client is relayed); the sweeper stops the desktop at `stops_at`, which the
//! dispatcher recomputes on every write. Every end is kept in a bounded history with its
//! [`EndReason`].
//!
//! One session per user across processes rests on [`Store::claim`]: the first caller stores a
//! placeholder holding a claim with a deadline; others see it and wait; the claimant replaces
//! it with the session ([`Store::complete`]) or removes it ([`Store::abandon`]). A claimant that
//! died leaves a claim that expires and is taken over.
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod embedded;
pub mod mongo;
pub mod timed;

use serde::{Deserialize, Serialize};

/// A store failure. The message says what was being done; `Unavailable` is for a store that
/// cannot be reached at all (health then reports NOT_SERVING).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or refused the operation.
    #[error("session store unavailable: {0}")]
    Unavailable(String),
    /// Stored data could not be read back.
    #[error("corrupt record in the session store: {0}")]
    Corrupt(String),
    /// A claim was taken over by another dispatcher (this one took too long).
    #[error("the start of {0:?}'s session was taken over by another dispatcher")]
    ClaimLost(String),
}

/// Result of store operations.
pub type StoreResult<T> = Result<T, StoreError>;

/// A claim on a user's session slot while a desktop is being started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// Random id of the claimant's attempt.
    pub id: String,
    /// Unix milliseconds after which others may take the slot over.
    pub expires_at_ms: i64,
}

/// A stored secret: sealed by the dispatcher (new rows) or plain (rows written by the
/// original service, which stored tokens and passwords as they are).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoredSecret {
    /// Encrypted with the dispatcher's seal key (see `crate::seal`).
    Sealed(String),
    /// As the original service wrote it.
    Plain(String),
}

impl Default for StoredSecret {
    fn default() -> Self {
        StoredSecret::Plain(String::new())
    }
}

/// A user's session as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SessionRecord {
    /// The account; one record per user.
    pub username: String,
    /// Set while the desktop is being started: the record is a placeholder.
    pub claim: Option<Claim>,
    /// Hex SHA-256 of the token: what lookups use. Empty for legacy rows, looked up by token.
    pub token_hash: String,
    /// The token, so a reconnecting user gets the same one back.
    pub token: StoredSecret,
    /// The VNC password.
    pub password: StoredSecret,
    /// Blade name.
    pub blade: String,
    /// Host ws-proxy connects to.
    pub host: String,
    /// X display on the blade.
    pub display: u32,
    /// RFB port on the blade.
    pub port: u32,
    /// Xvnc pid on the blade.
    pub vnc_pid: u32,
    /// Remote IP of the latest Dispatch.
    pub remote_ip: String,
    /// Unix milliseconds when the session was created.
    pub created_at_ms: i64,
    /// Unix milliseconds when the token stops resolving; None for legacy rows until touched.
    pub expires_at_ms: Option<i64>,
    /// SHA-256 (hex) of the desktop's VeNCrypt certificate, for ws-proxy to pin; empty when
    /// the desktop offers no VeNCrypt (or for rows written before it).
    #[serde(default)]
    pub cert_sha256: String,
    /// Unix milliseconds until which a ws-proxy holds a client on the session (renewed while
    /// it relays); None if no client was ever relayed.
    #[serde(default)]
    pub lease_until_ms: Option<i64>,
    /// Unix milliseconds when the sweeper stops the desktop unless a Dispatch or a client's
    /// lease moves it; None for rows written before it (then `expires_at_ms` is used).
    #[serde(default)]
    pub stops_at_ms: Option<i64>,
    /// The desktop's view-only VNC password (the second entry of its rfbauth file), which a
    /// view-only share logs in with; None for desktops started before sharing (they cannot be
    /// shared view-only).
    #[serde(default)]
    pub view_password: Option<StoredSecret>,
}

impl SessionRecord {
    /// True for a finished session (not a claim placeholder).
    pub fn is_ready(&self) -> bool {
        self.claim.is_none()
    }

    /// True if the token has expired at `now_ms`.
    pub fn is_expired(&self, now_ms: i64) -> bool {
        self.expires_at_ms.is_some_and(|e| e <= now_ms)
    }

    /// True while a ws-proxy holds a client on the session.
    pub fn is_attached(&self, now_ms: i64) -> bool {
        self.lease_until_ms.is_some_and(|l| l > now_ms)
    }

    /// True while the token resolves: before its expiry, or while a client is attached (so a
    /// browser reconnecting to a desktop in use gets back in after the token's TTL).
    pub fn resolves(&self, now_ms: i64) -> bool {
        !self.is_expired(now_ms) || self.is_attached(now_ms)
    }

    /// When the sweeper stops the desktop (None: never, a legacy row not yet dated).
    pub fn stop_deadline(&self) -> Option<i64> {
        self.stops_at_ms.or(self.expires_at_ms)
    }

    /// True once the stop deadline has passed.
    pub fn is_due(&self, now_ms: i64) -> bool {
        self.stop_deadline().is_some_and(|s| s <= now_ms)
    }
}

/// Why a session ended: every end has one, in the history, the log and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// The portal ended it (EndSession by a portal identity).
    Portal,
    /// An operator ended it (EndSession by an admin identity: the CLI).
    Operator,
    /// Its token expired and no client was ever relayed.
    TokenExpired,
    /// No client for the idle grace period after the last one left.
    NoClient,
    /// It reached the configured maximum age.
    MaxAge,
    /// Its blade was removed.
    BladeRemoved,
    /// Its Xvnc was found gone (killed, crashed, the blade rebooted).
    XvncDied,
    /// No blade could start it.
    StartFailed,
}

impl EndReason {
    /// Every reason, for metrics and tests.
    pub const ALL: [EndReason; 8] = [
        EndReason::Portal,
        EndReason::Operator,
        EndReason::TokenExpired,
        EndReason::NoClient,
        EndReason::MaxAge,
        EndReason::BladeRemoved,
        EndReason::XvncDied,
        EndReason::StartFailed,
    ];

    /// The name used in logs, metrics, the store and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Portal => "portal",
            EndReason::Operator => "operator",
            EndReason::TokenExpired => "token_expired",
            EndReason::NoClient => "no_client",
            EndReason::MaxAge => "max_age",
            EndReason::BladeRemoved => "blade_removed",
            EndReason::XvncDied => "xvnc_died",
            EndReason::StartFailed => "start_failed",
        }
    }

    /// The reason a name stands for.
    pub fn from_name(name: &str) -> Option<EndReason> {
        Self::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

/// A session that ended, as the history keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndedSession {
    /// The account.
    pub username: String,
    /// The blade (empty when no blade started it).
    pub blade: String,
    /// X display on the blade.
    pub display: u32,
    /// Xvnc pid on the blade.
    pub vnc_pid: u32,
    /// Unix milliseconds when it started (0 when it never did).
    pub created_at_ms: i64,
    /// Unix milliseconds when it ended.
    pub ended_at_ms: i64,
    /// Why.
    pub reason: EndReason,
    /// Details for people (which blades failed, what the agent said).
    pub detail: String,
}

impl EndedSession {
    /// The end of `rec` at `now_ms`, for `reason`.
    pub fn of(rec: &SessionRecord, now_ms: i64, reason: EndReason, detail: String) -> Self {
        EndedSession {
            username: rec.username.clone(),
            blade: rec.blade.clone(),
            display: rec.display,
            vnc_pid: rec.vnc_pid,
            created_at_ms: rec.created_at_ms,
            ended_at_ms: now_ms,
            reason,
            detail,
        }
    }
}

/// A grant to watch (or, if not `view_only`, to control) one user's desktop, made by
/// ShareSession. Stored by the SHA-256 of its token, never the token; it ends with the
/// session it was made for (`session_token_hash`), at `expires_at_ms`, or when revoked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareRecord {
    /// Public handle (16 hex digits) for ListShares and RevokeShare; not a credential.
    pub id: String,
    /// Hex SHA-256 of the share's token: what ResolveToken looks it up by. Unique.
    pub token_hash: String,
    /// The user whose desktop is shared.
    pub owner: String,
    /// The `token_hash` of the owner's session it was made for: a later session of the same
    /// user is not shared by it.
    pub session_token_hash: String,
    /// Viewing only (Xvnc's view-only password), or full control.
    pub view_only: bool,
    /// Who made it: the caller's identity as the audit trail names it.
    pub created_by: String,
    /// A note from whoever made it ("helpdesk ticket 4711"), for listings and the audit.
    pub note: String,
    /// Unix milliseconds when it was made.
    pub created_at_ms: i64,
    /// Unix milliseconds when it stops resolving (an open viewer is closed at its next
    /// re-check).
    pub expires_at_ms: i64,
}

/// One entry of the audit trail: who did what to whose desktop, when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Unix milliseconds when it happened.
    pub at_ms: i64,
    /// What happened: `dispatch`, `connect`, `disconnect`, `share`, `revoke_share`,
    /// `session_end`, `blade_add`, `blade_drain`, `blade_remove`, `end_session`.
    pub kind: String,
    /// Who did it: `<role>:<certificate name>`, `plaintext` (a loopback server without
    /// TLS), or `dispatcher` for what the dispatcher itself did (a sweep).
    pub actor: String,
    /// The user whose desktop it concerns (empty for blade actions).
    pub username: String,
    /// The rest, by name (blade, remote_ip, reused, share id, reason, bytes, ...); ordered so
    /// that the JSON lines are stable.
    pub fields: std::collections::BTreeMap<String, String>,
}

/// Which audit events to read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    /// Only this user's (events whose `username` is this).
    pub username: Option<String>,
    /// Only events at or after this time (Unix milliseconds).
    pub since_ms: Option<i64>,
    /// At most this many: the newest ones, returned oldest first.
    pub limit: usize,
}

/// How many ended sessions the history keeps (the oldest go first).
pub const HISTORY_MAX: usize = 10_000;

/// What [`Store::claim`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The slot is ours: start the desktop, then `complete` or `abandon`.
    Won,
    /// The user has a session (it may be expired or dead; the caller checks).
    Existing(Box<SessionRecord>),
    /// Someone else is starting it; retry shortly.
    Pending,
}

/// How the dispatcher reaches a blade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Method {
    /// gRPC to blade-agent.
    #[default]
    Agent,
    /// SSH running `blade-agent cloudvnc`.
    Ssh,
}

/// A registered blade.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BladeRecord {
    /// Unique name (the original's `blade_list` entries).
    pub name: String,
    /// Host or address to connect to.
    pub host: String,
    /// Agent gRPC port or SSH port.
    pub port: u16,
    /// How to start sessions there.
    pub method: Method,
    /// No new sessions while true.
    pub draining: bool,
    /// The pool it serves ([`vncdispatch_proto::rules::DEFAULT_POOL`] for rows stored before
    /// pools).
    #[serde(default = "default_pool")]
    pub pool: String,
    /// Most desktops placed there; 0: no cap but the agent's displays.
    #[serde(default)]
    pub max_sessions: u32,
}

fn default_pool() -> String {
    vncdispatch_proto::rules::DEFAULT_POOL.to_owned()
}

/// Storage for sessions and blades. Implementations must make each method atomic on its own;
/// callers never read-modify-write across two calls.
#[async_trait::async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Checks the store answers.
    async fn ping(&self) -> StoreResult<()>;

    /// The user's record (ready or placeholder), if any.
    async fn get_session(&self, username: &str) -> StoreResult<Option<SessionRecord>>;
    /// Claims the user's slot unless a session or a live claim is there (see module docs).
    async fn claim(&self, username: &str, claim: &Claim, now_ms: i64) -> StoreResult<ClaimOutcome>;
    /// Replaces our claim placeholder with the finished session.
    async fn complete(&self, record: &SessionRecord, claim_id: &str) -> StoreResult<()>;
    /// Removes our claim placeholder after a failed start.
    async fn abandon(&self, username: &str, claim_id: &str) -> StoreResult<()>;
    /// A ready session by token: by `token_hash`, or for legacy rows by the plain token.
    async fn find_by_token(
        &self,
        token_hash: &str,
        token: &str,
    ) -> StoreResult<Option<SessionRecord>>;
    /// Records a reconnect: new remote IP and expiry, and the stop deadline if later than
    /// the stored one, if the stored session still has `token_hash`. Returns the updated record.
    async fn touch(
        &self,
        username: &str,
        token_hash: &str,
        remote_ip: &str,
        expires_at_ms: i64,
        stops_at_ms: i64,
    ) -> StoreResult<Option<SessionRecord>>;
    /// Renews a client's lease: moves `lease_until` and the stop deadline later (never
    /// earlier: renewals race), if the stored session still has `token_hash`. Returns the
    /// updated record.
    async fn renew_lease(
        &self,
        username: &str,
        token_hash: &str,
        lease_until_ms: i64,
        stops_at_ms: i64,
    ) -> StoreResult<Option<SessionRecord>>;
    /// Gives ready rows without an expiry (written by the original service) one, and a stop
    /// deadline; returns how many.
    async fn date_legacy(&self, expires_at_ms: i64) -> StoreResult<u64>;
    /// Moves our claim's deadline while its launch runs; false if the claim is not ours.
    async fn renew_claim(
        &self,
        username: &str,
        claim_id: &str,
        expires_at_ms: i64,
    ) -> StoreResult<bool>;
    /// Deletes the user's ready session (only if its token hash is `token_hash`, when given).
    async fn delete_session(
        &self,
        username: &str,
        token_hash: Option<&str>,
    ) -> StoreResult<Option<SessionRecord>>;
    /// Every ready session, by username.
    async fn list_sessions(&self) -> StoreResult<Vec<SessionRecord>>;
    /// Deletes ready sessions whose stop deadline ([`SessionRecord::stop_deadline`]) is not
    /// after `now_ms`, and claims that expired; returns the deleted ready sessions.
    async fn sweep_expired(&self, now_ms: i64) -> StoreResult<Vec<SessionRecord>>;
    /// Adds an ended session to the history, dropping the oldest beyond [`HISTORY_MAX`].
    async fn record_end(&self, ended: &EndedSession) -> StoreResult<()>;
    /// The history, newest first: everyone's, or one user's; at most `limit` entries.
    async fn history(&self, username: Option<&str>, limit: usize)
    -> StoreResult<Vec<EndedSession>>;

    /// Stores a new share. Its `id` and `token_hash` are fresh random values; a clash is
    /// reported as `Unavailable` (it never happens by chance).
    async fn put_share(&self, share: &ShareRecord) -> StoreResult<()>;
    /// The share with this token hash, expired or not (the caller checks).
    async fn find_share(&self, token_hash: &str) -> StoreResult<Option<ShareRecord>>;
    /// Shares, oldest first: everyone's, or one owner's.
    async fn list_shares(&self, owner: Option<&str>) -> StoreResult<Vec<ShareRecord>>;
    /// Deletes the share with this id; returns it, or None if there was none.
    async fn remove_share(&self, id: &str) -> StoreResult<Option<ShareRecord>>;
    /// Deletes the shares of `owner` made for the session with `session_token_hash` (that
    /// session ended); returns them.
    async fn remove_shares_of(
        &self,
        owner: &str,
        session_token_hash: &str,
    ) -> StoreResult<Vec<ShareRecord>>;
    /// Deletes shares whose `expires_at_ms` is not after `now_ms`; returns them.
    async fn prune_shares(&self, now_ms: i64) -> StoreResult<Vec<ShareRecord>>;
    /// Appends audit events (one write for the batch; an empty batch writes nothing).
    async fn record_audit(&self, events: &[AuditEvent]) -> StoreResult<()>;
    /// Audit events matching `query`: the newest `limit` of them, oldest first (none for a
    /// limit of 0: callers clamp it). Events of the same millisecond keep the order they were
    /// recorded in.
    async fn audit(&self, query: &AuditQuery) -> StoreResult<Vec<AuditEvent>>;
    /// Deletes audit events older than `before_ms` (those at it stay); returns how many.
    async fn prune_audit(&self, before_ms: i64) -> StoreResult<u64>;

    /// Registers a blade, or updates the one of that name.
    async fn put_blade(&self, blade: &BladeRecord) -> StoreResult<()>;
    /// Every blade, in round-robin order (order of registration).
    async fn list_blades(&self) -> StoreResult<Vec<BladeRecord>>;
    /// Sets a blade's draining flag; None if no such blade.
    async fn set_draining(&self, name: &str, draining: bool) -> StoreResult<Option<BladeRecord>>;
    /// Forgets a blade; false if there was none.
    async fn remove_blade(&self, name: &str) -> StoreResult<bool>;
    /// Atomically advances the round-robin counter (the original's `last_blade`) and returns
    /// its new value.
    async fn next_round_robin(&self) -> StoreResult<u64>;
}
