//! The embedded store's session history: a table keyed by a rising sequence number, so the
//! oldest entries are the first keys and pruning takes them from the front.
use super::file::{HISTORY, bump, decode, encode, err};
use crate::store::{EndedSession, HISTORY_MAX, StoreResult};
use redb::{ReadableTable, ReadableTableMetadata, WriteTransaction};

/// Appends `ended`, then drops the oldest entries beyond [`HISTORY_MAX`].
pub(super) fn append(tx: &WriteTransaction, ended: &EndedSession) -> StoreResult<()> {
    let seq = bump(tx, "history_seq")?;
    let mut table = tx.open_table(HISTORY).map_err(err)?;
    table.insert(seq, encode(ended)?.as_slice()).map_err(err)?;
    let len = table.len().map_err(err)? as usize;
    for _ in HISTORY_MAX..len {
        table.pop_first().map_err(err)?;
    }
    Ok(())
}

/// Newest first, `username`'s only when given, at most `limit`.
pub(super) fn newest(
    tx: &redb::ReadTransaction,
    username: Option<&str>,
    limit: usize,
) -> StoreResult<Vec<EndedSession>> {
    let table = tx.open_table(HISTORY).map_err(err)?;
    let mut out = Vec::new();
    for row in table.iter().map_err(err)?.rev() {
        if out.len() >= limit {
            break;
        }
        let ended: EndedSession = decode(row.map_err(err)?.1.value())?;
        if username.is_none_or(|u| u == ended.username) {
            out.push(ended);
        }
    }
    Ok(out)
}
