//! Where the dispatcher's domain code gets the time: a [`Clock`], handed to the
//! [`Dispatcher`](crate::dispatch::Dispatcher), never `SystemTime` read in place.
//!
//! Times here are Unix milliseconds because they are stored: token expiry, claim deadlines and
//! creation times sit in the store, and several dispatchers sharing one MongoDB compare them
//! across processes and hosts. So production uses the wall clock ([`WallClock`]) — a monotonic
//! clock of one process would drift from the others' and from what an operator reads.
//!
//! Tests want time they can move: [`TokioClock`] is the wall time when it was made plus the
//! time that has passed on tokio's clock since, so under `tokio::time::pause()` expiry, sweeps
//! and claim deadlines follow `tokio::time::advance` (and auto-advance) instead of real sleeps.
//! Waiting (timeouts, retry pauses) already uses tokio's timers, which pause alike.
use std::time::{SystemTime, UNIX_EPOCH};

/// A source of the current time as Unix milliseconds.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// Milliseconds since the Unix epoch, now.
    fn now_ms(&self) -> i64;
}

/// The system's wall clock: what production uses (see the module docs for why not monotonic).
#[derive(Debug, Clone, Copy, Default)]
pub struct WallClock;

impl Clock for WallClock {
    fn now_ms(&self) -> i64 {
        wall_ms()
    }
}

/// Wall time at creation plus tokio's elapsed time since: pauses and advances with
/// `tokio::time::pause()` / `advance()`. For tests; in an unpaused runtime it tracks the wall
/// clock closely but not exactly (it ignores wall-clock steps).
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    /// Unix milliseconds when the clock was made.
    base_ms: i64,
    /// tokio's reading at the same moment.
    base: tokio::time::Instant,
}

impl TokioClock {
    /// A clock starting at the current wall time. Call it inside the (paused) runtime.
    pub fn new() -> Self {
        TokioClock {
            base_ms: wall_ms(),
            base: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now_ms(&self) -> i64 {
        let elapsed = i64::try_from(self.base.elapsed().as_millis()).unwrap_or(i64::MAX);
        self.base_ms.saturating_add(elapsed)
    }
}

/// The wall clock in Unix milliseconds; 0 for a clock set before 1970, which then makes
/// everything look expired rather than failing requests.
fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_wall_clock_reads_the_system_time() {
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_millis() as i64;
        let now = WallClock.now_ms();
        let after = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_millis() as i64;
        assert!(
            before <= now && now <= after,
            "{before} <= {now} <= {after}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_tokio_clock_moves_with_paused_time_only() {
        let clock = TokioClock::new();
        let start = clock.now_ms();
        // Real time passing does not move a paused clock...
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(clock.now_ms(), start);
        // ...advancing tokio's does, by exactly that much.
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(clock.now_ms(), start + 3_600_000);
        // It starts at the wall time, so stored times stay comparable with real ones.
        assert!((start - WallClock.now_ms()).abs() < 60_000);
    }
}
