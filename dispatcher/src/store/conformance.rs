//! The conformance suite every [`Store`] must pass, run by the integration tests
//! (`tests/tests/store_conformance.rs`) against the embedded store, the timing decorator and a
//! real FerretDB. Built only with the `conformance` feature, which those tests enable: it is
//! test support, not shipped. It panics on the first violation, naming it. Each run uses
//! usernames and blade names with `prefix`, so runs can share a database.
// A test suite: panicking on the first violation is how it reports.
#![allow(clippy::unwrap_used)]
use super::{
    BladeRecord, Claim, ClaimOutcome, EndReason, EndedSession, Method, SessionRecord, Store,
    StoreError, StoredSecret,
};
use std::sync::Arc;

mod sharing;

fn claim(id: &str, expires_at_ms: i64) -> Claim {
    Claim {
        id: id.into(),
        expires_at_ms,
    }
}

fn session(username: &str, hash: &str, expires_at_ms: i64) -> SessionRecord {
    SessionRecord {
        username: username.into(),
        claim: None,
        token_hash: hash.into(),
        token: StoredSecret::Sealed(format!("sealed-token-{hash}")),
        password: StoredSecret::Sealed("sealed-password".into()),
        blade: "blade-a".into(),
        host: "127.0.0.2".into(),
        display: 7,
        port: 5907,
        vnc_pid: 4242,
        remote_ip: "192.0.2.1".into(),
        created_at_ms: 1_000,
        expires_at_ms: Some(expires_at_ms),
        cert_sha256: "c0ffee".repeat(10) + "abcd",
        lease_until_ms: None,
        stops_at_ms: Some(expires_at_ms),
        view_password: Some(StoredSecret::Sealed("sealed-view-password".into())),
    }
}

/// Runs every check against `store`.
pub async fn run(store: Arc<dyn Store>, prefix: &str) {
    store.ping().await.expect("ping");
    sessions(&*store, prefix).await;
    concurrent_claims(store.clone(), prefix).await;
    expiry(&*store, prefix).await;
    leases(&*store, prefix).await;
    legacy_and_claims(&*store, prefix).await;
    history(&*store, prefix).await;
    sharing::shares(&*store, prefix).await;
    sharing::audit(&*store, prefix).await;
    blades(&*store, prefix).await;
    round_robin(store.clone()).await;
}

