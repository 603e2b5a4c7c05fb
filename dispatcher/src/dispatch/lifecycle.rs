//! When a desktop is stopped and why each session ended (the policy is in the module doc of
//! [`crate::dispatch`]): the stop deadline written with every record, the sweeper, and the
//! one place an end is recorded — history, metrics and log together.
use super::Dispatcher;
use super::audit::SELF_ACTOR;
use crate::error::DispatchError;
use crate::store::{EndReason, EndedSession, SessionRecord};

/// Most history entries one call returns.
pub(super) const HISTORY_LIMIT: usize = 1000;

impl Dispatcher {
    /// The stop deadline for a session created at `created_ms` whose token expires at
    /// `expires_ms` and whose client lease (if any) runs to `lease_ms`: the later of the
    /// token's expiry and the lease's end plus the idle grace, capped by the maximum age.
    pub(super) fn stops_at(&self, created_ms: i64, expires_ms: i64, lease_ms: Option<i64>) -> i64 {
        let grace = self.cfg.idle_grace.as_millis() as i64;
        let mut at = expires_ms.max(lease_ms.map_or(i64::MIN, |l| l.saturating_add(grace)));
        // Rows of the original service have no creation time (0): no age to cap.
        if let Some(max) = self.cfg.max_age
            && created_ms > 0
        {
            at = at.min(created_ms.saturating_add(max.as_millis() as i64));
        }
        at
    }

    /// Why a session whose stop deadline has passed ends.
    pub(super) fn due_reason(&self, rec: &SessionRecord, now_ms: i64) -> EndReason {
        let aged = rec.created_at_ms > 0
            && self
                .cfg
                .max_age
                .is_some_and(|m| rec.created_at_ms.saturating_add(m.as_millis() as i64) <= now_ms);
        if aged {
            EndReason::MaxAge
        } else if rec.lease_until_ms.is_some() {
            EndReason::NoClient
        } else {
            EndReason::TokenExpired
        }
    }

    /// Stops the desktops whose stop deadline passed (run periodically). Rows the original
    /// service wrote, which have no expiry, get one first: they end a TTL from now.
    pub async fn sweep(&self) -> Result<usize, DispatchError> {
        let now = self.now_ms();
        let dated = self.store.date_legacy(now + self.ttl_ms()).await?;
        if dated > 0 {
            tracing::info!(
                sessions = dated,
                "gave sessions from the original service an expiry"
            );
        }
        let swept = self.store.sweep_expired(now).await?;
        for rec in &swept {
            // Recorded first: the session is over once it left the store; the stop may take
            // the Xvnc's grace period.
            let reason = self.due_reason(rec, now);
            self.ended(rec, reason, String::new(), SELF_ACTOR).await;
            self.stop_desktop(rec).await;
        }
        self.prune(now).await;
        Ok(swept.len())
    }

