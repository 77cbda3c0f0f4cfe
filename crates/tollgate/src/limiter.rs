//! The [`Limiter`]: ask before a model call ([`Limiter::acquire`], [`Limiter::try_acquire`]),
//! settle after it ([`Permit::settle`]).
//!
//! This module turns quotas into decisions on a store and waits for reserved starts; the
//! arithmetic lives in [`crate::algo`] and the state in the store. It must never re-do a
//! decision's math, never sleep while holding a store lock, and never leave a reservation
//! or a concurrency slot behind when a caller goes away.

use std::fmt;
use std::mem::ManuallyDrop;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

use crate::algo::Params;
use crate::clock::Clock;
use crate::cost::{Cost, Usage};
use crate::error::{Error, KeyError, QuotaId, Rejected, TooLarge};
use crate::quota::{Checked, ConfigError, Dimension, Quota, Scope};
mod remote;

pub use remote::RedisBuilder;
use remote::{Held, Remote};

use crate::store::memory::{
    Charged, MAX_RATE_QUOTAS, MAX_SETTLED, MemoryStore, Part, RateQuota, Refusal, Reserved, Undo,
};
use crate::store::redis::Target;

/// The longest key accepted, in bytes. Longer keys are a typed error; hash long
/// identities (emails, URLs) first.
pub const MAX_KEY_LEN: usize = 1024;

/// The most slots a concurrency quota may have (tokio's semaphore holds at most
/// `usize::MAX >> 3` permits, 2^29 on 32-bit targets).
const MAX_SLOTS: usize = 1 << 28;

/// Builds a [`Limiter`] from quotas; see [`Limiter::builder`].
///
/// ```
/// use tollgate::{Limiter, Quota};
/// let limiter = Limiter::builder()
///     .quota(Quota::requests(10).per_minute())
///     .quota(Quota::tokens(100_000).per_minute())
///     .build()
///     .expect("valid quotas");
/// assert_eq!(limiter.quotas().len(), 2);
/// ```
#[derive(Debug, Default)]
pub struct LimiterBuilder {
    quotas: Vec<Quota>,
    clock: Option<Clock>,
    share: Option<Limiter>,
    share_keys: Option<Limiter>,
}

impl LimiterBuilder {
    /// Add a quota. Every call is decided against all of them at once.
    ///
    /// ```
    /// let b = tollgate::Limiter::builder().quota(tollgate::Quota::concurrent(8));
    /// # let _ = b;
    /// ```
    pub fn quota(mut self, quota: Quota) -> Self {
        self.quotas.push(quota);
        self
    }

