//! The redb file under the [`EmbeddedStore`]: its tables, opening it, running transactions
//! (writes on tokio's blocking pool, reads in place) and reopening it after an I/O error,
//! which redb needs before it accepts writes again — so a full disk heals once it has room.
//! Also the row helpers the store's methods build on.
use super::EmbeddedStore;
use crate::store::{BladeRecord, SessionRecord, StoreError, StoreResult};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::{Arc, RwLock};

pub(super) const SESSIONS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("sessions");
pub(super) const TOKENS: TableDefinition<'_, &str, &str> = TableDefinition::new("tokens");
pub(super) const BLADES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("blades");
pub(super) const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
/// Ended sessions by a rising sequence number (the oldest first), bounded by HISTORY_MAX.
pub(super) const HISTORY: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("history");
/// Shares by id (`shares.rs`).
pub(super) const SHARES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("shares");
/// Share ids by token hash.
pub(super) const SHARE_TOKENS: TableDefinition<'_, &str, &str> =
    TableDefinition::new("share_tokens");
/// Audit events by (time, sequence number) (`audit.rs`).
pub(super) const AUDIT: TableDefinition<'_, (i64, u64), &[u8]> = TableDefinition::new("audit");
/// The keys of `audit` by user: (username, time, sequence number).
pub(super) const AUDIT_BY_USER: TableDefinition<'_, (&str, i64, u64), ()> =
    TableDefinition::new("audit_by_user");
/// Usernames by when the sweeper must look at them, (deadline, username): a claim's expiry, a
/// session's stop deadline, or [`UNDATED`] for the original's rows without one. A sweep reads
/// what is due instead of every session, and one with nothing due writes nothing.
pub(super) const DUE: TableDefinition<'_, (i64, &str), ()> = TableDefinition::new("due");
/// The deadline key of rows with none (the original's, until `date_legacy` dates them).
pub(super) const UNDATED: i64 = i64::MIN;

/// A blade with its registration order.
#[derive(Serialize, Deserialize)]
pub(super) struct StoredBlade {
    /// Registration order: blades are listed (and rotated through) in it.
    pub(super) seq: u64,
    /// The blade itself.
    pub(super) blade: BladeRecord,
}

pub(super) fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

pub(super) fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> StoreResult<T> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Advances the `meta` counter `key` by one and returns its new value (1 the first time).
pub(super) fn bump(tx: &WriteTransaction, key: &str) -> StoreResult<u64> {
    let mut meta = tx.open_table(META).map_err(err)?;
    let next = meta.get(key).map_err(err)?.map(|v| v.value()).unwrap_or(0) + 1;
    meta.insert(key, next).map_err(err)?;
    Ok(next)
}

pub(super) fn encode<T: Serialize>(value: &T) -> StoreResult<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

impl EmbeddedStore {
    /// Opens (creating if needed) the database file; the file is made 0600 since it holds
    /// sealed secrets. Fails clearly if another process has it open.
    pub fn open(path: &Path) -> StoreResult<Self> {
        let db = Database::create(path)
            .map_err(|e| StoreError::Unavailable(format!("opening {}: {e}", path.display())))?;
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        let store = EmbeddedStore {
            db: Arc::new(RwLock::new(Some(db))),
            path: Arc::new(path.to_owned()),
        };
        store.write(Durability::Immediate, |tx| {
            tx.open_table(SESSIONS).map_err(err)?;
            tx.open_table(TOKENS).map_err(err)?;
            tx.open_table(BLADES).map_err(err)?;
            tx.open_table(META).map_err(err)?;
            tx.open_table(HISTORY).map_err(err)?;
            tx.open_table(SHARES).map_err(err)?;
            tx.open_table(SHARE_TOKENS).map_err(err)?;
            tx.open_table(AUDIT).map_err(err)?;
            tx.open_table(AUDIT_BY_USER).map_err(err)?;
            index_due(tx)
        })?;
        Ok(store)
    }

    /// Runs `f` on the open database, reopening it first if an earlier I/O error closed it.
    pub(super) fn with_db<T>(&self, f: impl FnOnce(&Database) -> StoreResult<T>) -> StoreResult<T> {
        {
            let guard = self.db.read().unwrap_or_else(|p| p.into_inner());
            if let Some(db) = guard.as_ref() {
                return f(db);
            }
        }
        self.reopen();
        let guard = self.db.read().unwrap_or_else(|p| p.into_inner());
        match guard.as_ref() {
            Some(db) => f(db),
            None => Err(StoreError::Unavailable(format!(
                "{} could not be reopened after an I/O error (disk full?)",
                self.path.display()
            ))),
        }
    }

