//! The embedded in-memory store: each key's quota states in a sharded hash table, shared
//! (account-wide) quota states under one lock, decided with the pure algorithms of
//! [`crate::algo`].
//!
//! A decision locks the shared states (when it involves shared quotas) and then the key's
//! shard, so every quota it involves is decided at once: all-or-nothing. A reservation
//! may involve every quota ([`Part::All`], what `try_acquire` uses) or only the key's or
//! only the shared ones (a waiting `acquire` reserves the key's first, then the shared
//! ones when its turn comes). For a key already known a decision allocates nothing. Keys whose states have fully refilled
//! are dropped when a shard grows, so memory tracks the keys active within a period, not
//! every key ever seen. This module must never know about HTTP, never read a clock (time
//! is passed in), and never sleep.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use hashbrown::HashTable;
use tokio::sync::Semaphore;

use crate::algo::{Params, State};
use crate::clock::Clock;
use crate::cost::{Cost, Usage};
use crate::quota::{Accounting, Dimension, charge};

/// The most rate quotas (per-key and shared together) one limiter may have.
pub(crate) const MAX_RATE_QUOTAS: usize = 8;

/// A permit carries a refund snapshot for each rate quota (to settle the ones charging
/// actual usage, and to give everything back when the call is called off).
pub(crate) const MAX_SETTLED: usize = MAX_RATE_QUOTAS;

/// Which quotas a reservation decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    /// Every quota at once (all or nothing).
    All,
    /// The key's own quotas only.
    Key,
    /// The shared quotas only.
    Shared,
}

/// What a waiter needs to give its reservation back exactly: per rate quota (per-key
/// first, then shared), the state words before and after its charge, and the refund
/// snapshot. When nothing was charged since, the state returns to `before` (as if the
/// waiter never came); otherwise its units are refunded under the refund rule.
#[derive(Debug, Clone, Default)]
pub(crate) struct Undo {
    charged: [bool; MAX_RATE_QUOTAS],
    before: [[u64; 4]; MAX_RATE_QUOTAS],
    after: [[u64; 4]; MAX_RATE_QUOTAS],
    snap: [u64; MAX_RATE_QUOTAS],
}

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
    /// Position of this quota's snapshot in a permit, if it charges actual usage.
    pub(crate) settle_slot: Option<usize>,
    /// The longest this quota may hold a call back, ns (`u64::MAX`: no limit of its own).
    pub(crate) max_wait: u64,
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
    /// Refund snapshots of the quotas, by `settle_slot`.
    pub(crate) settle: [u64; MAX_SETTLED],
}

/// What a permit keeps of its reservation: enough to settle it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Charged {
    /// Identity of the key's entry, so a refund never lands on a newer entry.
    pub(crate) epoch: u64,
    /// Refund snapshots of the quotas, by `settle_slot`.
    pub(crate) settle: [u64; MAX_SETTLED],
}

impl From<&Reserved> for Charged {
    #[inline]
    fn from(r: &Reserved) -> Charged {
        Charged {
            epoch: r.epoch,
            settle: r.settle,
        }
    }
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

/// One cache line of an entry: entries are allocated line-aligned, so a key of up to 16
/// bytes with one quota is read from a single line.
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(64))]
struct Line([u64; 8]);

/// One key: a single line-aligned allocation holding its bytes, its epoch and its rate
/// states, laid out in the order a decision reads them, so a lookup touches the table
/// slot and then one cache line or two (see `docs/LIMITS.md`).
///
/// Words: `[key length, key bytes (8 per word, zero-padded)..., epoch << 1 | touched,
/// states (4 words per quota)...]`.
struct Entry {
    lines: Box<[Line]>,
    slots: Option<Arc<Semaphore>>,
}

impl Entry {
    fn new(key: &str, epoch: u64, quotas: usize, slots: Option<Arc<Semaphore>>) -> Entry {
        let kw = key.len().div_ceil(8);
        let words = 1 + kw + 1 + 4 * quotas;
        let mut lines = vec![Line([0; 8]); words.div_ceil(8)].into_boxed_slice();
        let w: &mut [u64] = bytemuck::cast_slice_mut(&mut lines);
        w[0] = key.len() as u64;
        bytemuck::cast_slice_mut::<u64, u8>(&mut w[1..1 + kw])[..key.len()]
            .copy_from_slice(key.as_bytes());
        w[1 + kw] = (epoch << 1) | 1;
        Entry { lines, slots }
    }

