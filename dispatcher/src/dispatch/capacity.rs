//! How full a blade is, and the placement score: pure functions over what the dispatcher
//! knows of a blade (its record and its last health report), unit-tested here.
//!
//! **Room.** A blade's desktops are those of its last report (an agent's, or those stored on
//! it for SSH blades), plus the starts this dispatcher has under way there and the desktops
//! it started that the report does not list yet (by Xvnc pid), less those it stopped that
//! the report still lists. It takes another desktop while both hold:
//! - they are fewer than the displays the agent can use (live, starting and free at its
//!   report) — the hard limit, the agent's display range;
//! - they are fewer than its `max_sessions`, when it has one.
//!
//! **Score** (`--policy score`, the default; lower is chosen first). Three shares of the
//! blade's own size, so a big blade and a small one fill at the same pace:
//! - desktops: desktops / capacity, where capacity is `max_sessions` or, failing that, the
//!   desktops plus free displays (SSH blades without `max_sessions`: desktops / 100);
//! - CPU: 1-minute load / CPUs, at most 2 (an overloaded blade is avoided, not ruled out);
//! - memory: 1 − available / total.
//!
//! Figures a blade does not report (SSH blades report none) count 0; a load that is not a
//! number, or an agent that names no CPUs (one older than the score), counts as busy, so a
//! lying or old agent is not preferred. Ties go to the blade with fewer desktops, then to
//! registration order.
use super::BladeHealth;
use crate::store::BladeRecord;

/// Desktops a blade without figures or cap is measured against in the score.
const UNREPORTED_CAPACITY: f64 = 100.0;

/// What the dispatcher counts on a blade: its desktops and, when known, how many more it can
/// take (None: no limit known).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    /// Desktops there now, as far as this dispatcher knows.
    pub used: u32,
    /// Desktops it can still take; None when neither displays nor a cap are known.
    pub free: Option<u32>,
}

impl Room {
    /// Whether another desktop fits.
    pub fn fits(&self) -> bool {
        self.free != Some(0)
    }

    /// The most desktops it holds, when known.
    pub fn capacity(&self) -> Option<u32> {
        self.free.map(|f| self.used.saturating_add(f))
    }
}

/// The room on `blade` given its health (None: never checked).
pub fn room(blade: &BladeRecord, health: Option<&BladeHealth>) -> Room {
    let Some(h) = health else {
        let cap = (blade.max_sessions > 0).then_some(blade.max_sessions);
        return Room { used: 0, free: cap };
    };
    let n = |len: usize| u32::try_from(len).unwrap_or(u32::MAX);
    // The last report's desktops, plus this dispatcher's starts under way and those it
    // started that no report counts yet, less those it stopped that the report still counts.
    let used = h
        .load
        .sessions
        .saturating_add(h.starting)
        .saturating_add(n(h.placed.len()))
        .saturating_sub(n(h.ended.len()));
    // All the displays the agent can use: live, starting, free (a start another dispatcher
    // makes meanwhile may still take one: the agent then answers NO_FREE_DISPLAY).
    let by_displays = h.load.reported.then(|| {
        h.load
            .sessions
            .saturating_add(h.load.starting)
            .saturating_add(h.load.free_displays)
            .saturating_sub(used)
    });
    let by_cap = (blade.max_sessions > 0).then(|| blade.max_sessions.saturating_sub(used));
    let free = if h.full {
        Some(0)
    } else {
        match (by_displays, by_cap) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    };
    Room { used, free }
}

