//! The MongoDB store (also FerretDB), in the original deployment's schema so an existing
//! database is served without a migration step:
//!
//! - `config`: one document with `blade_list` (blade names, which were host names),
//!   `num_of_blades` and `last_blade`; we add `blades` (host, port, method, draining per name)
//!   and `rev` (for optimistic updates). The round-robin counter is `last_blade`, advanced with
//!   one `$inc` in `findOneAndUpdate` — never read-then-write.
//! - `tokenizer`: one document per user with `username`, `password`, `token`, `blade`,
//!   `display`, `vncpid`, `remoteip`; we add `token_hash`, `host`, `port`, `created_at`,
//!   `expires_at`, `lease_until`, `stops_at`, `claim_id`/`claim_expires` (while starting)
//!   and `token_sealed`/`password_sealed`. Rows we write carry the secrets sealed, not in `token`/`password`;
//!   rows the original wrote are read as they are (and found by their plain token).
//!
//! A unique index on `tokenizer.username` makes one session per user hold across dispatchers:
//! a claim is an insert, and the loser gets a duplicate-key error. Inserts are the one write
//! that is atomic on FerretDB v1 too (its findAndModify and filtered updates are a read then a
//! write), so every decision that must have one winner is an insert. No TTL index (FerretDB has
//! none): expiry is checked on every read and a sweeper deletes expired rows.
//!
//! - `session_history`: ended sessions (`history.rs`), bounded.
//! - `shares`: one document per share, `_id` its id, `token_hash` unique (`shares.rs`).
//! - `audit`: one document per audit event, by time and by user (`audit.rs`).
//!
//! `schema.rs` maps these documents to and from records; this file holds the queries.
use super::{
    AuditEvent, AuditQuery, BladeRecord, Claim, ClaimOutcome, EndedSession, Method, SessionRecord,
    ShareRecord, Store, StoreError, StoreResult,
};
use mongodb::bson::{Bson, DateTime, Document, doc};
use mongodb::options::{IndexOptions, ReturnDocument};
use mongodb::{Client, Collection, IndexModel};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

mod audit;
mod history;
mod schema;
mod shares;
use schema::{blade_to_doc, blades_of, int_of, ready_with_hash, record_from_doc, record_to_doc};

/// Database name when the URI names none.
pub const DEFAULT_DATABASE: &str = "vncDispatch";
/// How often an optimistic config update is retried under contention.
const CONFIG_RETRIES: usize = 20;

/// Defaults for blades listed in the original `blade_list` without our details.
#[derive(Debug, Clone)]
pub struct LegacyBlades {
    /// How to reach them (the original used SSH).
    pub method: Method,
    /// Port for that method.
    pub port: u16,
}

/// The MongoDB-backed store.
#[derive(Debug, Clone)]
pub struct MongoStore {
    config: Collection<Document>,
    tokenizer: Collection<Document>,
    /// Round-robin tickets (see `next_round_robin`).
    tickets: Collection<Document>,
    /// Ended sessions.
    history: Collection<Document>,
    /// Shares of desktops (`shares.rs`).
    shares: Collection<Document>,
    /// The audit trail (`audit.rs`).
    audit: Collection<Document>,
    /// Highest ticket this process won: where the next search starts.
    last_ticket: Arc<AtomicU64>,
    legacy: LegacyBlades,
}

/// Every document a query's cursor yields, in its order.
async fn documents(mut cursor: mongodb::Cursor<Document>) -> StoreResult<Vec<Document>> {
    let mut out = Vec::new();
    while cursor.advance().await.map_err(unavailable)? {
        out.push(cursor.deserialize_current().map_err(unavailable)?);
    }
    Ok(out)
}

/// Creates `indexes` on `collection` (named `what` in errors), one call each: FerretDB v1.24
/// drops the connection (a panic in its handler) on a createIndexes listing several indexes
/// that exist already, i.e. on every reconnect.
async fn create_indexes(
    collection: &Collection<Document>,
    what: &str,
    indexes: impl IntoIterator<Item = IndexModel>,
) -> StoreResult<()> {
    for index in indexes {
        collection
            .create_index(index)
            .await
            .map_err(|e| StoreError::Unavailable(format!("creating the indexes on {what}: {e}")))?;
    }
    Ok(())
}

fn unavailable(e: mongodb::error::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    use mongodb::error::{ErrorKind, WriteFailure};
    match e.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == 11000,
        ErrorKind::Command(c) => c.code == 11000,
        _ => e.to_string().contains("E11000") || e.to_string().contains("duplicate key"),
    }
}

