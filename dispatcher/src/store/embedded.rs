//! The embedded store: one redb file. redb commits are atomic (copy-on-write B-trees with a
//! checksummed commit slot), so a crash leaves the last committed state; writes are durable
//! when they return, except reconnect bookkeeping (remote IP, expiry extension), which is
//! committed without fsync and made durable by the next durable commit — losing it in a crash
//! costs nothing that matters.
//!
//! Tables: `sessions` (username → JSON record), `tokens` (token hash → username),
//! `blades` (name → JSON), `meta` (`last_blade`, `blade_seq` counters). redb allows one writer
//! at a time, which makes each method atomic; all calls run on tokio's blocking pool.
use super::{BladeRecord, Claim, ClaimOutcome, SessionRecord, Store, StoreError, StoreResult};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

const SESSIONS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("sessions");
const TOKENS: TableDefinition<'_, &str, &str> = TableDefinition::new("tokens");
const BLADES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("blades");
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");

/// A blade with its registration order.
#[derive(Serialize, Deserialize)]
struct StoredBlade {
    seq: u64,
    blade: BladeRecord,
}

/// The redb-backed store.
#[derive(Clone)]
pub struct EmbeddedStore {
    // None only between closing after an I/O error and a successful reopen. Every use holds
    // the read lock for its whole transaction, so a reopen (write lock) sees no one inside.
    db: Arc<RwLock<Option<Database>>>,
    path: Arc<PathBuf>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EmbeddedStore")
    }
}

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> StoreResult<T> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn encode<T: Serialize>(value: &T) -> StoreResult<Vec<u8>> {
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
            Ok(())
        })?;
        Ok(store)
    }

    /// Runs `f` on the open database, reopening it first if an earlier I/O error closed it.
    fn with_db<T>(&self, f: impl FnOnce(&Database) -> StoreResult<T>) -> StoreResult<T> {
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
    fn reopen(&self) {
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

    fn write<T>(
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
            Ok(out)
        });
        if failed_io {
            self.reopen();
        }
        out
    }

    /// Runs a read transaction in place: reads take microseconds (no fsync, no writer lock),
    /// so a trip through the blocking pool would cost more than the read itself.
    fn read_inline<T>(&self, f: impl FnOnce(&EmbeddedStore) -> StoreResult<T>) -> StoreResult<T> {
        use tokio::runtime::{Handle, RuntimeFlavor};
        match Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(|| f(self)),
            _ => f(self),
        }
    }

    async fn blocking<T: Send + 'static>(
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
    fn read_tx(&self) -> StoreResult<redb::ReadTransaction> {
        self.with_db(|db| db.begin_read().map_err(err))
    }

    fn read_session(&self, username: &str) -> StoreResult<Option<SessionRecord>> {
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

fn get_session(tx: &WriteTransaction, username: &str) -> StoreResult<Option<SessionRecord>> {
    let table = tx.open_table(SESSIONS).map_err(err)?;
    let found = table.get(username).map_err(err)?;
    found.map(|v| decode(v.value())).transpose()
}

fn put_session(tx: &WriteTransaction, rec: &SessionRecord) -> StoreResult<()> {
    tx.open_table(SESSIONS)
        .map_err(err)?
        .insert(rec.username.as_str(), encode(rec)?.as_slice())
        .map_err(err)?;
    if !rec.token_hash.is_empty() {
        tx.open_table(TOKENS)
            .map_err(err)?
            .insert(rec.token_hash.as_str(), rec.username.as_str())
            .map_err(err)?;
    }
    Ok(())
}

fn remove_session(tx: &WriteTransaction, rec: &SessionRecord) -> StoreResult<()> {
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

fn blades_sorted(tx: &redb::ReadTransaction) -> StoreResult<Vec<StoredBlade>> {
    let table = tx.open_table(BLADES).map_err(err)?;
    let mut out = Vec::new();
    for row in table.iter().map_err(err)? {
        let (_, v) = row.map_err(err)?;
        out.push(decode::<StoredBlade>(v.value())?);
    }
    out.sort_by_key(|b| b.seq);
    Ok(out)
}

#[async_trait::async_trait]
impl Store for EmbeddedStore {
    async fn ping(&self) -> StoreResult<()> {
        self.blocking(|s| s.read_tx().map(drop)).await
    }

    async fn get_session(&self, username: &str) -> StoreResult<Option<SessionRecord>> {
        self.read_inline(|s| s.read_session(username))
    }

    async fn claim(&self, username: &str, claim: &Claim, now_ms: i64) -> StoreResult<ClaimOutcome> {
        // Reconnects (a ready session exists) are answered from a read transaction: no
        // write lock, no fsync on the hot path.
        if let Some(rec) = self.read_inline(|s| s.read_session(username))?
            && rec.is_ready()
        {
            return Ok(ClaimOutcome::Existing(Box::new(rec)));
        }
        let (username, claim) = (username.to_owned(), claim.clone());
        self.blocking(move |s| {
            s.write(Durability::Immediate, |tx| {
                match get_session(tx, &username)? {
                    Some(rec) => match &rec.claim {
                        None => Ok(ClaimOutcome::Existing(Box::new(rec))),
                        Some(c) if c.expires_at_ms > now_ms => Ok(ClaimOutcome::Pending),
                        Some(_) => {
                            put_session(tx, &placeholder(&username, &claim))?;
                            Ok(ClaimOutcome::Won)
                        }
                    },
                    None => {
                        put_session(tx, &placeholder(&username, &claim))?;
                        Ok(ClaimOutcome::Won)
                    }
                }
            })
        })
        .await
    }

    async fn complete(&self, record: &SessionRecord, claim_id: &str) -> StoreResult<()> {
        let (record, claim_id) = (record.clone(), claim_id.to_owned());
        self.blocking(move |s| {
            s.write(Durability::Immediate, |tx| {
                match get_session(tx, &record.username)? {
                    Some(SessionRecord { claim: Some(c), .. }) if c.id == claim_id => {
                        put_session(tx, &record)
                    }
                    _ => Err(StoreError::ClaimLost(record.username.clone())),
                }
            })
        })
        .await
    }

    async fn abandon(&self, username: &str, claim_id: &str) -> StoreResult<()> {
        let (username, claim_id) = (username.to_owned(), claim_id.to_owned());
        self.blocking(move |s| {
            s.write(Durability::Immediate, |tx| {
                if let Some(rec) = get_session(tx, &username)?
                    && rec.claim.as_ref().is_some_and(|c| c.id == claim_id)
                {
                    remove_session(tx, &rec)?;
                }
                Ok(())
            })
        })
        .await
    }

    async fn find_by_token(
        &self,
        token_hash: &str,
        _token: &str,
    ) -> StoreResult<Option<SessionRecord>> {
        self.read_inline(|s| {
            let tx = s.read_tx()?;
            let tokens = tx.open_table(TOKENS).map_err(err)?;
            let Some(user) = tokens.get(token_hash).map_err(err)? else {
                return Ok(None);
            };
            let sessions = tx.open_table(SESSIONS).map_err(err)?;
            let Some(v) = sessions.get(user.value()).map_err(err)? else {
                return Ok(None);
            };
            let rec: SessionRecord = decode(v.value())?;
            Ok((rec.is_ready() && rec.token_hash == token_hash).then_some(rec))
        })
    }

    async fn touch(
        &self,
        username: &str,
        token_hash: &str,
        remote_ip: &str,
        expires_at_ms: i64,
    ) -> StoreResult<Option<SessionRecord>> {
        let (username, token_hash, remote_ip) = (
            username.to_owned(),
            token_hash.to_owned(),
            remote_ip.to_owned(),
        );
        self.blocking(move |s| {
            s.write(Durability::None, |tx| match get_session(tx, &username)? {
                Some(mut rec) if rec.is_ready() && rec.token_hash == token_hash => {
                    rec.remote_ip = remote_ip;
                    rec.expires_at_ms = Some(expires_at_ms);
                    put_session(tx, &rec)?;
                    Ok(Some(rec))
                }
                _ => Ok(None),
            })
        })
        .await
    }

    async fn delete_session(
        &self,
        username: &str,
        token_hash: Option<&str>,
    ) -> StoreResult<Option<SessionRecord>> {
        let (username, token_hash) = (username.to_owned(), token_hash.map(str::to_owned));
        self.blocking(move |s| {
            s.write(Durability::Immediate, |tx| {
                match get_session(tx, &username)? {
                    Some(rec)
                        if rec.is_ready()
                            && token_hash.as_ref().is_none_or(|h| *h == rec.token_hash) =>
                    {
                        remove_session(tx, &rec)?;
                        Ok(Some(rec))
                    }
                    _ => Ok(None),
                }
            })
        })
        .await
    }

    async fn list_sessions(&self) -> StoreResult<Vec<SessionRecord>> {
        self.blocking(|s| {
            let tx = s.read_tx()?;
            let table = tx.open_table(SESSIONS).map_err(err)?;
            let mut out = Vec::new();
            for row in table.iter().map_err(err)? {
                let rec: SessionRecord = decode(row.map_err(err)?.1.value())?;
                if rec.is_ready() {
                    out.push(rec);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn sweep_expired(&self, now_ms: i64) -> StoreResult<Vec<SessionRecord>> {
        self.blocking(move |s| {
            s.write(Durability::Immediate, |tx| {
                let mut doomed = Vec::new();
                {
                    let table = tx.open_table(SESSIONS).map_err(err)?;
                    for row in table.iter().map_err(err)? {
                        let rec: SessionRecord = decode(row.map_err(err)?.1.value())?;
                        let stale_claim = rec
                            .claim
                            .as_ref()
                            .is_some_and(|c| c.expires_at_ms <= now_ms);
                        if stale_claim || (rec.is_ready() && rec.is_expired(now_ms)) {
                            doomed.push(rec);
                        }
                    }
                }
                for rec in &doomed {
                    remove_session(tx, rec)?;
                }
                Ok(doomed.into_iter().filter(SessionRecord::is_ready).collect())
            })
        })
        .await
    }

    async fn put_blade(&self, blade: &BladeRecord) -> StoreResult<()> {
        let blade = blade.clone();
        self.blocking(move |s| {
            s.write(Durability::Immediate, |tx| {
                let mut table = tx.open_table(BLADES).map_err(err)?;
                let existing = table
                    .get(blade.name.as_str())
                    .map_err(err)?
                    .map(|v| decode::<StoredBlade>(v.value()))
                    .transpose()?;
                let seq = match existing {
                    Some(b) => b.seq,
                    None => {
                        let mut meta = tx.open_table(META).map_err(err)?;
                        let next = meta
                            .get("blade_seq")
                            .map_err(err)?
                            .map(|v| v.value())
                            .unwrap_or(0)
                            + 1;
                        meta.insert("blade_seq", next).map_err(err)?;
                        next
                    }
                };
                table
                    .insert(
                        blade.name.as_str(),
                        encode(&StoredBlade {
                            seq,
                            blade: blade.clone(),
                        })?
                        .as_slice(),
                    )
                    .map_err(err)?;
                Ok(())
            })
        })
        .await
    }

    async fn list_blades(&self) -> StoreResult<Vec<BladeRecord>> {
        self.read_inline(|s| {
            let tx = s.read_tx()?;
            Ok(blades_sorted(&tx)?.into_iter().map(|b| b.blade).collect())
        })
    }

    async fn set_draining(&self, name: &str, draining: bool) -> StoreResult<Option<BladeRecord>> {
        let name = name.to_owned();
        self.blocking(move |s| {
            s.write(Durability::Immediate, |tx| {
                let mut table = tx.open_table(BLADES).map_err(err)?;
                let existing = table
                    .get(name.as_str())
                    .map_err(err)?
                    .map(|v| decode::<StoredBlade>(v.value()))
                    .transpose()?;
                let Some(mut stored) = existing else {
                    return Ok(None);
                };
                stored.blade.draining = draining;
                table
                    .insert(name.as_str(), encode(&stored)?.as_slice())
                    .map_err(err)?;
                Ok(Some(stored.blade))
            })
        })
        .await
    }

    async fn remove_blade(&self, name: &str) -> StoreResult<bool> {
        let name = name.to_owned();
        self.blocking(move |s| {
            s.write(Durability::Immediate, |tx| {
                Ok(tx
                    .open_table(BLADES)
                    .map_err(err)?
                    .remove(name.as_str())
                    .map_err(err)?
                    .is_some())
            })
        })
        .await
    }

    async fn next_round_robin(&self) -> StoreResult<u64> {
        self.blocking(|s| {
            s.write(Durability::Immediate, |tx| {
                let mut meta = tx.open_table(META).map_err(err)?;
                let next = meta
                    .get("last_blade")
                    .map_err(err)?
                    .map(|v| v.value())
                    .unwrap_or(0)
                    + 1;
                meta.insert("last_blade", next).map_err(err)?;
                Ok(next)
            })
        })
        .await
    }
}

fn placeholder(username: &str, claim: &Claim) -> SessionRecord {
    SessionRecord {
        username: username.to_owned(),
        claim: Some(claim.clone()),
        ..Default::default()
    }
}
