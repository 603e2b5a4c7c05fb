//! This dispatcher's copy of the registered blades, indexed by name and by pool, so a Dispatch
//! neither reads the whole blade list from the store nor walks blades of other pools.
//!
//! The server reads it again every [`REFRESH`] in the background
//! ([`Dispatcher::refresh_blades`]), so no Dispatch waits on a read of every blade. A
//! Dispatch reads it itself only when the copy is older than [`MAX_AGE`] (the loop is late or
//! not running), at once after this dispatcher changed a blade, and whenever a lookup misses
//! (a blade or pool added through another dispatcher is found on first use). What another
//! dispatcher drains or removes is seen here within [`MAX_AGE`]: a start may land on a blade
//! drained a moment ago, as it may today when the drain comes while the start is under way.
//!
//! Every new copy is sorted into the pools' placement order ([`super::ranking`]) as it is
//! read, so whoever holds a copy finds the order at least that recent.
use super::Dispatcher;
use crate::store::{BladeRecord, StoreError};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::time::Instant;

/// How long a copy serves before it is read again: one store read a second per dispatcher,
/// whatever the request rate.
const MAX_AGE: Duration = Duration::from_secs(1);

/// How often the server's loop reads the blade list: within [`MAX_AGE`], so requests find
/// a fresh copy.
pub(crate) const REFRESH: Duration = Duration::from_millis(800);

/// The registered blades at one moment.
#[derive(Debug, Default)]
pub(super) struct Blades {
    /// In registration order (round-robin and equal scores follow it).
    all: Vec<BladeRecord>,
    by_name: HashMap<String, usize>,
    by_pool: HashMap<String, Vec<usize>>,
    /// Which read of the store this is: later reads have higher numbers.
    seq: u64,
}

impl Blades {
    pub(super) fn new(all: Vec<BladeRecord>, seq: u64) -> Self {
        let mut by_name = HashMap::with_capacity(all.len());
        let mut by_pool: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, b) in all.iter().enumerate() {
            by_name.insert(b.name.clone(), i);
            by_pool.entry(b.pool.clone()).or_default().push(i);
        }
        Blades {
            all,
            by_name,
            by_pool,
            seq,
        }
    }

    /// Which read of the store this is (see [`super::ranking::Ranking::sync`]).
    pub(super) fn seq(&self) -> u64 {
        self.seq
    }

    /// Every blade, in registration order.
    pub(super) fn all(&self) -> &[BladeRecord] {
        &self.all
    }

    /// The blade named `name`.
    pub(super) fn get(&self, name: &str) -> Option<&BladeRecord> {
        self.by_name.get(name).map(|&i| &self.all[i])
    }

    /// The blades of `pool`, in registration order.
    pub(super) fn pool<'a>(&'a self, pool: &str) -> impl Iterator<Item = &'a BladeRecord> + 'a {
        let idx = self.by_pool.get(pool).map_or(&[][..], Vec::as_slice);
        idx.iter().map(|&i| &self.all[i])
    }

    /// The pools that have blades, sorted.
    pub(super) fn pools(&self) -> Vec<&str> {
        let mut pools: Vec<&str> = self.by_pool.keys().map(String::as_str).collect();
        pools.sort_unstable();
        pools
    }
}

/// The cached copy and when its read began.
#[derive(Debug, Default)]
pub(super) struct Directory {
    current: RwLock<Option<(Arc<Blades>, Instant)>>,
    /// Bumped by [`Directory::forget`]: a read begun before a local change is not kept.
    generation: AtomicU64,
    /// Reads begun, numbering them.
    reads: AtomicU64,
    /// One store read at a time: callers arriving meanwhile take its result.
    reading: tokio::sync::Mutex<()>,
    /// The last failed read (when it began, why): callers that waited for it fail with it
    /// instead of each waiting out the store's timeout in turn.
    failed: std::sync::Mutex<Option<(Instant, String)>>,
}

impl Directory {
    fn fresh(&self, newer_than: Option<Instant>) -> Option<Arc<Blades>> {
        let guard = self.current.read().unwrap_or_else(|p| p.into_inner());
        let (blades, at) = guard.as_ref()?;
        let fresh = match newer_than {
            Some(t) => *at > t,
            None => at.elapsed() < MAX_AGE,
        };
        fresh.then(|| Arc::clone(blades))
    }

