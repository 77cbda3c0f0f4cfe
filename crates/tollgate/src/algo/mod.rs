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

/// A rate quota's numbers: `amount` per `period_ns`, holding at most `capacity`, decided
/// by `algorithm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Params {
    pub(crate) amount: u64,
    pub(crate) period_ns: u64,
    pub(crate) capacity: u64,
    pub(crate) algorithm: Algorithm,
}

/// The state of one key in one rate quota: four words, read by the quota's algorithm.
///
/// Untagged (the algorithm lives in [`Params`]) so a key's states stay small and a
/// decision touches few cache lines. All zeros is the fresh state of every algorithm.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct State([u64; 4]);

/// Run `$body` on the algorithm's view of `$state`, writing it back if `$write`.
macro_rules! with_state {
    ($self:expr, $p:expr, |$s:ident| $body:expr) => {
        match $p.algorithm {
            Algorithm::Gcra => {
                let mut $s = gcra::State::from_words($self.0);
                let out = $body;
                $self.0 = $s.to_words();
                out
            }
            Algorithm::FixedWindow => {
                let mut $s = fixed_window::State::from_words($self.0);
                let out = $body;
                $self.0 = $s.to_words();
                out
            }
            Algorithm::SlidingWindow => {
                let mut $s = sliding_window::State::from_words($self.0);
                let out = $body;
                $self.0 = $s.to_words();
                out
            }
        }
    };
}

macro_rules! read_state {
    ($self:expr, $p:expr, |$s:ident| $body:expr) => {
        match $p.algorithm {
            Algorithm::Gcra => {
                let $s = gcra::State::from_words($self.0);
                $body
            }
            Algorithm::FixedWindow => {
                let $s = fixed_window::State::from_words($self.0);
                $body
            }
            Algorithm::SlidingWindow => {
                let $s = sliding_window::State::from_words($self.0);
                $body
            }
        }
    };
}

impl State {
    /// A fresh state: nothing charged yet.
    pub(crate) fn new() -> State {
        State::default()
    }

    /// Read a state from four words (fewer or more: zeros / ignored).
    #[inline(always)]
    pub(crate) fn load(words: &[u64]) -> State {
        let mut w = [0; 4];
        for (d, s) in w.iter_mut().zip(words) {
            *d = *s;
        }
        State(w)
    }

    /// Write the state into four words.
    #[inline(always)]
    pub(crate) fn store(&self, words: &mut [u64]) {
        for (d, s) in words.iter_mut().zip(self.0) {
            *d = s;
        }
    }

    #[inline(always)]
    pub(crate) fn earliest(&self, p: &Params, now: u64, cost: u64) -> u64 {
        read_state!(self, p, |s| s.earliest(p, now, cost))
    }

    #[inline(always)]
    pub(crate) fn apply(&mut self, p: &Params, start: u64, cost: u64) -> u64 {
        with_state!(self, p, |s| s.apply(p, start, cost))
    }

    pub(crate) fn refund(&mut self, p: &Params, now: u64, units: u64, snap: u64) {
        with_state!(self, p, |s| s.refund(p, now, units, snap))
    }

    pub(crate) fn force(&mut self, p: &Params, now: u64, units: u64) {
        with_state!(self, p, |s| s.force(p, now, units))
    }

    pub(crate) fn status(&self, p: &Params, now: u64) -> (u64, u64) {
        read_state!(self, p, |s| s.status(p, now))
    }

    pub(crate) fn idle(&self, p: &Params, now: u64) -> bool {
        read_state!(self, p, |s| s.idle(p, now))
    }
}
