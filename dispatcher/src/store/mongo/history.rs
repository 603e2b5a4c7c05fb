//! The MongoDB store's session history: collection `session_history`, one document per ended
//! session, indexed by `ended_at`; after each insert the entries beyond [`HISTORY_MAX`] (the
//! oldest) are deleted, so the collection stays bounded without capped collections (which
//! FerretDB v1 does not have).
use super::unavailable;
use crate::store::{EndReason, EndedSession, HISTORY_MAX, StoreResult};
use mongodb::bson::{Bson, DateTime, Document, doc};
use mongodb::{Collection, IndexModel};

/// Creates the index on `ended_at` (idempotent).
pub(super) async fn create_index(history: &Collection<Document>) -> StoreResult<()> {
    history
        .create_index(IndexModel::builder().keys(doc! { "ended_at": -1 }).build())
        .await
        .map_err(unavailable)?;
    Ok(())
}

/// Inserts `ended`, then deletes what lies beyond the newest [`HISTORY_MAX`].
pub(super) async fn append(
    history: &Collection<Document>,
    ended: &EndedSession,
) -> StoreResult<()> {
    history
        .insert_one(to_doc(ended))
        .await
        .map_err(unavailable)?;
    let beyond = history
        .find_one(doc! {})
        .sort(doc! { "ended_at": -1 })
        .skip(HISTORY_MAX as u64)
        .await
        .map_err(unavailable)?;
    if let Some(Bson::DateTime(oldest_kept)) = beyond.as_ref().and_then(|d| d.get("ended_at")) {
        history
            .delete_many(doc! { "ended_at": { "$lte": *oldest_kept } })
            .await
            .map_err(unavailable)?;
    }
    Ok(())
}

/// Newest first, `username`'s only when given, at most `limit`.
pub(super) async fn newest(
    history: &Collection<Document>,
    username: Option<&str>,
    limit: usize,
) -> StoreResult<Vec<EndedSession>> {
    let filter = match username {
        Some(u) => doc! { "username": u },
        None => doc! {},
    };
    let cursor = history
        .find(filter)
        .sort(doc! { "ended_at": -1 })
        .limit(i64::try_from(limit).unwrap_or(i64::MAX))
        .await
        .map_err(unavailable)?;
    Ok(super::documents(cursor)
        .await?
        .iter()
        .filter_map(from_doc)
        .collect())
}

fn to_doc(e: &EndedSession) -> Document {
    doc! {
        "username": &e.username,
        "blade": &e.blade,
        "display": e.display as i64,
        "vncpid": e.vnc_pid as i64,
        "created_at": DateTime::from_millis(e.created_at_ms),
        "ended_at": DateTime::from_millis(e.ended_at_ms),
        "reason": e.reason.as_str(),
        "detail": &e.detail,
    }
}

fn from_doc(d: &Document) -> Option<EndedSession> {
    let time = |k: &str| match d.get(k) {
        Some(Bson::DateTime(t)) => t.timestamp_millis(),
        _ => 0,
    };
    let int = |k: &str| super::schema::int_of(d.get(k)).and_then(|v| u32::try_from(v).ok());
    Some(EndedSession {
        username: d.get_str("username").ok()?.to_owned(),
        blade: d.get_str("blade").unwrap_or_default().to_owned(),
        display: int("display").unwrap_or(0),
        vnc_pid: int("vncpid").unwrap_or(0),
        created_at_ms: time("created_at"),
        ended_at_ms: time("ended_at"),
        reason: EndReason::from_name(d.get_str("reason").ok()?)?,
        detail: d.get_str("detail").unwrap_or_default().to_owned(),
    })
}
