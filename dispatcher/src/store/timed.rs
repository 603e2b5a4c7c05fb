//! A [`Store`] decorator that times every call for the
//! `vncdispatch_dispatcher_store_duration_seconds{op}` histogram and counts failures in
//! `vncdispatch_dispatcher_store_errors_total{op}`, whichever store is underneath.
use super::{
    AuditEvent, AuditQuery, BladeRecord, Claim, ClaimOutcome, EndedSession, SessionRecord,
    ShareRecord, Store, StoreResult,
};
use std::future::Future;
use std::sync::Arc;

/// Wraps a store with timing.
#[derive(Debug)]
pub struct Timed(pub Arc<dyn Store>);

async fn timed<T>(op: &'static str, f: impl Future<Output = StoreResult<T>>) -> StoreResult<T> {
    let start = std::time::Instant::now();
    let r = f.await;
    metrics::histogram!("vncdispatch_dispatcher_store_duration_seconds", "op" => op)
        .record(start.elapsed().as_secs_f64());
    if r.is_err() {
        metrics::counter!("vncdispatch_dispatcher_store_errors_total", "op" => op).increment(1);
    }
    r
}

#[async_trait::async_trait]
impl Store for Timed {
    async fn ping(&self) -> StoreResult<()> {
        timed("ping", self.0.ping()).await
    }
    async fn get_session(&self, username: &str) -> StoreResult<Option<SessionRecord>> {
        timed("get_session", self.0.get_session(username)).await
    }
    async fn claim(&self, username: &str, claim: &Claim, now_ms: i64) -> StoreResult<ClaimOutcome> {
        timed("claim", self.0.claim(username, claim, now_ms)).await
    }
    async fn complete(&self, record: &SessionRecord, claim_id: &str) -> StoreResult<()> {
        timed("complete", self.0.complete(record, claim_id)).await
    }
    async fn abandon(&self, username: &str, claim_id: &str) -> StoreResult<()> {
        timed("abandon", self.0.abandon(username, claim_id)).await
    }
    async fn find_by_token(
        &self,
        token_hash: &str,
        token: &str,
    ) -> StoreResult<Option<SessionRecord>> {
        timed("find_by_token", self.0.find_by_token(token_hash, token)).await
    }
    async fn touch(
        &self,
        username: &str,
        token_hash: &str,
        remote_ip: &str,
        expires_at_ms: i64,
        stops_at_ms: i64,
    ) -> StoreResult<Option<SessionRecord>> {
        timed(
            "touch",
            self.0
                .touch(username, token_hash, remote_ip, expires_at_ms, stops_at_ms),
        )
        .await
    }
    async fn renew_lease(
        &self,
        username: &str,
        token_hash: &str,
        lease_until_ms: i64,
        stops_at_ms: i64,
    ) -> StoreResult<Option<SessionRecord>> {
        timed(
            "renew_lease",
            self.0
                .renew_lease(username, token_hash, lease_until_ms, stops_at_ms),
        )
        .await
    }
    async fn date_legacy(&self, expires_at_ms: i64) -> StoreResult<u64> {
        timed("date_legacy", self.0.date_legacy(expires_at_ms)).await
    }
    async fn renew_claim(
        &self,
        username: &str,
        claim_id: &str,
        expires_at_ms: i64,
    ) -> StoreResult<bool> {
        timed(
            "renew_claim",
            self.0.renew_claim(username, claim_id, expires_at_ms),
        )
        .await
    }
    async fn record_end(&self, ended: &EndedSession) -> StoreResult<()> {
        timed("record_end", self.0.record_end(ended)).await
    }
    async fn history(
        &self,
        username: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<EndedSession>> {
        timed("history", self.0.history(username, limit)).await
    }
    async fn delete_session(
        &self,
        username: &str,
        token_hash: Option<&str>,
    ) -> StoreResult<Option<SessionRecord>> {
        timed(
            "delete_session",
            self.0.delete_session(username, token_hash),
        )
        .await
    }
    async fn list_sessions(&self) -> StoreResult<Vec<SessionRecord>> {
        timed("list_sessions", self.0.list_sessions()).await
    }
    async fn sweep_expired(&self, now_ms: i64) -> StoreResult<Vec<SessionRecord>> {
        timed("sweep_expired", self.0.sweep_expired(now_ms)).await
    }
    async fn put_share(&self, share: &ShareRecord) -> StoreResult<()> {
        timed("put_share", self.0.put_share(share)).await
    }
    async fn find_share(&self, token_hash: &str) -> StoreResult<Option<ShareRecord>> {
        timed("find_share", self.0.find_share(token_hash)).await
    }
    async fn list_shares(&self, owner: Option<&str>) -> StoreResult<Vec<ShareRecord>> {
        timed("list_shares", self.0.list_shares(owner)).await
    }
    async fn remove_share(&self, id: &str) -> StoreResult<Option<ShareRecord>> {
        timed("remove_share", self.0.remove_share(id)).await
    }
    async fn remove_shares_of(
        &self,
        owner: &str,
        session_token_hash: &str,
    ) -> StoreResult<Vec<ShareRecord>> {
        timed(
            "remove_shares_of",
            self.0.remove_shares_of(owner, session_token_hash),
        )
        .await
    }
    async fn prune_shares(&self, now_ms: i64) -> StoreResult<Vec<ShareRecord>> {
        timed("prune_shares", self.0.prune_shares(now_ms)).await
    }
    async fn record_audit(&self, events: &[AuditEvent]) -> StoreResult<()> {
        timed("record_audit", self.0.record_audit(events)).await
    }
    async fn audit(&self, query: &AuditQuery) -> StoreResult<Vec<AuditEvent>> {
        timed("audit", self.0.audit(query)).await
    }
    async fn prune_audit(&self, before_ms: i64) -> StoreResult<u64> {
        timed("prune_audit", self.0.prune_audit(before_ms)).await
    }
    async fn put_blade(&self, blade: &BladeRecord) -> StoreResult<()> {
        timed("put_blade", self.0.put_blade(blade)).await
    }
    async fn list_blades(&self) -> StoreResult<Vec<BladeRecord>> {
        timed("list_blades", self.0.list_blades()).await
    }
    async fn set_draining(&self, name: &str, draining: bool) -> StoreResult<Option<BladeRecord>> {
        timed("set_draining", self.0.set_draining(name, draining)).await
    }
    async fn remove_blade(&self, name: &str) -> StoreResult<bool> {
        timed("remove_blade", self.0.remove_blade(name)).await
    }
    async fn next_round_robin(&self) -> StoreResult<u64> {
        timed("next_round_robin", self.0.next_round_robin()).await
    }
}
