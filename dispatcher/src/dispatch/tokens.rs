//! Tokens: resolving one for ws-proxy, and sweeping sessions whose tokens expired.
//!
//! A token is looked up by its SHA-256 (legacy rows, written before hashes, by the token
//! itself); an unknown, malformed, expired or revoked token is one answer, NOT_FOUND, so a
//! caller learns nothing about which. Expiry is measured on the injected clock.
use super::{Dispatcher, Target, timestamp};
use crate::error::DispatchError;
use crate::secrets;
use vncdispatch_proto::rules::validate_token;

impl Dispatcher {
    /// Where a token's desktop is.
    pub async fn resolve(&self, token: &str) -> Result<Target, DispatchError> {
        validate_token(token).map_err(|_| DispatchError::UnknownToken)?;
        let mut rec = self
            .store
            .find_by_token(&secrets::token_hash(token), token)
            .await?
            .ok_or(DispatchError::UnknownToken)?;
        self.fill_host(&mut rec).await?;
        if rec.is_expired(self.now_ms()) {
            return Err(DispatchError::UnknownToken);
        }
        let (_, password) = self.reveal(&rec)?;
        Ok(Target {
            host: rec.host,
            port: rec.port,
            username: rec.username,
            remote_ip: rec.remote_ip,
            expires_at: rec.expires_at_ms.map(timestamp),
            blade: rec.blade,
            password,
            cert_sha256: rec.cert_sha256,
        })
    }

    /// Removes expired sessions and stops their desktops (run periodically).
    pub async fn sweep(&self) -> Result<usize, DispatchError> {
        let swept = self.store.sweep_expired(self.now_ms()).await?;
        for rec in &swept {
            tracing::info!(user = %rec.username, blade = %rec.blade, "session expired; stopping its desktop");
            self.stop_desktop(rec).await;
        }
        Ok(swept.len())
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
        let target = d.resolve(&s.token).await.expect("resolves until its TTL");
        // The registered blade's host, never the agent's report; the pin the start reported.
        let blade = d.store().list_blades().await.unwrap().remove(0);
        assert_eq!(target.host, blade.host);
        assert_eq!(target.cert_sha256, format!("{:064x}", s.vnc_pid));
        assert_eq!(d.sweep().await.unwrap(), 0, "nothing to sweep yet");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(matches!(
            d.resolve(&s.token).await,
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