    #[inline(always)]
    fn words(&self) -> &[u64] {
        bytemuck::cast_slice(&self.lines)
    }

    #[inline(always)]
    fn words_mut(&mut self) -> &mut [u64] {
        bytemuck::cast_slice_mut(&mut self.lines)
    }

    /// Position of the epoch word, right after the key.
    #[inline(always)]
    fn meta_at(&self) -> usize {
        1 + usize::try_from(self.words()[0]).unwrap_or(0).div_ceil(8)
    }

    /// The key's bytes.
    fn key_bytes(&self) -> &[u8] {
        let len = usize::try_from(self.words()[0]).unwrap_or(0);
        let kw = len.div_ceil(8);
        let bytes: &[u8] = bytemuck::cast_slice(&self.words()[1..1 + kw]);
        &bytes[..len]
    }

    /// The key, to hash it again when the table grows (it was a `&str` when stored).
    fn key(&self) -> &str {
        std::str::from_utf8(self.key_bytes()).unwrap_or_default()
    }

    #[inline(always)]
    fn is(&self, key: &str) -> bool {
        let w = self.words();
        if w[0] != key.len() as u64 {
            return false;
        }
        let stored: &[u8] = bytemuck::cast_slice(w.get(1..).unwrap_or_default());
        stored
            .get(..key.len())
            .is_some_and(|stored| same_bytes(stored, key.as_bytes()))
    }

    #[inline(always)]
    fn epoch(&self) -> u64 {
        self.words()[self.meta_at()] >> 1
    }

    /// Mark as decided on since the last sweep (kept one more round even if idle) and
    /// return the epoch. The word is written only when the mark is missing: a key in
    /// steady use is marked already, and a decision then only reads it (a narrow
    /// read-modify-write followed by the full-word read of the epoch made the processor
    /// wait for the store on every decision).
    #[inline(always)]
    fn touch(&mut self) -> u64 {
        let m = self.meta_at();
        let word = self.words()[m];
        if word & 1 == 0 {
            self.words_mut()[m] = word | 1;
        }
        word >> 1
    }

    fn untouch(&mut self) {
        let m = self.meta_at();
        self.words_mut()[m] &= !1;
    }

    /// The rate states, four words per quota.
    #[inline(always)]
    fn states(&mut self, quotas: usize) -> &mut [u64] {
        let m = self.meta_at();
        &mut self.words_mut()[m + 1..m + 1 + 4 * quotas]
    }

    fn idle(&self, quotas: &[RateQuota], now: u64) -> bool {
        let m = self.meta_at();
        self.words()[m] & 1 == 0
            && self
                .slots
                .as_ref()
                .is_none_or(|s| Arc::strong_count(s) == 1)
            && self.words()[m + 1..]
                .chunks_exact(4)
                .zip(quotas)
                .all(|(s, q)| State::load(s).idle(&q.params, now))
    }
}

