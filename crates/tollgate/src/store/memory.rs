//! The embedded in-memory store: each key's quota states in a sharded hash table, shared
//! (account-wide) quota states under one lock, decided with the pure algorithms of
//! [`crate::algo`].
//!
//! A decision locks the shared states (when the limiter has shared quotas) and then the
//! key's shard, so every dimension of a call is decided at once: all-or-nothing. For a
//! key already known a decision allocates nothing. Keys whose states have fully refilled
//! are dropped when a shard grows, so memory tracks the keys active within a period, not
//! every key ever seen. This module must never know about HTTP, never read a clock (time
//! is passed in), and never sleep.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use hashbrown::HashTable;
use smallvec::SmallVec;
use tokio::sync::Semaphore;

use crate::algo::{Params, State};
use crate::cost::{Cost, Usage};
use crate::quota::{Accounting, Dimension, charge};

/// The most rate quotas (per-key and shared together) one limiter may have.
pub(crate) const MAX_RATE_QUOTAS: usize = 8;

/// Refund snapshots, one per rate quota (per-key quotas first, then shared ones).
pub(crate) type Snaps = [u64; MAX_RATE_QUOTAS];

/// A key's rate states, inline for up to two per-key quotas (one less pointer to chase).
type States = SmallVec<[State; 2]>;

const SHARDS: usize = 64;
/// A shard is swept when it has doubled since its last sweep, at least this big ...
const MIN_SWEEP: usize = 64;
/// ... and at most once a second, so keys in steady use are not dropped and re-created.
const SWEEP_INTERVAL_NS: u64 = 1_000_000_000;

/// One rate quota as the store needs it.
#[derive(Debug, Clone)]
pub(crate) struct RateQuota {
    /// Index of the quota in the limiter's list.
    pub(crate) index: usize,
    pub(crate) params: Params,
    pub(crate) dimension: Dimension,
    pub(crate) burndown_milli: u64,
    pub(crate) accounting: Accounting,
}

impl RateQuota {
    #[inline]
    pub(crate) fn charge(&self, cost: &Cost) -> u64 {
        charge(self.dimension, self.burndown_milli, cost)
    }
}

/// A successful reservation.
#[derive(Debug)]
pub(crate) struct Reserved {
    /// When the call may start, ns since the clock's epoch.
    pub(crate) start: u64,
    /// Identity of the key's entry, so a refund never lands on a newer entry.
    pub(crate) epoch: u64,
    pub(crate) snaps: Snaps,
}

/// Why a reservation was refused.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// The binding quota has no room within the allowed wait.
    Limited {
        /// Index of the quota in the limiter's list.
        index: usize,
        /// Earliest start for this call, ns since the epoch.
        start: u64,
        remaining: u64,
        reset: u64,
    },
    /// The call costs more than a quota's capacity.
    TooLarge {
        /// Index of the quota in the limiter's list.
        index: usize,
        cost: u64,
        capacity: u64,
    },
}

struct Entry {
    key: Box<str>,
    epoch: u64,
    states: States,
    slots: Option<Arc<Semaphore>>,
    /// Decided on since the last sweep: kept one more round even if idle.
    touched: bool,
}

impl Entry {
    fn idle(&self, quotas: &[RateQuota], now: u64) -> bool {
        !self.touched
            && self
                .slots
                .as_ref()
                .is_none_or(|s| Arc::strong_count(s) == 1)
            && self
                .states
                .iter()
                .zip(quotas)
                .all(|(s, q)| s.idle(&q.params, now))
    }
}

#[derive(Default)]
struct Shard {
    table: HashTable<Entry>,
    sweep_at: usize,
    swept: u64,
}

/// Pads a shard to its own cache lines so two cores locking neighbours don't contend.
#[repr(align(128))]
#[derive(Default)]
struct Padded(Mutex<Shard>);

