//! What this dispatcher knows of each blade's health, and, per pool, the blades a new desktop
//! may go to, kept in placement order as that knowledge changes.
//!
//! Choosing a blade is then a look at the front of an ordered set, O(log B), instead of
//! scoring and sorting the whole pool on every Dispatch; each change (a report, a start
//! reserved or settled, a stop, a failure) moves only its own blade. The blade list is sorted
//! in afresh only when it changes ([`Ranking::sync`]). A walk that goes past blades (each
//! start failing) pays for the blades it passes, as any walk must.
//!
//! In its pool a blade is in one of four classes, from its record and health:
//! - **usable**: not draining, not last seen down, with room; ordered by (score, desktops,
//!   registration order) for `--policy score`, and by registration order for the rotation;
//! - **full**: up (or never checked) and not draining, but without room;
//! - **down**: last seen down; those with room are tried in registration order once no
//!   usable one is left;
//! - **draining**.
//!
//! Each pool also keeps the sums a refusal reports (desktops and capacity of its usable and
//! full blades), so saying "full" costs no pass either.
use super::BladeHealth;
use super::capacity::{room, score};
use super::directory::Blades;
use crate::store::BladeRecord;
use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap, HashSet};

/// Health by blade, and the pools' placement order.
#[derive(Debug, Default)]
pub(super) struct Ranking {
    blades: HashMap<String, Known>,
    pools: HashMap<String, Pool>,
    /// The blade list ([`Blades::seq`]) the pools were last sorted from.
    synced: Option<u64>,
}

/// One blade: its health (None: never checked nor started on) and its place, if registered.
#[derive(Debug, Default)]
struct Known {
    health: Option<BladeHealth>,
    slot: Option<Slot>,
}

#[derive(Debug)]
struct Slot {
    record: BladeRecord,
    /// Its index among its pool's blades, in registration order.
    order: usize,
    class: Class,
}

#[derive(Debug, Clone, Copy)]
enum Class {
    Usable(Rank),
    Full { used: u32, capacity: Option<u32> },
    Down { order: usize },
    Draining,
}

/// A usable blade's key in its pool's score order.
#[derive(Debug, Clone, Copy)]
struct Rank {
    score: f64,
    used: u32,
    order: usize,
    capacity: Option<u32>,
}

impl Ord for Rank {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then(self.used.cmp(&other.used))
            .then(self.order.cmp(&other.order))
    }
}

impl PartialOrd for Rank {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Rank {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Rank {}

#[derive(Debug, Default)]
struct Pool {
    /// Blade names in registration order.
    names: Vec<String>,
    by_score: BTreeSet<Rank>,
    /// The usable blades by registration order (for the rotation's n-th).
    usable: Counts,
    down: BTreeSet<usize>,
    draining: usize,
    /// Usable and full blades: how many, their desktops, and the capacity of those that
    /// have a known one.
    open: usize,
    used: u64,
    capacity: u64,
}

/// Where a placement walk is: which blades it took, and where the rotation stands.
#[derive(Debug)]
pub(super) struct Walk {
    pool: String,
    /// The rotation counter's value (`--policy round-robin`); None: by score.
    rotation: Option<u64>,
    /// The blade the rotation took last (by name: the list may be re-sorted meanwhile).
    last: Option<String>,
    /// Blades last seen down are taken from this registration position on.
    down_from: usize,
    tried: HashSet<String>,
}

impl Walk {
    /// A walk over `pool`'s blades, by score or (with the store's counter) by rotation.
    pub(super) fn new(pool: &str, rotation: Option<u64>) -> Self {
        Walk {
            pool: pool.to_owned(),
            rotation,
            last: None,
            down_from: 0,
            tried: HashSet::new(),
        }
    }