impl MongoStore {
    /// Connects (with short timeouts, so an unreachable store fails fast and clearly), and
    /// creates the indexes idempotently.
    pub async fn connect(uri: &str, legacy: LegacyBlades) -> StoreResult<Self> {
        let mut options = mongodb::options::ClientOptions::parse(uri)
            .await
            .map_err(|e| StoreError::Unavailable(format!("bad MongoDB URI: {e}")))?;
        options.server_selection_timeout = Some(Duration::from_secs(5));
        options.connect_timeout = Some(Duration::from_secs(5));
        options.app_name = Some("vncdispatch-dispatcher".into());
        let db_name = options
            .default_database
            .clone()
            .unwrap_or_else(|| DEFAULT_DATABASE.into());
        let client = Client::with_options(options).map_err(unavailable)?;
        let db = client.database(&db_name);
        let store = MongoStore {
            config: db.collection("config"),
            tokenizer: db.collection("tokenizer"),
            tickets: db.collection("round_robin_tickets"),
            history: db.collection("session_history"),
            shares: db.collection("shares"),
            audit: db.collection("audit"),
            last_ticket: Arc::default(),
            legacy,
        };
        let unique = IndexOptions::builder()
            .unique(true)
            .name("username_unique".to_owned())
            .build();
        store
            .tokenizer
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "username": 1 })
                    .options(unique)
                    .build(),
            )
            .await
            .map_err(|e| {
                StoreError::Unavailable(format!(
                    "creating the unique index on tokenizer.username failed ({e}); if the original \
                     service left duplicate rows for a user, delete all but one of each"
                ))
            })?;
        let by_hash = IndexOptions::builder()
            .name("token_hash".to_owned())
            .build();
        store
            .tokenizer
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "token_hash": 1 })
                    .options(by_hash)
                    .build(),
            )
            .await
            .map_err(unavailable)?;
        // The sweeper's queries: what is due is read, not every session.
        create_indexes(
            &store.tokenizer,
            "tokenizer",
            [
                IndexModel::builder().keys(doc! { "stops_at": 1 }).build(),
                IndexModel::builder()
                    .keys(doc! { "claim_expires": 1 })
                    .build(),
            ],
        )
        .await?;
        history::create_index(&store.history).await?;
        shares::create_indexes(&store.shares).await?;
        audit::create_indexes(&store.audit).await?;
        Ok(store)
    }

    /// Applies `update` to the user's ready row with `token_hash`; the row after, if any.
    async fn update_ready(
        &self,
        username: &str,
        token_hash: &str,
        update: Document,
    ) -> StoreResult<Option<SessionRecord>> {
        let updated = self
            .tokenizer
            .find_one_and_update(ready_with_hash(username, token_hash), update)
            .return_document(ReturnDocument::After)
            .await
            .map_err(unavailable)?;
        Ok(updated.as_ref().map(record_from_doc))
    }

    /// The config document, created if the database has none yet.
    async fn config_doc(&self) -> StoreResult<Document> {
        let filter = doc! { "blade_list": { "$exists": true } };
        if let Some(d) = self
            .config
            .find_one(filter.clone())
            .await
            .map_err(unavailable)?
        {
            return Ok(d);
        }
        let fresh = doc! { "_id": "vncdispatch", "blade_list": [], "num_of_blades": 0, "last_blade": 0, "blades": [], "rev": 0 };
        match self.config.insert_one(fresh).await {
            Ok(_) => {}
            Err(e) if is_duplicate_key(&e) => {}
            Err(e) => return Err(unavailable(e)),
        }
        self.config
            .find_one(filter)
            .await
            .map_err(unavailable)?
            .ok_or_else(|| StoreError::Unavailable("config document vanished".into()))
    }

    /// Applies `change` to the blade list with optimistic concurrency on `rev`.
    async fn update_blades<T>(
        &self,
        mut change: impl FnMut(&mut Vec<BladeRecord>) -> T,
    ) -> StoreResult<T> {
        for _ in 0..CONFIG_RETRIES {
            let config = self.config_doc().await?;
            let mut blades = blades_of(&config, &self.legacy);
            let out = change(&mut blades);
            let id = config.get("_id").cloned().unwrap_or(Bson::Null);
            let filter = match config.get("rev") {
                Some(rev) => doc! { "_id": id, "rev": rev.clone() },
                None => doc! { "_id": id, "rev": { "$exists": false } },
            };
            let names: Vec<Bson> = blades
                .iter()
                .map(|b| Bson::String(b.name.clone()))
                .collect();
            let details: Vec<Bson> = blades
                .iter()
                .map(|b| Bson::Document(blade_to_doc(b)))
                .collect();
            let update = doc! {
                "$set": { "blade_list": names, "num_of_blades": blades.len() as i32, "blades": details },
                "$inc": { "rev": 1 },
            };
            if self
                .config
                .update_one(filter, update)
                .await
                .map_err(unavailable)?
                .matched_count
                == 1
            {
                return Ok(out);
            }
        }
        Err(StoreError::Unavailable(
            "the blade list kept changing under concurrent updates; try again".into(),
        ))
    }
}