/// `a == b` for slices of one length, inline for keys of up to 16 bytes (two loads a
/// side that may overlap, where a call to `memcmp` costs a few nanoseconds of a
/// decision); longer keys go to `memcmp`.
#[inline(always)]
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    let word = |s: &[u8], at: usize| {
        s.get(at..at + 8)
            .map(|w| u64::from_le_bytes(w.try_into().unwrap_or_default()))
    };
    let half = |s: &[u8], at: usize| {
        s.get(at..at + 4)
            .map(|w| u32::from_le_bytes(w.try_into().unwrap_or_default()))
    };
    match n {
        8..=16 => word(a, 0) == word(b, 0) && word(a, n - 8) == word(b, n - 8),
        4..=7 => half(a, 0) == half(b, 0) && half(a, n - 4) == half(b, n - 4),
        _ => a == b,
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
struct Padded(ShardLock<Shard>);

/// The in-memory store.
pub(crate) struct MemoryStore {
    key_rates: Box<[RateQuota]>,
    shared_rates: Box<[RateQuota]>,
    key_slots: Option<usize>,
    /// Shared quotas' states, four words per quota; one allocation for every limiter
    /// sharing them ([`crate::LimiterBuilder::share_with`]).
    shared: Arc<Mutex<Box<[u64]>>>,
    /// The keys' entries; like the hasher and the epoch counter, one table for every
    /// limiter sharing them ([`crate::LimiterBuilder::share_keys_with`]).
    shards: Arc<[Padded]>,
    hasher: foldhash::fast::RandomState,
    epochs: Arc<AtomicU64>,
}

/// A shard's lock: a spin lock that yields the thread while it waits. Decisions hold it
/// for tens of nanoseconds, and releasing it is a plain store, where `std::sync::Mutex`
/// pays a full memory barrier (an atomic swap) on every unlock: about 6 ns of each
/// decision on this machine (docs/BENCHMARKS.md). Waiters yield rather than burn their
/// time slice, so a holder that is descheduled (or sweeping idle keys) gets the core.
type ShardLock<T> = spin::mutex::SpinMutex<T, spin::relax::Yield>;

fn lock_shard<T>(m: &ShardLock<T>) -> spin::mutex::SpinMutexGuard<'_, T> {
    m.lock()
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
        share: Option<&MemoryStore>,
        share_keys: Option<&MemoryStore>,
    ) -> MemoryStore {
        let shared = share.map_or_else(
            || {
                Arc::new(Mutex::new(
                    vec![0; 4 * shared_rates.len()].into_boxed_slice(),
                ))
            },
            |other| other.shared.clone(),
        );
        MemoryStore {
            key_rates: key_rates.into(),
            shared_rates: shared_rates.into(),
            key_slots,
            shared,
            shards: share_keys.map_or_else(
                || (0..SHARDS).map(|_| Padded::default()).collect(),
                |o| o.shards.clone(),
            ),
            hasher: share_keys
                .map_or_else(foldhash::fast::RandomState::default, |o| o.hasher.clone()),
            epochs: share_keys.map_or_else(|| Arc::new(AtomicU64::new(1)), |o| o.epochs.clone()),
        }
    }

    pub(crate) fn key_rates(&self) -> &[RateQuota] {
        &self.key_rates
    }

    pub(crate) fn shared_rates(&self) -> &[RateQuota] {
        &self.shared_rates
    }

    /// Whether waiting calls reserve their key's quotas first and the shared ones after.
    pub(crate) fn two_phase(&self) -> bool {
        !self.key_rates.is_empty() && !self.shared_rates.is_empty()
    }

    fn has_entries(&self) -> bool {
        !self.key_rates.is_empty() || self.key_slots.is_some()
    }

    #[inline]
    fn shard(&self, key: &str) -> (u64, &ShardLock<Shard>) {
        let hash = self.hasher.hash_one(key);
        // Bits 40.. pick the shard; hashbrown uses the low bits and the top 7 itself.
        (hash, &self.shards[(hash >> 40) as usize % SHARDS].0)
    }

    fn new_entry(&self, key: &str) -> Entry {
        Entry::new(
            key,
            self.epochs.fetch_add(1, Ordering::Relaxed),
            self.key_rates.len(),
            self.key_slots.map(|n| Arc::new(Semaphore::new(n))),
        )
    }

    #[inline(always)]
    fn find<'s>(&self, shard: &'s mut Shard, hash: u64, key: &str) -> Option<&'s mut Entry> {
        shard.table.find_mut(hash, |e| e.is(key))
    }

    /// Insert `entry` (for a key of hash `hash`), first forgetting idle ones when the
    /// shard has doubled.
    fn insert<'s>(&self, shard: &'s mut Shard, hash: u64, entry: Entry, now: u64) -> &'s mut Entry {
        if shard.table.len() >= shard.sweep_at
            && now >= shard.swept.saturating_add(SWEEP_INTERVAL_NS)
        {
            shard.swept = now;
            shard.table.retain(|e| {
                let keep = !e.idle(&self.key_rates, now);
                e.untouch();
                keep
            });
            shard.sweep_at = (shard.table.len() * 2).max(MIN_SWEEP);
        }
        let hasher = &self.hasher;
        shard
            .table
            .insert_unique(hash, entry, |e| hasher.hash_one(e.key()))
            .into_mut()
    }

    /// The key's concurrency semaphore (creating its entry if needed).
    pub(crate) fn key_semaphore(&self, key: &str, now: u64) -> Option<Arc<Semaphore>> {
        self.key_slots?;
        let (hash, shard) = self.shard(key);
        let mut shard = lock_shard(shard);
        if let Some(e) = self.find(&mut shard, hash, key) {
            return e.slots.clone();
        }
        let entry = self.new_entry(key);
        self.insert(&mut shard, hash, entry, now).slots.clone()
    }

    /// Reserve the earliest start at or after now when every rate quota has room for
    /// `cost`, if that start is at most `max_wait` ns away; charge all or nothing.
    /// Every quota's charge must already be known to fit its capacity.
    ///
    /// The clock is read once the states are locked, so decisions see time in the order
    /// they are made: a call that read the clock before another but reached the lock
    /// after it would otherwise find that call's start later than its own now, and wait
    /// (or, with no wait allowed, be refused) for nothing.
    #[inline]
    pub(crate) fn reserve(
        &self,
        key: &str,
        cost: &Cost,
        clock: &Clock,
        max_wait: u64,
        part: Part,
        undo: Option<&mut Undo>,
    ) -> Result<Reserved, Refusal> {
        let with_shared = part != Part::Key && !self.shared_rates.is_empty();
        let mut shared = with_shared.then(|| lock(&self.shared));
        let (shared_quotas, shared_states): (&[RateQuota], &mut [u64]) = match shared.as_deref_mut()
        {
            Some(s) => (&self.shared_rates, &mut s[..]),
            None => (&[], &mut []),
        };
        let shared_offset = self.key_rates.len();
        if part == Part::Shared || !self.has_entries() {
            let d = Decision {
                key_quotas: &[],
                shared_quotas,
                shared_offset,
                cost,
                now: clock.now(),
                max_wait,
            };
            return d.decide(&mut [], shared_states, 0, undo);
        }
        let nq = self.key_rates.len();
        let (hash, shard) = self.shard(key);
        let mut shard = lock_shard(shard);
        let now = clock.now();
        let d = Decision {
            key_quotas: &self.key_rates,
            shared_quotas,
            shared_offset,
            cost,
            now,
            max_wait,
        };
        if let Some(entry) = self.find(&mut shard, hash, key) {
            let epoch = entry.touch();
            return d.decide(entry.states(nq), shared_states, epoch, undo);
        }
        // A new key: decide on fresh states and keep them only if the call is admitted.
        let mut fresh = self.new_entry(key);
        let epoch = fresh.epoch();
        let reserved = d.decide(fresh.states(nq), shared_states, epoch, undo)?;
        self.insert(&mut shard, hash, fresh, now);
        Ok(reserved)
    }

    /// Give a waiter's reservation back: exactly (the states return to what they were)
    /// where nothing was charged since, else by refunding its units.
    pub(crate) fn cancel(&self, key: &str, cost: &Cost, epoch: u64, undo: &Undo, now: u64) {
        let nk = self.key_rates.len();
        let undo_one = |i: usize, q: &RateQuota, words: &mut [u64]| {
            if !undo.charged[i] {
                return;
            }
            if words[..] == undo.after[i][..] {
                words.copy_from_slice(&undo.before[i]);
            } else {
                adjust_one(q, words, now, (q.charge(cost), 0), Some(undo.snap[i]));
            }
        };
        if undo.charged[nk..].iter().any(|&c| c) {
            let mut shared = lock(&self.shared);
            for (i, q) in self.shared_rates.iter().enumerate() {
                undo_one(nk + i, q, &mut shared[4 * i..4 * i + 4]);
            }
        }
        if !undo.charged[..nk].iter().any(|&c| c) {
            return;
        }
        let (hash, shard) = self.shard(key);
        let mut shard = lock_shard(shard);
        if let Some(entry) = self.find(&mut shard, hash, key)
            && entry.epoch() == epoch
        {
            let states = entry.states(nk);
            for (i, q) in self.key_rates.iter().enumerate() {
                undo_one(i, q, &mut states[4 * i..4 * i + 4]);
            }
        }
    }

    /// Replace the estimate with actual usage in the quotas that charge actual usage.
    pub(crate) fn settle(
        &self,
        key: &str,
        cost: &Cost,
        usage: &Usage,
        reserved: &Charged,
        now: u64,
    ) {
        let actual = Cost {
            requests: cost.requests,
            input: usage.input,
            output: usage.output,
            spend: usage.spend,
        };
        let snap = |_, q: &RateQuota| q.settle_slot.map(|slot| reserved.settle[slot]);
        self.adjust(key, reserved.epoch, now, snap, |q| match q.accounting {
            Accounting::Estimate => (0, 0),
            Accounting::Actual => {
                let (est, act) = (q.charge(cost), q.charge(&actual));
                (est.saturating_sub(act), act.saturating_sub(est))
            }
        });
    }

    /// Give back everything a call admitted with `cost` took, never capacity that has
    /// refilled since it was charged (so no later caller can exceed the bound).
    pub(crate) fn revoke(&self, key: &str, cost: &Cost, reserved: &Charged, now: u64) {
        let snap = |_, q: &RateQuota| q.settle_slot.map(|slot| reserved.settle[slot]);
        self.adjust(key, reserved.epoch, now, snap, |q| (q.charge(cost), 0));
    }

    /// True when settling this cost with any usage could change a state.
    pub(crate) fn settles(&self) -> bool {
        self.key_rates
            .iter()
            .chain(self.shared_rates.iter())
            .any(|q| q.accounting == Accounting::Actual)
    }

    /// Apply `(refund, extra)` units per quota to the call charged on entry `epoch`, with
    /// `snap(i, quota)` its snapshot in quota `i` (per-key quotas first).
    fn adjust(
        &self,
        key: &str,
        epoch: u64,
        now: u64,
        snap: impl Fn(usize, &RateQuota) -> Option<u64>,
        delta: impl Fn(&RateQuota) -> (u64, u64),
    ) {
        let nk = self.key_rates.len();
        let wanted = |quotas: &[RateQuota]| quotas.iter().any(|q| delta(q) != (0, 0));
        if wanted(&self.shared_rates) {
            let mut shared = lock(&self.shared);
            for (i, (q, words)) in self
                .shared_rates
                .iter()
                .zip(shared.chunks_exact_mut(4))
                .enumerate()
            {
                adjust_one(q, words, now, delta(q), snap(nk + i, q));
            }
        }
        if !wanted(&self.key_rates) {
            return;
        }
        let (hash, shard) = self.shard(key);
        let mut shard = lock_shard(shard);
        let entry = match self.find(&mut shard, hash, key) {
            Some(e) => e,
            // Forgotten while idle: only an extra charge still matters.
            None if self.key_rates.iter().any(|q| delta(q).1 > 0) => {
                let entry = self.new_entry(key);
                self.insert(&mut shard, hash, entry, now)
            }
            None => return,
        };
        // A different entry than the one charged can take extra charges, never refunds.
        let same = entry.epoch() == epoch;
        for (i, (q, s)) in self
            .key_rates
            .iter()
            .zip(entry.states(nk).chunks_exact_mut(4))
            .enumerate()
        {
            let (refund, extra) = delta(q);
            let snap = if same { snap(i, q) } else { None };
            adjust_one(q, s, now, (if same { refund } else { 0 }, extra), snap);
        }
    }

    /// (remaining, reset ns) per rate quota: per-key quotas first, then shared ones.
    pub(crate) fn status(&self, key: &str, now: u64) -> Vec<(usize, u64, u64)> {
        let mut out = Vec::with_capacity(self.key_rates.len() + self.shared_rates.len());
        {
            let (hash, shard) = self.shard(key);
            let mut shard = lock_shard(shard);
            let mut entry = self.find(&mut shard, hash, key);
            let nk = self.key_rates.len();
            for (i, q) in self.key_rates.iter().enumerate() {
                let state = match entry.as_deref_mut() {
                    Some(e) => State::load(&e.states(nk)[4 * i..4 * i + 4]),
                    None => State::new(),
                };
                let (remaining, reset) = state.status(&q.params, now);
                out.push((q.index, remaining, reset));
            }
        }
        let shared = lock(&self.shared);
        for (q, words) in self.shared_rates.iter().zip(shared.chunks_exact(4)) {
            let (remaining, reset) = State::load(words).status(&q.params, now);
            out.push((q.index, remaining, reset));
        }
        out
    }

    /// Free slots of the key's concurrency quota, if it has one.
    pub(crate) fn key_slots_free(&self, key: &str) -> Option<usize> {
        let n = self.key_slots?;
        let (hash, shard) = self.shard(key);
        let mut shard = lock_shard(shard);
        Some(
            self.find(&mut shard, hash, key)
                .and_then(|e| e.slots.as_ref())
                .map_or(n, |s| s.available_permits()),
        )
    }

    /// Number of keys held in memory.
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| lock_shard(&s.0).table.len())
            .sum()
    }
}

