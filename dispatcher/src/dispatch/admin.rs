//! Blade administration — register, list, drain, remove — and the session listing, for
//! operators. Names and hosts are checked with the shared rules in
//! [`vncdispatch_proto::rules`] before anything reaches the store.
use super::{BladeHealth, Dispatcher, timestamp};
use crate::error::DispatchError;
use crate::store::{BladeRecord, EndReason, Method, SessionRecord};
use std::collections::HashMap;
use vncdispatch_proto::rules::{
    DEFAULT_POOL, validate_blade_host, validate_blade_name, validate_pool,
};

impl Dispatcher {
    /// Sessions (no secrets), optionally of one blade.
    pub async fn list(
        &self,
        blade: &str,
    ) -> Result<Vec<vncdispatch_proto::v1::SessionInfo>, DispatchError> {
        if !blade.is_empty() {
            validate_blade_name(blade)?;
        }
        let now = self.now_ms();
        let mut out: Vec<_> = self
            .store
            .list_sessions()
            .await?
            .into_iter()
            .filter(|s| blade.is_empty() || s.blade == blade)
            .map(|s| vncdispatch_proto::v1::SessionInfo {
                attached: s.is_attached(now),
                stops_at: s.stop_deadline().map(timestamp),
                username: s.username,
                blade: s.blade,
                display: s.display,
                port: s.port,
                vnc_pid: s.vnc_pid,
                remote_ip: s.remote_ip,
                expires_at: s.expires_at_ms.map(timestamp),
            })
            .collect();
        out.sort_by(|a, b| a.username.cmp(&b.username));
        Ok(out)
    }

    /// Registers a blade, or updates the one of that name (its draining state stays). A pool
    /// or cap not given is the existing blade's, or for a new blade the default pool and no
    /// cap; an empty pool is the default pool, a cap of 0 none.
    pub async fn add_blade(
        &self,
        name: &str,
        host: &str,
        port: u32,
        method: Method,
        pool: Option<&str>,
        max_sessions: Option<u32>,
    ) -> Result<BladeRecord, DispatchError> {
        validate_blade_name(name)?;
        validate_blade_host(host)?;
        let pool = pool.map(validate_pool).transpose()?.map(str::to_owned);
        let port = match port {
            0 => match method {
                Method::Agent => self.cfg.agent_port,
                Method::Ssh => 22,
            },
            p => u16::try_from(p)
                .map_err(|_| DispatchError::BadArgument(format!("port {p} is not a TCP port")))?,
        };
        let existing = self
            .store
            .list_blades()
            .await?
            .into_iter()
            .find(|b| b.name == name);
        let blade = BladeRecord {
            name: name.to_owned(),
            host: host.to_owned(),
            port,
            method,
            draining: existing.as_ref().is_some_and(|b| b.draining),
            pool: pool
                .or_else(|| existing.as_ref().map(|b| b.pool.clone()))
                .unwrap_or_else(|| DEFAULT_POOL.to_owned()),
            max_sessions: max_sessions
                .or_else(|| existing.as_ref().map(|b| b.max_sessions))
                .unwrap_or(0),
        };
        self.store.put_blade(&blade).await?;
        self.directory.forget();
        // What is known of the blade holds while it stays where it was (a cap or pool
        // changed); at a new address it is learnt again.
        let moved = existing.is_none_or(|b| {
            b.host != blade.host || b.port != blade.port || b.method != blade.method
        });
        if moved {
            // Starts under way there still end their reservations on this entry.
            self.ranking_mut().update_known(name, |h| {
                *h = BladeHealth {
                    starting: h.starting,
                    ..BladeHealth::unchecked()
                }
            });
        }
        Ok(blade)
    }

    /// Blades with what the dispatcher knows of them.
    pub async fn blades(
        &self,
    ) -> Result<Vec<(BladeRecord, Option<BladeHealth>, usize)>, DispatchError> {
        let blades = self.store.list_blades().await?;
        let mut stored: HashMap<String, usize> = HashMap::new();
        for s in self.store.list_sessions().await? {
            *stored.entry(s.blade).or_default() += 1;
        }
        let health = self.health_view();
        Ok(blades
            .into_iter()
            .map(|b| {
                let n = stored.get(&b.name).copied().unwrap_or(0);
                let h = health.get(&b.name).cloned();
                (b, h, n)
            })
            .collect())
    }

    /// Drains (or undrains) a blade.
    pub async fn drain(&self, name: &str, draining: bool) -> Result<BladeRecord, DispatchError> {
        validate_blade_name(name)?;
        let drained = self.store.set_draining(name, draining).await;
        self.directory.forget();
        drained?.ok_or_else(|| DispatchError::UnknownBlade(name.to_owned()))
    }

    /// Forgets a blade; with `force`, revokes and stops its sessions first (ended by `actor`).
    pub async fn remove_blade(
        &self,
        name: &str,
        force: bool,
        actor: &str,
    ) -> Result<bool, DispatchError> {
        validate_blade_name(name)?;
        let on_blade: Vec<SessionRecord> = self
            .store
            .list_sessions()
            .await?
            .into_iter()
            .filter(|s| s.blade == name)
            .collect();
        if !on_blade.is_empty() && !force {
            return Err(DispatchError::BladeBusy {
                name: name.to_owned(),
                sessions: on_blade.len(),
            });
        }
        for rec in &on_blade {
            if self
                .store
                .delete_session(&rec.username, None)
                .await?
                .is_some()
            {
                self.ended(rec, EndReason::BladeRemoved, String::new(), actor)
                    .await;
                self.stop_desktop(rec).await;
            }
        }
        self.ranking_mut().forget(name);
        let removed = self.store.remove_blade(name).await;
        self.directory.forget();
        Ok(removed?)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::setup;
    use crate::error::DispatchError;
    use crate::store::Method;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread")]
    async fn bad_names_and_hosts_are_refused_before_the_store() {
        let (d, _rec, _dir) = setup(&[], Duration::from_secs(3600)).await;
        for (name, host) in [("bad name", "10.0.0.5"), ("b1", "-oProxyCommand=x")] {
            let err = d
                .add_blade(name, host, 0, Method::Agent, None, None)
                .await
                .unwrap_err();
            assert!(matches!(err, DispatchError::Field(_)), "{err}");
            let status = tonic::Status::from(err);
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
        }
        assert!(d.blades().await.unwrap().is_empty(), "nothing was stored");
        let err = d
            .add_blade("b1", "h", 70_000, Method::Agent, None, None)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("70000 is not a TCP port"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_blade_with_sessions_is_removed_only_with_force_which_stops_them() {
        let (d, rec, _dir) = setup(&["b1"], Duration::from_secs(3600)).await;
        let b = d
            .add_blade("b2", "10.0.0.9", 0, Method::Ssh, None, None)
            .await
            .unwrap();
        assert_eq!(b.port, 22, "SSH blades default to port 22");
        d.dispatch("u", "192.0.2.1", "t").await.unwrap();
        let err = d.remove_blade("b1", false, "admin:test").await.unwrap_err();
        assert!(
            matches!(err, DispatchError::BladeBusy { sessions: 1, .. }),
            "{err}"
        );
        assert!(d.remove_blade("b1", true, "admin:test").await.unwrap());
        assert!(
            rec.alive.lock().unwrap().is_empty(),
            "its desktop was stopped"
        );
        assert!(d.list("").await.unwrap().is_empty());
        assert!(
            !d.remove_blade("b1", false, "admin:test").await.unwrap(),
            "already gone"
        );
    }
}