    /// After a failed write (disk full, I/O error) redb refuses every further write until
    /// the database is closed and opened again (which repairs it if needed): do that, so the
    /// store recovers by itself once the disk has room.
    pub(super) fn reopen(&self) {
        let mut guard = self.db.write().unwrap_or_else(|p| p.into_inner());
        *guard = None;
        match Database::create(&*self.path) {
            Ok(db) => {
                tracing::warn!(path = %self.path.display(), "reopened the store after an I/O error");
                *guard = Some(db);
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "cannot reopen the store yet");
            }
        }
    }

    pub(super) fn write<T>(
        &self,
        durability: Durability,
        f: impl FnOnce(&WriteTransaction) -> StoreResult<T>,
    ) -> StoreResult<T> {
        let mut failed_io = false;
        let mut io = |e: redb::Error| {
            failed_io |= matches!(e, redb::Error::Io(_) | redb::Error::PreviousIo);
            err(e)
        };
        let out = self.with_db(|db| {
            let mut tx = db.begin_write().map_err(|e| io(e.into()))?;
            tx.set_durability(durability).map_err(err)?;
            let out = f(&tx)?;
            tx.commit().map_err(|e| io(e.into()))?;
            // Durable commits (an fsync each) are what a new session waits on: counted.
            let durable = if matches!(durability, Durability::Immediate) {
                "true"
            } else {
                "false"
            };
            metrics::counter!("vncdispatch_dispatcher_store_commits_total", "durable" => durable)
                .increment(1);
            Ok(out)
        });
        if failed_io {
            self.reopen();
        }
        out
    }

    /// Runs a read transaction in place: reads take microseconds (no fsync, no writer lock),
    /// so a trip through the blocking pool would cost more than the read itself.
    pub(super) fn read_inline<T>(
        &self,
        f: impl FnOnce(&EmbeddedStore) -> StoreResult<T>,
    ) -> StoreResult<T> {
        use tokio::runtime::{Handle, RuntimeFlavor};
        match Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(|| f(self)),
            _ => f(self),
        }
    }

    /// Runs `f` in a durable write transaction on tokio's blocking pool.
    pub(super) async fn durable<T: Send + 'static>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        self.blocking(move |s| s.write(Durability::Immediate, f))
            .await
    }

    pub(super) async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&EmbeddedStore) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(&this))
            .await
            .map_err(err)?
    }

    /// A read transaction. It does not hold the lock: a reopen while it runs fails and is
    /// retried by the next call, which is fine for a path that only runs after disk errors.
    pub(super) fn read_tx(&self) -> StoreResult<redb::ReadTransaction> {
        self.with_db(|db| db.begin_read().map_err(err))
    }

    pub(super) fn read_session(&self, username: &str) -> StoreResult<Option<SessionRecord>> {
        self.with_db(|db| {
            let tx = db.begin_read().map_err(err)?;
            let table = tx.open_table(SESSIONS).map_err(err)?;
            table
                .get(username)
                .map_err(err)?
                .map(|v| decode(v.value()))
                .transpose()
        })
    }
}

pub(super) fn get_session(
    tx: &WriteTransaction,
    username: &str,
) -> StoreResult<Option<SessionRecord>> {
    let table = tx.open_table(SESSIONS).map_err(err)?;
    let found = table.get(username).map_err(err)?;
    found.map(|v| decode(v.value())).transpose()
}

/// Where a row sits in [`DUE`].
fn due_key(rec: &SessionRecord) -> i64 {
    match &rec.claim {
        Some(c) => c.expires_at_ms,
        None => rec.stop_deadline().unwrap_or(UNDATED),
    }
}

/// Builds [`DUE`] afresh from the sessions, at every open: one pass at start keeps it right
/// for a file written before it existed, or by an older build after a rollback (which leaves
/// the table as it was while changing sessions).
fn index_due(tx: &WriteTransaction) -> StoreResult<()> {
    tx.delete_table(DUE).map_err(err)?;
    let sessions = tx.open_table(SESSIONS).map_err(err)?;
    let mut due = tx.open_table(DUE).map_err(err)?;
    for row in sessions.iter().map_err(err)? {
        let (user, v) = row.map_err(err)?;
        let rec: SessionRecord = decode(v.value())?;
        due.insert((due_key(&rec), user.value()), ()).map_err(err)?;
    }
    Ok(())
}

/// Takes the stored row of `username` (if any) out of [`DUE`].
fn unindex_due(tx: &WriteTransaction, username: &str) -> StoreResult<()> {
    if let Some(old) = get_session(tx, username)? {
        tx.open_table(DUE)
            .map_err(err)?
            .remove((due_key(&old), username))
            .map_err(err)?;
    }
    Ok(())
}

/// The usernames in [`DUE`] with a key in `from..=to`.
pub(super) fn due_between(
    due: &impl ReadableTable<(i64, &'static str), ()>,
    from: i64,
    to: i64,
) -> StoreResult<Vec<String>> {
    let mut out = Vec::new();
    for row in due.range((from, "")..=(to, "\u{10ffff}")).map_err(err)? {
        out.push(row.map_err(err)?.0.value().1.to_owned());
    }
    Ok(out)
}

pub(super) fn put_session(tx: &WriteTransaction, rec: &SessionRecord) -> StoreResult<()> {
    unindex_due(tx, &rec.username)?;
    tx.open_table(SESSIONS)
        .map_err(err)?
        .insert(rec.username.as_str(), encode(rec)?.as_slice())
        .map_err(err)?;
    tx.open_table(DUE)
        .map_err(err)?
        .insert((due_key(rec), rec.username.as_str()), ())
        .map_err(err)?;
    if !rec.token_hash.is_empty() {
        tx.open_table(TOKENS)
            .map_err(err)?
            .insert(rec.token_hash.as_str(), rec.username.as_str())
            .map_err(err)?;
    }
    Ok(())
}

pub(super) fn remove_session(tx: &WriteTransaction, rec: &SessionRecord) -> StoreResult<()> {
    unindex_due(tx, &rec.username)?;
    tx.open_table(SESSIONS)
        .map_err(err)?
        .remove(rec.username.as_str())
        .map_err(err)?;
    if !rec.token_hash.is_empty() {
        tx.open_table(TOKENS)
            .map_err(err)?
            .remove(rec.token_hash.as_str())
            .map_err(err)?;
    }
    Ok(())
}

pub(super) fn blades_sorted(tx: &redb::ReadTransaction) -> StoreResult<Vec<StoredBlade>> {
    let table = tx.open_table(BLADES).map_err(err)?;
    let mut out = Vec::new();
    for row in table.iter().map_err(err)? {
        let (_, v) = row.map_err(err)?;
        out.push(decode::<StoredBlade>(v.value())?);
    }
    out.sort_by_key(|b| b.seq);
    Ok(out)
}
