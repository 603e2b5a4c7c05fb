//! Which blades a new session is tried on, and in what order; and the health poller that
//! keeps this dispatcher's view of blades current.
//!
//! Usable blades (registered, not draining, not known to be down) come first, ordered by the
//! policy: round-robin from one atomic counter in the store (the original's `last_blade`, so
//! several dispatchers share the rotation), or least-loaded from the agents' health reports.
//! Blades last seen down come after them — health is a periodic view and may be stale.
use super::{BladeHealth, Dispatcher, Policy};
use crate::error::DispatchError;
use crate::launcher::BladeLoad;
use crate::store::BladeRecord;
use std::time::Duration;

impl Dispatcher {
    /// The blades to try, in order: usable ones (registered, not draining, not known to be
    /// down) by the configured policy, then the ones last seen down. Health is a periodic
    /// view and may be stale (a blade back up a moment ago): a blade marked down is tried
    /// after the others rather than never.
    pub(super) async fn choose_blades(&self) -> Result<Vec<BladeRecord>, DispatchError> {
        let all = self.store.list_blades().await?;
        if all.is_empty() {
            return Err(DispatchError::NoBlade(
                "no blades are registered (dispatcher blade add NAME HOST)".into(),
            ));
        }
        let health = self
            .health
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let (usable, last_resort): (Vec<BladeRecord>, Vec<BladeRecord>) = all
            .iter()
            .filter(|b| !b.draining)
            .cloned()
            .partition(|b| health.get(&b.name).is_none_or(|h| h.healthy));
        if usable.is_empty() && last_resort.is_empty() {
            return Err(DispatchError::NoBlade(format!(
                "no usable blade: all {} registered blades are draining",
                all.len()
            )));
        }
        // A blade that reported no free display gets no new desktop (admission, not
        // overload); when that is every healthy blade, Dispatch says so at once.
        let has_room = |b: &BladeRecord| {
            health
                .get(&b.name)
                .is_none_or(|h| !h.load.reported || h.load.free_displays > 0)
        };
        let usable: Vec<BladeRecord> = usable.into_iter().filter(has_room).collect();
        if usable.is_empty() && last_resort.is_empty() {
            return Err(self.no_capacity());
        }
        if usable.is_empty() {
            return Ok(last_resort);
        }
        let mut ordered: Vec<BladeRecord> = match self.cfg.policy {
            Policy::RoundRobin => {
                let n = self.store.next_round_robin().await?;
                let start = (n % usable.len() as u64) as usize;
                usable[start..]
                    .iter()
                    .chain(&usable[..start])
                    .cloned()
                    .collect()
            }
            // Fewest desktops (as the agent reports them, or as stored for SSH blades), then
            // the lowest load.
            Policy::LeastLoaded => {
                let mut sorted = usable;
                let load =
                    |b: &BladeRecord| health.get(&b.name).map(|h| h.load).unwrap_or_default();
                sorted.sort_by(|a, b| {
                    let (la, lb) = (load(a), load(b));
                    la.sessions
                        .cmp(&lb.sessions)
                        .then(la.load1.total_cmp(&lb.load1))
                });
                sorted
            }
        };
        ordered.extend(last_resort);
        Ok(ordered)
    }

    /// The refusal when no blade has room, with what an operator needs to act on it.
    pub(super) fn no_capacity(&self) -> DispatchError {
        let health = self.health.read().unwrap_or_else(|p| p.into_inner());
        let (blades, used, total) = health
            .values()
            .filter(|h| h.healthy && h.load.reported)
            .fold((0u32, 0u32, 0u32), |(n, u, t), h| {
                (
                    n + 1,
                    u + h.load.sessions,
                    t + h.load.sessions + h.load.free_displays,
                )
            });
        metrics::counter!("vncdispatch_dispatcher_admission_refusals_total").increment(1);
        DispatchError::NoCapacity(format!(
            "no free desktop: all {blades} healthy blades are full ({used} of {total} desktops in use); add blades, raise their --display-count, or end idle sessions"
        ))
    }

    /// Records that a start found `blade` without a free display, until the next health
    /// report says otherwise.
    pub(super) fn mark_full(&self, blade: &str) {
        let mut map = self.health.write().unwrap_or_else(|p| p.into_inner());
        let entry = map.entry(blade.to_owned()).or_insert(BladeHealth {
            healthy: true,
            load: BladeLoad::default(),
        });
        entry.load.reported = true;
        entry.load.free_displays = 0;
    }

    /// Records what was learnt about a blade: from the poller (with its load) or from a
    /// failed start (without).
    pub(super) fn mark(&self, blade: &str, healthy: bool, load: Option<BladeLoad>) {
        let mut map = self.health.write().unwrap_or_else(|p| p.into_inner());
        let entry = map.entry(blade.to_owned()).or_insert(BladeHealth {
            healthy,
            load: BladeLoad::default(),
        });
        entry.healthy = healthy;
        if let Some(l) = load {
            entry.load = l;
        }
    }

