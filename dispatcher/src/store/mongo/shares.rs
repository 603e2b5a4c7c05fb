//! The MongoDB store's shares: collection `shares`, one document per share with the share's id
//! as `_id` and a unique index on `token_hash`, so a clash of either is a duplicate-key error
//! (an insert is atomic on FerretDB v1 too), plus an index on `owner` for listings.
//!
//! Deleting several shares is a find, then a delete by `_id` each: FerretDB v1 has no atomic
//! find-and-delete, and this is safe enough because deleting is idempotent — a share found here
//! and deleted by another dispatcher meanwhile is simply not counted (`deleted_count` 0), and
//! nothing can bring a deleted share back or change the fields the filter matched.
use super::{is_duplicate_key, unavailable};
use crate::store::{ShareRecord, StoreError, StoreResult};
use mongodb::bson::{Bson, DateTime, Document, doc};
use mongodb::options::IndexOptions;
use mongodb::{Collection, IndexModel};

/// Creates the indexes (idempotent): unique on `token_hash`, and on `owner`.
pub(super) async fn create_indexes(shares: &Collection<Document>) -> StoreResult<()> {
    let unique = IndexOptions::builder()
        .unique(true)
        .name("token_hash_unique".to_owned())
        .build();
    let indexes = [
        IndexModel::builder()
            .keys(doc! { "token_hash": 1 })
            .options(unique)
            .build(),
        IndexModel::builder().keys(doc! { "owner": 1 }).build(),
    ];
    super::create_indexes(shares, "shares", indexes).await
}

/// Inserts `share`; a taken id or token hash is refused, never overwritten.
pub(super) async fn put(shares: &Collection<Document>, share: &ShareRecord) -> StoreResult<()> {
    match shares.insert_one(to_doc(share)).await {
        Ok(_) => Ok(()),
        Err(e) if is_duplicate_key(&e) => Err(StoreError::Unavailable(format!(
            "storing share {}: a share with that id or token hash exists",
            share.id
        ))),
        Err(e) => Err(unavailable(e)),
    }
}

/// The share with `token_hash`.
pub(super) async fn find(
    shares: &Collection<Document>,
    token_hash: &str,
) -> StoreResult<Option<ShareRecord>> {
    let found = shares
        .find_one(doc! { "token_hash": token_hash })
        .await
        .map_err(unavailable)?;
    found.as_ref().map(from_doc).transpose()
}

/// The shares matching `filter`, oldest first (by creation time, then id).
pub(super) async fn list(
    shares: &Collection<Document>,
    filter: Document,
) -> StoreResult<Vec<ShareRecord>> {
    let cursor = shares
        .find(filter)
        .sort(doc! { "created_at": 1, "_id": 1 })
        .await
        .map_err(unavailable)?;
    super::documents(cursor)
        .await?
        .iter()
        .map(from_doc)
        .collect()
}

/// Deletes the shares matching `filter` (see the module docs); returns those this call deleted.
pub(super) async fn remove(
    shares: &Collection<Document>,
    filter: Document,
) -> StoreResult<Vec<ShareRecord>> {
    let mut out = Vec::new();
    for share in list(shares, filter).await? {
        let gone = shares
            .delete_one(doc! { "_id": &share.id })
            .await
            .map_err(unavailable)?;
        if gone.deleted_count == 1 {
            out.push(share);
        }
    }
    Ok(out)
}

fn to_doc(s: &ShareRecord) -> Document {
    doc! {
        "_id": &s.id,
        "token_hash": &s.token_hash,
        "owner": &s.owner,
        "session_token_hash": &s.session_token_hash,
        "view_only": s.view_only,
        "created_by": &s.created_by,
        "note": &s.note,
        "created_at": DateTime::from_millis(s.created_at_ms),
        "expires_at": DateTime::from_millis(s.expires_at_ms),
    }
}

/// A share document as a record; only we write them, so a missing field is corruption.
fn from_doc(d: &Document) -> StoreResult<ShareRecord> {
    let corrupt = |field: &str| {
        let id = d.get("_id").map_or_else(String::new, Bson::to_string);
        StoreError::Corrupt(format!("share {id}: field {field} missing or mistyped"))
    };
    let text = |k: &str| d.get_str(k).map(str::to_owned).map_err(|_| corrupt(k));
    let time = |k: &str| {
        d.get_datetime(k)
            .map(|t| t.timestamp_millis())
            .map_err(|_| corrupt(k))
    };
    Ok(ShareRecord {
        id: text("_id")?,
        token_hash: text("token_hash")?,
        owner: text("owner")?,
        session_token_hash: text("session_token_hash")?,
        view_only: d.get_bool("view_only").map_err(|_| corrupt("view_only"))?,
        created_by: text("created_by")?,
        note: text("note")?,
        created_at_ms: time("created_at")?,
        expires_at_ms: time("expires_at")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_round_trips() {
        let s = ShareRecord {
            id: "0123456789abcdef".into(),
            token_hash: "th".into(),
            owner: "alice".into(),
            session_token_hash: "sh".into(),
            view_only: true,
            created_by: "portal:web".into(),
            note: "ticket 4711".into(),
            created_at_ms: 1,
            expires_at_ms: 2,
        };
        assert_eq!(from_doc(&to_doc(&s)).unwrap(), s);
        assert!(matches!(
            from_doc(&doc! { "_id": "x" }),
            Err(StoreError::Corrupt(_))
        ));
    }
}
