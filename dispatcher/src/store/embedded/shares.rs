//! The embedded store's shares: table `shares` (id → JSON record) and `share_tokens` (token
//! hash → id), the second being what ResolveToken looks a share up by. There are few shares at
//! any time (each is made by hand and expires), so listing and pruning scan `shares` whole
//! rather than keeping an index by owner or expiry.
use super::file::{SHARE_TOKENS, SHARES, decode, encode, err};
use crate::store::{ShareRecord, StoreError, StoreResult};
use redb::{ReadTransaction, ReadableTable, WriteTransaction};

/// Stores a new share, refusing (not overwriting) one whose id or token hash is taken: both
/// are fresh random values, so a clash means a bug, and overwriting would hide it.
pub(super) fn put(tx: &WriteTransaction, share: &ShareRecord) -> StoreResult<()> {
    let mut shares = tx.open_table(SHARES).map_err(err)?;
    let mut tokens = tx.open_table(SHARE_TOKENS).map_err(err)?;
    if shares.get(share.id.as_str()).map_err(err)?.is_some() {
        return Err(StoreError::Unavailable(format!(
            "storing share {}: a share with that id exists",
            share.id
        )));
    }
    if tokens
        .get(share.token_hash.as_str())
        .map_err(err)?
        .is_some()
    {
        return Err(StoreError::Unavailable(format!(
            "storing share {}: a share with that token hash exists",
            share.id
        )));
    }
    shares
        .insert(share.id.as_str(), encode(share)?.as_slice())
        .map_err(err)?;
    tokens
        .insert(share.token_hash.as_str(), share.id.as_str())
        .map_err(err)?;
    Ok(())
}

/// The share with `token_hash`, expired or not.
pub(super) fn find(tx: &ReadTransaction, token_hash: &str) -> StoreResult<Option<ShareRecord>> {
    let tokens = tx.open_table(SHARE_TOKENS).map_err(err)?;
    let Some(id) = tokens.get(token_hash).map_err(err)? else {
        return Ok(None);
    };
    let shares = tx.open_table(SHARES).map_err(err)?;
    let found = shares.get(id.value()).map_err(err)?;
    found.map(|v| decode(v.value())).transpose()
}

/// Every share in `shares`, decoded, in id order.
fn all(shares: &impl ReadableTable<&'static str, &'static [u8]>) -> StoreResult<Vec<ShareRecord>> {
    let mut out = Vec::new();
    for row in shares.iter().map_err(err)? {
        out.push(decode(row.map_err(err)?.1.value())?);
    }
    Ok(out)
}

/// Shares (`owner`'s only, when given), oldest first: by creation time, then id.
pub(super) fn list(tx: &ReadTransaction, owner: Option<&str>) -> StoreResult<Vec<ShareRecord>> {
    let mut out = all(&tx.open_table(SHARES).map_err(err)?)?;
    out.retain(|s| owner.is_none_or(|o| o == s.owner));
    out.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
    Ok(out)
}

/// Deletes the share with `id`; returns it.
pub(super) fn remove(tx: &WriteTransaction, id: &str) -> StoreResult<Option<ShareRecord>> {
    let removed = {
        let mut shares = tx.open_table(SHARES).map_err(err)?;
        let removed = shares.remove(id).map_err(err)?;
        removed
            .map(|v| decode::<ShareRecord>(v.value()))
            .transpose()?
    };
    if let Some(share) = &removed {
        tx.open_table(SHARE_TOKENS)
            .map_err(err)?
            .remove(share.token_hash.as_str())
            .map_err(err)?;
    }
    Ok(removed)
}

/// Deletes the shares `doomed` picks; returns them.
pub(super) fn remove_where(
    tx: &WriteTransaction,
    doomed: impl Fn(&ShareRecord) -> bool,
) -> StoreResult<Vec<ShareRecord>> {
    let picked: Vec<String> = all(&tx.open_table(SHARES).map_err(err)?)?
        .into_iter()
        .filter(|s| doomed(s))
        .map(|s| s.id)
        .collect();
    let mut out = Vec::with_capacity(picked.len());
    for id in picked {
        out.extend(remove(tx, &id)?);
    }
    Ok(out)
}
