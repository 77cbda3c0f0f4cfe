//! The limiter on Redis: the builder, and acquire / settle / status through the Redis
//! store, with the store policy (fail closed, or fail open to a local share) applied
//! whenever Redis cannot be reached.
//!
//! This module sleeps for reserved starts and polls for concurrency slots; it never
//! decides a limit itself (the script does) and never waits while Redis is down.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::Semaphore;

use super::{Inner, Limiter, LimiterBuilder, Permit, QuotaStatus, Waiting, check_key, nanos};
use crate::algo::Params;
use crate::clock::Clock;
use crate::cost::Cost;
use crate::error::{Error, Rejected, StoreUnavailable, TooLarge};
use crate::quota::{ConfigError, Quota};
use crate::store::memory::{MAX_RATE_QUOTAS, MemoryStore, Part, RateQuota, Reserved, Undo};
use crate::store::redis::{
    Lease, RedisStore, RemoteRefusal, RemoteReserved, Settings, StorePolicy, Target,
};

/// Builds a [`Limiter`] whose limits live in Redis; see [`LimiterBuilder::redis`].
///
/// ```no_run
/// use std::time::Duration;
/// use tollgate::{Limiter, Quota, StorePolicy};
/// # async fn run() -> Result<(), tollgate::Error> {
/// let limiter = Limiter::builder()
///     .redis("redis://127.0.0.1:6379")
///     .prefix("myapp:limits:")
///     .timeout(Duration::from_millis(100))
///     .policy(StorePolicy::FailOpen { share: 0.25 })
///     .quota(Quota::requests(500).per_minute())
///     .build()
///     .await?;
/// # Ok(()) }
/// ```
pub struct RedisBuilder {
    base: LimiterBuilder,
    target: Target,
    prefix: String,
    timeout: Duration,
    lease: Duration,
    policy: StorePolicy,
    status: bool,
}

impl std::fmt::Debug for RedisBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBuilder")
            .field("quotas", &self.base.quotas)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("lease", &self.lease)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// The Redis side of a limiter.
pub(super) struct Remote {
    pub(super) store: RedisStore,
    policy: StorePolicy,
    /// Index and slot count of the per-key and shared concurrency quotas.
    key_slots: Option<(usize, u64)>,
    shared_slots: Option<(usize, u64)>,
}

/// What a permit admitted on Redis holds: its reservation and its leases.
pub(super) struct Held<'a> {
    pub(super) reserved: RemoteReserved,
    pub(super) charges: [u64; MAX_RATE_QUOTAS],
    /// Per concurrency quota held: its index and the slots free right after this call
    /// took one.
    slots: Vec<(usize, u64)>,
    _leases: Leases<'a>,
}

/// Concurrency leases, released when dropped.
struct Leases<'a> {
    store: &'a RedisStore,
    held: Vec<Lease>,
}

impl Drop for Leases<'_> {
    fn drop(&mut self) {
        for l in &self.held {
            self.store.release(l);
        }
    }
}

impl RedisBuilder {
    pub(super) fn new(base: LimiterBuilder, target: Target) -> RedisBuilder {
        RedisBuilder {
            base,
            target,
            prefix: "tollgate:".into(),
            timeout: Duration::from_millis(250),
            lease: Duration::from_secs(30),
            policy: StorePolicy::FailClosed,
            status: false,
        }
    }

    /// Add a quota (as [`LimiterBuilder::quota`]).
    ///
    /// ```
    /// let b = tollgate::Limiter::builder().redis("redis://127.0.0.1").quota(tollgate::Quota::concurrent(8));
    /// # let _ = b;
    /// ```
    pub fn quota(mut self, quota: Quota) -> Self {
        self.base = self.base.quota(quota);
        self
    }

    /// The clock the limiter sleeps on. Decisions use Redis's time, never this clock;
    /// it only times the waits Redis hands out.
    ///
    /// ```
    /// let b = tollgate::Limiter::builder().redis("redis://127.0.0.1").clock(tollgate::Clock::system());
    /// # let _ = b;
    /// ```
    pub fn clock(mut self, clock: Clock) -> Self {
        self.base = self.base.clock(clock);
        self
    }

