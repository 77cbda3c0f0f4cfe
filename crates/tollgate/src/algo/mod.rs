//! Pure rate-limiting math: GCRA, fixed window and sliding window.
//!
//! Every function takes the time as an argument (nanoseconds since the limiter's epoch)
//! and works on plain state; nothing here reads a clock, locks, allocates or does I/O, so
//! the same code is driven by the in-memory store and by property tests with injected
//! time. Each algorithm offers the same five operations:
//!
//! - `earliest(now, cost)`: the first start time at or after `now` when `cost` fits
//!   (a reservation, so waiting is FIFO with O(1) state), and every later time fits too;
//! - `apply(start, cost)`: charge it, returning a snapshot for a later refund;
//! - `refund(now, units, snapshot)`: give back what a call did not use, never more than
//!   keeps every interval within the algorithm's bound;
//! - `force(now, units)`: charge usage above the estimate;
//! - `status(now)`: units remaining and time until fully replenished.

pub(crate) mod fixed_window;
pub(crate) mod gcra;
pub(crate) mod sliding_window;

#[cfg(test)]
mod tests;

use crate::quota::Algorithm;

/// A rate quota's numbers: `amount` per `period_ns`, holding at most `capacity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Params {
    pub(crate) amount: u64,
    pub(crate) period_ns: u64,
    pub(crate) capacity: u64,
}

/// The state of one key in one rate quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    Gcra(gcra::State),
    Fixed(fixed_window::State),
    Sliding(sliding_window::State),
}

macro_rules! dispatch {
    ($self:expr, $s:ident => $e:expr) => {
        match $self {
            State::Gcra($s) => $e,
            State::Fixed($s) => $e,
            State::Sliding($s) => $e,
        }
    };
}

impl State {
    /// A fresh state: nothing charged yet.
    pub(crate) fn new(algorithm: Algorithm) -> State {
        match algorithm {
            Algorithm::Gcra => State::Gcra(gcra::State::default()),
            Algorithm::FixedWindow => State::Fixed(fixed_window::State::default()),
            Algorithm::SlidingWindow => State::Sliding(sliding_window::State::default()),
        }
    }

    #[inline]
    pub(crate) fn earliest(&self, p: &Params, now: u64, cost: u64) -> u64 {
        dispatch!(self, s => s.earliest(p, now, cost))
    }

    #[inline]
    pub(crate) fn apply(&mut self, p: &Params, start: u64, cost: u64) -> u64 {
        dispatch!(self, s => s.apply(p, start, cost))
    }

    pub(crate) fn refund(&mut self, p: &Params, now: u64, units: u64, snap: u64) {
        dispatch!(self, s => s.refund(p, now, units, snap))
    }

    pub(crate) fn force(&mut self, p: &Params, now: u64, units: u64) {
        dispatch!(self, s => s.force(p, now, units))
    }

    pub(crate) fn status(&self, p: &Params, now: u64) -> (u64, u64) {
        dispatch!(self, s => s.status(p, now))
    }

    pub(crate) fn idle(&self, p: &Params, now: u64) -> bool {
        dispatch!(self, s => s.idle(p, now))
    }
}