async fn sessions(store: &dyn Store, prefix: &str) {
    let alice = format!("{prefix}alice");
    let hash = format!("{prefix}hash-alice");
    assert_eq!(
        store.get_session(&alice).await.unwrap(),
        None,
        "fresh store has no session"
    );
    assert_eq!(
        store
            .claim(&alice, &claim("c1", i64::MAX), 0)
            .await
            .unwrap(),
        ClaimOutcome::Won
    );
    let placeholder = store
        .get_session(&alice)
        .await
        .unwrap()
        .expect("placeholder stored");
    assert!(!placeholder.is_ready(), "a claim is not a session");
    assert_eq!(
        store
            .claim(&alice, &claim("c2", i64::MAX), 0)
            .await
            .unwrap(),
        ClaimOutcome::Pending
    );
    assert!(
        store
            .list_sessions()
            .await
            .unwrap()
            .iter()
            .all(|s| s.username != alice),
        "placeholders are not listed"
    );
    // Only the claimant may complete.
    let rec = session(&alice, &hash, i64::MAX);
    assert!(matches!(
        store.complete(&rec, "c2").await,
        Err(StoreError::ClaimLost(_))
    ));
    store.complete(&rec, "c1").await.expect("complete");
    assert_eq!(
        store.get_session(&alice).await.unwrap().as_ref(),
        Some(&rec)
    );
    match store
        .claim(&alice, &claim("c3", i64::MAX), 0)
        .await
        .unwrap()
    {
        ClaimOutcome::Existing(found) => assert_eq!(*found, rec),
        other => panic!("claim on a ready session gave {other:?}"),
    }
    assert_eq!(
        store.find_by_token(&hash, "unused").await.unwrap().as_ref(),
        Some(&rec)
    );
    assert_eq!(
        store
            .find_by_token(&format!("{prefix}other"), "unused")
            .await
            .unwrap(),
        None
    );
    // touch needs the current token hash.
    assert_eq!(
        store
            .touch(&alice, "stale", "198.51.100.9", 99, 99)
            .await
            .unwrap(),
        None
    );
    let touched = store
        .touch(&alice, &hash, "2001:db8::7", i64::MAX - 1, i64::MAX - 2)
        .await
        .unwrap()
        .expect("touched");
    assert_eq!(
        (
            touched.remote_ip.as_str(),
            touched.expires_at_ms,
            touched.stops_at_ms
        ),
        // The stop deadline never moves earlier (it was i64::MAX).
        ("2001:db8::7", Some(i64::MAX - 1), Some(i64::MAX))
    );
    assert_eq!(
        store.get_session(&alice).await.unwrap().unwrap().remote_ip,
        "2001:db8::7"
    );
    assert!(
        store
            .list_sessions()
            .await
            .unwrap()
            .iter()
            .any(|s| s.username == alice)
    );
    // Delete only with the right hash, and the token stops resolving.
    assert_eq!(
        store.delete_session(&alice, Some("stale")).await.unwrap(),
        None
    );
    assert!(
        store
            .delete_session(&alice, Some(&hash))
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(store.find_by_token(&hash, "unused").await.unwrap(), None);
    assert_eq!(store.get_session(&alice).await.unwrap(), None);
    assert_eq!(store.delete_session(&alice, None).await.unwrap(), None);
    // Abandon removes only our own placeholder.
    assert_eq!(
        store
            .claim(&alice, &claim("c4", i64::MAX), 0)
            .await
            .unwrap(),
        ClaimOutcome::Won
    );
    store.abandon(&alice, "not-mine").await.unwrap();
    assert!(store.get_session(&alice).await.unwrap().is_some());
    store.abandon(&alice, "c4").await.unwrap();
    assert_eq!(store.get_session(&alice).await.unwrap(), None);
}

async fn concurrent_claims(store: Arc<dyn Store>, prefix: &str) {
    let bob = format!("{prefix}bob");
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let (store, bob) = (store.clone(), bob.clone());
            tokio::spawn(async move {
                store
                    .claim(&bob, &claim(&format!("b{i}"), i64::MAX), 0)
                    .await
            })
        })
        .collect();
    let mut won = 0;
    for t in tasks {
        match t.await.unwrap().unwrap() {
            ClaimOutcome::Won => won += 1,
            ClaimOutcome::Pending => {}
            ClaimOutcome::Existing(_) => panic!("no session existed"),
        }
    }
    assert_eq!(won, 1, "exactly one of 32 concurrent claims wins");
    // A claim whose deadline passed is taken over.
    assert_eq!(
        store
            .claim(&bob, &claim("late", i64::MAX), i64::MAX)
            .await
            .unwrap(),
        ClaimOutcome::Won
    );
    store.abandon(&bob, "late").await.unwrap();
}