    /// Start every Redis key with this prefix (default `tollgate:`), so several limiters
    /// or applications share one Redis apart. Braces are not allowed (they are reserved
    /// for Redis Cluster hash tags).
    ///
    /// ```
    /// let b = tollgate::Limiter::builder().redis("redis://127.0.0.1").prefix("billing:v2:");
    /// # let _ = b;
    /// ```
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long one call to Redis may take before it counts as an outage (default
    /// 250 ms). Also bounds connecting.
    ///
    /// ```
    /// let b = tollgate::Limiter::builder().redis("redis://127.0.0.1").timeout(std::time::Duration::from_millis(50));
    /// # let _ = b;
    /// ```
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long a concurrency slot stays held by a process that stopped renewing it
    /// (default 30 s). Held permits renew their leases every third of this, so a slot
    /// leaks at most this long when a process dies.
    ///
    /// ```
    /// let b = tollgate::Limiter::builder().redis("redis://127.0.0.1").lease(std::time::Duration::from_secs(10));
    /// # let _ = b;
    /// ```
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// What to do while Redis cannot be reached (default [`StorePolicy::FailClosed`]).
    ///
    /// ```
    /// use tollgate::StorePolicy;
    /// let b = tollgate::Limiter::builder().redis("redis://127.0.0.1").policy(StorePolicy::FailOpen { share: 0.5 });
    /// # let _ = b;
    /// ```
    pub fn policy(mut self, policy: StorePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Have every decision also return each quota's limit, remaining units and reset, so
    /// [`Permit::status`] answers without another round trip to Redis (default off: a
    /// little more work in Redis per decision, for callers that report the figures, such
    /// as a gateway's `x-ratelimit-*` headers).
    ///
    /// ```
    /// let b = tollgate::Limiter::builder().redis("redis://127.0.0.1").status_with_decisions(true);
    /// # let _ = b;
    /// ```
    pub fn status_with_decisions(mut self, on: bool) -> Self {
        self.status = on;
        self
    }

    /// Check the quotas, connect to Redis and start the store's background tasks. Must
    /// be called inside a Tokio runtime.
    ///
    /// A Redis that cannot be reached now is an [`Error::Unavailable`] when the limiter
    /// fails closed; failing open, the limiter starts on its local share and switches
    /// to Redis as soon as it answers.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for invalid quotas, URL, prefix or share (or a quota Redis cannot
    /// count exactly); [`Error::Unavailable`] as above.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), tollgate::Error> {
    /// let limiter = tollgate::Limiter::builder()
    ///     .redis("redis://127.0.0.1:6379")
    ///     .quota(tollgate::Quota::requests(10).per_minute())
    ///     .build()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn build(self) -> Result<Limiter, Error> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(ConfigError::Store {
                detail: "build the Redis limiter inside a Tokio runtime: its store runs \
                         background tasks (batching, probing, lease renewal)"
                    .into(),
            }
            .into());
        }
        let share = match self.policy {
            StorePolicy::FailClosed => 1.0,
            StorePolicy::FailOpen { share } => share,
        };
        if !(share.is_finite() && share > 0.0 && share <= 1.0) {
            return Err(ConfigError::BadShare {
                share: share.to_string(),
            }
            .into());
        }
        if self.timeout.is_zero() || self.lease < Duration::from_millis(30) {
            return Err(ConfigError::Store {
                detail: "the timeout must be above zero and the lease at least 30 ms".into(),
            }
            .into());
        }
        let a = self.base.assemble()?;
        let named = |rates: &[RateQuota]| -> Vec<(RateQuota, Arc<str>)> {
            rates
                .iter()
                .map(|r| (r.clone(), a.checked[r.index].name.clone()))
                .collect()
        };
        let store = RedisStore::new(
            Settings {
                target: self.target,
                prefix: self.prefix,
                timeout: self.timeout,
                lease: self.lease,
                status: self.status,
            },
            &named(&a.key_rates),
            &named(&a.shared_rates),
        )
        .map_err(|detail| ConfigError::Store { detail })?;
        let scale = |n: u64| ((n as f64 * share).floor() as u64).clamp(1, n.max(1));
        let scaled = |rates: &[RateQuota]| -> Vec<RateQuota> {
            rates
                .iter()
                .map(|r| RateQuota {
                    params: Params {
                        amount: scale(r.params.amount),
                        capacity: scale(r.params.capacity),
                        ..r.params
                    },
                    ..r.clone()
                })
                .collect()
        };
        let slots = |s: Option<(usize, usize)>| s.map(|(i, n)| (i, n as u64));
        self.base.check_shares(&a, true)?;
        let share = self.base.share.as_ref().map(|o| &*o.inner);
        let share_keys = self.base.share_keys.as_ref().map(|o| &*o.inner);
        let fallback = MemoryStore::new(
            scaled(&a.key_rates),
            scaled(&a.shared_rates),
            a.key_slots.map(|(_, n)| scale(n as u64) as usize),
            share.map(|o| &o.store),
            share_keys.map(|o| &o.store),
        );
        let remote = Remote {
            store,
            policy: self.policy,
            key_slots: slots(a.key_slots),
            shared_slots: slots(a.shared_slots),
        };
        let inner = Arc::new(Inner {
            settles: fallback.settles(),
            ids: a.ids,
            quotas: a.checked,
            key_slots: a.key_slots.map(|(i, _)| i),
            // The other limiter's semaphore, under this limiter's index for the quota.
            shared_slots: a.shared_slots.map(|(i, n)| {
                let theirs = share
                    .and_then(|o| o.shared_slots.as_ref())
                    .map(|(_, s)| s.clone());
                let own = || Arc::new(Semaphore::new(scale(n as u64) as usize));
                (i, theirs.unwrap_or_else(own))
            }),
            store: fallback,
            clock: share
                .or(share_keys)
                .map_or_else(|| self.base.clock.unwrap_or_default(), |o| o.clock.clone()),
            remote: Some(Box::new(remote)),
            absorbing: tokio::sync::Mutex::new(()),
        });
        let weak: Weak<Inner> = Arc::downgrade(&inner);
        let remote = inner.remote.as_ref().map(|r| &r.store);
        if let Some(store) = remote {
            store.renew_leases_with(move || {
                let inner = weak.upgrade()?;
                inner.remote.as_ref()?.store.renew_all();
                Some(())
            });
            if let Err(e) = store.ping().await {
                store.mark_down(e.detail());
                if self.policy == StorePolicy::FailClosed {
                    return Err(Error::Unavailable(e));
                }
            }
        }
        Ok(Limiter { inner })
    }
}