#[async_trait::async_trait]
impl Store for MongoStore {
    async fn ping(&self) -> StoreResult<()> {
        self.config
            .find_one(doc! {})
            .await
            .map(drop)
            .map_err(unavailable)
    }

    async fn get_session(&self, username: &str) -> StoreResult<Option<SessionRecord>> {
        let found = self
            .tokenizer
            .find_one(doc! { "username": username })
            .await
            .map_err(unavailable)?;
        Ok(found.as_ref().map(record_from_doc))
    }

    async fn claim(&self, username: &str, claim: &Claim, now_ms: i64) -> StoreResult<ClaimOutcome> {
        let placeholder = doc! {
            "username": username,
            "claim_id": &claim.id,
            "claim_expires": DateTime::from_millis(claim.expires_at_ms),
        };
        // Reconnects are the common case: look before trying to insert.
        if let Some(existing) = self.get_session(username).await?
            && existing.is_ready()
        {
            return Ok(ClaimOutcome::Existing(Box::new(existing)));
        }
        for _ in 0..5 {
            match self.tokenizer.insert_one(placeholder.clone()).await {
                Ok(_) => return Ok(ClaimOutcome::Won),
                Err(e) if is_duplicate_key(&e) => {}
                Err(e) => return Err(unavailable(e)),
            }
            let Some(existing) = self.get_session(username).await? else {
                continue;
            };
            let Some(theirs) = existing.claim else {
                return Ok(ClaimOutcome::Existing(Box::new(existing)));
            };
            if theirs.expires_at_ms > now_ms {
                return Ok(ClaimOutcome::Pending);
            }
            // The claimant died: remove its placeholder and race for the slot again; the
            // unique index lets exactly one insert win (an update could not promise that).
            // Only while it is still expired: a renewal since our read keeps it.
            let filter = doc! {
                "username": username,
                "claim_id": &theirs.id,
                "claim_expires": { "$lte": DateTime::from_millis(now_ms) },
            };
            self.tokenizer
                .delete_one(filter)
                .await
                .map_err(unavailable)?;
        }
        Ok(ClaimOutcome::Pending)
    }

    async fn complete(&self, record: &SessionRecord, claim_id: &str) -> StoreResult<()> {
        let filter = doc! { "username": &record.username, "claim_id": claim_id };
        let done = self
            .tokenizer
            .replace_one(filter, record_to_doc(record))
            .await
            .map_err(unavailable)?;
        if done.matched_count == 1 {
            Ok(())
        } else {
            Err(StoreError::ClaimLost(record.username.clone()))
        }
    }

    async fn abandon(&self, username: &str, claim_id: &str) -> StoreResult<()> {
        let filter = doc! { "username": username, "claim_id": claim_id };
        self.tokenizer
            .delete_one(filter)
            .await
            .map(drop)
            .map_err(unavailable)
    }

    async fn find_by_token(
        &self,
        token_hash: &str,
        token: &str,
    ) -> StoreResult<Option<SessionRecord>> {
        let ready = doc! { "token_hash": token_hash, "claim_id": { "$exists": false } };
        if let Some(d) = self.tokenizer.find_one(ready).await.map_err(unavailable)? {
            return Ok(Some(record_from_doc(&d)));
        }
        if token.is_empty() {
            return Ok(None);
        }
        // A row the original service wrote: plain token, no hash.
        let legacy = doc! {
            "token": token,
            "claim_id": { "$exists": false },
            "$or": [ { "token_hash": { "$exists": false } }, { "token_hash": "" } ],
        };
        Ok(self
            .tokenizer
            .find_one(legacy)
            .await
            .map_err(unavailable)?
            .as_ref()
            .map(record_from_doc))
    }

