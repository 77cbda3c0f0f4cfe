//! Sliding window, as the upstash ratelimit library defines it: a call fits at offset
//! `x` into the current window when `prev × (period − x) / period + curr + cost ≤ amount`,
//! decided here in exact integer arithmetic rather than floating point.
//!
//! A reservation that does not fit now starts at the earliest offset where the previous
//! window's weight has shrunk enough, or in the next window. Refunds apply to the current
//! and the previous window, the only ones still weighed. This module must never read a
//! clock or do I/O.

use super::Params;

/// Sliding-window state of one key in one quota.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct State {
    /// Index of the latest window with charges (may be in the future).
    win: u64,
    /// Units charged in window `win - 1`.
    prev: u64,
    /// Units charged in window `win`.
    curr: u64,
    /// The latest start handed out, ns: later calls never start before it (FIFO).
    max_start: u64,
}

impl State {
    #[inline]
    pub(crate) fn from_words(w: [u64; 4]) -> State {
        State {
            win: w[0],
            prev: w[1],
            curr: w[2],
            max_start: w[3],
        }
    }

    #[inline]
    pub(crate) fn to_words(self) -> [u64; 4] {
        [self.win, self.prev, self.curr, self.max_start]
    }

    /// (previous, current) counts as seen from window `w >= win`.
    #[inline]
    fn seen_from(&self, w: u64) -> (u64, u64) {
        if w == self.win {
            (self.prev, self.curr)
        } else if w == self.win.saturating_add(1) {
            (self.curr, 0)
        } else {
            (0, 0)
        }
    }

    fn advance(&mut self, w: u64) {
        if w > self.win {
            (self.prev, self.curr) = self.seen_from(w);
            self.win = w;
        }
    }

    /// Smallest offset `x` in `[0, period]` with `prev × (period − x) ≤ room × period`.
    #[inline]
    fn min_offset(p: &Params, prev: u64, room: u64) -> u64 {
        if prev <= room {
            return 0;
        }
        let period = u128::from(p.period_ns);
        let allowed = u128::from(room) * period / u128::from(prev);
        // room < prev, so allowed < period and the offset is at least 1.
        p.period_ns - u64::try_from(allowed).unwrap_or(p.period_ns)
    }

    /// Earliest start at or after `now` (and not before the latest window charged).
    #[inline]
    pub(crate) fn earliest(&self, p: &Params, now: u64, c: u64) -> u64 {
        self.earliest_unordered(p, now, c).max(self.max_start)
    }

    #[inline]
    fn earliest_unordered(&self, p: &Params, now: u64, c: u64) -> u64 {
        let w = (now / p.period_ns).max(self.win);
        let t0 = now.max(w.saturating_mul(p.period_ns));
        let (prev, curr) = self.seen_from(w);
        let window_start = w.saturating_mul(p.period_ns);
        if let Some(room) = p.capacity.checked_sub(curr.saturating_add(c)) {
            t0.max(window_start.saturating_add(Self::min_offset(p, prev, room)))
        } else {
            // Only the next window can hold it; there `curr` becomes the weighed count.
            let next = window_start.saturating_add(p.period_ns);
            next.saturating_add(Self::min_offset(p, curr, p.capacity.saturating_sub(c)))
        }
    }

    /// Charge `c` at `start`; returns the window index as the refund snapshot.
    #[inline]
    pub(crate) fn apply(&mut self, p: &Params, start: u64, c: u64) -> u64 {
        self.max_start = self.max_start.max(start);
        self.advance(start / p.period_ns);
        self.curr = self.curr.saturating_add(c);
        self.win
    }

    /// Give back `units` charged in window `snap`, if it still counts.
    pub(crate) fn refund(&mut self, _p: &Params, _now: u64, units: u64, snap: u64) {
        if snap == self.win {
            self.curr = self.curr.saturating_sub(units);
        } else if snap.saturating_add(1) == self.win {
            self.prev = self.prev.saturating_sub(units);
        }
    }

    /// Charge `units` more at `now` without a check.
    pub(crate) fn force(&mut self, p: &Params, now: u64, units: u64) {
        self.apply(p, now, units);
    }

    /// Units available and ns until nothing is counted any more.
    pub(crate) fn status(&self, p: &Params, now: u64) -> (u64, u64) {
        let w = (now / p.period_ns).max(self.win);
        let t = now.max(w.saturating_mul(p.period_ns));
        let x = t - w.saturating_mul(p.period_ns);
        let (prev, curr) = self.seen_from(w);
        let weighted =
            (u128::from(prev) * u128::from(p.period_ns - x)).div_ceil(u128::from(p.period_ns));
        let used = u64::try_from(weighted)
            .unwrap_or(u64::MAX)
            .saturating_add(curr);
        let windows_left = if curr > 0 {
            2
        } else if prev > 0 {
            1
        } else {
            0
        };
        let reset = if windows_left == 0 {
            0
        } else {
            w.saturating_add(windows_left)
                .saturating_mul(p.period_ns)
                .saturating_sub(now)
        };
        (p.capacity.saturating_sub(used), reset)
    }

    /// True when forgetting this state changes nothing.
    pub(crate) fn idle(&self, p: &Params, now: u64) -> bool {
        self.max_start <= now
            && ((self.prev == 0 && self.curr == 0)
                || now / p.period_ns > self.win.saturating_add(1))
    }
}