impl Limiter {
    /// Whether the limiter decides on Redis now: `None` on the in-memory store, `Some(false)`
    /// while Redis is unreachable (calls then follow the [`StorePolicy`]).
    ///
    /// ```
    /// let l = tollgate::Limiter::builder().quota(tollgate::Quota::requests(1).per_second()).build().unwrap();
    /// assert_eq!(l.redis_up(), None);
    /// ```
    pub fn redis_up(&self) -> Option<bool> {
        self.inner.remote.as_ref().map(|r| r.store.is_up())
    }

    /// How many times the limiter switched between Redis and its fallback policy (each
    /// outage counts twice: down, then back). Zero on the in-memory store.
    ///
    /// ```
    /// let l = tollgate::Limiter::builder().quota(tollgate::Quota::requests(1).per_second()).build().unwrap();
    /// assert_eq!(l.store_switches(), 0);
    /// ```
    pub fn store_switches(&self) -> u64 {
        self.inner.remote.as_ref().map_or(0, |r| r.store.switches())
    }

    /// An outage under the policy: fail closed, or `Ok` to decide locally.
    fn outage(&self, r: &Remote, e: StoreUnavailable) -> Result<(), Error> {
        match r.policy {
            StorePolicy::FailClosed => Err(Error::Unavailable(e)),
            StorePolicy::FailOpen { .. } => Ok(()),
        }
    }

