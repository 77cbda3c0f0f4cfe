//! Fixed window: a counter per aligned window of `period`, at most `amount` per window.
//!
//! Windows are aligned to the limiter's epoch. A reservation that does not fit in the
//! current window starts at the next window's beginning. Refunds apply only while the
//! charged window is still the current one (an old window's count no longer matters).
//! This module must never read a clock or do I/O.

use super::Params;

/// Fixed-window state of one key in one quota.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct State {
    /// Index of the latest window with charges (may be in the future).
    win: u64,
    /// Units charged in window `win`.
    count: u64,
    /// The latest start handed out, ns: later calls never start before it (FIFO).
    max_start: u64,
}

impl State {
    #[inline]
    pub(crate) fn from_words(w: [u64; 4]) -> State {
        State {
            win: w[0],
            count: w[1],
            max_start: w[2],
        }
    }

    #[inline]
    pub(crate) fn to_words(self) -> [u64; 4] {
        [self.win, self.count, self.max_start, 0]
    }

    #[inline]
    fn used_in(&self, w: u64) -> u64 {
        if w == self.win { self.count } else { 0 }
    }

    fn advance(&mut self, w: u64) {
        if w > self.win {
            self.win = w;
            self.count = 0;
        }
    }

    /// Earliest start at or after `now` (and not before the latest window charged).
    #[inline]
    pub(crate) fn earliest(&self, p: &Params, now: u64, c: u64) -> u64 {
        self.earliest_unordered(p, now, c).max(self.max_start)
    }

    #[inline]
    fn earliest_unordered(&self, p: &Params, now: u64, c: u64) -> u64 {
        let w = (now / p.period_ns).max(self.win);
        let start = now.max(w.saturating_mul(p.period_ns));
        if self.used_in(w).saturating_add(c) <= p.capacity {
            start
        } else {
            w.saturating_add(1).saturating_mul(p.period_ns)
        }
    }

    /// Charge `c` at `start`; returns the window index as the refund snapshot.
    #[inline]
    pub(crate) fn apply(&mut self, p: &Params, start: u64, c: u64) -> u64 {
        self.max_start = self.max_start.max(start);
        self.advance(start / p.period_ns);
        self.count = self.count.saturating_add(c);
        self.win
    }

    /// Give back `units` charged in window `snap`, if it is still the current one.
    pub(crate) fn refund(&mut self, _p: &Params, _now: u64, units: u64, snap: u64) {
        if snap == self.win {
            self.count = self.count.saturating_sub(units);
        }
    }

    /// Charge `units` more at `now` without a check.
    pub(crate) fn force(&mut self, p: &Params, now: u64, units: u64) {
        self.apply(p, now, units);
    }

    /// Units available and ns until the window's count resets.
    pub(crate) fn status(&self, p: &Params, now: u64) -> (u64, u64) {
        let w = (now / p.period_ns).max(self.win);
        let used = self.used_in(w);
        let reset = if used > 0 {
            w.saturating_add(1).saturating_mul(p.period_ns) - now
        } else {
            0
        };
        (p.capacity.saturating_sub(used), reset)
    }

    /// True when forgetting this state changes nothing.
    pub(crate) fn idle(&self, p: &Params, now: u64) -> bool {
        self.max_start <= now && (self.count == 0 || now / p.period_ns > self.win)
    }
}