    async fn touch(
        &self,
        username: &str,
        token_hash: &str,
        remote_ip: &str,
        expires_at_ms: i64,
        stops_at_ms: i64,
    ) -> StoreResult<Option<SessionRecord>> {
        // The stop deadline only moves later: a lease renewed since our read may have moved
        // it further than this Dispatch would.
        let update = doc! {
            "$set": {
                "remoteip": remote_ip,
                "expires_at": DateTime::from_millis(expires_at_ms),
                "token_hash": token_hash,
            },
            "$max": { "stops_at": DateTime::from_millis(stops_at_ms) },
        };
        self.update_ready(username, token_hash, update).await
    }

    async fn renew_lease(
        &self,
        username: &str,
        token_hash: &str,
        lease_until_ms: i64,
        stops_at_ms: i64,
    ) -> StoreResult<Option<SessionRecord>> {
        // Both only move later: renewals from several ws-proxies and a Dispatch may race.
        let update = doc! { "$max": {
            "lease_until": DateTime::from_millis(lease_until_ms),
            "stops_at": DateTime::from_millis(stops_at_ms),
        } };
        self.update_ready(username, token_hash, update).await
    }

    async fn date_legacy(&self, expires_at_ms: i64) -> StoreResult<u64> {
        let at = DateTime::from_millis(expires_at_ms);
        let undated = doc! { "claim_id": { "$exists": false }, "expires_at": { "$exists": false } };
        let r = self
            .tokenizer
            .update_many(
                undated,
                doc! { "$set": { "expires_at": at, "stops_at": at } },
            )
            .await
            .map_err(unavailable)?;
        Ok(r.modified_count)
    }

    async fn renew_claim(
        &self,
        username: &str,
        claim_id: &str,
        expires_at_ms: i64,
    ) -> StoreResult<bool> {
        let r = self
            .tokenizer
            .update_one(
                doc! { "username": username, "claim_id": claim_id },
                doc! { "$set": { "claim_expires": DateTime::from_millis(expires_at_ms) } },
            )
            .await
            .map_err(unavailable)?;
        Ok(r.matched_count == 1)
    }

    async fn record_end(&self, ended: &EndedSession) -> StoreResult<()> {
        history::append(&self.history, ended).await
    }

