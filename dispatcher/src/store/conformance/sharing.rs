//! Conformance checks for shares and the audit trail (see [`super`]).
// A test suite: panicking on the first violation is how it reports.
#![allow(clippy::unwrap_used)]
use crate::store::{AuditEvent, AuditQuery, ShareRecord, Store, StoreError};

fn share(
    id: &str,
    owner: &str,
    session: &str,
    created_at_ms: i64,
    expires_at_ms: i64,
) -> ShareRecord {
    ShareRecord {
        id: id.into(),
        token_hash: format!("{id}-token-hash"),
        owner: owner.into(),
        session_token_hash: session.into(),
        view_only: created_at_ms % 2 == 0,
        created_by: "portal:web".into(),
        note: format!("note for {id}"),
        created_at_ms,
        expires_at_ms,
    }
}

/// Shares of `prefix`'s owners only, sorted by id (the order of removals is unspecified).
fn mine(prefix: &str, mut shares: Vec<ShareRecord>) -> Vec<ShareRecord> {
    shares.retain(|s| s.owner.starts_with(prefix));
    shares.sort_by(|a, b| a.id.cmp(&b.id));
    shares
}

/// Shares: stored once per id and token hash, found by token hash, listed oldest first, and
/// removed by id, with their owner's session, or when expired.
pub(super) async fn shares(store: &dyn Store, prefix: &str) {
    let (owner, other) = (
        format!("{prefix}share-owner"),
        format!("{prefix}share-other"),
    );
    let (s1, s2) = (format!("{prefix}session-1"), format!("{prefix}session-2"));
    let far = 4_000_000_000_000;
    let id = |n: u32| format!("{prefix}share-{n}");
    let (one, two, three) = (
        share(&id(1), &owner, &s1, 1_000, far),
        share(&id(2), &owner, &s2, 2_000, far),
        share(&id(3), &other, &s1, 1_500, far),
    );
    // Same creation time as `one`: ordered after it by id.
    let four = share(&id(4), &owner, &s1, 1_000, far);
    let (expired, expiring) = (
        share(&id(5), &owner, &s2, 500, 10_000),
        share(&id(6), &other, &s1, 600, 10_001),
    );
    for s in [&two, &one, &three, &four, &expired, &expiring] {
        store.put_share(s).await.expect("put_share");
    }
    let mut clash = share(&id(7), &owner, &s1, 1, far);
    clash.token_hash = one.token_hash.clone();
    assert!(
        matches!(
            store.put_share(&clash).await,
            Err(StoreError::Unavailable(_))
        ),
        "a taken token hash is refused"
    );
    let mut clash = share(&id(1), &owner, &s1, 1, far);
    clash.token_hash = format!("{prefix}fresh-hash");
    assert!(
        matches!(
            store.put_share(&clash).await,
            Err(StoreError::Unavailable(_))
        ),
        "a taken id is refused"
    );
    assert_eq!(
        store.find_share(&one.token_hash).await.unwrap().as_ref(),
        Some(&one),
        "the refused clash changed nothing"
    );
    assert_eq!(store.find_share(&clash.token_hash).await.unwrap(), None);
    assert_eq!(
        store.list_shares(Some(&owner)).await.unwrap(),
        [expired.clone(), one.clone(), four.clone(), two.clone()],
        "one owner's, oldest first, then by id"
    );
    let all: Vec<ShareRecord> = store
        .list_shares(None)
        .await
        .unwrap()
        .into_iter()
        .filter(|s| s.owner.starts_with(prefix))
        .collect();
    assert_eq!(
        all,
        [
            expired.clone(),
            expiring.clone(),
            one.clone(),
            four.clone(),
            three.clone(),
            two.clone()
        ],
        "everyone's, oldest first"
    );

    let pruned = mine(prefix, store.prune_shares(10_000).await.unwrap());
    assert_eq!(pruned, vec![expired.clone()], "only what expired by then");
    assert_eq!(store.find_share(&expired.token_hash).await.unwrap(), None);
    let gone = mine(prefix, store.remove_shares_of(&owner, &s1).await.unwrap());
    assert_eq!(
        gone,
        [one.clone(), four.clone()],
        "the owner's for that session only"
    );
    assert_eq!(
        store.list_shares(Some(&owner)).await.unwrap(),
        vec![two.clone()],
        "the owner's share of another session stays"
    );
    assert_eq!(
        store.list_shares(Some(&other)).await.unwrap(),
        [expiring.clone(), three.clone()],
        "another owner's shares stay"
    );
    assert_eq!(
        store.remove_share(&two.id).await.unwrap(),
        Some(two.clone())
    );
    assert_eq!(store.remove_share(&two.id).await.unwrap(), None);
    assert_eq!(store.find_share(&two.token_hash).await.unwrap(), None);
    for s in [&three, &expiring] {
        assert!(store.remove_share(&s.id).await.unwrap().is_some());
    }
    assert!(mine(prefix, store.list_shares(None).await.unwrap()).is_empty());
}

