//! Which blades a new session is tried on, and in what order; and the health poller that
//! keeps this dispatcher's view of blades current.
//!
//! Only the blades of the pool asked for are considered. Usable blades (not draining, not
//! known to be down, with room — see [`super::capacity`]) come first, ordered by the policy:
//! the lowest placement score, or round-robin from one atomic counter in the store (the
//! original's `last_blade`, so several dispatchers share the rotation). Blades last seen down
//! come after them — health is a periodic view and may be stale. The order is kept as health
//! changes ([`super::ranking`]), so a Dispatch takes the next blade without a pass over the
//! pool. A blade is reserved as it is taken ([`Dispatcher::take_blade`]), before its start is
//! asked for, so concurrent calls cannot overfill it.
use super::ranking::{Ranking, Walk};
use super::{BladeHealth, Dispatcher, Policy};
use crate::error::DispatchError;
use crate::launcher::BladeLoad;
use crate::store::BladeRecord;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

impl Dispatcher {
    /// Where a new desktop in `pool` may go: the walk [`Dispatcher::take_blade`] follows —
    /// usable blades (not draining, not known to be down, with room) by the configured
    /// policy, then the ones last seen down. Health is a periodic view and may be stale (a
    /// blade back up a moment ago): a blade marked down is tried after the others rather
    /// than never. Fails at once, saying why, when the pool has nowhere to put one.
    pub(super) async fn placement(&self, pool: &str) -> Result<Walk, DispatchError> {
        let mut blades = self.blade_list().await?;
        if blades.pool(pool).next().is_none() {
            // Added through another dispatcher a moment ago, perhaps: ask the store.
            blades = self.blade_list_now().await?;
        }
        if blades.all().is_empty() {
            return Err(DispatchError::NoBlade(
                "no blades are registered (dispatcher blade add NAME HOST)".into(),
            ));
        }
        if blades.pool(pool).next().is_none() {
            return Err(DispatchError::EmptyPool(format!(
                "no blade serves pool `{pool}` (pools with blades: {}); add one with `dispatcher blade add NAME HOST --pool {pool}`, or ask for another pool",
                blades.pools().join(", ")
            )));
        }
        // Sorted from `blades` or a later list (each copy is sorted in as it is read).
        let state = self.ranking().pool_state(pool);
        if state.blades == 0 {
            // The list this dispatcher sorted last (newer than `blades`) has no such pool.
            return Err(DispatchError::EmptyPool(format!(
                "no blade serves pool `{pool}` any more; add one with `dispatcher blade add NAME HOST --pool {pool}`, or ask for another pool"
            )));
        }
        if state.draining == state.blades {
            return Err(DispatchError::NoBlade(format!(
                "no usable blade: all {} blades of pool `{pool}` are draining",
                state.blades
            )));
        }
        // When no healthy blade has room, Dispatch says so at once.
        if state.usable == 0 && state.down == 0 {
            return Err(self.no_capacity(pool));
        }
        let rotation = match self.cfg.policy {
            Policy::RoundRobin if state.usable > 0 => Some(self.store.next_round_robin().await?),
            _ => None,
        };
        Ok(Walk::new(pool, rotation))
    }

    /// The walk's next blade, with a start counted on it (so concurrent calls cannot
    /// overfill it) until [`Reservation::started`] or the reservation is dropped (a failed
    /// start, a late one's clean-up ending, a panic); None when the walk has tried them all.
    pub(super) fn take_blade(&self, walk: &mut Walk) -> Option<(BladeRecord, Reservation)> {
        let blade = self.ranking_mut().take(walk)?;
        let reservation = Reservation {
            ranking: Arc::clone(&self.ranking),
            blade: blade.name.clone(),
            done: false,
        };
        Some((blade, reservation))
    }

    /// Reads what is known of blades (no await may happen while it is held).
    pub(super) fn ranking(&self) -> std::sync::RwLockReadGuard<'_, Ranking> {
        self.ranking.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes what is known of blades (no await may happen while it is held).
    pub(super) fn ranking_mut(&self) -> std::sync::RwLockWriteGuard<'_, Ranking> {
        self.ranking.write().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of what is known of every blade's health (for listings, not per Dispatch).
    pub(super) fn health_view(&self) -> HashMap<String, BladeHealth> {
        self.ranking().view()
    }