    async fn history(
        &self,
        username: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<EndedSession>> {
        history::newest(&self.history, username, limit).await
    }

    async fn delete_session(
        &self,
        username: &str,
        token_hash: Option<&str>,
    ) -> StoreResult<Option<SessionRecord>> {
        let filter = match token_hash {
            Some(h) => ready_with_hash(username, h),
            None => doc! { "username": username, "claim_id": { "$exists": false } },
        };
        let deleted = self
            .tokenizer
            .find_one_and_delete(filter)
            .await
            .map_err(unavailable)?;
        Ok(deleted.as_ref().map(record_from_doc))
    }

    async fn list_sessions(&self) -> StoreResult<Vec<SessionRecord>> {
        let cursor = self
            .tokenizer
            .find(doc! { "claim_id": { "$exists": false } })
            .await
            .map_err(unavailable)?;
        let mut out: Vec<SessionRecord> = documents(cursor)
            .await?
            .iter()
            .map(record_from_doc)
            .collect();
        out.sort_by(|a, b| a.username.cmp(&b.username));
        Ok(out)
    }

    async fn sweep_expired(&self, now_ms: i64) -> StoreResult<Vec<SessionRecord>> {
        let now = DateTime::from_millis(now_ms);
        // The stop deadline, or for rows from before it the expiry.
        let due = || {
            doc! { "$or": [
                { "stops_at": { "$lte": now } },
                { "stops_at": { "$exists": false }, "expires_at": { "$lte": now } },
            ] }
        };
        let mut expired = due();
        expired.insert("claim_id", doc! { "$exists": false });
        let cursor = self.tokenizer.find(expired).await.map_err(unavailable)?;
        let candidates = documents(cursor).await?;
        let mut swept = Vec::new();
        for d in candidates {
            // Delete only if still due: a concurrent Dispatch or lease may have just moved it.
            let Some(id) = d.get("_id").cloned() else {
                continue;
            };
            let mut filter = due();
            filter.insert("_id", id);
            if let Some(gone) = self
                .tokenizer
                .find_one_and_delete(filter)
                .await
                .map_err(unavailable)?
            {
                swept.push(record_from_doc(&gone));
            }
        }
        self.tokenizer
            .delete_many(doc! { "claim_expires": { "$lte": now } })
            .await
            .map_err(unavailable)?;
        Ok(swept)
    }

    async fn put_share(&self, share: &ShareRecord) -> StoreResult<()> {
        shares::put(&self.shares, share).await
    }

    async fn find_share(&self, token_hash: &str) -> StoreResult<Option<ShareRecord>> {
        shares::find(&self.shares, token_hash).await
    }

    async fn list_shares(&self, owner: Option<&str>) -> StoreResult<Vec<ShareRecord>> {
        let filter = owner.map_or_else(Document::new, |o| doc! { "owner": o });
        shares::list(&self.shares, filter).await
    }

    async fn remove_share(&self, id: &str) -> StoreResult<Option<ShareRecord>> {
        let mut gone = shares::remove(&self.shares, doc! { "_id": id }).await?;
        Ok(gone.pop())
    }

    async fn remove_shares_of(
        &self,
        owner: &str,
        session_token_hash: &str,
    ) -> StoreResult<Vec<ShareRecord>> {
        let filter = doc! { "owner": owner, "session_token_hash": session_token_hash };
        shares::remove(&self.shares, filter).await
    }

    async fn prune_shares(&self, now_ms: i64) -> StoreResult<Vec<ShareRecord>> {
        let filter = doc! { "expires_at": { "$lte": DateTime::from_millis(now_ms) } };
        shares::remove(&self.shares, filter).await
    }

    async fn record_audit(&self, events: &[AuditEvent]) -> StoreResult<()> {
        audit::append(&self.audit, events).await
    }

    async fn audit(&self, query: &AuditQuery) -> StoreResult<Vec<AuditEvent>> {
        audit::newest(&self.audit, query).await
    }

    async fn prune_audit(&self, before_ms: i64) -> StoreResult<u64> {
        audit::prune(&self.audit, before_ms).await
    }

    async fn put_blade(&self, blade: &BladeRecord) -> StoreResult<()> {
        self.update_blades(
            |blades| match blades.iter_mut().find(|b| b.name == blade.name) {
                Some(b) => *b = blade.clone(),
                None => blades.push(blade.clone()),
            },
        )
        .await
    }

    async fn list_blades(&self) -> StoreResult<Vec<BladeRecord>> {
        let config = self.config_doc().await?;
        Ok(blades_of(&config, &self.legacy))
    }

    async fn set_draining(&self, name: &str, draining: bool) -> StoreResult<Option<BladeRecord>> {
        self.update_blades(|blades| {
            blades.iter_mut().find(|b| b.name == name).map(|b| {
                b.draining = draining;
                b.clone()
            })
        })
        .await
    }

    async fn remove_blade(&self, name: &str) -> StoreResult<bool> {
        self.update_blades(|blades| {
            let before = blades.len();
            blades.retain(|b| b.name != name);
            blades.len() != before
        })
        .await
    }

    async fn next_round_robin(&self) -> StoreResult<u64> {
        // FerretDB v1 runs findAndModify and filtered updates as a read then a write, so
        // neither `$inc` nor compare-and-set hands out a value once under concurrency (the
        // conformance suite caught both). Inserting into a unique `_id` is atomic everywhere:
        // each value is a ticket document, and whoever inserts ticket N owns N. `last_blade`
        // follows along (monotonically) for the original's readers.
        let config = self.config_doc().await?;
        let stored = int_of(config.get("last_blade"))
            .and_then(|v| u64::try_from(v).ok())
            .unwrap_or(0);
        let mut n = stored.max(self.last_ticket.load(Ordering::Relaxed));
        for _ in 0..10_000 {
            n += 1;
            match self.tickets.insert_one(doc! { "_id": n as i64 }).await {
                Ok(_) => {
                    self.last_ticket.fetch_max(n, Ordering::Relaxed);
                    let id = config.get("_id").cloned().unwrap_or(Bson::Null);
                    let filter = doc! { "_id": id, "last_blade": { "$lt": n as i64 } };
                    let _ = self
                        .config
                        .update_one(filter, doc! { "$set": { "last_blade": n as i64 } })
                        .await;
                    if n.is_multiple_of(1000) {
                        let _ = self
                            .tickets
                            .delete_many(doc! { "_id": { "$lt": n as i64 - 1000 } })
                            .await;
                    }
                    return Ok(n);
                }
                Err(e) if is_duplicate_key(&e) => continue,
                Err(e) => return Err(unavailable(e)),
            }
        }
        Err(StoreError::Unavailable(
            "round-robin counter under too much contention; try again".into(),
        ))
    }
}