    /// Asks every blade for its health and records the answers (run periodically).
    pub async fn check_blades(&self) {
        let Ok(blades) = self.store.list_blades().await else {
            return;
        };
        // Each blade is marked as its answer comes: a hung blade must not hold up the news
        // that another is back.
        let checks = blades.iter().map(|blade| async move {
            let result = match self.launchers.get(blade.method) {
                Ok(l) => tokio::time::timeout(Duration::from_secs(5), l.health(blade))
                    .await
                    .ok(),
                Err(_) => None,
            };
            match result {
                Some(Ok(load)) => self.mark(&blade.name, true, Some(load)),
                Some(Err(e)) => {
                    tracing::warn!(blade = %blade.name, error = %e, "blade unhealthy");
                    self.mark(&blade.name, false, None)
                }
                None => {
                    tracing::warn!(blade = %blade.name, "blade health check timed out");
                    self.mark(&blade.name, false, None)
                }
            }
        });
        futures_util::future::join_all(checks).await;
        // Per-blade gauges ride on this periodic pass rather than on every Dispatch.
        let health = self
            .health
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let sessions = self.store.list_sessions().await.unwrap_or_default();
        for blade in blades {
            let live = sessions.iter().filter(|s| s.blade == blade.name).count();
            let healthy = health.get(&blade.name).is_some_and(|h| h.healthy);
            // Blades that report no figures (SSH) are placed by the sessions stored on them,
            // so least-loaded does not rank them first for ever.
            if health.get(&blade.name).is_some_and(|h| !h.load.reported) {
                let mut map = self.health.write().unwrap_or_else(|p| p.into_inner());
                if let Some(h) = map.get_mut(&blade.name) {
                    h.load.sessions = u32::try_from(live).unwrap_or(u32::MAX);
                }
            }
            metrics::gauge!("vncdispatch_dispatcher_sessions_live", "blade" => blade.name.clone())
                .set(live as f64);
            metrics::gauge!("vncdispatch_dispatcher_blade_healthy", "blade" => blade.name)
                .set(f64::from(u8::from(healthy)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::setup;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread")]
    async fn a_thousand_new_sessions_spread_within_one_over_four_blades() {
        let (d, rec, _dir) = setup(&["b1", "b2", "b3", "b4"], Duration::from_secs(3600)).await;
        let tasks: Vec<_> = (0..1000)
            .map(|i| {
                let d = d.clone();
                tokio::spawn(async move { d.dispatch(&format!("user{i}"), "192.0.2.1", "t").await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let starts = rec.starts.lock().unwrap().clone();
        let (min, max) = (
            starts.values().min().copied().unwrap(),
            starts.values().max().copied().unwrap(),
        );
        assert_eq!(starts.values().sum::<usize>(), 1000);
        assert!(max - min <= 1, "uneven: {starts:?}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_failing_blade_is_skipped_and_remembered() {
        let (d, rec, _dir) = setup(&["down1", "b2"], Duration::from_secs(3600)).await;
        for i in 0..6 {
            let s = d
                .dispatch(&format!("u{i}"), "192.0.2.1", "t")
                .await
                .unwrap();
            assert_eq!(s.blade, "b2");
        }
        assert_eq!(rec.starts.lock().unwrap().get("b2"), Some(&6));
        let blades = d.blades().await.unwrap();
        assert!(
            !blades[0].1.unwrap().healthy,
            "the failed blade is marked down"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn no_usable_blade_says_why() {
        let (d, _rec, _dir) = setup(&["b1"], Duration::from_secs(3600)).await;
        d.drain("b1", true).await.unwrap();
        let err = tonic::Status::from(d.dispatch("u", "192.0.2.1", "t").await.unwrap_err());
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(
            err.message()
                .contains("all 1 registered blades are draining"),
            "{}",
            err.message()
        );
    }

    // Every blade full: RESOURCE_EXHAUSTED with what an operator can act on, not UNAVAILABLE.
    #[tokio::test(start_paused = true)]
    async fn when_every_blade_is_full_dispatch_says_so() {
        use std::sync::atomic::Ordering;
        let (d, rec, _dir) = setup(&["full1", "full2"], Duration::from_secs(3600)).await;
        let err = d.dispatch("u", "192.0.2.1", "t").await.unwrap_err();
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains("full"), "{}", status.message());
        assert_eq!(rec.full_attempts.load(Ordering::Relaxed), 2);
        // Once the health poller has seen them full, Dispatch answers without trying.
        d.check_blades().await;
        let status = tonic::Status::from(d.dispatch("v", "192.0.2.1", "t").await.unwrap_err());
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status.message().contains("120 of 120 desktops"),
            "{}",
            status.message()
        );
        assert_eq!(rec.full_attempts.load(Ordering::Relaxed), 2, "tried again");
    }

    // A blade that reported no free display gets no new desktop while another has room.
    #[tokio::test(start_paused = true)]
    async fn a_full_blade_is_skipped() {
        use std::sync::atomic::Ordering;
        let (d, rec, _dir) = setup(&["full1", "b2"], Duration::from_secs(3600)).await;
        d.check_blades().await;
        for u in ["u1", "u2", "u3"] {
            assert_eq!(d.dispatch(u, "192.0.2.1", "t").await.unwrap().blade, "b2");
        }
        assert_eq!(rec.full_attempts.load(Ordering::Relaxed), 0);
    }

    // A blade that reports no figures (SSH) is placed by the sessions stored on it: least-
    // loaded no longer sends it every new desktop.
    #[tokio::test(start_paused = true)]
    async fn least_loaded_counts_stored_sessions_for_blades_without_figures() {
        use super::super::testkit::setup_with;
        use super::super::{DispatchConfig, Policy};
        let cfg = DispatchConfig::with_defaults(
            Duration::from_secs(3600),
            Policy::LeastLoaded,
            Duration::from_secs(5),
        );
        let (d, rec, _dir) = setup_with(&["quiet1", "b2"], cfg).await;
        for i in 0..6 {
            d.check_blades().await;
            d.dispatch(&format!("u{i}"), "192.0.2.1", "t")
                .await
                .unwrap();
        }
        let starts = rec.starts.lock().unwrap().clone();
        assert_eq!(
            (starts.get("quiet1"), starts.get("b2")),
            (Some(&3), Some(&3)),
            "{starts:?}"
        );
    }
}