async fn expiry(store: &dyn Store, prefix: &str) {
    let (old, new, starting) = (
        format!("{prefix}old"),
        format!("{prefix}new"),
        format!("{prefix}starting"),
    );
    for (user, expires) in [(&old, 5_000), (&new, 50_000)] {
        assert_eq!(
            store.claim(user, &claim("e", i64::MAX), 0).await.unwrap(),
            ClaimOutcome::Won
        );
        store
            .complete(&session(user, &format!("{user}-hash"), expires), "e")
            .await
            .unwrap();
    }
    assert_eq!(
        store.claim(&starting, &claim("s", 6_000), 0).await.unwrap(),
        ClaimOutcome::Won
    );
    let swept = store.sweep_expired(10_000).await.unwrap();
    let swept_names: Vec<&str> = swept.iter().map(|s| s.username.as_str()).collect();
    assert!(
        swept_names.contains(&old.as_str()) && !swept_names.contains(&new.as_str()),
        "{swept_names:?}"
    );
    assert_eq!(store.get_session(&old).await.unwrap(), None);
    assert_eq!(
        store.get_session(&starting).await.unwrap(),
        None,
        "a dead claim is swept"
    );
    assert!(
        store
            .find_by_token(&format!("{new}-hash"), "")
            .await
            .unwrap()
            .is_some()
    );
    store.delete_session(&new, None).await.unwrap();
}

/// A lease moves the stop deadline: the sweep keeps a session whose token expired while its
/// lease (plus grace) runs, and takes it once that passes; a lease needs the current hash.
async fn leases(store: &dyn Store, prefix: &str) {
    let user = format!("{prefix}leased");
    let hash = format!("{user}-hash");
    store.claim(&user, &claim("l", i64::MAX), 0).await.unwrap();
    store
        .complete(&session(&user, &hash, 5_000), "l")
        .await
        .unwrap();
    assert_eq!(
        store
            .renew_lease(&user, "stale", 9_000, 20_000)
            .await
            .unwrap(),
        None,
        "a lease needs the current token hash"
    );
    let leased = store
        .renew_lease(&user, &hash, 9_000, 20_000)
        .await
        .unwrap()
        .expect("leased");
    assert_eq!(
        (leased.lease_until_ms, leased.stops_at_ms),
        (Some(9_000), Some(20_000))
    );
    assert!(leased.resolves(8_000) && !leased.resolves(9_000));
    let again = store
        .renew_lease(&user, &hash, 7_000, 15_000)
        .await
        .unwrap()
        .expect("leased");
    assert_eq!(
        (again.lease_until_ms, again.stops_at_ms),
        (Some(9_000), Some(20_000)),
        "a late renewal never moves the lease or the deadline earlier"
    );
    let swept = store.sweep_expired(10_000).await.unwrap();
    assert!(
        !swept.iter().any(|s| s.username == user),
        "swept while its stop deadline was ahead"
    );
    assert!(store.get_session(&user).await.unwrap().is_some());
    let swept = store.sweep_expired(20_000).await.unwrap();
    assert!(
        swept
            .iter()
            .any(|s| s.username == user && s.lease_until_ms == Some(9_000)),
        "not swept at its stop deadline: {swept:?}"
    );
}

/// Rows without an expiry (the original's) get one; a claim is renewed only by its owner.
async fn legacy_and_claims(store: &dyn Store, prefix: &str) {
    let user = format!("{prefix}legacy");
    store.claim(&user, &claim("g", i64::MAX), 0).await.unwrap();
    let mut rec = session(&user, &format!("{user}-hash"), 0);
    rec.expires_at_ms = None;
    rec.stops_at_ms = None;
    store.complete(&rec, "g").await.unwrap();
    assert!(store.date_legacy(77_000).await.unwrap() >= 1);
    let dated = store
        .get_session(&user)
        .await
        .unwrap()
        .expect("still there");
    assert_eq!(
        (dated.expires_at_ms, dated.stops_at_ms),
        (Some(77_000), Some(77_000))
    );
    store.delete_session(&user, None).await.unwrap();

    let starting = format!("{prefix}renewed");
    store
        .claim(&starting, &claim("mine", 1_000), 0)
        .await
        .unwrap();
    assert!(
        !store
            .renew_claim(&starting, "theirs", 50_000)
            .await
            .unwrap()
    );
    assert!(store.renew_claim(&starting, "mine", 50_000).await.unwrap());
    assert_eq!(
        store
            .claim(&starting, &claim("late", 60_000), 2_000)
            .await
            .unwrap(),
        ClaimOutcome::Pending,
        "a renewed claim still holds past its first deadline"
    );
    store.abandon(&starting, "mine").await.unwrap();
}