/// The in-memory store.
pub(crate) struct MemoryStore {
    key_rates: Box<[RateQuota]>,
    shared_rates: Box<[RateQuota]>,
    key_slots: Option<usize>,
    shared: Mutex<Box<[State]>>,
    shards: Box<[Padded]>,
    hasher: foldhash::fast::RandomState,
    epochs: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded data are plain numbers that are valid at every step, so a panic
    // elsewhere while holding the lock leaves nothing to repair.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl MemoryStore {
    pub(crate) fn new(
        key_rates: Vec<RateQuota>,
        shared_rates: Vec<RateQuota>,
        key_slots: Option<usize>,
    ) -> MemoryStore {
        let shared = shared_rates.iter().map(|_| State::new()).collect();
        MemoryStore {
            key_rates: key_rates.into(),
            shared_rates: shared_rates.into(),
            key_slots,
            shared: Mutex::new(shared),
            shards: (0..SHARDS).map(|_| Padded::default()).collect(),
            hasher: foldhash::fast::RandomState::default(),
            epochs: AtomicU64::new(1),
        }
    }

    pub(crate) fn key_rates(&self) -> &[RateQuota] {
        &self.key_rates
    }

    pub(crate) fn shared_rates(&self) -> &[RateQuota] {
        &self.shared_rates
    }

    fn has_entries(&self) -> bool {
        !self.key_rates.is_empty() || self.key_slots.is_some()
    }

    #[inline]
    fn shard(&self, key: &str) -> (u64, &Mutex<Shard>) {
        let hash = self.hasher.hash_one(key);
        // Bits 40.. pick the shard; hashbrown uses the low bits and the top 7 itself.
        (hash, &self.shards[(hash >> 40) as usize % SHARDS].0)
    }

    fn new_entry(&self, key: &str) -> Entry {
        Entry {
            key: key.into(),
            epoch: self.epochs.fetch_add(1, Ordering::Relaxed),
            states: self.key_rates.iter().map(|_| State::new()).collect(),
            slots: self.key_slots.map(|n| Arc::new(Semaphore::new(n))),
            touched: true,
        }
    }