/// One decision's inputs: the quotas in play (per key, shared), the call, the time and
/// the longest acceptable wait.
struct Decision<'q> {
    key_quotas: &'q [RateQuota],
    shared_quotas: &'q [RateQuota],
    /// Position of the first shared quota among all rate quotas (per-key ones first).
    shared_offset: usize,
    cost: &'q Cost,
    now: u64,
    max_wait: u64,
}

impl Decision<'_> {
    /// Reserve the earliest start when every quota in play has room, if it is at most
    /// `max_wait` away; charge all of them or none.
    #[inline(always)]
    fn decide(
        &self,
        key_states: &mut [u64],
        shared_states: &mut [u64],
        epoch: u64,
        mut undo: Option<&mut Undo>,
    ) -> Result<Reserved, Refusal> {
        let (cost, now) = (self.cost, self.now);
        let mut start = now;
        let mut binding = None;
        let mut over = None;
        scan(
            self.key_quotas,
            key_states,
            cost,
            now,
            &mut start,
            &mut binding,
            &mut over,
        )?;
        scan(
            self.shared_quotas,
            shared_states,
            cost,
            now,
            &mut start,
            &mut binding,
            &mut over,
        )?;
        // A quota that would hold the call back longer than it allows names the refusal;
        // else the call's own wait decides.
        if let Some((q, s)) = over.or(binding.filter(|_| start - now > self.max_wait)) {
            let (remaining, reset) = s.status(&q.params, now);
            return Err(Refusal::Limited {
                index: q.index,
                start,
                remaining,
                reset,
            });
        }
        let mut settle = [0; MAX_SETTLED];
        for (i, q) in self.key_quotas.iter().enumerate() {
            let words = &mut key_states[4 * i..4 * i + 4];
            charge_at(
                q,
                words,
                start,
                cost,
                &mut settle,
                undo.as_deref_mut().map(|u| (u, i)),
            );
        }
        for (i, q) in self.shared_quotas.iter().enumerate() {
            let words = &mut shared_states[4 * i..4 * i + 4];
            let at = self.shared_offset + i;
            charge_at(
                q,
                words,
                start,
                cost,
                &mut settle,
                undo.as_deref_mut().map(|u| (u, at)),
            );
        }
        Ok(Reserved {
            start,
            epoch,
            settle,
        })
    }
}

