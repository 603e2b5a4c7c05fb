//! How full a blade is, and the placement score: pure functions over what the dispatcher
//! knows of a blade (its record and its last health report), unit-tested here.
//!
//! **Room.** A blade takes another desktop while both hold:
//! - the agent's free displays (last report, less the desktops this dispatcher placed there
//!   since, plus those it stopped) are above zero — the hard limit, the agent's display range;
//! - its desktops (last report, or those stored on it for SSH blades, plus the ones placed
//!   since, less those stopped) are below its `max_sessions`, when it has one.
//!
//! **Score** (`--policy score`, the default; lower is chosen first). Three shares of the
//! blade's own size, so a big blade and a small one fill at the same pace:
//! - desktops: desktops / capacity, where capacity is `max_sessions` or, failing that, the
//!   desktops plus free displays (SSH blades without `max_sessions`: desktops / 100);
//! - CPU: 1-minute load / CPUs, at most 2 (an overloaded blade is avoided, not ruled out);
//! - memory: 1 − available / total.
//!
//! Figures a blade does not report (SSH blades report none) count 0. Ties go to the blade
//! with fewer desktops, then to registration order.
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
    let (reported_used, free_displays, placed, ended) = match health {
        Some(h) => (
            h.load.sessions,
            h.load.reported.then_some(h.load.free_displays),
            h.placed,
            h.ended,
        ),
        None => (0, None, 0, 0),
    };
    let used = reported_used.saturating_add(placed).saturating_sub(ended);
    let by_displays = free_displays.map(|f| f.saturating_add(ended).saturating_sub(placed));
    let by_cap = (blade.max_sessions > 0).then(|| blade.max_sessions.saturating_sub(used));
    let free = match (by_displays, by_cap) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
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
    let Some(load) = health.map(|h| h.load).filter(|l| l.reported) else {
        return desktops;
    };
    let cpu = if load.cpus > 0 {
        (load.load1 / f64::from(load.cpus)).clamp(0.0, 2.0)
    } else {
        0.0
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

    fn reported(sessions: u32, free_displays: u32, placed: u32) -> BladeHealth {
        BladeHealth {
            healthy: true,
            load: BladeLoad {
                sessions,
                free_displays,
                reported: true,
                ..Default::default()
            },
            placed,
            ended: 0,
        }
    }

    #[test]
    fn room_is_the_tighter_of_displays_and_the_cap() {
        let r = room(&blade(0), Some(&reported(3, 5, 0)));
        assert_eq!((r.used, r.free), (3, Some(5)));
        // Placed since the report: counted at once.
        let r = room(&blade(0), Some(&reported(3, 5, 2)));
        assert_eq!((r.used, r.free), (5, Some(3)));
        let r = room(&blade(4), Some(&reported(3, 5, 0)));
        assert_eq!((r.free, r.capacity()), (Some(1), Some(4)));
        assert!(!room(&blade(4), Some(&reported(3, 5, 1))).fits());
        assert!(!room(&blade(0), Some(&reported(8, 0, 0))).fits());
        // A cap lowered below what runs: full, not an underflow.
        assert_eq!(room(&blade(2), Some(&reported(3, 5, 0))).free, Some(0));
        // Stopped since the report: its room is back at once.
        let mut h = reported(4, 0, 0);
        h.ended = 1;
        assert_eq!(
            room(&blade(4), Some(&h)),
            Room {
                used: 3,
                free: Some(1)
            }
        );
    }

    #[test]
    fn unreported_blades_have_room_unless_capped() {
        assert!(room(&blade(0), None).fits());
        assert_eq!(room(&blade(0), None).free, None);
        let ssh = BladeHealth {
            healthy: true,
            load: BladeLoad {
                sessions: 2,
                ..Default::default()
            },
            placed: 1,
            ended: 0,
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
    }
}