    /// How many blades it took.
    pub(super) fn tried(&self) -> usize {
        self.tried.len()
    }
}

/// A pool's counts, for what Dispatch says when it cannot place.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct PoolState {
    pub(super) blades: usize,
    pub(super) draining: usize,
    pub(super) usable: usize,
    pub(super) down: usize,
    /// Usable and full blades, their desktops, and their known capacity.
    pub(super) open: usize,
    pub(super) used: u64,
    pub(super) capacity: u64,
}

fn classify(record: &BladeRecord, order: usize, health: Option<&BladeHealth>) -> Class {
    if record.draining {
        return Class::Draining;
    }
    if health.is_some_and(|h| !h.healthy) {
        return Class::Down { order };
    }
    let r = room(record, health);
    if r.fits() {
        Class::Usable(Rank {
            score: score(record, health),
            used: r.used,
            order,
            capacity: r.capacity(),
        })
    } else {
        Class::Full {
            used: r.used,
            capacity: r.capacity(),
        }
    }
}

impl Pool {
    fn enter(&mut self, class: Class) {
        self.count(class, 1);
    }

    fn leave(&mut self, class: Class) {
        self.count(class, -1);
    }

    fn count(&mut self, class: Class, sign: i64) {
        let mut open = |used: u32, capacity: Option<u32>| {
            self.open = self.open.saturating_add_signed(sign as isize);
            self.used = self.used.saturating_add_signed(sign * i64::from(used));
            self.capacity = self
                .capacity
                .saturating_add_signed(sign * i64::from(capacity.unwrap_or(0)));
        };
        match class {
            Class::Usable(r) => {
                open(r.used, r.capacity);
                self.usable.add(r.order, sign);
                if sign > 0 {
                    self.by_score.insert(r);
                } else {
                    self.by_score.remove(&r);
                }
            }
            Class::Full { used, capacity } => open(used, capacity),
            Class::Down { order } => {
                if sign > 0 {
                    self.down.insert(order);
                } else {
                    self.down.remove(&order);
                }
            }
            Class::Draining => self.draining = self.draining.saturating_add_signed(sign as isize),
        }
    }

    /// The next usable blade of the rotation not yet tried.
    fn next_in_rotation(
        &self,
        n: u64,
        last: Option<usize>,
        tried: &HashSet<String>,
    ) -> Option<usize> {
        let total = self.usable.total();
        let mut at = match last {
            // The n-th usable blade, counting from the first registered.
            None => self.usable.nth((n % total.max(1) as u64) as usize)?,
            Some(last) => self.usable.after(last)?,
        };
        for _ in 0..total {
            if !tried.contains(&self.names[at]) {
                return Some(at);
            }
            at = self.usable.after(at)?;
        }
        None
    }
}

impl Ranking {
    /// What is known of `name`'s health (None: never checked nor started on).
    pub(super) fn health(&self, name: &str) -> Option<&BladeHealth> {
        self.blades.get(name)?.health.as_ref()
    }

    /// A copy of every blade's health (for listings).
    pub(super) fn view(&self) -> HashMap<String, BladeHealth> {
        self.blades
            .iter()
            .filter_map(|(n, k)| Some((n.clone(), k.health.clone()?)))
            .collect()
    }

    /// Whether the pools are sorted from blade list `seq` or a later one.
    fn synced_with(&self, seq: u64) -> bool {
        self.synced.is_some_and(|s| s >= seq)
    }

    /// Sorts the pools afresh from `blades` (a pass over them: only when the list changed),
    /// unless they come from that list or a later one already.
    pub(super) fn sync(&mut self, blades: &Blades) {
        if self.synced_with(blades.seq()) {
            return;
        }
        self.pools.clear();
        for known in self.blades.values_mut() {
            known.slot = None;
        }
        let mut orders = Vec::with_capacity(blades.all().len());
        for record in blades.all() {
            let pool = self.pools.entry(record.pool.clone()).or_default();
            orders.push(pool.names.len());
            pool.names.push(record.name.clone());
        }
        for pool in self.pools.values_mut() {
            pool.usable = Counts::new(pool.names.len());
        }
        for (record, &order) in blades.all().iter().zip(&orders) {
            let Some(pool) = self.pools.get_mut(&record.pool) else {
                continue;
            };
            let known = self.blades.entry(record.name.clone()).or_default();
            let class = classify(record, order, known.health.as_ref());
            pool.enter(class);
            known.slot = Some(Slot {
                record: record.clone(),
                order,
                class,
            });
        }
        self.blades
            .retain(|_, k| k.slot.is_some() || k.health.is_some());
        // Last: a rebuild cut short (a panic) must not pass for current.
        self.synced = Some(blades.seq());
    }