/// The placement score of `blade` (lower first); see the module docs.
pub fn score(blade: &BladeRecord, health: Option<&BladeHealth>) -> f64 {
    let room = room(blade, health);
    let desktops = match room.capacity() {
        Some(0) => 1.0,
        Some(c) => f64::from(room.used) / f64::from(c),
        None => f64::from(room.used) / UNREPORTED_CAPACITY,
    };
    let Some(load) = health.map(|h| &h.load).filter(|l| l.reported) else {
        return desktops;
    };
    let cpu = if load.cpus > 0 && load.load1.is_finite() {
        (load.load1 / f64::from(load.cpus)).clamp(0.0, 2.0)
    } else {
        2.0
    };
    let memory = if load.mem_total > 0 {
        1.0 - (load.mem_available.min(load.mem_total) as f64 / load.mem_total as f64)
    } else {
        0.0
    };
    desktops + cpu + memory
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launcher::BladeLoad;
    use crate::store::Method;

    fn blade(max_sessions: u32) -> BladeRecord {
        BladeRecord {
            name: "b".into(),
            host: "10.0.0.1".into(),
            port: 7501,
            method: Method::Agent,
            draining: false,
            pool: "default".into(),
            max_sessions,
        }
    }

    /// A report of `sessions` desktops and `free_displays`, with `placed` starts since that
    /// it does not list.
    fn reported(sessions: u32, free_displays: u32, placed: u32) -> BladeHealth {
        BladeHealth {
            healthy: true,
            load: BladeLoad {
                sessions,
                free_displays,
                reported: true,
                ..Default::default()
            },
            placed: (0..placed).map(|p| (1000 + p, 0)).collect(),
            ..BladeHealth::unchecked()
        }
    }

    #[test]
    fn room_is_the_tighter_of_displays_and_the_cap() {
        let r = room(&blade(0), Some(&reported(3, 5, 0)));
        assert_eq!((r.used, r.free), (3, Some(5)));
        // Placed since the report, or starting: counted at once.
        let r = room(&blade(0), Some(&reported(3, 5, 2)));
        assert_eq!((r.used, r.free), (5, Some(3)));
        let mut h = reported(3, 5, 1);
        h.starting = 1;
        assert_eq!(
            room(&blade(0), Some(&h)),
            Room {
                used: 5,
                free: Some(3)
            }
        );
        // A start the agent reports as under way holds a display, not a free one.
        let mut h = reported(3, 4, 0);
        h.load.starting = 1;
        h.starting = 1;
        assert_eq!(
            room(&blade(0), Some(&h)),
            Room {
                used: 4,
                free: Some(4)
            }
        );
        let r = room(&blade(4), Some(&reported(3, 5, 0)));
        assert_eq!((r.free, r.capacity()), (Some(1), Some(4)));
        assert!(!room(&blade(4), Some(&reported(3, 5, 1))).fits());
        assert!(!room(&blade(0), Some(&reported(8, 0, 0))).fits());
        // A cap lowered below what runs: full, not an underflow.
        assert_eq!(room(&blade(2), Some(&reported(3, 5, 0))).free, Some(0));
        // Stopped but still in the report: its room is back at once.
        let mut h = reported(4, 0, 0);
        h.ended = vec![(77, 0)];
        assert_eq!(
            room(&blade(4), Some(&h)),
            Room {
                used: 3,
                free: Some(1)
            }
        );
        // Found full by a start: full until the next report.
        let mut h = reported(1, 5, 0);
        h.full = true;
        assert!(!room(&blade(0), Some(&h)).fits());
    }

    #[test]
    fn unreported_blades_have_room_unless_capped() {
        assert!(room(&blade(0), None).fits());
        assert_eq!(room(&blade(0), None).free, None);
        assert_eq!(room(&blade(3), None).free, Some(3));
        let ssh = BladeHealth {
            healthy: true,
            load: BladeLoad {
                sessions: 2,
                ..Default::default()
            },
            placed: vec![(5, 0)],
            ..BladeHealth::unchecked()
        };
        assert_eq!(room(&blade(3), Some(&ssh)).free, Some(0));
        assert_eq!(room(&blade(0), Some(&ssh)).free, None);
    }

    #[test]
    fn big_and_small_blades_fill_at_the_same_pace() {
        // Half full on 4 displays and half full on 16 score the same.
        let small = score(&blade(0), Some(&reported(2, 2, 0)));
        let big = score(&blade(0), Some(&reported(8, 8, 0)));
        assert!((small - big).abs() < 1e-9);
        assert!(score(&blade(0), Some(&reported(1, 3, 0))) < small);
    }

    #[test]
    fn load_and_memory_count_per_cpu_and_per_byte() {
        let mut busy = reported(1, 7, 0);
        busy.load.cpus = 2;
        busy.load.load1 = 2.0; // one per CPU
        busy.load.mem_total = 1000;
        busy.load.mem_available = 250;
        let s = score(&blade(0), Some(&busy));
        assert!((s - (0.125 + 1.0 + 0.75)).abs() < 1e-9, "{s}");
        busy.load.load1 = 50.0; // capped
        assert!((score(&blade(0), Some(&busy)) - (0.125 + 2.0 + 0.75)).abs() < 1e-9);
        // A load that is not a number, or no CPUs named, counts as busy, not idle.
        busy.load.load1 = f64::NAN;
        assert!((score(&blade(0), Some(&busy)) - (0.125 + 2.0 + 0.75)).abs() < 1e-9);
        busy.load.load1 = -f64::INFINITY;
        assert!(score(&blade(0), Some(&busy)).is_finite());
        busy.load.load1 = 0.0;
        busy.load.cpus = 0;
        assert!((score(&blade(0), Some(&busy)) - (0.125 + 2.0 + 0.75)).abs() < 1e-9);
    }
}
