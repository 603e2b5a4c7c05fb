//! The MongoDB store's audit trail: collection `audit`, one document per event with its time
//! as a BSON date `at`, indexed by `at` and by `username` + `at`. Both indexes end in `_id`,
//! which the reads sort by after `at`: the driver makes ids that rise in insertion order, so
//! events of the same millisecond keep the order they were recorded in, and the index serves
//! the whole sort (no in-memory sort of everything matching before the limit).
use super::unavailable;
use crate::store::{AuditEvent, AuditQuery, StoreError, StoreResult};
use mongodb::bson::{Bson, DateTime, Document, doc};
use mongodb::{Collection, IndexModel};

/// Creates the indexes (idempotent).
pub(super) async fn create_indexes(audit: &Collection<Document>) -> StoreResult<()> {
    let indexes = [
        IndexModel::builder()
            .keys(doc! { "at": 1, "_id": 1 })
            .build(),
        IndexModel::builder()
            .keys(doc! { "username": 1, "at": 1, "_id": 1 })
            .build(),
    ];
    super::create_indexes(audit, "audit", indexes).await
}

/// Inserts `events` in one `insert_many`, in order.
pub(super) async fn append(audit: &Collection<Document>, events: &[AuditEvent]) -> StoreResult<()> {
    if events.is_empty() {
        return Ok(()); // insert_many refuses an empty batch
    }
    audit
        .insert_many(events.iter().map(to_doc))
        .await
        .map_err(|e| StoreError::Unavailable(format!("recording audit events: {e}")))?;
    Ok(())
}

/// The newest `query.limit` events matching `query`, oldest first.
pub(super) async fn newest(
    audit: &Collection<Document>,
    query: &AuditQuery,
) -> StoreResult<Vec<AuditEvent>> {
    // A limit of 0 would mean "no limit" to MongoDB.
    if query.limit == 0 {
        return Ok(Vec::new());
    }
    let mut filter = Document::new();
    if let Some(user) = &query.username {
        filter.insert("username", user);
    }
    if let Some(since) = query.since_ms {
        filter.insert("at", doc! { "$gte": DateTime::from_millis(since) });
    }
    let cursor = audit
        .find(filter)
        .sort(doc! { "at": -1, "_id": -1 })
        .limit(i64::try_from(query.limit).unwrap_or(i64::MAX))
        .await
        .map_err(unavailable)?;
    let mut out = super::documents(cursor)
        .await?
        .iter()
        .map(from_doc)
        .collect::<StoreResult<Vec<_>>>()?;
    out.reverse();
    Ok(out)
}

/// Deletes the events older than `before_ms`; returns how many.
pub(super) async fn prune(audit: &Collection<Document>, before_ms: i64) -> StoreResult<u64> {
    let gone = audit
        .delete_many(doc! { "at": { "$lt": DateTime::from_millis(before_ms) } })
        .await
        .map_err(|e| StoreError::Unavailable(format!("pruning the audit trail: {e}")))?;
    Ok(gone.deleted_count)
}

fn to_doc(e: &AuditEvent) -> Document {
    let fields: Document = e
        .fields
        .iter()
        .map(|(k, v)| (k.clone(), Bson::String(v.clone())))
        .collect();
    doc! {
        "at": DateTime::from_millis(e.at_ms),
        "kind": &e.kind,
        "actor": &e.actor,
        "username": &e.username,
        "fields": fields,
    }
}

/// An audit document as an event; only we write them, so a missing field is corruption.
fn from_doc(d: &Document) -> StoreResult<AuditEvent> {
    let corrupt = |field: &str| {
        let id = d.get("_id").map_or_else(String::new, Bson::to_string);
        StoreError::Corrupt(format!(
            "audit event {id}: field {field} missing or mistyped"
        ))
    };
    let text = |k: &str| d.get_str(k).map(str::to_owned).map_err(|_| corrupt(k));
    let fields = d
        .get_document("fields")
        .map_err(|_| corrupt("fields"))?
        .iter()
        .map(|(k, v)| match v {
            Bson::String(s) => Ok((k.clone(), s.clone())),
            _ => Err(corrupt("fields")),
        })
        .collect::<StoreResult<_>>()?;
    Ok(AuditEvent {
        at_ms: d
            .get_datetime("at")
            .map(|t| t.timestamp_millis())
            .map_err(|_| corrupt("at"))?,
        kind: text("kind")?,
        actor: text("actor")?,
        username: text("username")?,
        fields,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_round_trips() {
        let e = AuditEvent {
            at_ms: -3,
            kind: "share".into(),
            actor: "portal:web".into(),
            username: "alice".into(),
            fields: [("share_id".to_owned(), "ab".to_owned())].into(),
        };
        assert_eq!(from_doc(&to_doc(&e)).unwrap(), e);
    }
}
