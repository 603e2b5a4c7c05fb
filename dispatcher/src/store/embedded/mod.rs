//! The embedded store: one redb file. redb commits are atomic (copy-on-write B-trees with a
//! checksummed commit slot), so a crash leaves the last committed state; writes are durable
//! when they return, except reconnect bookkeeping (remote IP, expiry extension), which is
//! committed without fsync and made durable by the next durable commit — losing it in a crash
//! costs nothing that matters.
//!
//! Tables: `sessions` (username → JSON record), `tokens` (token hash → username),
//! `blades` (name → JSON), `meta` (`last_blade`, `blade_seq`, `history_seq` counters),
//! `history` (ended sessions, `history.rs`), `shares`/`share_tokens` (`shares.rs`) and
//! `audit`/`audit_by_user` (`audit.rs`). Lease renewals, like reconnects, are committed
//! without fsync: a crash loses at most one renewal, which the next one (seconds later)
//! restores, long before an idle grace runs out. redb allows one writer
//! at a time, which makes each method atomic; all calls run on tokio's blocking pool.
//!
//! `file.rs` holds the file and transaction handling; this file, the [`Store`] methods.
use super::{
    AuditEvent, AuditQuery, BladeRecord, Claim, ClaimOutcome, EndedSession, SessionRecord,
    ShareRecord, Store, StoreError, StoreResult,
};
use file::{
    BLADES, DUE, SESSIONS, StoredBlade, TOKENS, UNDATED, blades_sorted, bump, decode, due_between,
    encode, err, get_session, put_session, remove_session,
};
use redb::{Database, Durability, ReadableTable};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