    /// Counts the desktop of Xvnc `pid` stopped on `blade`, so its room is used before a
    /// report says it is gone.
    pub(super) fn freed(&self, blade: &str, pid: u32) {
        self.ranking_mut().update_known(blade, |h| {
            h.full = false;
            if let Some(i) = h.placed.iter().position(|(p, _)| *p == pid) {
                // Never counted by a report: forgetting it is enough.
                h.placed.swap_remove(i);
            } else if h.load.vnc_pids.contains(&pid) {
                h.ended.push((pid, 0));
            }
        });
    }

    /// The refusal when no blade of `pool` has room, with what an operator needs to act on.
    pub(super) fn no_capacity(&self, pool: &str) -> DispatchError {
        let state = self.ranking().pool_state(pool);
        metrics::counter!("vncdispatch_dispatcher_admission_refusals_total", "pool" => pool.to_owned()).increment(1);
        DispatchError::NoCapacity(format!(
            "no free desktop in pool `{pool}`: all {} usable blades are full ({} of {} desktops in use); add blades to the pool, raise their --display-count or max_sessions, or end idle sessions",
            state.open, state.used, state.capacity
        ))
    }

    /// Records that a start found `blade` without a free display, until the next health
    /// report says otherwise.
    pub(super) fn mark_full(&self, blade: &str) {
        self.ranking_mut().update(blade, |h| h.full = true);
    }

    /// Records what was learnt about a blade: from the poller (with its report) or from a
    /// failed start (without).
    pub(super) fn mark(&self, blade: &str, healthy: bool, load: Option<BladeLoad>) {
        self.ranking_mut()
            .update(blade, |entry| mark_health(entry, healthy, load));
    }