/// Charge quota `q` for `cost` at `start`, keeping the refund snapshot where a permit
/// needs it, and what a waiter needs to undo the charge (quota position `i`).
#[inline(always)]
fn charge_at(
    q: &RateQuota,
    words: &mut [u64],
    start: u64,
    cost: &Cost,
    settle: &mut [u64; MAX_SETTLED],
    undo: Option<(&mut Undo, usize)>,
) {
    let c = q.charge(cost);
    if c == 0 {
        return;
    }
    let mut s = State::load(words);
    let before = s;
    let snap = s.apply(&q.params, start, c);
    s.store(words);
    if let Some(slot) = q.settle_slot {
        settle[slot] = snap;
    }
    if let Some((undo, i)) = undo {
        undo.charged[i] = true;
        before.store(&mut undo.before[i]);
        s.store(&mut undo.after[i]);
        undo.snap[i] = snap;
    }
}

/// Find the latest earliest-start among `quotas` for `cost`, which quota sets it, and
/// the first quota that would hold the call back longer than its own `max_wait`.
#[inline(always)]
fn scan<'q>(
    quotas: &'q [RateQuota],
    states: &[u64],
    cost: &Cost,
    now: u64,
    start: &mut u64,
    binding: &mut Option<(&'q RateQuota, State)>,
    over: &mut Option<(&'q RateQuota, State)>,
) -> Result<(), Refusal> {
    for (i, q) in quotas.iter().enumerate() {
        let s = State::load(&states[4 * i..4 * i + 4]);
        let c = q.charge(cost);
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
        if t.saturating_sub(now) > q.max_wait && over.is_none() {
            *over = Some((q, s));
        }
        if t > *start {
            *start = t;
            *binding = Some((q, s));
        }
    }
    Ok(())
}

fn adjust_one(
    q: &RateQuota,
    words: &mut [u64],
    now: u64,
    (refund, extra): (u64, u64),
    snap: Option<u64>,
) {
    let mut s = State::load(words);
    if let (true, Some(snap)) = (refund > 0, snap) {
        s.refund(&q.params, now, refund, snap);
    }
    if extra > 0 {
        s.force(&q.params, now, extra);
    }
    s.store(words);
}

#[cfg(test)]
mod tests {
    //! The decision rule, per-quota waits included, against a reference model: each
    //! quota on its own state, the rule spelled out plainly.

    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;
    use crate::ManualClock;
    use crate::quota::Algorithm;

    fn quota(index: usize, amount: u64, period_ns: u64, max_wait: Option<u64>) -> RateQuota {
        RateQuota {
            index,
            params: Params {
                amount,
                period_ns,
                capacity: amount,
                algorithm: Algorithm::Gcra,
            },
            dimension: Dimension::Requests,
            burndown_milli: 1000,
            accounting: Accounting::Estimate,
            settle_slot: Some(index),
            max_wait: max_wait.unwrap_or(u64::MAX),
        }
    }

    /// What the reference says a call at `now`, accepting `wait`, gets: its start, or
    /// the quota named in the refusal.
    fn reference(
        quotas: &[RateQuota],
        states: &mut [State],
        now: u64,
        wait: u64,
    ) -> Result<u64, usize> {
        let earliest: Vec<u64> = quotas
            .iter()
            .zip(states.iter())
            .map(|(q, s)| s.earliest(&q.params, now, 1))
            .collect();
        // A quota that alone would hold the call back longer than it allows refuses it.
        for (q, &e) in quotas.iter().zip(&earliest) {
            if e - now > q.max_wait {
                return Err(q.index);
            }
        }
        let start = earliest.iter().copied().max().unwrap_or(now).max(now);
        if start - now > wait {
            // The first quota that sets the start names the refusal.
            let i = earliest.iter().position(|&e| e == start).unwrap_or(0);
            return Err(quotas[i].index);
        }
        for (q, s) in quotas.iter().zip(states.iter_mut()) {
            s.apply(&q.params, start, 1);
        }
        Ok(start)
    }

    proptest! {
        /// The inline comparison agrees with `==` for every length around its word
        /// sizes, on slices that differ anywhere or nowhere.
        #[test]
        fn key_comparison_agrees_with_slice_equality(
            a in proptest::collection::vec(any::<u8>(), 0..40),
            flip in any::<prop::sample::Index>(),
            differ in any::<bool>(),
            shorter in any::<bool>(),
        ) {
            let mut b = a.clone();
            if differ && !b.is_empty() {
                let i = flip.index(b.len());
                b[i] ^= 1;
            }
            if shorter {
                b.pop();
            }
            prop_assert_eq!(same_bytes(&a, &b), a == b);
        }

        /// An entry answers to its own key and to no other, whatever the lengths.
        #[test]
        fn an_entry_answers_to_its_own_key_only(
            key in "[a-z0-9-]{1,40}",
            other in "[a-z0-9-]{1,40}",
        ) {
            let entry = Entry::new(&key, 1, 1, None);
            prop_assert!(entry.is(&key));
            prop_assert_eq!(entry.is(&other), key == other);
            let mut near = key.clone();
            near.push('x');
            prop_assert!(!entry.is(&near));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn each_quota_holds_a_call_back_no_longer_than_it_allows(
            limits in proptest::collection::vec(
                (1..=5u64, 1..=100u64, proptest::option::of(0..=300u64)),
                1..=3,
            ),
            calls in proptest::collection::vec((0..=60u64, 0..=400u64), 1..80),
        ) {
            let quotas: Vec<RateQuota> = limits
                .iter()
                .enumerate()
                .map(|(i, &(amount, period, mw))| quota(i, amount, period * 10, mw))
                .collect();
            let store = MemoryStore::new(quotas.clone(), Vec::new(), None, None, None);
            let mut states = vec![State::new(); quotas.len()];
            let manual = ManualClock::new();
            let clock = Clock::from(manual.clone());
            for (dt, wait) in calls {
                manual.advance(Duration::from_nanos(dt));
                let now = clock.now();
                let got = store
                    .reserve("k", &Cost::request(), &clock, wait, Part::All, None)
                    .map(|r| r.start)
                    .map_err(|r| match r {
                        Refusal::Limited { index, .. } => index,
                        Refusal::TooLarge { index, .. } => panic!("too large: quota {index}"),
                    });
                let want = reference(&quotas, &mut states, now, wait);
                prop_assert_eq!(got, want, "at {} waiting up to {}", now, wait);
            }
        }
    }
}