    /// Changes `name`'s health (an unchecked one if none is known) and moves it in its pool.
    pub(super) fn update<R>(&mut self, name: &str, f: impl FnOnce(&mut BladeHealth) -> R) -> R {
        let known = self.blades.entry(name.to_owned()).or_default();
        let r = f(known.health.get_or_insert_with(BladeHealth::unchecked));
        self.reclassify(name);
        r
    }

    /// Like [`Ranking::update`], only if something is known of `name`'s health.
    pub(super) fn update_known<R>(
        &mut self,
        name: &str,
        f: impl FnOnce(&mut BladeHealth) -> R,
    ) -> Option<R> {
        let r = f(self.blades.get_mut(name)?.health.as_mut()?);
        self.reclassify(name);
        Some(r)
    }

    /// Forgets `name`'s health (a removed blade).
    pub(super) fn forget(&mut self, name: &str) {
        if let Some(k) = self.blades.get_mut(name) {
            k.health = None;
        }
        self.reclassify(name);
    }

    fn reclassify(&mut self, name: &str) {
        let Some(known) = self.blades.get_mut(name) else {
            return;
        };
        let Some(slot) = known.slot.as_mut() else {
            return;
        };
        // Always out and back in: a usable blade's key ignores its capacity, which the
        // pool's sums must follow too.
        let class = classify(&slot.record, slot.order, known.health.as_ref());
        if let Some(pool) = self.pools.get_mut(&slot.record.pool) {
            pool.leave(slot.class);
            pool.enter(class);
        }
        slot.class = class;
    }

    /// `pool`'s counts (all zero for a pool without blades).
    pub(super) fn pool_state(&self, pool: &str) -> PoolState {
        let Some(p) = self.pools.get(pool) else {
            return PoolState::default();
        };
        PoolState {
            blades: p.names.len(),
            draining: p.draining,
            usable: p.by_score.len(),
            down: p.down.len(),
            open: p.open,
            used: p.used,
            capacity: p.capacity,
        }
    }

    /// The next blade of the walk, counted as starting a desktop there (the caller's
    /// [`super::placement::Reservation`] ends that): the best usable one not tried yet, or
    /// failing that the first blade last seen down that is not tried and has room.
    pub(super) fn take(&mut self, walk: &mut Walk) -> Option<BladeRecord> {
        let pool = self.pools.get(&walk.pool)?;
        let usable = match walk.rotation {
            Some(n) => {
                let last = walk
                    .last
                    .as_ref()
                    .and_then(|name| self.blades.get(name)?.slot.as_ref())
                    .filter(|s| s.record.pool == walk.pool)
                    .map(|s| s.order);
                pool.next_in_rotation(n, last, &walk.tried)
            }
            None => pool
                .by_score
                .iter()
                .find(|r| !walk.tried.contains(&pool.names[r.order]))
                .map(|r| r.order),
        };
        let order = match usable {
            Some(o) => o,
            None => {
                let o = *pool.down.range(walk.down_from..).find(|&&o| {
                    let name = &pool.names[o];
                    !walk.tried.contains(name)
                        && self.blades.get(name).is_some_and(|k| {
                            k.slot
                                .as_ref()
                                .is_some_and(|s| room(&s.record, k.health.as_ref()).fits())
                        })
                })?;
                walk.down_from = o + 1;
                o
            }
        };
        let name = pool.names[order].clone();
        if usable.is_some() {
            walk.last = Some(name.clone());
        }
        walk.tried.insert(name.clone());
        self.update(&name, |h| h.starting += 1);
        let record = self.blades.get(&name)?.slot.as_ref()?.record.clone();
        Some(record)
    }
}

/// Counts per position with prefix sums and "the n-th set position" in O(log n): a Fenwick
/// tree over the pool's registration order, 1 where a blade is usable.
#[derive(Debug, Default)]
struct Counts {
    tree: Vec<i64>,
}

impl Counts {
    fn new(len: usize) -> Self {
        Counts {
            tree: vec![0; len + 1],
        }
    }