    /// Insert a new entry, first forgetting idle ones when the shard has doubled.
    fn insert<'s>(&self, shard: &'s mut Shard, hash: u64, key: &str, now: u64) -> &'s mut Entry {
        if shard.table.len() >= shard.sweep_at
            && now >= shard.swept.saturating_add(SWEEP_INTERVAL_NS)
        {
            shard.swept = now;
            shard.table.retain(|e| {
                let keep = !e.idle(&self.key_rates, now);
                e.touched = false;
                keep
            });
            shard.sweep_at = (shard.table.len() * 2).max(MIN_SWEEP);
        }
        let entry = self.new_entry(key);
        let hasher = &self.hasher;
        shard
            .table
            .insert_unique(hash, entry, |e| hasher.hash_one(&*e.key))
            .into_mut()
    }

    /// The key's concurrency semaphore (creating its entry if needed).
    pub(crate) fn key_semaphore(&self, key: &str, now: u64) -> Option<Arc<Semaphore>> {
        self.key_slots?;
        let (hash, shard) = self.shard(key);
        let mut shard = lock(shard);
        if let Some(e) = shard.table.find(hash, |e| &*e.key == key) {
            return e.slots.clone();
        }
        self.insert(&mut shard, hash, key, now).slots.clone()
    }

    /// Reserve the earliest start at or after `now` when every rate quota has room for
    /// `cost`, if that start is at most `max_wait` ns away; charge all or nothing.
    /// Every quota's charge must already be known to fit its capacity.
    #[inline]
    pub(crate) fn reserve(
        &self,
        key: &str,
        cost: &Cost,
        now: u64,
        max_wait: u64,
    ) -> Result<Reserved, Refusal> {
        let mut shared = (!self.shared_rates.is_empty()).then(|| lock(&self.shared));
        let shared_states: &mut [State] = shared.as_deref_mut().map_or(&mut [], |s| &mut s[..]);
        if !self.has_entries() {
            return self.decide(None, shared_states, 0, cost, now, max_wait);
        }
        let (hash, shard) = self.shard(key);
        let mut shard = lock(shard);
        if let Some(entry) = shard.table.find_mut(hash, |e| &*e.key == key) {
            entry.touched = true;
            let epoch = entry.epoch;
            return self.decide(
                Some(&mut entry.states),
                shared_states,
                epoch,
                cost,
                now,
                max_wait,
            );
        }
        // A new key: decide on fresh states and keep them only if the call is admitted.
        let mut fresh = self.new_entry(key);
        let reserved = self.decide(
            Some(&mut fresh.states),
            shared_states,
            fresh.epoch,
            cost,
            now,
            max_wait,
        )?;
        let entry = self.insert(&mut shard, hash, key, now);
        entry.states = fresh.states;
        entry.epoch = fresh.epoch;
        Ok(Reserved {
            epoch: fresh.epoch,
            ..reserved
        })
    }

    #[inline(always)]
    fn decide(
        &self,
        key_states: Option<&mut States>,
        shared_states: &mut [State],
        epoch: u64,
        cost: &Cost,
        now: u64,
        max_wait: u64,
    ) -> Result<Reserved, Refusal> {
        let key_states: &mut [State] = key_states.map_or(&mut [], |s| &mut s[..]);
        let nk = self.key_rates.len();
        // Each quota's charge, computed once: per-key quotas first, then shared ones.
        let mut charges = [0u64; MAX_RATE_QUOTAS];
        let mut start = now;
        let mut binding = None;
        scan(
            &self.key_rates,
            key_states,
            &mut charges[..nk],
            cost,
            now,
            &mut start,
            &mut binding,
        )?;
        scan(
            &self.shared_rates,
            shared_states,
            &mut charges[nk..],
            cost,
            now,
            &mut start,
            &mut binding,
        )?;
        if let Some((q, s)) = binding
            && start - now > max_wait
        {
            let (remaining, reset) = s.status(&q.params, now);
            return Err(Refusal::Limited {
                index: q.index,
                start,
                remaining,
                reset,
            });
        }
        let mut snaps = [0; MAX_RATE_QUOTAS];
        let quotas = self.key_rates.iter().chain(self.shared_rates.iter());
        let states = key_states.iter_mut().chain(shared_states.iter_mut());
        for (i, (q, s)) in quotas.zip(states).enumerate() {
            if charges[i] > 0 {
                snaps[i] = s.apply(&q.params, start, charges[i]);
            }
        }
        Ok(Reserved {
            start,
            epoch,
            snaps,
        })
    }

    /// Return a reservation's charges in full (a waiter that gave up before its start).
    pub(crate) fn cancel(&self, key: &str, cost: &Cost, reserved: &Reserved, now: u64) {
        self.adjust(key, reserved, now, |q| (q.charge(cost), 0));
    }

    /// Replace the estimate with actual usage in the quotas that charge actual usage.
    pub(crate) fn settle(
        &self,
        key: &str,
        cost: &Cost,
        usage: &Usage,
        reserved: &Reserved,
        now: u64,
    ) {
        let actual = Cost {
            requests: cost.requests,
            input: usage.input,
            output: usage.output,
        };
        self.adjust(key, reserved, now, |q| match q.accounting {
            Accounting::Estimate => (0, 0),
            Accounting::Actual => {
                let (est, act) = (q.charge(cost), q.charge(&actual));
                (est.saturating_sub(act), act.saturating_sub(est))
            }
        });
    }

    /// True when settling this cost with any usage could change a state.
    pub(crate) fn settles(&self) -> bool {
        self.key_rates
            .iter()
            .chain(self.shared_rates.iter())
            .any(|q| q.accounting == Accounting::Actual)
    }

    /// Apply `(refund, extra)` units per quota for the call `reserved`.
    fn adjust(
        &self,
        key: &str,
        reserved: &Reserved,
        now: u64,
        delta: impl Fn(&RateQuota) -> (u64, u64),
    ) {
        let nk = self.key_rates.len();
        let wanted = |quotas: &[RateQuota]| quotas.iter().any(|q| delta(q) != (0, 0));
        if wanted(&self.shared_rates) {
            let mut shared = lock(&self.shared);
            for (i, (q, s)) in self.shared_rates.iter().zip(shared.iter_mut()).enumerate() {
                adjust_one(q, s, now, delta(q), reserved.snaps.get(nk + i).copied());
            }
        }
        if !wanted(&self.key_rates) {
            return;
        }
        let (hash, shard) = self.shard(key);
        let mut shard = lock(shard);
        let entry = match shard.table.find_mut(hash, |e| &*e.key == key) {
            Some(e) => e,
            // Forgotten while idle: only an extra charge still matters.
            None if self.key_rates.iter().any(|q| delta(q).1 > 0) => {
                self.insert(&mut shard, hash, key, now)
            }
            None => return,
        };
        // A different entry than the one charged can take extra charges, never refunds.
        let same = entry.epoch == reserved.epoch;
        for (i, (q, s)) in self
            .key_rates
            .iter()
            .zip(entry.states.iter_mut())
            .enumerate()
        {
            let (refund, extra) = delta(q);
            let snap = if same {
                reserved.snaps.get(i).copied()
            } else {
                None
            };
            adjust_one(q, s, now, (if same { refund } else { 0 }, extra), snap);
        }
    }

    /// (remaining, reset ns) per rate quota: per-key quotas first, then shared ones.
    pub(crate) fn status(&self, key: &str, now: u64) -> Vec<(usize, u64, u64)> {
        let mut out = Vec::with_capacity(self.key_rates.len() + self.shared_rates.len());
        {
            let (hash, shard) = self.shard(key);
            let shard = lock(shard);
            let entry = shard.table.find(hash, |e| &*e.key == key);
            for (i, q) in self.key_rates.iter().enumerate() {
                let (remaining, reset) = match entry {
                    Some(e) => e.states[i].status(&q.params, now),
                    None => State::new().status(&q.params, now),
                };
                out.push((q.index, remaining, reset));
            }
        }
        let shared = lock(&self.shared);
        for (q, s) in self.shared_rates.iter().zip(shared.iter()) {
            let (remaining, reset) = s.status(&q.params, now);
            out.push((q.index, remaining, reset));
        }
        out
    }

    /// Free slots of the key's concurrency quota, if it has one.
    pub(crate) fn key_slots_free(&self, key: &str) -> Option<usize> {
        let n = self.key_slots?;
        let (hash, shard) = self.shard(key);
        let shard = lock(shard);
        Some(
            shard
                .table
                .find(hash, |e| &*e.key == key)
                .and_then(|e| e.slots.as_ref())
                .map_or(n, |s| s.available_permits()),
        )
    }

    /// Number of keys held in memory.
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(&s.0).table.len()).sum()
    }
}

/// Find the latest earliest-start among `quotas` for `cost`, and which quota sets it.
#[inline(always)]
fn scan<'q>(
    quotas: &'q [RateQuota],
    states: &'q [State],
    charges: &mut [u64],
    cost: &Cost,
    now: u64,
    start: &mut u64,
    binding: &mut Option<(&'q RateQuota, &'q State)>,
) -> Result<(), Refusal> {
    for ((q, s), slot) in quotas.iter().zip(states).zip(charges) {
        let c = q.charge(cost);
        *slot = c;
        if c == 0 {
            continue;
        }
        if c > q.params.capacity {
            return Err(Refusal::TooLarge {
                index: q.index,
                cost: c,
                capacity: q.params.capacity,
            });
        }
        let t = s.earliest(&q.params, now, c);
        if t > *start {
            *start = t;
            *binding = Some((q, s));
        }
    }
    Ok(())
}

fn adjust_one(
    q: &RateQuota,
    s: &mut State,
    now: u64,
    (refund, extra): (u64, u64),
    snap: Option<u64>,
) {
    if let (true, Some(snap)) = (refund > 0, snap) {
        s.refund(&q.params, now, refund, snap);
    }
    if extra > 0 {
        s.force(&q.params, now, extra);
    }
}