    /// Drops expired shares (each sweep: they are few) and, hourly, audit events past the
    /// retention. Failures are logged: what is not pruned now is pruned next time.
    async fn prune(&self, now: i64) {
        match self.store.prune_shares(now).await {
            Ok(gone) if !gone.is_empty() => {
                tracing::debug!(shares = gone.len(), "expired shares removed")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not remove expired shares"),
        }
        use std::sync::atomic::Ordering::Relaxed;
        let last = self.audit_pruned_at.load(Relaxed);
        if now - last < 3_600_000
            || self
                .audit_pruned_at
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_err()
        {
            return;
        }
        let before = now - self.cfg.audit_retention.as_millis() as i64;
        match self.store.prune_audit(before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(events = n, "audit events past their retention removed"),
            Err(e) => tracing::warn!(error = %e, "could not remove old audit events"),
        }
    }

    /// Ends `rec` for `reason` if the store still holds it (same token; `hash` is its
    /// token's, for legacy rows without one stored): the record is removed and the end
    /// recorded; the removed record is returned. The desktop is not stopped (it is gone,
    /// or the caller stops it).
    pub(super) async fn end_if_current(
        &self,
        rec: &SessionRecord,
        hash: &str,
        reason: EndReason,
        detail: &str,
    ) -> Result<Option<SessionRecord>, DispatchError> {
        let gone = self
            .store
            .delete_session(&rec.username, Some(&super::session::rec_hash(rec, hash)))
            .await?;
        if let Some(gone) = &gone {
            self.ended(gone, reason, detail.to_owned(), SELF_ACTOR)
                .await;
        }
        Ok(gone)
    }

    /// Records that `rec` ended for `reason` (asked by `actor`): history, audit trail, metric,
    /// log; its shares end with it. A history write that fails is logged, not returned: the
    /// session is over either way.
    pub(super) async fn ended(
        &self,
        rec: &SessionRecord,
        reason: EndReason,
        detail: String,
        actor: &str,
    ) {
        metrics::counter!("vncdispatch_dispatcher_sessions_ended_total", "reason" => reason.as_str())
            .increment(1);
        tracing::info!(
            user = %rec.username,
            blade = %rec.blade,
            pid = rec.vnc_pid,
            reason = reason.as_str(),
            %detail,
            "session ended"
        );
        let shares = self.end_shares(&rec.username, &rec.token_hash).await;
        self.record(
            "session_end",
            actor,
            &rec.username,
            &[
                ("reason", reason.as_str().to_owned()),
                ("blade", rec.blade.clone()),
                ("vnc_pid", rec.vnc_pid.to_string()),
                ("shares_ended", shares.to_string()),
                ("detail", detail.clone()),
            ],
        );
        let entry = EndedSession::of(rec, self.now_ms(), reason, detail);
        if let Err(e) = self.store.record_end(&entry).await {
            tracing::warn!(error = %e, "could not record the end in the session history");
        }
    }

    /// Ended sessions, newest first: everyone's or one user's, at most `limit` (capped).
    pub async fn history(
        &self,
        username: Option<&str>,
        limit: usize,
    ) -> Result<Vec<EndedSession>, DispatchError> {
        if let Some(u) = username {
            vncdispatch_proto::rules::validate_username(u)?;
        }
        let limit = if limit == 0 {
            100
        } else {
            limit.min(HISTORY_LIMIT)
        };
        Ok(self.store.history(username, limit).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::{setup, setup_with};
    use super::super::{DispatchConfig, Policy};
    use crate::error::DispatchError;
    use crate::store::EndReason;
    use std::time::Duration;

    const MIN: Duration = Duration::from_secs(60);

    fn cfg(ttl: Duration, grace: Duration, max_age: Option<Duration>) -> DispatchConfig {
        DispatchConfig {
            idle_grace: grace,
            max_age,
            lease: Duration::from_secs(90),
            ..DispatchConfig::with_defaults(ttl, Policy::RoundRobin, Duration::from_secs(5))
        }
    }

    async fn reasons(d: &super::super::Dispatcher, user: &str) -> Vec<EndReason> {
        d.history(Some(user), 10)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.reason)
            .collect()
    }

    // A desktop in use outlives its token: renewals (ws-proxy's re-checks) keep it, the
    // sweeper leaves it; once they stop, it lives the idle grace more, then ends "no client".
    #[tokio::test(start_paused = true)]
    async fn a_leased_desktop_outlives_its_token_and_ends_after_the_grace() {
        let (d, rec, _dir) = setup_with(&["b1"], cfg(MIN, 10 * MIN, None)).await;
        let s = d.dispatch("u", "192.0.2.1", "t").await.unwrap();
        // Busy for ten minutes, ten times the token's TTL, renewing every 30 s.
        for _ in 0..20 {
            d.resolve(&s.token, true)
                .await
                .expect("resolves while attached");
            tokio::time::advance(Duration::from_secs(30)).await;
            assert_eq!(d.sweep().await.unwrap(), 0, "swept while attached");
        }
        assert_eq!(rec.alive.lock().unwrap().len(), 1);
        // The client leaves: the lease runs out (renewed when half of its 90 s remained, so
        // the last renewal may be up to 45 s before the last re-check), then the grace.
        let lease_until = d
            .store()
            .get_session("u")
            .await
            .unwrap()
            .unwrap()
            .lease_until_ms
            .expect("leased");
        let now = d.now_ms();
        assert!(
            lease_until - now > 0,
            "the lease outlived the last re-check"
        );
        tokio::time::advance(Duration::from_millis((lease_until - now) as u64 + 1_000)).await;
        assert!(
            matches!(
                d.resolve(&s.token, false).await,
                Err(DispatchError::UnknownToken)
            ),
            "a token past its TTL with no client attached does not resolve"
        );
        tokio::time::advance(10 * MIN - Duration::from_secs(2)).await;
        assert_eq!(
            d.sweep().await.unwrap(),
            0,
            "stopped before the grace ran out"
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(d.sweep().await.unwrap(), 1);
        assert!(
            rec.alive.lock().unwrap().is_empty(),
            "the desktop was stopped"
        );
        assert_eq!(reasons(&d, "u").await, [EndReason::NoClient]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_desktop_no_client_reached_ends_with_its_token() {
        let (d, _rec, _dir) = setup_with(&["b1"], cfg(MIN, 10 * MIN, None)).await;
        let s = d.dispatch("u", "192.0.2.1", "t").await.unwrap();
        let stops = s.stops_at.expect("stops_at").seconds;
        assert_eq!(stops, s.expires_at.unwrap().seconds, "stops with its token");
        tokio::time::advance(MIN + Duration::from_secs(1)).await;
        assert_eq!(d.sweep().await.unwrap(), 1);
        assert_eq!(reasons(&d, "u").await, [EndReason::TokenExpired]);
    }

    #[tokio::test(start_paused = true)]
    async fn max_age_ends_even_an_attached_desktop() {
        let (d, _rec, _dir) = setup_with(&["b1"], cfg(10 * MIN, 10 * MIN, Some(2 * MIN))).await;
        let s = d.dispatch("u", "192.0.2.1", "t").await.unwrap();
        for _ in 0..5 {
            let _ = d.resolve(&s.token, true).await;
            tokio::time::advance(Duration::from_secs(30)).await;
            d.sweep().await.unwrap();
        }
        assert_eq!(reasons(&d, "u").await, [EndReason::MaxAge]);
    }

    // Displays are reused: a token whose Xvnc is gone must not lead to whatever now runs
    // there. It answers NOT_FOUND and the session ends, with its reason.
    #[tokio::test(start_paused = true)]
    async fn a_token_whose_desktop_died_resolves_no_more() {
        let (d, rec, _dir) = setup(&["b1"], MIN).await;
        let s = d.dispatch("u", "192.0.2.1", "t").await.unwrap();
        rec.alive.lock().unwrap().clear();
        assert!(matches!(
            d.resolve(&s.token, true).await,
            Err(DispatchError::UnknownToken)
        ));
        assert!(d.store().get_session("u").await.unwrap().is_none());
        assert_eq!(reasons(&d, "u").await, [EndReason::XvncDied]);
    }

    #[tokio::test(start_paused = true)]
    async fn ends_by_the_portal_and_failed_starts_are_in_the_history() {
        let (d, _rec, _dir) = setup(&["down1"], MIN).await;
        assert!(d.dispatch("u", "192.0.2.1", "t").await.is_err());
        assert_eq!(reasons(&d, "u").await, [EndReason::StartFailed]);
        let (d, _rec, _dir) = setup(&["b1"], MIN).await;
        d.dispatch("v", "192.0.2.1", "t").await.unwrap();
        assert!(d.end("v", EndReason::Portal, "portal:test").await.unwrap());
        let h = d.history(None, 0).await.unwrap();
        assert_eq!(
            (h[0].username.as_str(), h[0].reason),
            ("v", EndReason::Portal)
        );
        assert!(h[0].created_at_ms > 0 && h[0].ended_at_ms >= h[0].created_at_ms);
    }

    // Rows the original service wrote have no expiry: the first sweep gives them one.
    #[tokio::test(start_paused = true)]
    async fn rows_without_an_expiry_get_one_and_end_with_it() {
        let (d, _rec, _dir) = setup(&["b1"], MIN).await;
        let s = d.dispatch("u", "192.0.2.1", "t").await.unwrap();
        let mut rec = d.store().get_session("u").await.unwrap().unwrap();
        d.store().delete_session("u", None).await.unwrap();
        rec.expires_at_ms = None;
        rec.stops_at_ms = None;
        rec.claim = Some(crate::store::Claim {
            id: "x".into(),
            expires_at_ms: i64::MAX,
        });
        d.store()
            .claim("u", rec.claim.as_ref().unwrap(), 0)
            .await
            .unwrap();
        rec.claim = None;
        d.store().complete(&rec, "x").await.unwrap();
        assert_eq!(d.sweep().await.unwrap(), 0, "dated, not swept");
        assert!(d.resolve(&s.token, false).await.is_ok());
        tokio::time::advance(MIN + Duration::from_secs(1)).await;
        assert_eq!(d.sweep().await.unwrap(), 1);
    }
}
