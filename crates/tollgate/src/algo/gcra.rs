//! The generic cell rate algorithm with reservations and safe refunds.
//!
//! Time is kept scaled by the quota's amount `A`: one scaled unit is `1/A` ns, so a
//! charge of `c` units moves the theoretical arrival time (TAT) by exactly `c × period`
//! scaled units, with no rounding for rates like 90,000 tokens per minute. A call of
//! cost `c` may start at `t` when `max(tat, t·A) + c·P − capacity·P ≤ t·A`.
//!
//! Refunds (a waiter that gave up, a call that used fewer tokens than estimated) must not
//! hand back capacity that has since refilled, or a later caller could exceed the bound.
//! With `W` the units charged after the refunded call and `S` the latest start so far,
//! replaying history with the smaller charge could leave TAT no lower than
//! `max(now, S)·A + W·P`, so the refund stops there: `tat' = max(tat − δ·P,
//! min(tat, max(now, S)·A + W·P))`. This module must never read a clock or do I/O.

use super::Params;

/// GCRA state of one key in one quota.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct State {
    /// Theoretical arrival time, in ns × amount.
    tat: u128,
    /// Units charged so far (wrapping), to size refunds.
    charged: u64,
    /// The latest start time handed out, ns.
    max_start: u64,
}

/// `ns × amount`: a product of two `u64`, which always fits a `u128`.
#[inline]
fn scaled(p: &Params, ns: u64) -> u128 {
    u128::from(ns) * u128::from(p.amount)
}

/// `units × period`: a product of two `u64`, which always fits a `u128`.
#[inline]
fn span(p: &Params, units: u64) -> u128 {
    u128::from(units) * u128::from(p.period_ns)
}

impl State {
    #[inline]
    pub(crate) fn from_words(w: [u64; 4]) -> State {
        State {
            tat: (u128::from(w[0]) << 64) | u128::from(w[1]),
            charged: w[2],
            max_start: w[3],
        }
    }

    #[inline]
    pub(crate) fn to_words(self) -> [u64; 4] {
        [
            (self.tat >> 64) as u64,
            self.tat as u64,
            self.charged,
            self.max_start,
        ]
    }

    /// Earliest start (ns) at or after `now` for a call of `c ≤ capacity` units.
    #[inline]
    pub(crate) fn earliest(&self, p: &Params, now: u64, c: u64) -> u64 {
        let now_s = scaled(p, now);
        let need = self
            .tat
            .max(now_s)
            .saturating_add(span(p, c))
            .saturating_sub(span(p, p.capacity));
        let start = if need <= now_s {
            now
        } else {
            let start = need.div_ceil(u128::from(p.amount));
            u64::try_from(start).unwrap_or(u64::MAX).max(now)
        };
        // Never before a start already handed out: FIFO even after refunds.
        start.max(self.max_start)
    }

    /// Charge `c` units starting at `start` (which `earliest` allowed). Returns the
    /// snapshot a later refund needs.
    #[inline]
    pub(crate) fn apply(&mut self, p: &Params, start: u64, c: u64) -> u64 {
        self.tat = self.tat.max(scaled(p, start)).saturating_add(span(p, c));
        self.charged = self.charged.wrapping_add(c);
        self.max_start = self.max_start.max(start);
        self.charged
    }

    /// Give back up to `units` of a call charged with snapshot `snap`, never more than
    /// has not been refilled since (see the module docs).
    pub(crate) fn refund(&mut self, p: &Params, now: u64, units: u64, snap: u64) {
        let after = self.charged.wrapping_sub(snap);
        let floor = scaled(p, now.max(self.max_start)).saturating_add(span(p, after));
        let lowered = self.tat.saturating_sub(span(p, units));
        self.tat = lowered.max(self.tat.min(floor));
    }

    /// Charge `units` more at `now` without a check (usage above the estimate).
    pub(crate) fn force(&mut self, p: &Params, now: u64, units: u64) {
        self.apply(p, now, units);
    }

    /// Units available at `now` and ns until the bucket is full again.
    pub(crate) fn status(&self, p: &Params, now: u64) -> (u64, u64) {
        let now_s = scaled(p, now);
        let level = now_s
            .saturating_add(span(p, p.capacity))
            .saturating_sub(self.tat.max(now_s));
        let remaining = u64::try_from(level / u128::from(p.period_ns)).unwrap_or(u64::MAX);
        let reset = self
            .tat
            .saturating_sub(now_s)
            .div_ceil(u128::from(p.amount));
        (remaining, u64::try_from(reset).unwrap_or(u64::MAX))
    }

    /// True when forgetting this state changes nothing: the bucket is full and no
    /// reservation lies in the future.
    pub(crate) fn idle(&self, p: &Params, now: u64) -> bool {
        self.tat <= scaled(p, now) && self.max_start <= now
    }
}
