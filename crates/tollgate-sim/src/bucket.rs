//! A plain token bucket: full (or as full as asked) at start, refilled continuously at
//! capacity per minute.
//! Kept deliberately independent of tollgate's GCRA so each checks the other.

use std::time::{Duration, Instant};

const MINUTE: f64 = 60.0;

pub(crate) struct Bucket {
    capacity: f64,
    level: f64,
    at: Instant,
}

impl Bucket {
    /// A bucket holding `fill` (0 to 1) of its capacity, as a key an earlier run or
    /// another app has partly spent.
    pub(crate) fn filled(capacity: u64, fill: f64, now: Instant) -> Bucket {
        Bucket {
            capacity: capacity as f64,
            level: capacity as f64 * fill.clamp(0.0, 1.0),
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + elapsed * self.capacity / MINUTE).min(self.capacity);
        self.at = self.at.max(now);
    }

    fn exact(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        (self.level + elapsed * self.capacity / MINUTE).min(self.capacity)
    }

    /// Whole units available now.
    pub(crate) fn level(&self, now: Instant) -> u64 {
        self.exact(now).floor() as u64
    }

    /// How long until `n` units are available (zero when they are now).
    pub(crate) fn wait_for(&self, n: u64, now: Instant) -> Duration {
        let missing = n as f64 - self.exact(now);
        if missing <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(missing * MINUTE / self.capacity)
    }

    /// How long until the bucket is full again.
    pub(crate) fn until_full(&self, now: Instant) -> Duration {
        let missing = self.capacity - self.exact(now);
        Duration::from_secs_f64(missing.max(0.0) * MINUTE / self.capacity)
    }

    pub(crate) fn take(&mut self, n: u64, now: Instant) {
        self.refill(now);
        self.level -= n as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refills_at_capacity_per_minute_and_never_past_full() {
        let t0 = Instant::now();
        let mut b = Bucket::filled(60, 1.0, t0);
        b.take(60, t0);
        assert_eq!(b.level(t0), 0);
        assert_eq!(b.wait_for(1, t0), Duration::from_secs(1));
        assert_eq!(b.level(t0 + Duration::from_millis(2_500)), 2);
        assert_eq!(b.level(t0 + Duration::from_secs(600)), 60);
        assert_eq!(b.until_full(t0), Duration::from_secs(60));
        assert_eq!(b.wait_for(0, t0), Duration::ZERO);
    }

    #[test]
    fn a_bucket_can_start_part_spent() {
        let t0 = Instant::now();
        let empty = Bucket::filled(60, 0.0, t0);
        assert_eq!(empty.level(t0), 0);
        assert_eq!(empty.wait_for(1, t0), Duration::from_secs(1));
        let half = Bucket::filled(60, 0.5, t0);
        assert_eq!(half.level(t0), 30);
        assert_eq!(half.until_full(t0), Duration::from_secs(30));
    }
}