    fn len(&self) -> usize {
        self.tree.len().saturating_sub(1)
    }

    fn add(&mut self, at: usize, delta: i64) {
        let mut i = at + 1;
        while i < self.tree.len() {
            self.tree[i] += delta;
            i += i & i.wrapping_neg();
        }
    }

    /// How many are set among positions `0..end`.
    fn before(&self, end: usize) -> usize {
        let (mut i, mut sum) = (end.min(self.len()), 0);
        while i > 0 {
            sum += self.tree[i];
            i -= i & i.wrapping_neg();
        }
        usize::try_from(sum).unwrap_or(0)
    }

    fn total(&self) -> usize {
        self.before(self.len())
    }

    /// The position of the `n`-th set one (from 0), if there are more than `n`.
    fn nth(&self, n: usize) -> Option<usize> {
        let len = self.len();
        let mut step = if len == 0 { 0 } else { 1 << len.ilog2() };
        let (mut pos, mut left) = (0, i64::try_from(n).ok()? + 1);
        while step > 0 {
            if pos + step <= len && self.tree[pos + step] < left {
                pos += step;
                left -= self.tree[pos];
            }
            step >>= 1;
        }
        (pos < len).then_some(pos)
    }

    /// The first set position after `at`, wrapping round to the start.
    fn after(&self, at: usize) -> Option<usize> {
        let seen = self.before(at + 1);
        if seen < self.total() {
            self.nth(seen)
        } else {
            self.nth(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launcher::BladeLoad;
    use crate::store::Method;

    /// A small deterministic generator: the same cases every run.
    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) % n
        }
    }

    fn blade(i: usize, pool: &str, draining: bool, max_sessions: u32) -> BladeRecord {
        BladeRecord {
            name: format!("b{i:02}"),
            host: format!("127.0.0.{}", i + 2),
            port: 7501,
            method: Method::Agent,
            draining,
            pool: pool.into(),
            max_sessions,
        }
    }