    /// Run on this clock instead of the system's monotonic clock (tests, simulations).
    ///
    /// ```
    /// use tollgate::{Limiter, ManualClock, Quota};
    /// let clock = ManualClock::new();
    /// let b = Limiter::builder().clock(clock.clone().into()).quota(Quota::requests(1).per_second());
    /// # let _ = b;
    /// ```
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Draw this limiter's shared quotas ([`Quota::shared`]) from the same budgets as
    /// `other`'s, so one account-wide limit holds across limiters whose per-key quotas
    /// differ: one limiter per tier of users (free, pro), each with its own per-user
    /// quotas and all with the provider account's shared quotas, which they then spend
    /// together. Every call is still one decision in one limiter, all-or-nothing.
    ///
    /// The shared quotas (and the shared concurrency quota) must be the same, in the same
    /// order, as `other`'s; the new limiter runs on `other`'s clock. On Redis, limiters
    /// with the same key prefix and the same shared quotas share them in Redis already;
    /// `share_with` there makes their fail-open fallbacks share them too.
    ///
    /// ```
    /// use tollgate::{Cost, Limiter, Quota};
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let account = Quota::requests(3).per_minute().shared().named("account-rpm");
    /// let free = Limiter::builder()
    ///     .quota(Quota::requests(1).per_minute())
    ///     .quota(account.clone())
    ///     .build()?;
    /// let pro = Limiter::builder()
    ///     .quota(Quota::requests(100).per_minute())
    ///     .quota(account)
    ///     .share_with(&free)
    ///     .build()?;
    /// free.try_acquire("alice", Cost::request()).await?;
    /// pro.try_acquire("bob", Cost::request()).await?;
    /// pro.try_acquire("bob", Cost::request()).await?;
    /// // The account's 3 requests are spent, whichever tier spent them.
    /// assert!(pro.try_acquire("carol", Cost::request()).await.is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub fn share_with(mut self, other: &Limiter) -> Self {
        self.share = Some(other.clone());
        self
    }

    /// Keep this limiter's per-key quotas in the same per-key states as `other`'s, so a
    /// user's own limits hold across limiters whose shared quotas differ: one limiter
    /// per provider account (each with its account's shared quotas), each with the same
    /// per-user quotas, which a user then spends together whichever account serves the
    /// call. Every call is still one decision in one limiter, all-or-nothing.
    ///
    /// The per-key quotas (and the per-key concurrency quota) must be the same, in the
    /// same order, as `other`'s; the new limiter runs on `other`'s clock. Combine with
    /// [`LimiterBuilder::share_with`] for tiers × accounts. On Redis, limiters with the
    /// same key prefix and the same per-key quotas share them in Redis already;
    /// `share_keys_with` there makes their fail-open fallbacks share them too.
    ///
    /// ```
    /// use tollgate::{Cost, Limiter, Quota};
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let user = Quota::requests(2).per_minute().named("user-rpm");
    /// let openai = Limiter::builder()
    ///     .quota(user.clone())
    ///     .quota(Quota::requests(500).per_minute().shared())
    ///     .build()?;
    /// let anthropic = Limiter::builder()
    ///     .quota(user)
    ///     .quota(Quota::requests(50).per_minute().shared())
    ///     .share_keys_with(&openai)
    ///     .build()?;
    /// openai.try_acquire("alice", Cost::request()).await?;
    /// anthropic.try_acquire("alice", Cost::request()).await?;
    /// // Alice's 2 requests a minute are spent, whichever account served them.
    /// assert!(openai.try_acquire("alice", Cost::request()).await.is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub fn share_keys_with(mut self, other: &Limiter) -> Self {
        self.share_keys = Some(other.clone());
        self
    }

    /// Check both sharings of `a`: shared quotas with `share`, per-key ones with
    /// `share_keys`.
    fn check_shares(&self, a: &Assembled, remote: bool) -> Result<(), ConfigError> {
        if let Some(other) = &self.share {
            self.check_share(a, other, remote, Scope::Shared)?;
        }
        if let Some(other) = &self.share_keys {
            self.check_share(a, other, remote, Scope::PerKey)?;
        }
        if let (Some(x), Some(y)) = (&self.share, &self.share_keys)
            && !x.inner.clock.same(&y.inner.clock)
        {
            return Err(ConfigError::ShareMismatch {
                detail: "the two limiters shared with run on different clocks".to_string(),
            });
        }
        Ok(())
    }

    /// Check that the quotas of `scope` in `a` match those of the limiter to share with.
    fn check_share(
        &self,
        a: &Assembled,
        other: &Limiter,
        remote: bool,
        scope: Scope,
    ) -> Result<(), ConfigError> {
        let mismatch = |detail: String| Err(ConfigError::ShareMismatch { detail });
        if other.inner.remote.is_some() != remote {
            return mismatch(
                "one limiter is on Redis and the other in memory; share between limiters on the same store"
                    .to_string(),
            );
        }
        if self.clock.is_some() {
            return mismatch(
                "a limiter that shares another's quotas runs on that limiter's clock; drop .clock(...)"
                    .to_string(),
            );
        }
        let of_scope = |quotas: &[Checked]| -> Vec<(String, Quota)> {
            quotas
                .iter()
                .filter(|c| c.quota.scope == scope)
                // How long a quota may hold a call back is each limiter's own policy,
                // not part of the budget they share.
                .map(|c| {
                    let mut q = c.quota.clone();
                    q.max_wait = None;
                    (c.name.to_string(), q)
                })
                .collect()
        };
        let what = match scope {
            Scope::Shared => "shared",
            Scope::PerKey => "per-key",
        };
        let (mine, theirs) = (of_scope(&a.checked), of_scope(&other.inner.quotas));
        if mine.is_empty() {
            return mismatch(format!("this limiter has no {what} quota to share"));
        }
        if mine != theirs {
            let names = |v: &[(String, Quota)]| {
                v.iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return mismatch(format!(
                "the {what} quotas differ: [{}] here, [{}] in the other limiter; give both the same {what} quotas in the same order",
                names(&mine),
                names(&theirs)
            ));
        }
        Ok(())
    }

    /// Check every quota and build the limiter on the in-memory store.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the first quota that is invalid: a zero amount, a missing,
    /// zero or overflowing period, a bad burst or burndown, two quotas with one name,
    /// more than one concurrency quota per scope, more than eight rate quotas, or no quota
    /// at all.
    ///
    /// ```
    /// use tollgate::{ConfigError, Limiter, Quota};
    /// let err = Limiter::builder().quota(Quota::tokens(10)).build().unwrap_err();
    /// assert!(matches!(err, ConfigError::MissingPeriod { .. }));
    /// ```
    pub fn build(self) -> Result<Limiter, ConfigError> {
        let a = self.assemble()?;
        self.check_shares(&a, false)?;
        let share = self.share.as_ref().map(|o| &*o.inner);
        let share_keys = self.share_keys.as_ref().map(|o| &*o.inner);
        let store = MemoryStore::new(
            a.key_rates,
            a.shared_rates,
            a.key_slots.map(|(_, n)| n),
            share.map(|o| &o.store),
            share_keys.map(|o| &o.store),
        );
        // The other limiter's semaphore, under this limiter's index for the quota.
        let shared_slots = a.shared_slots.map(|(i, n)| {
            let theirs = share
                .and_then(|o| o.shared_slots.as_ref())
                .map(|(_, s)| s.clone());
            (i, theirs.unwrap_or_else(|| Arc::new(Semaphore::new(n))))
        });
        Ok(Limiter {
            inner: Arc::new(Inner {
                settles: store.settles(),
                ids: a.ids,
                quotas: a.checked,
                key_slots: a.key_slots.map(|(i, _)| i),
                shared_slots,
                store,
                clock: share
                    .or(share_keys)
                    .map_or_else(|| self.clock.unwrap_or_default(), |o| o.clock.clone()),
                remote: None,
                absorbing: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// Share these limits through Redis instead of keeping them in memory: every process
    /// built with the same URL, key prefix and quotas enforces one budget. Accepts
    /// `redis://`, `rediss://` (TLS, with the `tls` feature), and `unix://` /
    /// `redis+unix://` socket URLs. Finish with [`RedisBuilder::build`], which is async.
    ///
    /// ```no_run
    /// use tollgate::{Limiter, Quota};
    /// # async fn run() -> Result<(), tollgate::Error> {
    /// let limiter = Limiter::builder()
    ///     .redis("redis://127.0.0.1:6379")
    ///     .quota(Quota::requests(500).per_minute())
    ///     .quota(Quota::tokens(90_000).per_minute())
    ///     .build()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn redis(self, url: impl Into<String>) -> RedisBuilder {
        RedisBuilder::new(self, Target::Url(url.into()))
    }

    /// As [`LimiterBuilder::redis`], with a client you configured yourself.
    ///
    /// ```no_run
    /// use tollgate::{Limiter, Quota};
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = tollgate::redis::Client::open("redis://127.0.0.1:6379")?;
    /// let limiter = Limiter::builder().redis_client(client).quota(Quota::requests(5).per_second()).build().await?;
    /// # Ok(()) }
    /// ```
    pub fn redis_client(self, client: redis::Client) -> RedisBuilder {
        RedisBuilder::new(self, Target::Client(Box::new(client)))
    }

    /// As [`LimiterBuilder::redis`], sharing a connection manager your application
    /// already holds (its timeouts and reconnection settings then apply).
    ///
    /// ```no_run
    /// use tollgate::{Limiter, Quota};
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = tollgate::redis::Client::open("redis://127.0.0.1:6379")?;
    /// let manager = tollgate::redis::aio::ConnectionManager::new(client).await?;
    /// let limiter = Limiter::builder().redis_connection(manager).quota(Quota::requests(5).per_second()).build().await?;
    /// # Ok(()) }
    /// ```
    pub fn redis_connection(self, manager: redis::aio::ConnectionManager) -> RedisBuilder {
        RedisBuilder::new(self, Target::Manager(manager))
    }

    /// As [`LimiterBuilder::redis`], on a Redis Cluster reached through these seed nodes.
    /// Each identity's keys share one hash slot; shared (account-wide) quotas live on
    /// their own slot and are reserved after the identity's, with the identity's given
    /// back if the shared ones refuse.
    ///
    /// ```no_run
    /// use tollgate::{Limiter, Quota};
    /// # async fn run() -> Result<(), tollgate::Error> {
    /// let limiter = Limiter::builder()
    ///     .redis_cluster(["redis://10.0.0.1:6379", "redis://10.0.0.2:6379"])
    ///     .quota(Quota::requests(500).per_minute())
    ///     .build()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn redis_cluster<I, S>(self, nodes: I) -> RedisBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        RedisBuilder::new(
            self,
            Target::Cluster(nodes.into_iter().map(Into::into).collect()),
        )
    }

    /// Check every quota and sort them into the store's lists.
    fn assemble(&self) -> Result<Assembled, ConfigError> {
        if self.quotas.is_empty() {
            return Err(ConfigError::NoQuotas);
        }
        let mut checked: Vec<Checked> = Vec::with_capacity(self.quotas.len());
        for q in &self.quotas {
            let c = q.check()?;
            if checked.iter().any(|o| o.name == c.name) {
                return Err(ConfigError::DuplicateName {
                    quota: c.name.to_string(),
                });
            }
            checked.push(c);
        }
        let rates = checked
            .iter()
            .filter(|c| c.quota.dimension != Dimension::Concurrency)
            .count();
        if rates > MAX_RATE_QUOTAS {
            return Err(ConfigError::TooManyQuotas {
                max: MAX_RATE_QUOTAS,
                what: "in all",
            });
        }
        let mut key_rates = Vec::new();
        let mut shared_rates = Vec::new();
        let mut key_slots = None;
        let mut shared_slots = None;
        for (index, c) in checked.iter().enumerate() {
            let q = &c.quota;
            if q.dimension == Dimension::Concurrency {
                let slot = match q.scope {
                    Scope::PerKey => &mut key_slots,
                    Scope::Shared => &mut shared_slots,
                };
                if slot.is_some() {
                    return Err(ConfigError::TwoConcurrencyQuotas {
                        quota: c.name.to_string(),
                    });
                }
                let slots = usize::try_from(q.amount)
                    .ok()
                    .filter(|&n| n <= MAX_SLOTS)
                    .ok_or_else(|| ConfigError::Overflow {
                        quota: c.name.to_string(),
                        detail: format!("{} slots; the most is {MAX_SLOTS}", q.amount),
                    })?;
                *slot = Some((index, slots));
                continue;
            }
            let rate = RateQuota {
                index,
                params: Params {
                    amount: q.amount,
                    period_ns: c.period_ns,
                    capacity: c.capacity,
                    algorithm: q.algorithm,
                },
                dimension: q.dimension,
                burndown_milli: c.burndown_milli,
                accounting: c.accounting,
                settle_slot: None,
                max_wait: q.max_wait.map_or(u64::MAX, nanos),
            };
            match q.scope {
                Scope::PerKey => key_rates.push(rate),
                Scope::Shared => shared_rates.push(rate),
            }
        }
        // Every rate quota keeps a refund snapshot in its permits (the count was checked
        // against MAX_RATE_QUOTAS = MAX_SETTLED above).
        let all = key_rates.iter_mut().chain(shared_rates.iter_mut());
        for (slot, q) in all.enumerate().take(MAX_SETTLED) {
            q.settle_slot = Some(slot);
        }
        Ok(Assembled {
            ids: checked
                .iter()
                .enumerate()
                .map(|(index, c)| QuotaId {
                    index,
                    name: c.name.clone(),
                })
                .collect(),
            checked,
            key_rates,
            shared_rates,
            key_slots,
            shared_slots,
        })
    }
}

/// A builder's quotas, checked and sorted for a store.
struct Assembled {
    checked: Vec<Checked>,
    ids: Vec<QuotaId>,
    key_rates: Vec<RateQuota>,
    shared_rates: Vec<RateQuota>,
    /// Index and slots of the per-key and shared concurrency quotas.
    key_slots: Option<(usize, usize)>,
    shared_slots: Option<(usize, usize)>,
}

struct Inner {
    quotas: Vec<Checked>,
    ids: Vec<QuotaId>,
    /// Index of the per-key concurrency quota.
    key_slots: Option<usize>,
    /// Index and semaphore of the shared concurrency quota.
    shared_slots: Option<(usize, Arc<Semaphore>)>,
    /// Whether any quota charges actual usage (else settle has nothing to do).
    settles: bool,
    /// The in-memory store; on Redis, the fallback that holds each process's share.
    store: MemoryStore,
    clock: Clock,
    /// The Redis store, when limits are shared.
    remote: Option<Box<Remote>>,
    /// Serialises [`Limiter::absorb`]: reading what is left and charging the excess must
    /// not interleave with another absorb, or both would charge the same excess.
    absorbing: tokio::sync::Mutex<()>,
}

/// Keeps calls within every quota: per key (user, team, API key) and shared.
///
/// Cheap to clone (an `Arc`); clones share state.
///
/// ```
/// use tollgate::{Cost, Limiter, Quota, Usage};
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let limiter = Limiter::builder()
///     .quota(Quota::requests(10).per_minute())
///     .quota(Quota::tokens(100_000).per_minute().burndown(5.0))
///     .quota(Quota::concurrent(8))
///     .build()?;
///
/// let permit = limiter.acquire("user-42", Cost::input(3_000).output(2_000)).await?;
/// // ... call the model ...
/// permit.settle(Usage::new(3_000, 450)).await?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct Limiter {
    inner: Arc<Inner>,
}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiter")
            .field("quotas", &self.inner.ids)
            .field("clock", &self.inner.clock)
            .finish_non_exhaustive()
    }
}

