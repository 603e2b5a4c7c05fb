//! The embedded store's audit trail: table `audit`, keyed by (time, sequence number) so that
//! reading what happened since a time, and pruning what is older than one, are range scans
//! that touch only the rows they return or delete; the sequence keeps events of the same
//! millisecond in the order they were recorded. `audit_by_user` (username, time, sequence)
//! indexes it by user, so one user's events are found without reading everyone's.
use super::file::{AUDIT, AUDIT_BY_USER, bump, decode, encode, err};
use crate::store::{AuditEvent, AuditQuery, StoreResult};
use redb::{ReadTransaction, ReadableTable, WriteTransaction};

/// Appends `events` in order.
pub(super) fn append(tx: &WriteTransaction, events: &[AuditEvent]) -> StoreResult<()> {
    let mut audit = tx.open_table(AUDIT).map_err(err)?;
    let mut by_user = tx.open_table(AUDIT_BY_USER).map_err(err)?;
    for event in events {
        let seq = bump(tx, "audit_seq")?;
        audit
            .insert((event.at_ms, seq), encode(event)?.as_slice())
            .map_err(err)?;
        by_user
            .insert((event.username.as_str(), event.at_ms, seq), ())
            .map_err(err)?;
    }
    Ok(())
}

/// The newest `query.limit` events matching `query`, oldest first.
pub(super) fn newest(tx: &ReadTransaction, query: &AuditQuery) -> StoreResult<Vec<AuditEvent>> {
    let audit = tx.open_table(AUDIT).map_err(err)?;
    let since = query.since_ms.unwrap_or(i64::MIN);
    let mut out = Vec::new();
    match &query.username {
        None => {
            for row in audit.range((since, 0)..).map_err(err)?.rev() {
                if out.len() >= query.limit {
                    break;
                }
                out.push(decode(row.map_err(err)?.1.value())?);
            }
        }
        Some(user) => {
            let by_user = tx.open_table(AUDIT_BY_USER).map_err(err)?;
            let keys = by_user
                .range((user.as_str(), since, 0)..=(user.as_str(), i64::MAX, u64::MAX))
                .map_err(err)?;
            for row in keys.rev() {
                if out.len() >= query.limit {
                    break;
                }
                let (_, at_ms, seq) = row.map_err(err)?.0.value();
                // Pruned together with its event, so a missing one is a torn index: skip it.
                if let Some(v) = audit.get((at_ms, seq)).map_err(err)? {
                    out.push(decode(v.value())?);
                }
            }
        }
    }
    out.reverse();
    Ok(out)
}

/// Deletes the events older than `before_ms` (the first keys); returns how many.
pub(super) fn prune(tx: &WriteTransaction, before_ms: i64) -> StoreResult<u64> {
    let mut audit = tx.open_table(AUDIT).map_err(err)?;
    let mut by_user = tx.open_table(AUDIT_BY_USER).map_err(err)?;
    let mut pruned = 0;
    loop {
        let (at_ms, seq, username) = {
            let Some((k, v)) = audit.first().map_err(err)? else {
                break;
            };
            let (at_ms, seq) = k.value();
            if at_ms >= before_ms {
                break;
            }
            (at_ms, seq, decode::<AuditEvent>(v.value())?.username)
        };
        audit.remove((at_ms, seq)).map_err(err)?;
        by_user
            .remove((username.as_str(), at_ms, seq))
            .map_err(err)?;
        pruned += 1;
    }
    Ok(pruned)
}

#[cfg(test)]
mod tests {
    use crate::store::embedded::EmbeddedStore;
    use crate::store::{AuditEvent, AuditQuery, Store};

    fn event(at_ms: i64, username: &str) -> AuditEvent {
        AuditEvent {
            at_ms,
            kind: "connect".into(),
            actor: "dispatcher".into(),
            username: username.into(),
            fields: [("n".to_owned(), at_ms.to_string())].into(),
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn negative_times_sort_before_positive_and_prune_from_the_front() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        let events = [event(5, "a"), event(-5, "b"), event(0, "a"), event(-1, "a")];
        store.record_audit(&events).await.unwrap();
        let all = |username: Option<&str>| AuditQuery {
            username: username.map(str::to_owned),
            since_ms: None,
            limit: 10,
        };
        let times = |v: Vec<AuditEvent>| v.iter().map(|e| e.at_ms).collect::<Vec<_>>();
        assert_eq!(
            times(store.audit(&all(None)).await.unwrap()),
            [-5, -1, 0, 5]
        );
        assert_eq!(
            times(store.audit(&all(Some("a"))).await.unwrap()),
            [-1, 0, 5]
        );
        assert_eq!(store.prune_audit(0).await.unwrap(), 2);
        assert_eq!(times(store.audit(&all(Some("a"))).await.unwrap()), [0, 5]);
        assert_eq!(
            times(store.audit(&all(Some("b"))).await.unwrap()),
            [] as [i64; 0]
        );
    }
}