/// The history keeps ends newest first, per user or for all.
async fn history(store: &dyn Store, prefix: &str) {
    let (a, b) = (format!("{prefix}hist-a"), format!("{prefix}hist-b"));
    let base = 1_900_000_000_000;
    for (i, (user, reason)) in [
        (&a, EndReason::TokenExpired),
        (&b, EndReason::Portal),
        (&a, EndReason::NoClient),
    ]
    .into_iter()
    .enumerate()
    {
        let rec = session(user, "h", 0);
        store
            .record_end(&EndedSession::of(
                &rec,
                base + i as i64,
                reason,
                format!("#{i}"),
            ))
            .await
            .unwrap();
    }
    let mine = store.history(Some(&a), 10).await.unwrap();
    assert_eq!(
        mine.iter().map(|e| e.reason).collect::<Vec<_>>(),
        [EndReason::NoClient, EndReason::TokenExpired],
        "newest first, one user's"
    );
    assert_eq!(mine[0].ended_at_ms, base + 2);
    assert_eq!(mine[0].display, 7);
    assert_eq!(
        store.history(None, 2).await.unwrap().len(),
        2,
        "the limit holds"
    );
}

async fn blades(store: &dyn Store, prefix: &str) {
    let names: Vec<String> = (0..3).map(|i| format!("{prefix}blade{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        let blade = BladeRecord {
            name: name.clone(),
            host: format!("127.0.0.{}", i + 2),
            port: 7501,
            method: if i == 2 { Method::Ssh } else { Method::Agent },
            draining: false,
            pool: "default".into(),
            max_sessions: 0,
        };
        store.put_blade(&blade).await.unwrap();
    }
    // Idempotent for a name: an update keeps its place in the order.
    let mut updated = store
        .list_blades()
        .await
        .unwrap()
        .into_iter()
        .find(|b| b.name == names[0])
        .unwrap();
    updated.port = 7600;
    updated.pool = "lab".into();
    updated.max_sessions = 12;
    store.put_blade(&updated).await.unwrap();
    let listed: Vec<BladeRecord> = store
        .list_blades()
        .await
        .unwrap()
        .into_iter()
        .filter(|b| b.name.starts_with(prefix))
        .collect();
    assert_eq!(
        listed.iter().map(|b| b.name.clone()).collect::<Vec<_>>(),
        names,
        "registration order kept"
    );
    assert_eq!(listed[0].port, 7600);
    assert_eq!(
        (listed[0].pool.as_str(), listed[0].max_sessions),
        ("lab", 12)
    );
    assert_eq!(listed[2].method, Method::Ssh);
    let drained = store
        .set_draining(&names[1], true)
        .await
        .unwrap()
        .expect("blade exists");
    assert!(drained.draining);
    assert!(
        store
            .list_blades()
            .await
            .unwrap()
            .iter()
            .any(|b| b.name == names[1] && b.draining)
    );
    assert_eq!(
        store
            .set_draining(&format!("{prefix}nope"), true)
            .await
            .unwrap(),
        None
    );
    for name in &names {
        assert!(store.remove_blade(name).await.unwrap());
    }
    assert!(!store.remove_blade(&names[0]).await.unwrap());
    assert!(
        store
            .list_blades()
            .await
            .unwrap()
            .iter()
            .all(|b| !b.name.starts_with(prefix))
    );
}

async fn round_robin(store: Arc<dyn Store>) {
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.next_round_robin().await })
        })
        .collect();
    let mut values = Vec::new();
    for t in tasks {
        values.push(t.await.unwrap().unwrap());
    }
    values.sort();
    values.dedup();
    assert_eq!(
        values.len(),
        50,
        "the counter hands out each value once under concurrency"
    );
}