    /// What a walk must give, worked out the slow way (the pass and sort every Dispatch
    /// made before this index): usable blades by (score, desktops, registration) — or, for
    /// the rotation's `n`, in registration order from the n-th on, wrapping — then those last
    /// seen down that have room, in registration order.
    fn slow_order(
        ranking: &Ranking,
        blades: &[BladeRecord],
        pool: &str,
        rotation: Option<u64>,
    ) -> Vec<String> {
        let mut usable = Vec::new();
        let mut down = Vec::new();
        for b in blades.iter().filter(|b| b.pool == pool && !b.draining) {
            let h = ranking.health(&b.name);
            if h.is_some_and(|h| !h.healthy) {
                if room(b, h).fits() {
                    down.push(b.name.clone());
                }
            } else if room(b, h).fits() {
                usable.push((score(b, h), room(b, h).used, b.name.clone()));
            }
        }
        match rotation {
            Some(n) if !usable.is_empty() => {
                let start = (n % usable.len() as u64) as usize;
                usable.rotate_left(start);
            }
            Some(_) => {}
            None => usable.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1))),
        }
        usable.into_iter().map(|(_, _, n)| n).chain(down).collect()
    }

    /// The refusal's figures, the slow way.
    fn slow_state(ranking: &Ranking, blades: &[BladeRecord], pool: &str) -> (usize, u64, u64) {
        let open: Vec<_> = blades
            .iter()
            .filter(|b| b.pool == pool && !b.draining)
            .filter(|b| ranking.health(&b.name).is_none_or(|h| h.healthy))
            .map(|b| room(b, ranking.health(&b.name)))
            .collect();
        (
            open.len(),
            open.iter().map(|r| u64::from(r.used)).sum(),
            open.iter()
                .filter_map(|r| r.capacity())
                .map(u64::from)
                .sum(),
        )
    }

    /// The records whose `listed` flag is set: the blade list of the moment.
    fn present(records: &[BladeRecord], listed: &[bool]) -> Vec<BladeRecord> {
        records
            .iter()
            .zip(listed)
            .filter(|(_, l)| **l)
            .map(|(b, _)| b.clone())
            .collect()
    }

    /// Takes every blade of the walk, then gives their reservations back.
    fn walk_all(ranking: &mut Ranking, walk: &mut Walk) -> Vec<String> {
        let taken: Vec<String> =
            std::iter::from_fn(|| ranking.take(walk).map(|b| b.name)).collect();
        for name in &taken {
            ranking.update_known(name, |h| h.starting -= 1);
        }
        taken
    }

    // Through random reports, failures, starts, stops, drains, caps and blades leaving and
    // coming back, a walk gives exactly the order the full sort (or the rotation over the
    // usable blades) gives, and the pool's figures match a recount.
    #[test]
    fn walks_match_the_full_sort_through_random_changes() {
        let mut rng = Lcg(7);
        let mut ranking = Ranking::default();
        let (mut seq, mut taken, mut down_taken) = (0, 0, 0);
        let mut records: Vec<BladeRecord> = (0..40)
            .map(|i| blade(i, ["a", "b"][i % 2], false, 0))
            .collect();
        let mut listed = vec![true; 40];
        for round in 0..300 {
            if round % 5 == 0 {
                // The list changes: a drain, a cap, a blade gone or back.
                let i = rng.below(40) as usize;
                records[i].draining = rng.below(4) == 0;
                records[i].max_sessions = [0, 2, 5][rng.below(3) as usize];
                let j = rng.below(40) as usize;
                listed[j] = !listed[j];
                seq += 1;
                ranking.sync(&Blades::new(present(&records, &listed), seq));
            }
            for _ in 0..20 {
                let name = format!("b{:02}", rng.below(40));
                match rng.below(6) {
                    0 | 1 => {
                        let load = BladeLoad {
                            sessions: rng.below(6) as u32,
                            free_displays: rng.below(4) as u32,
                            load1: rng.below(40) as f64 / 10.0,
                            cpus: 4,
                            mem_total: 1000,
                            mem_available: rng.below(1000),
                            reported: rng.below(5) != 0,
                            ..Default::default()
                        };
                        let healthy = rng.below(5) != 0;
                        ranking.update(&name, |h| {
                            h.healthy = healthy;
                            h.load = load;
                        });
                    }
                    2 => ranking.update(&name, |h| h.full = true),
                    3 => {
                        ranking.update_known(&name, |h| h.starting = h.starting.saturating_sub(1));
                    }
                    4 => ranking.update(&name, |h| h.placed.push((9, 0))),
                    _ => ranking.forget(&name),
                }
            }
            let now = present(&records, &listed);
            for pool in ["a", "b"] {
                let state = ranking.pool_state(pool);
                assert_eq!(
                    (state.open, state.used, state.capacity),
                    slow_state(&ranking, &now, pool),
                    "round {round}"
                );
                for rotation in [None, Some(round as u64)] {
                    let want = slow_order(&ranking, &now, pool, rotation);
                    let got = walk_all(&mut ranking, &mut Walk::new(pool, rotation));
                    assert_eq!(got, want, "round {round}, pool {pool}, {rotation:?}");
                    taken += got.len();
                    down_taken += got
                        .iter()
                        .filter(|n| ranking.health(n).is_some_and(|h| !h.healthy))
                        .count();
                }
            }
        }
        // The cases are not empty: walks take many blades, and down ones too.
        assert!(taken > 4000 && down_taken > 300, "{taken} {down_taken}");
    }

    // A blade with nothing on it whose free displays change keeps its score (0 desktops of
    // any size is 0): the refusal's capacity must still follow.
    #[test]
    fn a_change_of_capacity_alone_reaches_the_pool_figures() {
        let mut ranking = Ranking::default();
        ranking.sync(&Blades::new(vec![blade(0, "p", false, 0)], 1));
        for free in [4, 9, 2] {
            ranking.update("b00", |h| {
                h.load = BladeLoad {
                    free_displays: free,
                    reported: true,
                    ..Default::default()
                }
            });
            assert_eq!(ranking.pool_state("p").capacity, u64::from(free));
        }
    }

    // A walk that outlives a re-sort of the list goes on from the blade it took last, by
    // name, and takes none twice.
    #[test]
    fn a_rotation_survives_a_re_sort() {
        let records: Vec<_> = (0..4).map(|i| blade(i, "p", false, 0)).collect();
        let mut ranking = Ranking::default();
        ranking.sync(&Blades::new(records.clone(), 1));
        let mut walk = Walk::new("p", Some(1));
        assert_eq!(ranking.take(&mut walk).unwrap().name, "b01");
        // b00 goes: every position shifts by one.
        ranking.sync(&Blades::new(records[1..].to_vec(), 2));
        assert_eq!(ranking.take(&mut walk).unwrap().name, "b02");
        assert_eq!(ranking.take(&mut walk).unwrap().name, "b03");
        assert!(ranking.take(&mut walk).is_none());
        // An older list does not undo a newer one.
        ranking.sync(&Blades::new(records.clone(), 1));
        assert_eq!(ranking.pool_state("p").blades, 3);
        // Nor does a rebuild lose what was counted on a blade meanwhile.
        assert_eq!(ranking.health("b02").map(|h| h.starting), Some(1));
    }

    // The rotation: the n-th usable blade (counting full, down and draining ones out), then
    // the usable ones after it, wrapping; then those last seen down.
    #[test]
    fn the_rotation_counts_usable_blades_only() {
        let records: Vec<_> = (0..6).map(|i| blade(i, "p", i == 4, 0)).collect();
        let mut ranking = Ranking::default();
        ranking.sync(&Blades::new(records, 1));
        ranking.update("b01", |h| h.healthy = false);
        ranking.update("b02", |h| h.full = true);
        // Usable: b00, b03, b05.
        let order = |ranking: &mut Ranking, n| walk_all(ranking, &mut Walk::new("p", Some(n)));
        assert_eq!(order(&mut ranking, 0), ["b00", "b03", "b05", "b01"]);
        assert_eq!(order(&mut ranking, 1), ["b03", "b05", "b00", "b01"]);
        assert_eq!(order(&mut ranking, 5), ["b05", "b00", "b03", "b01"]);
        assert_eq!(ranking.pool_state("p").usable, 3);
        // A blade that fills while the walk goes on is not taken again.
        let mut walk = Walk::new("p", Some(0));
        assert_eq!(ranking.take(&mut walk).unwrap().name, "b00");
        ranking.update("b03", |h| h.full = true);
        assert_eq!(ranking.take(&mut walk).unwrap().name, "b05");
        assert_eq!(ranking.take(&mut walk).unwrap().name, "b01");
        assert!(ranking.take(&mut walk).is_none());
        assert_eq!(walk.tried(), 3);
    }

    #[test]
    fn counts_find_the_nth_and_the_next_set_position() {
        let mut rng = Lcg(3);
        for len in [0usize, 1, 2, 7, 64, 100] {
            let mut c = Counts::new(len);
            let mut set = vec![false; len];
            for _ in 0..200 {
                if len > 0 {
                    let i = rng.below(len as u64) as usize;
                    c.add(i, if set[i] { -1 } else { 1 });
                    set[i] = !set[i];
                }
                let on: Vec<usize> = (0..len).filter(|&i| set[i]).collect();
                assert_eq!(c.total(), on.len());
                for (n, &at) in on.iter().enumerate() {
                    assert_eq!(c.nth(n), Some(at));
                }
                assert_eq!(c.nth(on.len()), None);
                for at in 0..len {
                    let next = on.iter().find(|&&i| i > at).or(on.first()).copied();
                    assert_eq!(c.after(at), next, "after {at} in {on:?}");
                }
            }
        }
    }
}