    /// `acquire`, `acquire_within` and `try_acquire` on Redis (`max_wait` of zero: never
    /// wait).
    pub(super) async fn remote_acquire<'a>(
        &'a self,
        r: &'a Remote,
        key: &'a str,
        cost: Cost,
        max_wait: Option<Duration>,
    ) -> Result<Permit<'a>, Error> {
        check_key(key)?;
        self.remote_capacity(r, &cost)?;
        let asked = self.inner.clock.now();
        let outage = if r.store.is_up() {
            match self.remote_try(r, key, cost, max_wait).await {
                Ok(p) => return Ok(p),
                Err(Err(e)) => e,
                Err(Ok(e)) => return Err(e),
            }
        } else {
            StoreUnavailable::new("Redis is down")
        };
        self.outage(r, outage.clone())?;
        // Failing open: decide on this process's local share, within what is left of the
        // caller's wait.
        let spent = Duration::from_nanos(self.inner.clock.now().saturating_sub(asked));
        let local = match max_wait {
            Some(w) if w.is_zero() => self.try_acquire_now(key, &cost),
            Some(w) => {
                self.acquire_inner(key, cost, Some(w.saturating_sub(spent)))
                    .await
            }
            None => self.acquire_inner(key, cost, None).await,
        };
        match local {
            // It fits the real quota (checked above), only not this process's share:
            // not "too large", just not decidable until Redis is back.
            Err(Error::TooLarge(t)) => Err(Error::Unavailable(StoreUnavailable::new(&format!(
                "{}; this call costs {} in quota `{}`, more than this process's fail-open \
                 share of it ({})",
                outage.detail(),
                t.cost(),
                t.quota(),
                t.capacity()
            )))),
            other => other,
        }
    }

    fn remote_capacity(&self, r: &Remote, cost: &Cost) -> Result<(), Error> {
        for q in r.store.quotas() {
            let c = q.rate.charge(cost);
            if c > q.rate.params.capacity {
                return Err(Error::TooLarge(TooLarge {
                    quota: self.inner.ids[q.rate.index].clone(),
                    cost: c,
                    capacity: q.rate.params.capacity,
                }));
            }
        }
        Ok(())
    }

    /// One attempt on Redis: `Err(Ok(e))` is the caller's error, `Err(Err(_))` an outage.
    async fn remote_try<'a>(
        &'a self,
        r: &'a Remote,
        key: &'a str,
        cost: Cost,
        max_wait: Option<Duration>,
    ) -> Result<Permit<'a>, Result<Error, StoreUnavailable>> {
        let inner = &*self.inner;
        let never_wait = max_wait.is_some_and(|w| w.is_zero());
        let asked = inner.clock.now();
        let deadline = max_wait.map(|w| asked.saturating_add(nanos(w)));
        let mut leases = Leases {
            store: &r.store,
            held: Vec::new(),
        };
        let slots = [(r.key_slots, Some(key)), (r.shared_slots, None)];
        let mut slots_after = Vec::new();
        for (slot, k) in slots {
            if let Some((index, limit)) = slot {
                let until = self.slot_deadline(index, deadline);
                let lease = self.remote_lease(r, k, index, limit, until).await?;
                match lease {
                    Some(l) => {
                        slots_after.push((index, limit.saturating_sub(l.1)));
                        leases.held.push(l);
                    }
                    None => return Err(Ok(self.slots_full(index))),
                }
            }
        }
        let charges = r.store.charges(&cost);
        let n = r.store.quotas().len();
        let mut held = Box::new(Held {
            reserved: RemoteReserved::default(),
            charges,
            slots: slots_after,
            _leases: leases,
        });
        if n == 0 {
            let mut p = self.permit(key, cost, empty_reserved(), [None, None]);
            *p.remote = Some(held);
            return Ok(p);
        }
        let two_phase = !never_wait && r.store.two_phase();
        let first = if two_phase { Part::Key } else { Part::All };
        let wait_us = |now: u64| deadline.map(|d| d.saturating_sub(now) / 1_000);
        let (wait, reserved) = self
            .remote_reserve(r, key, &charges[..n], first, wait_us(inner.clock.now()))
            .await?;
        let mut start = inner.clock.now().saturating_add(wait.saturating_mul(1_000));
        let mut permit = self.permit(key, cost, empty_reserved(), [None, None]);
        held.reserved = reserved;
        *permit.remote = Some(held);
        let mut guard = Waiting(Some((permit, Undo::default())));
        inner.clock.sleep_until(start).await;
        if two_phase && let Some((permit, _)) = guard.0.as_mut() {
            let (wait, shared) = self
                .remote_reserve(
                    r,
                    key,
                    &charges[..n],
                    Part::Shared,
                    wait_us(inner.clock.now()),
                )
                .await?;
            start = inner.clock.now().saturating_add(wait.saturating_mul(1_000));
            if let Some(h) = permit.remote.as_mut() {
                h.reserved.merge(shared);
            }
            inner.clock.sleep_until(start).await;
        }
        let mut permit = guard.into_permit();
        permit.waited_ns = start.saturating_sub(asked);
        Ok(permit)
    }

    async fn remote_reserve(
        &self,
        r: &Remote,
        key: &str,
        charges: &[u64],
        part: Part,
        max_wait_us: Option<u64>,
    ) -> Result<(u64, RemoteReserved), Result<Error, StoreUnavailable>> {
        // A call that never waits is never cancelled: it needs no undo data.
        let undo = max_wait_us != Some(0);
        match r.store.reserve(key, charges, part, max_wait_us, undo).await {
            Ok(Ok(x)) => Ok(x),
            Ok(Err(refusal)) => Err(Ok(self.remote_refused(refusal))),
            Err(e) => Err(Err(e)),
        }
    }

    /// Take a concurrency lease, polling until `deadline` (local clock) while every slot
    /// is held. `None`: no slot in time.
    async fn remote_lease(
        &self,
        r: &Remote,
        key: Option<&str>,
        index: usize,
        limit: u64,
        deadline: Option<u64>,
    ) -> Result<Option<Lease>, Result<Error, StoreUnavailable>> {
        let clock = &self.inner.clock;
        let quota = self.inner.ids[index].name();
        let mut pause = Duration::from_millis(2);
        loop {
            if let Some(l) = r.store.lease(key, quota, limit).await.map_err(Err)? {
                return Ok(Some(l));
            }
            let now = clock.now();
            let wake = now.saturating_add(nanos(pause));
            match deadline {
                Some(d) if now >= d => return Ok(None),
                Some(d) => clock.sleep_until(wake.min(d)).await,
                None => clock.sleep_until(wake).await,
            }
            // Jittered exponential polling, at most every 50 ms: Redis has no queue of
            // waiters to wake us, so slots free up to that late.
            pause = (pause * 2).min(Duration::from_millis(50));
            pause = pause
                .mul_f64(0.5 + fastrand::f64() * 0.5)
                .max(Duration::from_millis(1));
        }
    }

    fn remote_refused(&self, r: RemoteRefusal) -> Error {
        let inner = &*self.inner;
        Error::Limited(Rejected {
            quota: inner.ids[r.index].clone(),
            limit: inner.quotas[r.index].quota.amount,
            remaining: r.remaining,
            reset: Duration::from_micros(r.reset_us),
            retry_after: Some(Duration::from_micros(r.retry_us)),
        })
    }

    /// `status` on Redis, or the local share when Redis is down and the limiter fails
    /// open.
    pub(super) async fn remote_status(
        &self,
        r: &Remote,
        key: &str,
    ) -> Result<Option<Vec<QuotaStatus>>, Error> {
        let inner = &*self.inner;
        let rates = match r.store.status(key).await {
            Ok(rates) => rates,
            Err(e) => {
                self.outage(r, e)?;
                return Ok(None);
            }
        };
        let mut out: Vec<QuotaStatus> = rates
            .into_iter()
            .map(|(index, remaining, reset_us)| {
                self.quota_status(index, remaining, Duration::from_micros(reset_us))
            })
            .collect();
        for (slot, k) in [(r.key_slots, Some(key)), (r.shared_slots, None)] {
            if let Some((index, limit)) = slot {
                let free = match r.store.free_slots(k, inner.ids[index].name(), limit).await {
                    Ok(f) => f,
                    Err(e) => {
                        self.outage(r, e)?;
                        return Ok(None);
                    }
                };
                out.push(self.quota_status(index, free, Duration::ZERO));
            }
        }
        out.sort_by_key(|s| s.quota.index);
        Ok(Some(out))
    }

    /// The status a decision on Redis reported (with
    /// [`RedisBuilder::status_with_decisions`]), or `None` when it reported none.
    pub(super) fn held_status(&self, r: &Remote, held: &Held<'_>) -> Option<Vec<QuotaStatus>> {
        let quotas = r.store.quotas();
        if held.reserved.status.len() != quotas.len() {
            return None;
        }
        let mut out = Vec::with_capacity(quotas.len() + held.slots.len());
        for (q, s) in quotas.iter().zip(&held.reserved.status) {
            let (remaining, reset_us) = (*s)?;
            out.push(self.quota_status(q.rate.index, remaining, Duration::from_micros(reset_us)));
        }
        for &(index, free) in &held.slots {
            out.push(self.quota_status(index, free, Duration::ZERO));
        }
        out.sort_by_key(|s| s.quota.index);
        Some(out)
    }

    /// Settle a permit admitted on Redis.
    pub(super) async fn remote_settle(
        &self,
        r: &Remote,
        key: &str,
        cost: &Cost,
        actual: &Cost,
        held: &Held<'_>,
    ) -> Result<(), Error> {
        let deltas = r.store.deltas(cost, actual);
        let n = r.store.quotas().len();
        match r.store.settle(key, &deltas[..n], &held.reserved).await {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, "could not settle on Redis; the estimate stands");
                self.outage(r, e)
            }
        }
    }
}

fn empty_reserved() -> Reserved {
    Reserved {
        start: 0,
        epoch: 0,
        settle: [0; crate::store::memory::MAX_SETTLED],
    }
}