/// What one quota looks like for one key, consuming nothing.
///
/// ```
/// use tollgate::{Limiter, Quota};
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let limiter = Limiter::builder().quota(Quota::requests(10).per_minute()).build()?;
/// let status = limiter.status("nobody-yet").await?;
/// assert_eq!((status[0].limit, status[0].remaining), (10, 10));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaStatus {
    /// Which quota.
    pub quota: QuotaId,
    /// Amount per period (slots for concurrency).
    pub limit: u64,
    /// Units available now.
    pub remaining: u64,
    /// Time until fully replenished (zero for concurrency).
    pub reset: Duration,
}

impl Limiter {
    /// Start building a limiter.
    ///
    /// ```
    /// let builder = tollgate::Limiter::builder();
    /// # let _ = builder;
    /// ```
    pub fn builder() -> LimiterBuilder {
        LimiterBuilder::default()
    }

    /// The quotas' identities, in the order they were added.
    ///
    /// ```
    /// use tollgate::{Limiter, Quota};
    /// let l = Limiter::builder().quota(Quota::requests(1).per_second()).build().unwrap();
    /// assert_eq!(l.quotas()[0].name(), "requests/1s");
    /// ```
    pub fn quotas(&self) -> &[QuotaId] {
        &self.inner.ids
    }