fn event(at_ms: i64, username: &str, kind: &str) -> AuditEvent {
    AuditEvent {
        at_ms,
        kind: kind.into(),
        actor: "admin:cli".into(),
        username: username.into(),
        fields: [
            ("blade".to_owned(), "blade-a".to_owned()),
            ("n".to_owned(), format!("{at_ms}-{kind}")),
        ]
        .into(),
    }
}

fn query(username: Option<&str>, since_ms: Option<i64>, limit: usize) -> AuditQuery {
    AuditQuery {
        username: username.map(str::to_owned),
        since_ms,
        limit,
    }
}

/// The audit trail: the newest events matching, oldest first; pruned from the oldest. Its
/// events are dated in 1970, before anything real or any other check writes, and read by
/// username, so runs sharing a database do not see each other's.
pub(super) async fn audit(store: &dyn Store, prefix: &str) {
    let (a, b) = (format!("{prefix}audit-a"), format!("{prefix}audit-b"));
    let base = 1_000_000;
    let first = [
        event(base, &a, "dispatch"),
        event(base + 1, &b, "dispatch"),
        event(base + 2, &a, "connect"),
    ];
    // Recorded later, though one is older: reads go by time. Two share a millisecond: they
    // keep the order they were recorded in.
    let second = [
        event(base + 2, &a, "disconnect"),
        event(base + 5, &b, "end_session"),
        event(base - 1, &b, "share"),
        event(base + 9, &a, "session_end"),
    ];
    store.record_audit(&first).await.expect("record_audit");
    store.record_audit(&[]).await.expect("an empty batch");
    store.record_audit(&second).await.expect("record_audit");
    let (a0, b1, a2, a2b, b5, bm1, a9) = (
        &first[0], &first[1], &first[2], &second[0], &second[1], &second[2], &second[3],
    );
    let read = |q: AuditQuery| async move { store.audit(&q).await.unwrap() };
    assert_eq!(
        read(query(Some(&a), None, 100)).await,
        [a0, a2, a2b, a9].map(Clone::clone),
        "one user's, oldest first"
    );
    assert_eq!(
        read(query(Some(&b), None, 100)).await,
        [bm1, b1, b5].map(Clone::clone)
    );
    assert_eq!(
        read(query(Some(&a), None, 2)).await,
        [a2b, a9].map(Clone::clone),
        "the newest of the limit, oldest first"
    );
    assert_eq!(
        read(query(Some(&a), Some(base + 2), 100)).await,
        [a2, a2b, a9].map(Clone::clone),
        "since is inclusive"
    );
    assert_eq!(
        read(query(Some(&b), Some(base + 2), 1)).await,
        vec![b5.clone()]
    );
    assert!(read(query(Some(&a), None, 0)).await.is_empty(), "limit 0");
    assert!(read(query(None, None, 0)).await.is_empty(), "limit 0");
    assert!(
        read(query(Some(&format!("{prefix}nobody")), None, 10))
            .await
            .is_empty()
    );
    // Everyone's: whatever else the database holds, the limit and the order hold.
    let everyone = read(query(None, Some(base - 1), 3)).await;
    assert_eq!(everyone.len(), 3);
    assert!(
        everyone.windows(2).all(|w| w[0].at_ms <= w[1].at_ms),
        "oldest first"
    );
    assert!(everyone.iter().all(|e| e.at_ms >= base - 1), "since holds");

    // Pruning takes what is older than the time, and no more (other runs' 1970 events too).
    assert!(
        store.prune_audit(base + 1).await.unwrap() >= 2,
        "a0 and bm1 pruned"
    );
    assert_eq!(
        read(query(Some(&a), None, 100)).await,
        [a2, a2b, a9].map(Clone::clone)
    );
    assert_eq!(
        read(query(Some(&b), None, 100)).await,
        [b1, b5].map(Clone::clone),
        "an event at the prune time stays"
    );
    assert!(store.prune_audit(base + 10).await.unwrap() >= 5);
    for user in [&a, &b] {
        assert!(read(query(Some(user), None, 100)).await.is_empty());
    }
}