    /// Asks every blade for its health and records the answers (run periodically); reads
    /// the blade list afresh on the way.
    pub async fn check_blades(&self) {
        let Ok(blades) = self.blade_list_now().await else {
            return;
        };
        // Each blade is marked as its answer comes: a hung blade must not hold up the news
        // that another is back.
        let checks = blades.all().iter().map(|blade| async move {
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
        // Blades that report no figures (SSH) are placed by the sessions stored on them, so
        // the score does not rank them first for ever. Only then are the sessions read: with
        // agents alone, a pass costs nothing that grows with the sessions.
        let unreported: Vec<&str> = {
            let ranking = self.ranking();
            blades
                .all()
                .iter()
                .filter(|b| ranking.health(&b.name).is_some_and(|h| !h.load.reported))
                .map(|b| b.name.as_str())
                .collect()
        };
        let mut stored: HashMap<&str, Vec<u32>> = HashMap::new();
        let sessions = if unreported.is_empty() {
            Vec::new()
        } else {
            // Without them there is nothing to count those blades by: keep what was.
            let Ok(sessions) = self.store.list_sessions().await else {
                return;
            };
            sessions
        };
        for s in &sessions {
            stored.entry(s.blade.as_str()).or_default().push(s.vnc_pid);
        }
        let mut ranking = self.ranking_mut();
        for name in unreported {
            ranking.update_known(name, |h| {
                h.load.vnc_pids = stored.get(name).cloned().unwrap_or_default();
                h.load.sessions = u32::try_from(h.load.vnc_pids.len()).unwrap_or(u32::MAX);
                settle(h);
            });
        }
        // Per-blade gauges ride on this periodic pass rather than on every Dispatch.
        for blade in blades.all() {
            let h = ranking.health(&blade.name);
            let live = h.map_or(0, |h| h.load.sessions);
            let healthy = h.is_some_and(|h| h.healthy);
            metrics::gauge!("vncdispatch_dispatcher_sessions_live", "blade" => blade.name.clone())
                .set(f64::from(live));
            metrics::gauge!("vncdispatch_dispatcher_blade_healthy", "blade" => blade.name.clone())
                .set(f64::from(u8::from(healthy)));
        }
    }
}

/// A start counted on a blade (see [`Dispatcher::take_blade`]).
#[derive(Debug)]
pub(super) struct Reservation {
    ranking: Arc<RwLock<Ranking>>,
    blade: String,
    done: bool,
}

impl Reservation {
    /// The start gave the desktop of Xvnc `pid`: counted as placed until a report lists it.
    pub(super) fn started(mut self, pid: u32) {
        self.done = true;
        let mut ranking = self.ranking.write().unwrap_or_else(|p| p.into_inner());
        ranking.update_known(&self.blade, |h| {
            h.starting = h.starting.saturating_sub(1);
            // A report that came in while the answer travelled may list it already.
            if !h.load.vnc_pids.contains(&pid) {
                h.placed.push((pid, 0));
            }
        });
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut ranking = self.ranking.write().unwrap_or_else(|p| p.into_inner());
        ranking.update_known(&self.blade, |h| h.starting = h.starting.saturating_sub(1));
    }
}

/// A report came (its pids in `h.load`): the desktops this dispatcher started that it lists
/// are counted by it now, and those it stopped that it no longer lists are gone; what a
/// second report still does not settle is dropped either way (a desktop that died at once, a
/// stop that failed), so nothing is counted for ever.
fn settle(h: &mut BladeHealth) {
    let listed = &h.load.vnc_pids;
    h.placed.retain_mut(|(pid, seen)| {
        *seen += 1;
        !listed.contains(pid) && *seen < 2
    });
    h.ended.retain_mut(|(pid, seen)| {
        *seen += 1;
        listed.contains(pid) && *seen < 2
    });
    h.full = false;
}

/// What the poller (with a report) or a failed start (without) says of a blade.
fn mark_health(entry: &mut BladeHealth, healthy: bool, load: Option<BladeLoad>) {
    entry.healthy = healthy;
    match load {
        Some(l) if l.reported => {
            entry.load = l;
            settle(entry);
        }
        // No figures (SSH): the poller counts its desktops from the store.
        Some(l) => {
            entry.load = BladeLoad {
                sessions: entry.load.sessions,
                vnc_pids: std::mem::take(&mut entry.load.vnc_pids),
                ..l
            };
        }
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::{setup, setup_with};
    use super::super::{DispatchConfig, Policy};
    use crate::store::Method;
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
            !blades[0].1.as_ref().unwrap().healthy,
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
                .contains("all 1 blades of pool `default` are draining"),
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

    /// A dispatcher placing by score over `blades` (name, max_sessions; 0: no cap).
    async fn scored(
        blades: &[(&str, u32)],
    ) -> (
        std::sync::Arc<super::super::Dispatcher>,
        std::sync::Arc<super::super::testkit::Recording>,
        tempfile::TempDir,
    ) {
        let cfg = DispatchConfig::with_defaults(
            Duration::from_secs(3600),
            Policy::Score,
            Duration::from_secs(5),
        );
        let names: Vec<&str> = blades.iter().map(|(n, _)| *n).collect();
        let (d, rec, dir) = setup_with(&names, cfg).await;
        for (i, (name, cap)) in blades.iter().enumerate() {
            let host = format!("127.0.0.{}", i + 2);
            d.add_blade(name, &host, 0, Method::Agent, None, Some(*cap))
                .await
                .unwrap();
        }
        (d, rec, dir)
    }

    // A blade that reports no figures (SSH) is placed by the desktops stored on it, as a
    // share of 100 (b2's of its 60 displays): it no longer gets every new desktop.
    #[tokio::test(start_paused = true)]
    async fn blades_without_figures_are_placed_by_their_stored_desktops() {
        let (d, rec, _dir) = scored(&[("quiet1", 0), ("b2", 0)]).await;
        for i in 0..6 {
            d.check_blades().await;
            d.dispatch(&format!("u{i}"), "192.0.2.1", "t")
                .await
                .unwrap();
        }
        let starts = rec.starts.lock().unwrap().clone();
        assert_eq!(
            (starts.get("quiet1"), starts.get("b2")),
            (Some(&4), Some(&2)),
            "{starts:?}"
        );
    }

    // New desktops go to the pool asked for; a pool no blade serves says which pools there
    // are; a user's running desktop is returned whatever pool is asked.
    #[tokio::test(flavor = "multi_thread")]
    async fn pools_keep_new_desktops_to_their_blades() {
        let (d, _rec, _dir) = setup(&["b1", "b2", "b3"], Duration::from_secs(3600)).await;
        d.add_blade("b3", "127.0.0.4", 0, Method::Agent, Some("lab"), None)
            .await
            .unwrap();
        for i in 0..4 {
            let user = format!("lab{i}");
            let lab = d.dispatch_in(&user, "192.0.2.1", "lab", "t").await;
            assert_eq!(lab.unwrap().blade, "b3");
            let std = d
                .dispatch(&format!("std{i}"), "192.0.2.1", "t")
                .await
                .unwrap();
            assert_ne!(std.blade, "b3");
        }
        let err = tonic::Status::from(
            d.dispatch_in("u", "192.0.2.1", "gpu", "t")
                .await
                .unwrap_err(),
        );
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(
            err.message()
                .contains("no blade serves pool `gpu` (pools with blades: default, lab)"),
            "{}",
            err.message()
        );
        let again = d
            .dispatch_in("std0", "192.0.2.1", "lab", "t")
            .await
            .unwrap();
        assert!(again.reused && again.blade != "b3");
        let bad = d
            .dispatch_in("u", "192.0.2.1", "Lab!", "t")
            .await
            .unwrap_err();
        assert_eq!(
            tonic::Status::from(bad).code(),
            tonic::Code::InvalidArgument
        );
    }

    // A burst of concurrent Dispatch calls between two health reports fills each blade to
    // its cap and no further; then RESOURCE_EXHAUSTED names the pool and the count, and a
    // desktop ended makes room at once.
    #[tokio::test(flavor = "multi_thread")]
    async fn max_sessions_holds_under_concurrent_dispatch() {
        let (d, rec, _dir) = scored(&[("b1", 3), ("b2", 2)]).await;
        d.check_blades().await;
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let d = d.clone();
                tokio::spawn(async move { d.dispatch(&format!("u{i}"), "192.0.2.1", "t").await })
            })
            .collect();
        let (mut served, mut refused) = (Vec::new(), Vec::new());
        for t in tasks {
            match t.await.unwrap() {
                Ok(s) => served.push(s.username),
                Err(e) => refused.push(tonic::Status::from(e)),
            }
        }
        let starts = rec.starts.lock().unwrap().clone();
        assert_eq!((starts.get("b1"), starts.get("b2")), (Some(&3), Some(&2)));
        assert_eq!(refused.len(), 3);
        for s in &refused {
            assert_eq!(s.code(), tonic::Code::ResourceExhausted);
            assert!(
                s.message().contains("pool `default`") && s.message().contains("5 of 5 desktops"),
                "{}",
                s.message()
            );
        }
        assert!(
            d.end(&served[0], crate::store::EndReason::Portal, "portal:test")
                .await
                .unwrap()
        );
        assert!(d.dispatch("late", "192.0.2.1", "t").await.is_ok());
    }

    // The score fills blades by their share, not their count: a blade twice the size gets
    // twice the desktops.
    #[tokio::test(flavor = "multi_thread")]
    async fn the_score_fills_blades_by_their_size() {
        let (d, rec, _dir) = scored(&[("b1", 4), ("b2", 8)]).await;
        d.check_blades().await;
        for i in 0..6 {
            d.dispatch(&format!("u{i}"), "192.0.2.1", "t")
                .await
                .unwrap();
        }
        let starts = rec.starts.lock().unwrap().clone();
        assert_eq!((starts.get("b1"), starts.get("b2")), (Some(&2), Some(&4)));
    }

    // A report taken while a start was finishing does not list its desktop: it stays counted
    // until a report does (or a second one still does not); a stop is counted until a report
    // no longer lists the desktop.
    #[test]
    fn reports_settle_only_the_desktops_they_list() {
        use super::super::BladeHealth;
        use super::settle;
        let mut h = BladeHealth::unchecked();
        h.placed = vec![(10, 0), (11, 0)];
        h.ended = vec![(5, 0)];
        h.load.vnc_pids = vec![5, 10];
        settle(&mut h);
        assert_eq!(
            (h.placed.clone(), h.ended.clone()),
            (vec![(11, 1)], vec![(5, 1)])
        );
        h.load.vnc_pids = vec![10, 11];
        settle(&mut h);
        assert!(h.placed.is_empty() && h.ended.is_empty(), "{h:?}");
        h.placed = vec![(12, 0)];
        h.load.vnc_pids = vec![];
        settle(&mut h);
        settle(&mut h);
        assert!(
            h.placed.is_empty(),
            "a desktop no report ever lists is dropped"
        );
    }
}