mod audit;
mod file;
mod history;
mod shares;

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
        // Not durable: a claim lost in a crash costs nothing (the desktop its launch may have
        // started is adopted by the user's next Dispatch, as with a claim that lapsed), while
        // a durable one would cost a new session a second fsync. `complete` makes the session
        // durable, and with it everything committed before.
        self.blocking(move |s| {
            s.write(Durability::None, |tx| match get_session(tx, &username)? {
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
        stops_at_ms: i64,
    ) -> StoreResult<Option<SessionRecord>> {
        let remote_ip = remote_ip.to_owned();
        self.update_ready(username, token_hash, move |rec| {
            rec.remote_ip = remote_ip;
            rec.expires_at_ms = Some(expires_at_ms);
            // The stop deadline only moves later (a lease may have moved it further).
            rec.stops_at_ms = rec.stops_at_ms.max(Some(stops_at_ms));
        })
        .await
    }

    async fn renew_lease(
        &self,
        username: &str,
        token_hash: &str,
        lease_until_ms: i64,
        stops_at_ms: i64,
    ) -> StoreResult<Option<SessionRecord>> {
        self.update_ready(username, token_hash, move |rec| {
            // Both only move later: renewals from several ws-proxies and a Dispatch may race.
            rec.lease_until_ms = rec.lease_until_ms.max(Some(lease_until_ms));
            rec.stops_at_ms = rec.stops_at_ms.max(Some(stops_at_ms));
        })
        .await
    }

    async fn date_legacy(&self, expires_at_ms: i64) -> StoreResult<u64> {
        self.blocking(move |s| {
            // Read first: there are none once dated, and a write would commit (fsync) nothing.
            let undated = due_between(
                &s.read_tx()?.open_table(DUE).map_err(err)?,
                UNDATED,
                UNDATED,
            )?;
            if undated.is_empty() {
                return Ok(0);
            }
            s.write(Durability::Immediate, |tx| {
                let mut dated = 0;
                // Collected first: the table must be closed before put_session opens it.
                let undated = due_between(&tx.open_table(DUE).map_err(err)?, UNDATED, UNDATED)?;
                for user in undated {
                    let Some(mut rec) = get_session(tx, &user)? else {
                        continue;
                    };
                    if rec.is_ready() && rec.expires_at_ms.is_none() {
                        rec.expires_at_ms = Some(expires_at_ms);
                        rec.stops_at_ms = Some(expires_at_ms);
                        put_session(tx, &rec)?;
                        dated += 1;
                    }
                }
                Ok(dated)
            })
        })
        .await
    }

    async fn renew_claim(
        &self,
        username: &str,
        claim_id: &str,
        expires_at_ms: i64,
    ) -> StoreResult<bool> {
        let (username, claim_id) = (username.to_owned(), claim_id.to_owned());
        self.blocking(move |s| {
            s.write(Durability::Immediate, |tx| {
                match get_session(tx, &username)? {
                    Some(mut rec) if rec.claim.as_ref().is_some_and(|c| c.id == claim_id) => {
                        if let Some(c) = rec.claim.as_mut() {
                            c.expires_at_ms = expires_at_ms;
                        }
                        put_session(tx, &rec)?;
                        Ok(true)
                    }
                    _ => Ok(false),
                }
            })
        })
        .await
    }

    async fn record_end(&self, ended: &EndedSession) -> StoreResult<()> {
        let ended = ended.clone();
        self.blocking(move |s| s.write(Durability::Immediate, |tx| history::append(tx, &ended)))
            .await
    }

    async fn history(
        &self,
        username: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<EndedSession>> {
        let username = username.map(str::to_owned);
        self.blocking(move |s| history::newest(&s.read_tx()?, username.as_deref(), limit))
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
            // Only rows whose deadline passed are read; most sweeps find none and write nothing.
            let (from, to) = (UNDATED + 1, now_ms);
            if due_between(&s.read_tx()?.open_table(DUE).map_err(err)?, from, to)?.is_empty() {
                return Ok(Vec::new());
            }
            s.write(Durability::Immediate, |tx| {
                let mut doomed = Vec::new();
                let due = due_between(&tx.open_table(DUE).map_err(err)?, from, to)?;
                for user in due {
                    let Some(rec) = get_session(tx, &user)? else {
                        continue;
                    };
                    let stale_claim = rec
                        .claim
                        .as_ref()
                        .is_some_and(|c| c.expires_at_ms <= now_ms);
                    if stale_claim || (rec.is_ready() && rec.is_due(now_ms)) {
                        doomed.push(rec);
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

    async fn put_share(&self, share: &ShareRecord) -> StoreResult<()> {
        let share = share.clone();
        self.durable(move |tx| shares::put(tx, &share)).await
    }

    async fn find_share(&self, token_hash: &str) -> StoreResult<Option<ShareRecord>> {
        // Inline, like `find_by_token`: every share viewer's ResolveToken reads it.
        self.read_inline(|s| shares::find(&s.read_tx()?, token_hash))
    }

    async fn list_shares(&self, owner: Option<&str>) -> StoreResult<Vec<ShareRecord>> {
        self.read_inline(|s| shares::list(&s.read_tx()?, owner))
    }

    async fn remove_share(&self, id: &str) -> StoreResult<Option<ShareRecord>> {
        let id = id.to_owned();
        self.durable(move |tx| shares::remove(tx, &id)).await
    }

    async fn remove_shares_of(
        &self,
        owner: &str,
        session_token_hash: &str,
    ) -> StoreResult<Vec<ShareRecord>> {
        let (owner, session) = (owner.to_owned(), session_token_hash.to_owned());
        self.durable(move |tx| {
            shares::remove_where(tx, |s| s.owner == owner && s.session_token_hash == session)
        })
        .await
    }

    async fn prune_shares(&self, now_ms: i64) -> StoreResult<Vec<ShareRecord>> {
        self.durable(move |tx| shares::remove_where(tx, |s| s.expires_at_ms <= now_ms))
            .await
    }

    async fn record_audit(&self, events: &[AuditEvent]) -> StoreResult<()> {
        if events.is_empty() {
            return Ok(()); // no commit, no fsync
        }
        let events = events.to_vec();
        self.durable(move |tx| audit::append(tx, &events)).await
    }

    async fn audit(&self, query: &AuditQuery) -> StoreResult<Vec<AuditEvent>> {
        let query = query.clone();
        self.blocking(move |s| audit::newest(&s.read_tx()?, &query))
            .await
    }

    async fn prune_audit(&self, before_ms: i64) -> StoreResult<u64> {
        self.durable(move |tx| audit::prune(tx, before_ms)).await
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
                    None => bump(tx, "blade_seq")?,
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
        self.blocking(|s| s.write(Durability::Immediate, |tx| bump(tx, "last_blade")))
            .await
    }
}

impl EmbeddedStore {
    /// Changes the user's ready session with `token_hash` (no fsync: reconnect and lease
    /// bookkeeping); the updated record, or None if it is gone or replaced.
    async fn update_ready(
        &self,
        username: &str,
        token_hash: &str,
        change: impl FnOnce(&mut SessionRecord) + Send + 'static,
    ) -> StoreResult<Option<SessionRecord>> {
        let (username, token_hash) = (username.to_owned(), token_hash.to_owned());
        self.blocking(move |s| {
            s.write(Durability::None, |tx| match get_session(tx, &username)? {
                Some(mut rec) if rec.is_ready() && rec.token_hash == token_hash => {
                    change(&mut rec);
                    put_session(tx, &rec)?;
                    Ok(Some(rec))
                }
                _ => Ok(None),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Method, StoredSecret};

    #[tokio::test(flavor = "multi_thread")]
    async fn embedded_store_keeps_everything_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions.redb");
        let rec = SessionRecord {
            username: "carol".into(),
            token_hash: "carol-hash".into(),
            token: StoredSecret::Sealed("sealed-token".into()),
            password: StoredSecret::Sealed("sealed-password".into()),
            blade: "b".into(),
            host: "127.0.0.2".into(),
            display: 7,
            port: 5907,
            vnc_pid: 4242,
            remote_ip: "192.0.2.1".into(),
            created_at_ms: 1_000,
            expires_at_ms: Some(i64::MAX),
            ..Default::default()
        };
        {
            let store = EmbeddedStore::open(&path).unwrap();
            let claim = Claim {
                id: "k".into(),
                expires_at_ms: i64::MAX,
            };
            store.claim("carol", &claim, 0).await.unwrap();
            store.complete(&rec, "k").await.unwrap();
            let blade = BladeRecord {
                name: "b".into(),
                host: "h".into(),
                port: 1,
                method: Method::Agent,
                draining: true,
                pool: "default".into(),
                max_sessions: 0,
            };
            store.put_blade(&blade).await.unwrap();
        }
        let store = EmbeddedStore::open(&path).unwrap();
        assert_eq!(
            store.find_by_token("carol-hash", "").await.unwrap(),
            Some(rec)
        );
        assert!(store.list_blades().await.unwrap()[0].draining);
    }

    // A file from before the `due` index, or written by an older build after a rollback:
    // the index is rebuilt at open, so the sweeper still finds the sessions due.
    #[tokio::test(flavor = "multi_thread")]
    async fn the_due_index_is_rebuilt_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions.redb");
        {
            let store = EmbeddedStore::open(&path).unwrap();
            let claim = Claim {
                id: "k".into(),
                expires_at_ms: i64::MAX,
            };
            store.claim("dora", &claim, 0).await.unwrap();
            let rec = SessionRecord {
                username: "dora".into(),
                expires_at_ms: Some(10),
                ..Default::default()
            };
            store.complete(&rec, "k").await.unwrap();
            // What an older build leaves: the index without this row, and a stray entry.
            store
                .write(Durability::Immediate, |tx| {
                    let mut due = tx.open_table(DUE).map_err(err)?;
                    due.remove((10, "dora")).map_err(err)?;
                    due.insert((5, "gone"), ()).map_err(err)?;
                    Ok(())
                })
                .unwrap();
        }
        let store = EmbeddedStore::open(&path).unwrap();
        let swept = store.sweep_expired(20).await.unwrap();
        assert_eq!(swept.len(), 1);
        assert_eq!(swept[0].username, "dora");
        let left = due_between(
            &store.read_tx().unwrap().open_table(DUE).unwrap(),
            i64::MIN,
            i64::MAX,
        )
        .unwrap();
        assert!(left.is_empty(), "{left:?}");
    }
}