    /// Drops the copy: the next use reads the store, and a read under way is not kept.
    pub(super) fn forget(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

impl Dispatcher {
    /// The registered blades, from the copy if it is recent.
    pub(super) async fn blade_list(&self) -> Result<Arc<Blades>, StoreError> {
        match self.directory.fresh(None) {
            Some(b) => Ok(b),
            None => self.blade_list_now().await,
        }
    }

    /// The registered blades as the store has them now: read by this call, or by one that
    /// began after this call did.
    pub(super) async fn blade_list_now(&self) -> Result<Arc<Blades>, StoreError> {
        let asked = Instant::now();
        let _one = self.directory.reading.lock().await;
        if let Some(b) = self.directory.fresh(Some(asked)) {
            return Ok(b);
        }
        let failed = self
            .directory
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some((at, why)) = failed
            && at > asked
        {
            return Err(StoreError::Unavailable(why));
        }
        let (began, generation) = (
            Instant::now(),
            self.directory.generation.load(Ordering::SeqCst),
        );
        let seq = self.directory.reads.fetch_add(1, Ordering::SeqCst) + 1;
        let listed = self.store.list_blades().await;
        // Unchanged: the same copy serves on (its placement order stays sorted).
        let same = match (
            &listed,
            self.directory
                .current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref(),
        ) {
            (Ok(b), Some((copy, _))) if copy.all == *b => Some(Arc::clone(copy)),
            _ => None,
        };
        let blades = match listed {
            Ok(b) => same.unwrap_or_else(|| Arc::new(Blades::new(b, seq))),
            Err(e) => {
                let why = match &e {
                    StoreError::Unavailable(m) => m.clone(),
                    other => other.to_string(),
                };
                *self
                    .directory
                    .failed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some((began, why));
                return Err(e);
            }
        };
        // Kept only if no local change came while it was read (it may predate that change).
        {
            let mut current = self
                .directory
                .current
                .write()
                .unwrap_or_else(|p| p.into_inner());
            if self.directory.generation.load(Ordering::SeqCst) == generation {
                *current = Some((Arc::clone(&blades), began));
            }
        }
        // Nothing to do for a copy already sorted in (unchanged) or older than the last one.
        self.ranking_mut().sync(&blades);
        Ok(blades)
    }

    /// Reads the blade list again, sorting what changed into placement (the server runs
    /// this every [`REFRESH`]); a store that does not answer is the store watch's to report.
    pub async fn refresh_blades(&self) {
        if let Err(e) = self.blade_list_now().await {
            tracing::debug!(error = %e, "could not read the blade list");
        }
    }

    /// The blade named `name`: from the copy, or from the store if the copy lacks it (added
    /// through another dispatcher a moment ago).
    pub(super) async fn blade_named(&self, name: &str) -> Result<Option<BladeRecord>, StoreError> {
        if let Some(b) = self.blade_list().await?.get(name) {
            return Ok(Some(b.clone()));
        }
        Ok(self.blade_list_now().await?.get(name).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::setup;
    use crate::store::{BladeRecord, Method};
    use std::time::Duration;

    fn blade(name: &str, pool: &str, draining: bool) -> BladeRecord {
        BladeRecord {
            name: name.into(),
            host: "127.0.0.9".into(),
            port: 7501,
            method: Method::Agent,
            draining,
            pool: pool.into(),
            max_sessions: 0,
        }
    }

    // What another dispatcher sharing the store does, written to the store behind this one's
    // back: a new pool is found on first use; a drain is seen once the copy is a second old;
    // a drain made here is seen at once.
    #[tokio::test(start_paused = true)]
    async fn changes_through_the_store_are_seen_on_a_miss_or_within_a_second() {
        let (d, rec, _dir) = setup(&["b1"], Duration::from_secs(3600)).await;
        d.dispatch("u1", "192.0.2.1", "t").await.unwrap();
        d.store()
            .put_blade(&blade("gpu1", "gpu", false))
            .await
            .unwrap();
        d.dispatch_in("u2", "192.0.2.1", "gpu", "t").await.unwrap();
        assert_eq!(rec.starts.lock().unwrap().get("gpu1"), Some(&1));

        d.store()
            .put_blade(&blade("gpu1", "gpu", true))
            .await
            .unwrap();
        tokio::time::advance(Duration::from_millis(1100)).await;
        assert!(d.dispatch_in("u3", "192.0.2.1", "gpu", "t").await.is_err());

        d.drain("b1", true).await.unwrap();
        assert!(d.dispatch("u4", "192.0.2.1", "t").await.is_err());
        assert_eq!(rec.starts.lock().unwrap().get("b1"), Some(&1));
    }
}
