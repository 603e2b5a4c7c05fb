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
}

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
    /// Records a reconnect: new remote IP and expiry, if the stored session still has
    /// `token_hash`. Returns the updated record.
    async fn touch(
        &self,
        username: &str,
        token_hash: &str,
        remote_ip: &str,
        expires_at_ms: i64,
    ) -> StoreResult<Option<SessionRecord>>;
    /// Deletes the user's ready session (only if its token hash is `token_hash`, when given).
    async fn delete_session(
        &self,
        username: &str,
        token_hash: Option<&str>,
    ) -> StoreResult<Option<SessionRecord>>;
    /// Every ready session, by username.
    async fn list_sessions(&self) -> StoreResult<Vec<SessionRecord>>;
    /// Deletes ready sessions that expired before `now_ms`, and claims that did; returns the
    /// deleted ready sessions.
    async fn sweep_expired(&self, now_ms: i64) -> StoreResult<Vec<SessionRecord>>;

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