    /// How many keys the limiter holds in memory now. Keys whose quotas have fully
    /// refilled are forgotten as new keys arrive, so this stays near the number of
    /// keys active within a period.
    ///
    /// ```
    /// use tollgate::{Cost, Limiter, Quota};
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let l = Limiter::builder().quota(Quota::requests(5).per_second()).build()?;
    /// l.try_acquire("a", Cost::request()).await?;
    /// assert_eq!(l.tracked_keys(), 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub fn tracked_keys(&self) -> usize {
        self.inner.store.len()
    }

    /// Admit a call now or refuse it; never waits.
    ///
    /// # Errors
    ///
    /// [`Error::Limited`] when a quota has no room now (with when to retry),
    /// [`Error::TooLarge`] when the cost exceeds a quota's capacity,
    /// [`Error::InvalidKey`] for an empty or over-long key; on Redis,
    /// [`Error::Unavailable`] while Redis cannot be reached and the limiter fails closed.
    ///
    /// # Cancel safety
    ///
    /// In memory, decided in one step without awaiting; dropping the future before it is
    /// polled does nothing. On Redis, a future dropped while its decision is in flight
    /// gives back what the decision took (its reservation, its concurrency lease) when
    /// Redis's answer arrives. Several calls of one key abandoned at once may be given
    /// back out of order; the refund rule (`docs/LIMITS.md`) then keeps part of them
    /// counted until it refills, which only ever under-admits.
    ///
    /// ```
    /// use tollgate::{Cost, Error, Limiter, Quota};
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let limiter = Limiter::builder().quota(Quota::requests(1).per_minute()).build()?;
    /// assert!(limiter.try_acquire("u", Cost::request()).await.is_ok());
    /// assert!(matches!(limiter.try_acquire("u", Cost::request()).await, Err(Error::Limited(_))));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    #[expect(
        clippy::manual_async_fn,
        reason = "an `async fn` copies its arguments before the decision (see the body)"
    )]
    pub fn try_acquire<'a>(
        &'a self,
        key: &'a str,
        cost: Cost,
    ) -> impl Future<Output = Result<Permit<'a>, Error>> + 'a {
        // An `async` block rather than an `async fn`: an `async fn` rebinds every
        // argument when it starts, copying the cost the caller has just written with
        // wide loads the processor cannot serve from those narrower pending stores, and
        // waiting for them (about 4 ns of a 65 ns decision). The block reads the cost
        // where the caller put it, field by field, and copies it into the permit last.
        async move {
            if let Some(r) = &self.inner.remote {
                return Box::pin(self.remote_acquire(r, key, cost, Some(Duration::ZERO))).await;
            }
            self.try_acquire_now(key, &cost)
        }
    }

    /// Admit a call, waiting (FIFO) as long as needed for every quota to have room.
    ///
    /// The start time is reserved at once, in arrival order, so waiting callers start in
    /// the order they asked. With both per-key and shared rate quotas, a call reserves
    /// its key's quotas first and queues for the shared ones when its key's turn comes,
    /// so a key waiting on its own limit never makes other keys wait. A cost no quota can ever hold fails at once with
    /// [`Error::TooLarge`] rather than waiting forever.
    ///
    /// # Errors
    ///
    /// [`Error::TooLarge`] and [`Error::InvalidKey`], as for [`Limiter::try_acquire`]; on
    /// Redis, [`Error::Unavailable`] as for [`Limiter::try_acquire`], and
    /// [`Error::Limited`] for a start so far out (over 1,024 periods of queued calls) that
    /// Redis cannot count it exactly.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future while it waits gives back everything it reserved (and any
    /// concurrency slot), so the capacity goes to the next caller. On Redis this includes
    /// a decision still in flight: it is given back when Redis's answer arrives.
    ///
    /// ```
    /// use tollgate::{Cost, Limiter, Quota};
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let limiter = Limiter::builder().quota(Quota::requests(100).per_second().burst(1)).build()?;
    /// let t = std::time::Instant::now();
    /// for _ in 0..3 {
    ///     limiter.acquire("u", Cost::request()).await?;
    /// }
    /// assert!(t.elapsed() >= std::time::Duration::from_millis(19)); // 10 ms apart
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub async fn acquire<'a>(&'a self, key: &'a str, cost: Cost) -> Result<Permit<'a>, Error> {
        if let Some(r) = &self.inner.remote {
            return Box::pin(self.remote_acquire(r, key, cost, None)).await;
        }
        self.acquire_inner(key, cost, None).await
    }

    /// Admit a call, waiting at most `max_wait`. When the reserved start would land
    /// later than that, fails at once, without sleeping, with [`Error::Limited`] saying
    /// when it would fit.
    ///
    /// Waits that cannot be known in advance count against `max_wait` as they happen:
    /// a full concurrency quota (a slot frees when some call ends), and, when the limiter
    /// has both per-key and shared rate quotas, the shared ones, which a call queues for
    /// once its key's own turn has come (so one key over its limit never holds up the
    /// others). If those push the start past `max_wait`, the call fails then and gives
    /// back what it reserved.
    ///
    /// # Errors
    ///
    /// As [`Limiter::try_acquire`]. A concurrency quota that stays full for `max_wait`
    /// also gives [`Error::Limited`].
    ///
    /// # Cancel safety
    ///
    /// As [`Limiter::acquire`]: dropping the future gives back what it reserved.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tollgate::{Cost, Error, Limiter, Quota};
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let limiter = Limiter::builder().quota(Quota::requests(1).per_minute()).build()?;
    /// limiter.try_acquire("u", Cost::request()).await?;
    /// let t = std::time::Instant::now();
    /// let err = limiter.acquire_within("u", Cost::request(), Duration::from_secs(1)).await.unwrap_err();
    /// assert!(t.elapsed() < Duration::from_millis(100)); // did not sleep
    /// assert!(err.retry_after() > Some(Duration::from_secs(59)));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub async fn acquire_within<'a>(
        &'a self,
        key: &'a str,
        cost: Cost,
        max_wait: Duration,
    ) -> Result<Permit<'a>, Error> {
        if let Some(r) = &self.inner.remote {
            return Box::pin(self.remote_acquire(r, key, cost, Some(max_wait))).await;
        }
        self.acquire_inner(key, cost, Some(max_wait)).await
    }

    /// Every quota's limit, remaining units and reset for `key`, consuming nothing.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidKey`] for an empty or over-long key.
    ///
    /// ```
    /// use tollgate::{Cost, Limiter, Quota};
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let limiter = Limiter::builder().quota(Quota::tokens(1_000).per_minute()).build()?;
    /// limiter.try_acquire("u", Cost::input(400)).await?;
    /// let status = limiter.status("u").await?;
    /// assert_eq!(status[0].remaining, 600);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub async fn status(&self, key: &str) -> Result<Vec<QuotaStatus>, Error> {
        check_key(key)?;
        let inner = &*self.inner;
        if let Some(r) = &inner.remote
            && let Some(status) = Box::pin(self.remote_status(r, key)).await?
        {
            return Ok(status);
        }
        let now = inner.clock.now();
        let mut out: Vec<QuotaStatus> = inner
            .store
            .status(key, now)
            .into_iter()
            .map(|(index, remaining, reset)| {
                self.quota_status(index, remaining, Duration::from_nanos(reset))
            })
            .collect();
        let slots = [
            inner
                .key_slots
                .map(|i| (i, inner.store.key_slots_free(key))),
            inner
                .shared_slots
                .as_ref()
                .map(|(i, s)| (*i, Some(s.available_permits()))),
        ];
        for (index, free) in slots.into_iter().flatten() {
            let limit = inner.quotas[index].quota.amount;
            out.push(self.quota_status(index, free.map_or(limit, |f| f as u64), Duration::ZERO));
        }
        out.sort_by_key(|s| s.quota.index);
        Ok(out)
    }

    /// Pulls `key`'s view down to what a provider's rate-limit headers say is left, so
    /// traffic the limiter did not see (another app on the same API key, a provider that
    /// counts differently) stops causing 429s. Never raises anything.
    ///
    /// For each quota with a period whose dimension the headers report (`requests`,
    /// `tokens`, `input_tokens`, `output_tokens`), the provider's `remaining` plus what
    /// the quota refills during `age` (how old the headers may be: the time since the
    /// request was sent) is the most the provider can have left now; when the limiter
    /// thinks more is left, the difference is charged. A charge for tokens also lowers
    /// quotas that count the same tokens (`input_tokens` with `tokens`). Returns the
    /// units charged per quota, in the order of [`Limiter::quotas`].
    ///
    /// Calls on one limiter run one at a time, so two answers read together never charge
    /// the same excess twice. Processes sharing Redis each absorb on their own: two that
    /// absorb the same excess at the same moment both charge it, which only ever makes
    /// the limit stricter until it refills.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidKey`]; on Redis, [`Error::Unavailable`] while Redis cannot be
    /// reached and the limiter fails closed. A charge that no longer fits is skipped.
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use tollgate::{Limiter, Quota, provider};
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let limiter = Limiter::builder().quota(Quota::tokens(90_000).per_minute()).build()?;
    /// let mut headers = http::HeaderMap::new();
    /// headers.insert("x-ratelimit-remaining-tokens", "30000".parse()?);
    /// let seen = provider::parse(&headers, SystemTime::now());
    /// let charged = limiter.absorb("account", &seen, Duration::ZERO).await?;
    /// assert_eq!(charged, vec![60_000]);
    /// assert_eq!(limiter.status("account").await?[0].remaining, 30_000);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub async fn absorb(
        &self,
        key: &str,
        headers: &crate::provider::RateLimitHeaders,
        age: Duration,
    ) -> Result<Vec<u64>, Error> {
        let _one_at_a_time = self.inner.absorbing.lock().await;
        let mut charged = vec![0; self.inner.quotas.len()];
        for (index, checked) in self.inner.quotas.iter().enumerate() {
            let quota = &checked.quota;
            let budget = match quota.dimension {
                Dimension::Requests => headers.requests,
                Dimension::Tokens => headers.tokens,
                Dimension::InputTokens => headers.input_tokens,
                Dimension::OutputTokens => headers.output_tokens,
                Dimension::Concurrency | Dimension::Spend => None,
            };
            let (Some(remaining), Some(period)) = (budget.and_then(|b| b.remaining), quota.period)
            else {
                continue;
            };
            let refill =
                u128::from(quota.amount).saturating_mul(age.as_nanos()) / period.as_nanos().max(1);
            let allowance = remaining.saturating_add(u64::try_from(refill).unwrap_or(u64::MAX));
            let Some(ours) = self
                .status(key)
                .await?
                .into_iter()
                .find(|s| s.quota.index == index)
                .map(|s| s.remaining)
            else {
                continue;
            };
            let Some(excess) = ours.checked_sub(allowance).filter(|&e| e > 0) else {
                continue;
            };
            let cost = match quota.dimension {
                Dimension::Requests => Cost::request().requests(excess),
                Dimension::Tokens | Dimension::InputTokens => Cost::input(excess).requests(0),
                _ => Cost::request().requests(0).output(excess),
            };
            match self.try_acquire(key, cost).await {
                Ok(permit) => {
                    charged[index] = quota.charge(&cost);
                    drop(permit);
                }
                Err(Error::Limited(_) | Error::TooLarge(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(charged)
    }

    /// Capacity checks before waiting for a concurrency slot, so a call that can never
    /// fit fails at once. (The store checks capacity in every decision too.)
    fn check_capacity(&self, cost: &Cost) -> Result<(), Error> {
        let inner = &*self.inner;
        for q in inner
            .store
            .key_rates()
            .iter()
            .chain(inner.store.shared_rates())
        {
            let c = q.charge(cost);
            if c > q.params.capacity {
                return Err(self.refused(
                    Refusal::TooLarge {
                        index: q.index,
                        cost: c,
                        capacity: q.params.capacity,
                    },
                    0,
                ));
            }
        }
        Ok(())
    }

    #[inline]
    fn try_acquire_now<'a>(&'a self, key: &'a str, cost: &Cost) -> Result<Permit<'a>, Error> {
        check_key(key)?;
        let inner = &*self.inner;
        let mut slots: Slots = [None, None];
        if inner.key_slots.is_some() || inner.shared_slots.is_some() {
            // Too large must win over "no free slot": waiting would never help.
            self.check_capacity(cost)?;
        }
        if let Some(index) = inner.key_slots
            && let Some(sem) = inner.store.key_semaphore(key, inner.clock.now())
        {
            slots[0] = Some(self.try_slot(sem, index)?);
        }
        if let Some((index, sem)) = &inner.shared_slots {
            slots[1] = Some(self.try_slot(sem.clone(), *index)?);
        }
        let reserved = inner
            .store
            .reserve(key, cost, &inner.clock, 0, Part::All, None)
            .map_err(|r| self.refused(r, inner.clock.now()))?;
        Ok(self.permit(key, *cost, reserved, slots))
    }

    #[inline]
    fn permit<'a>(
        &'a self,
        key: &'a str,
        cost: Cost,
        reserved: Reserved,
        slots: Slots,
    ) -> Permit<'a> {
        Permit {
            limiter: self,
            key,
            cost,
            reserved: Charged::from(&reserved),
            waited_ns: 0,
            slots: ManuallyDrop::new(slots),
            remote: ManuallyDrop::new(None),
        }
    }

    async fn acquire_inner<'a>(
        &'a self,
        key: &'a str,
        cost: Cost,
        max_wait: Option<Duration>,
    ) -> Result<Permit<'a>, Error> {
        check_key(key)?;
        let inner = &*self.inner;
        if inner.key_slots.is_some() || inner.shared_slots.is_some() || inner.store.two_phase() {
            // Before any wait: a call that can never fit says so at once.
            self.check_capacity(&cost)?;
        }
        let asked = inner.clock.now();
        let deadline = max_wait.map(|w| asked.saturating_add(nanos(w)));
        // The key's own slot first: a key waiting on itself holds no account-wide slot.
        let mut slots: Slots = [None, None];
        if let Some(index) = inner.key_slots
            && let Some(sem) = inner.store.key_semaphore(key, inner.clock.now())
        {
            let until = self.slot_deadline(index, deadline);
            slots[0] = Some(self.wait_slot(sem, index, until).await?);
        }
        if let Some((index, sem)) = &inner.shared_slots {
            let until = self.slot_deadline(*index, deadline);
            slots[1] = Some(self.wait_slot(sem.clone(), *index, until).await?);
        }
        // With both per-key and shared rate quotas, a call first waits for its key's own
        // turn, then queues for the shared ones: a key over its own limit never holds a
        // reservation on the account that would make every other key wait too.
        let two_phase = inner.store.two_phase();
        let first = if two_phase { Part::Key } else { Part::All };
        let now = inner.clock.now();
        let remaining = |now: u64| deadline.map_or(u64::MAX, |d| d.saturating_sub(now));
        let mut undo = Undo::default();
        let reserved = inner
            .store
            .reserve(
                key,
                &cost,
                &inner.clock,
                remaining(now),
                first,
                Some(&mut undo),
            )
            .map_err(|r| self.refused(r, now))?;
        let mut start = reserved.start;
        let permit = self.permit(key, cost, reserved, slots);
        // Dropped while waiting: the guard hands every reservation made so far back.
        let mut guard = Waiting(Some((permit, undo)));
        inner.clock.sleep_until(start).await;
        if two_phase && let Some((permit, undo)) = guard.0.as_mut() {
            let now = inner.clock.now();
            let shared = inner
                .store
                .reserve(
                    key,
                    &cost,
                    &inner.clock,
                    remaining(now),
                    Part::Shared,
                    Some(undo),
                )
                .map_err(|r| self.refused(r, now))?;
            start = shared.start;
            // Each phase fills only its own quotas' settle slots; the others stay 0.
            for (a, b) in permit.reserved.settle.iter_mut().zip(shared.settle) {
                *a |= b;
            }
            inner.clock.sleep_until(start).await;
        }
        let mut permit = guard.into_permit();
        permit.waited_ns = start.saturating_sub(asked);
        Ok(permit)
    }

    /// When a wait for concurrency quota `index`'s slot, starting now, must give up: the
    /// call's deadline, or sooner when the quota's own `max_wait` allows less.
    pub(super) fn slot_deadline(&self, index: usize, deadline: Option<u64>) -> Option<u64> {
        let inner = &*self.inner;
        match inner.quotas[index].quota.max_wait {
            Some(w) => {
                let own = inner.clock.now().saturating_add(nanos(w));
                Some(deadline.map_or(own, |d| d.min(own)))
            }
            None => deadline,
        }
    }

    fn try_slot(&self, sem: Arc<Semaphore>, index: usize) -> Result<OwnedSemaphorePermit, Error> {
        match sem.try_acquire_owned() {
            Ok(p) => Ok(p),
            Err(TryAcquireError::NoPermits | TryAcquireError::Closed) => {
                Err(self.slots_full(index))
            }
        }
    }

    async fn wait_slot(
        &self,
        sem: Arc<Semaphore>,
        index: usize,
        deadline: Option<u64>,
    ) -> Result<OwnedSemaphorePermit, Error> {
        if let Ok(p) = sem.clone().try_acquire_owned() {
            return Ok(p);
        }
        let acquire = sem.acquire_owned();
        let got = match deadline {
            None => acquire.await.ok(),
            Some(d) => tokio::select! {
                p = acquire => p.ok(),
                () = self.inner.clock.sleep_until(d) => None,
            },
        };
        got.ok_or_else(|| self.slots_full(index))
    }

    /// Quota `index`'s status: its amount as the limit (slots for concurrency).
    fn quota_status(&self, index: usize, remaining: u64, reset: Duration) -> QuotaStatus {
        QuotaStatus {
            quota: self.inner.ids[index].clone(),
            limit: self.inner.quotas[index].quota.amount,
            remaining,
            reset,
        }
    }

    fn slots_full(&self, index: usize) -> Error {
        Error::Limited(Rejected {
            quota: self.inner.ids[index].clone(),
            limit: self.inner.quotas[index].quota.amount,
            remaining: 0,
            reset: Duration::ZERO,
            retry_after: None,
        })
    }

    fn refused(&self, r: Refusal, now: u64) -> Error {
        let inner = &*self.inner;
        match r {
            Refusal::Limited {
                index,
                start,
                remaining,
                reset,
            } => Error::Limited(Rejected {
                quota: inner.ids[index].clone(),
                limit: inner.quotas[index].quota.amount,
                remaining,
                reset: Duration::from_nanos(reset),
                retry_after: Some(Duration::from_nanos(start.saturating_sub(now))),
            }),
            Refusal::TooLarge {
                index,
                cost,
                capacity,
            } => Error::TooLarge(TooLarge {
                quota: inner.ids[index].clone(),
                cost,
                capacity,
            }),
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[inline]
fn check_key(key: &str) -> Result<(), Error> {
    if key.is_empty() {
        Err(Error::InvalidKey(KeyError::Empty))
    } else if key.len() > MAX_KEY_LEN {
        Err(Error::InvalidKey(KeyError::TooLong(key.len())))
    } else {
        Ok(())
    }
}

/// Concurrency slots held: the key's own, then the shared one.
type Slots = [Option<OwnedSemaphorePermit>; 2];

/// An admitted call. Holds its concurrency slots until it is settled or dropped.
///
/// Settle it with the usage the provider reported to refund what the estimate
/// over-counted (or charge what it under-counted) in quotas that charge actual usage.
/// Dropped without settling, the estimate stands and the slots are freed.
///
/// ```
/// use tollgate::{Cost, Limiter, Quota, Usage};
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let limiter = Limiter::builder().quota(Quota::tokens(10_000).per_minute()).build()?;
/// let permit = limiter.acquire("u", Cost::input(1_000).output(4_000)).await?;
/// assert_eq!(limiter.status("u").await?[0].remaining, 5_000);
/// permit.settle(Usage::new(1_000, 500)).await?;                 // used 1,500, not 5,000
/// assert_eq!(limiter.status("u").await?[0].remaining, 8_500);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
pub struct Permit<'a> {
    limiter: &'a Limiter,
    key: &'a str,
    cost: Cost,
    reserved: Charged,
    waited_ns: u64,
    /// Released by `Drop` (never dropped in place: see there).
    slots: ManuallyDrop<Slots>,
    /// The reservation and leases of a call admitted on Redis; released by `Drop`.
    remote: ManuallyDrop<Option<Box<Held<'a>>>>,
}

impl Drop for Permit<'_> {
    /// Free the concurrency slots and the Redis leases. A permit holding neither (a rate
    /// limit in memory, the common case) costs one test here; releasing is out of line,
    /// so the test is all that is inlined where a permit is dropped.
    #[inline]
    fn drop(&mut self) {
        if self.slots.iter().any(Option::is_some) || self.remote.is_some() {
            self.release();
        }
    }
}

