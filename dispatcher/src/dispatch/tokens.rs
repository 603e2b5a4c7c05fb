//! Resolving a token for ws-proxy, which renews a client's lease when it relays one.
//!
//! A token is looked up by its SHA-256 (legacy rows, written before hashes, by the token
//! itself); an unknown, malformed, expired or revoked token is one answer, NOT_FOUND, so a
//! caller learns nothing about which. A token resolves before its expiry or while a client
//! is attached (see the lifecycle in [`crate::dispatch`]), and only while the recorded Xvnc
//! still runs: displays are reused, and a stale token must never lead to another user's
//! desktop. A desktop found gone ends its session ("Xvnc died").
use super::session::rec_hash;
use super::{Dispatcher, Target, timestamp};
use crate::error::DispatchError;
use crate::secrets;
use crate::store::EndReason;
use vncdispatch_proto::rules::validate_token;

/// How long a blade's "alive" answer for a desktop is taken as still true.
const ALIVE_FOR_MS: i64 = 10_000;
/// Most desktops remembered; beyond it the memory is cleared (it refills from the blades).
const ALIVE_MAX: usize = 100_000;

impl Dispatcher {
    /// Whether the record's Xvnc runs, the blade's positive answer remembered for
    /// [`ALIVE_FOR_MS`]: each open relay re-checks its token, and a dead desktop is still
    /// noticed within seconds.
    pub(super) async fn alive_cached(&self, rec: &crate::store::SessionRecord) -> bool {
        let key = (rec.blade.clone(), rec.username.clone(), rec.vnc_pid);
        let now = self.now_ms();
        let seen = |m: &std::sync::Mutex<std::collections::HashMap<_, i64>>| {
            m.lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&key)
                .is_some_and(|at| now - at < ALIVE_FOR_MS)
        };
        if seen(&self.alive_seen) {
            return true;
        }
        let alive = self.alive(rec).await;
        let mut memo = self.alive_seen.lock().unwrap_or_else(|p| p.into_inner());
        if alive {
            if memo.len() >= ALIVE_MAX {
                memo.clear();
            }
            memo.insert(key, now);
        } else {
            memo.remove(&key);
        }
        alive
    }

    /// Where a token's desktop is. With `attached` (ws-proxy relays, or is about to relay, a
    /// client) the session's lease is renewed, which keeps the desktop and its token alive.
    pub async fn resolve(&self, token: &str, attached: bool) -> Result<Target, DispatchError> {
        validate_token(token).map_err(|_| DispatchError::UnknownToken)?;
        let hash = secrets::token_hash(token);
        let Some(mut rec) = self.store.find_by_token(&hash, token).await? else {
            // Not a session's token: perhaps a share's.
            return self.resolve_share(&hash).await;
        };
        let now = self.now_ms();
        // A new connection needs a valid token or a client already attached. A relay already
        // open (attached) keeps its session as long as it is not due: a dispatcher or store
        // outage longer than the lease must not cut a desktop in use.
        let open = if attached {
            !rec.is_due(now)
        } else {
            rec.resolves(now)
        };
        if !open {
            return Err(DispatchError::UnknownToken);
        }
        if !self.alive_cached(&rec).await {
            self.end_if_current(
                &rec,
                &hash,
                EndReason::XvncDied,
                "found gone when its token was used",
            )
            .await?;
            return Err(DispatchError::UnknownToken);
        }
        // Renewed when less than half the lease remains: a write per lease, not per re-check.
        let lease_ms = self.cfg.lease.as_millis() as i64;
        if attached && rec.lease_until_ms.is_none_or(|l| l - now < lease_ms / 2) {
            let lease = now + lease_ms;
            let expires = rec.expires_at_ms.unwrap_or(now + self.ttl_ms());
            let stops = self.stops_at(rec.created_at_ms, expires, Some(lease));
            match self
                .store
                .renew_lease(&rec.username, &rec_hash(&rec, &hash), lease, stops)
                .await?
            {
                Some(updated) => rec = updated,
                None => return Err(DispatchError::UnknownToken), // ended meanwhile
            }
        }
        self.fill_host(&mut rec).await?;
        let (_, password) = self.reveal(&rec)?;
        // Until when the token resolves: its expiry, or the lease's end if later.
        let until = rec.expires_at_ms.max(rec.lease_until_ms).map(timestamp);
        Ok(Target {
            host: rec.host,
            port: rec.port,
            username: rec.username,
            remote_ip: rec.remote_ip,
            expires_at: until,
            blade: rec.blade,
            password,
            cert_sha256: rec.cert_sha256,
            lease_until: rec.lease_until_ms.map(timestamp),
            view_only: false,
            share_id: String::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::setup;
    use crate::error::DispatchError;
    use std::time::Duration;

    // Paused time: the token's 5 minutes pass in an instant, by the dispatcher's own clock.
    #[tokio::test(start_paused = true)]
    async fn expiry_and_sweep() {
        let (d, rec, _dir) = setup(&["b1"], Duration::from_secs(300)).await;
        let s = d.dispatch("u", "192.0.2.1", "t").await.unwrap();
        tokio::time::advance(Duration::from_secs(299)).await;
        let target = d
            .resolve(&s.token, false)
            .await
            .expect("resolves until its TTL");
        // The registered blade's host, never the agent's report; the pin the start reported.
        let blade = d.store().list_blades().await.unwrap().remove(0);
        assert_eq!(target.host, blade.host);
        assert_eq!(target.cert_sha256, format!("{:064x}", s.vnc_pid));
        assert_eq!(d.sweep().await.unwrap(), 0, "nothing to sweep yet");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(matches!(
            d.resolve(&s.token, false).await,
            Err(DispatchError::UnknownToken)
        ));
        assert_eq!(d.sweep().await.unwrap(), 1);
        assert!(
            rec.alive.lock().unwrap().is_empty(),
            "the sweeper stopped the expired desktop"
        );
        assert!(d.store().get_session("u").await.unwrap().is_none());
    }
}