impl Permit<'_> {
    #[inline(never)]
    fn release(&mut self) {
        // Taken out, so the `ManuallyDrop` fields are left holding nothing.
        for slot in self.slots.iter_mut() {
            drop(slot.take());
        }
        drop(self.remote.take());
    }
}

impl fmt::Debug for Permit<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("key", &self.key)
            .field("cost", &self.cost)
            .field("waited", &self.waited())
            .finish_non_exhaustive()
    }
}

impl Permit<'_> {
    /// The cost the call was admitted with.
    ///
    /// ```
    /// use tollgate::{Cost, Limiter, Quota};
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let l = Limiter::builder().quota(Quota::requests(1).per_second()).build()?;
    /// let p = l.try_acquire("u", Cost::input(5)).await?;
    /// assert_eq!(p.cost().input, 5);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub fn cost(&self) -> Cost {
        self.cost
    }

    /// How long the call waited for its start.
    ///
    /// ```
    /// use tollgate::{Cost, Limiter, Quota};
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let l = Limiter::builder().quota(Quota::requests(1).per_second()).build()?;
    /// let p = l.try_acquire("u", Cost::request()).await?;
    /// assert_eq!(p.waited(), std::time::Duration::ZERO);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub fn waited(&self) -> Duration {
        Duration::from_nanos(self.waited_ns)
    }

    /// Every quota's limit, remaining units and reset for the permit's key, this call
    /// included: what upstash's `limit()` returns with a success, and what a gateway puts
    /// in its `x-ratelimit-*` headers.
    ///
    /// In memory this reads the quotas now (later calls included). On Redis, with
    /// [`RedisBuilder::status_with_decisions`](crate::RedisBuilder::status_with_decisions),
    /// it is what the decision itself reported, with no further round trip; otherwise it
    /// is [`Limiter::status`].
    ///
    /// # Errors
    ///
    /// As [`Limiter::status`]; never on the in-memory store.
    ///
    /// ```
    /// use tollgate::{Cost, Limiter, Quota};
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let l = Limiter::builder()
    ///     .quota(Quota::requests(10).per_minute())
    ///     .quota(Quota::tokens(1_000).per_minute())
    ///     .build()?;
    /// let p = l.try_acquire("u", Cost::input(300)).await?;
    /// let status = p.status().await?;
    /// assert_eq!((status[0].limit, status[0].remaining), (10, 9));
    /// assert_eq!((status[1].limit, status[1].remaining), (1_000, 700));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub async fn status(&self) -> Result<Vec<QuotaStatus>, Error> {
        if let (Some(held), Some(r)) = (self.remote.as_ref(), &self.limiter.inner.remote)
            && let Some(status) = self.limiter.held_status(r, held)
        {
            return Ok(status);
        }
        self.limiter.status(self.key).await
    }

    /// Replace the estimate with what the call used, in every quota that charges actual
    /// usage ([`crate::Accounting::Actual`]), and free the concurrency slots.
    ///
    /// Unused tokens are refunded, never more than keeps every later caller within the
    /// bound (capacity that has refilled since the call started is not handed out
    /// twice; a window algorithm refunds only while the call's window is still the
    /// latest one charged); tokens above the estimate are charged now.
    ///
    /// # Errors
    ///
    /// None on the in-memory store; the `Result` is for stores that can fail.
    ///
    /// ```
    /// use tollgate::{Cost, Limiter, Quota, Usage};
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let l = Limiter::builder().quota(Quota::output_tokens(1_000).per_minute()).build()?;
    /// let p = l.acquire("u", Cost::input(10).output(200)).await?;
    /// p.settle(Usage::new(10, 350)).await?;                        // 150 over the estimate
    /// assert_eq!(l.status("u").await?[0].remaining, 650);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub async fn settle(self, usage: Usage) -> Result<(), Error> {
        let inner = &*self.limiter.inner;
        if let (Some(held), Some(r)) = (self.remote.as_ref(), &inner.remote) {
            let actual = Cost {
                requests: self.cost.requests,
                input: usage.input,
                output: usage.output,
                spend: usage.spend,
            };
            if !inner.settles {
                return Ok(());
            }
            return Box::pin(
                self.limiter
                    .remote_settle(r, self.key, &self.cost, &actual, held),
            )
            .await;
        }
        if inner.settles {
            let now = inner.clock.now();
            inner
                .store
                .settle(self.key, &self.cost, &usage, &self.reserved, now);
        }
        Ok(())
    }

    /// Call the call off before it is made: give back everything the permit took (the
    /// request and every unit it reserved) and free its concurrency slots, as when a
    /// second limiter refuses what this one admitted, or a request is found invalid.
    ///
    /// The exact prior state comes back when nothing was charged since; otherwise only
    /// what keeps every later caller within the bound is refunded (capacity that has
    /// refilled since is not handed out twice). On Redis the refund is sent without
    /// waiting for it; one lost to an outage only over-counts.
    ///
    /// ```
    /// use tollgate::{Cost, Limiter, Quota};
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let l = Limiter::builder().quota(Quota::requests(1).per_minute()).build()?;
    /// let p = l.try_acquire("u", Cost::request()).await?;
    /// assert!(l.try_acquire("u", Cost::request()).await.is_err());
    /// p.cancel();
    /// assert!(l.try_acquire("u", Cost::request()).await.is_ok()); // the request came back
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub fn cancel(self) {
        let inner = &*self.limiter.inner;
        if let (Some(held), Some(r)) = (self.remote.as_ref(), &inner.remote) {
            r.store.cancel(self.key, &held.charges, &held.reserved);
            return;
        }
        inner
            .store
            .revoke(self.key, &self.cost, &self.reserved, inner.clock.now());
    }
}

/// A permit whose start has not come yet, with what it needs to undo its reservations;
/// dropping it gives them back.
struct Waiting<'a>(Option<(Permit<'a>, Undo)>);

impl<'a> Waiting<'a> {
    fn into_permit(mut self) -> Permit<'a> {
        // Always Some: only Drop takes it otherwise.
        match self.0.take() {
            Some((p, _)) => p,
            None => unreachable!("a waiting permit is taken once"),
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some((p, undo)) = self.0.take() {
            let inner = &*p.limiter.inner;
            if let (Some(held), Some(r)) = (p.remote.as_ref(), &inner.remote) {
                r.store.cancel(p.key, &held.charges, &held.reserved);
                return;
            }
            let now = inner.clock.now();
            inner
                .store
                .cancel(p.key, &p.cost, p.reserved.epoch, &undo, now);
        }
    }
}
