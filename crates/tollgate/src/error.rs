//! Why a call was not admitted, in types a caller can act on: which quota refused, how
//! much is left, when to come back.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// Which quota of a limiter: its position in the builder's order and its name.
///
/// ```
/// use tollgate::{Cost, Error, Limiter, Quota};
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let limiter = Limiter::builder()
///     .quota(Quota::requests(1).per_minute().named("rpm"))
///     .build()?;
/// let _first = limiter.try_acquire("alice", Cost::request()).await?;
/// let Err(Error::Limited(rejected)) = limiter.try_acquire("alice", Cost::request()).await else {
///     panic!("the second call in a minute must be refused");
/// };
/// assert_eq!(rejected.quota().name(), "rpm");
/// assert_eq!(rejected.quota().index(), 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QuotaId {
    pub(crate) index: usize,
    pub(crate) name: Arc<str>,
}

impl QuotaId {
    /// Position of the quota in the order it was added to the builder.
    ///
    /// See [`QuotaId`] for an example.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The quota's name.
    ///
    /// See [`QuotaId`] for an example.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for QuotaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// A call refused because a quota has no room for it now (or not within the wait the
/// caller allowed). Carries what upstash's `limit()` returns: the limit, what remains,
/// when it resets, and when this call would fit.
///
/// ```
/// use std::time::Duration;
/// use tollgate::{Cost, Error, Limiter, Quota};
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let limiter = Limiter::builder().quota(Quota::requests(10).per_minute()).build()?;
/// for _ in 0..10 {
///     limiter.try_acquire("user-42", Cost::request()).await?;
/// }
/// match limiter.try_acquire("user-42", Cost::request()).await {
///     Err(Error::Limited(r)) => {
///         assert_eq!((r.limit(), r.remaining()), (10, 0));
///         assert!(r.retry_after() > Some(Duration::from_secs(5)));
///         assert!(r.reset() > Duration::from_secs(59));
///     }
///     other => panic!("expected a rejection, got {other:?}"),
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub(crate) quota: QuotaId,
    pub(crate) limit: u64,
    pub(crate) remaining: u64,
    pub(crate) reset: Duration,
    pub(crate) retry_after: Option<Duration>,
}

impl Rejected {
    /// The quota that refused (the one that would have made the call wait longest).
    ///
    /// See [`Rejected`] for an example.
    pub fn quota(&self) -> &QuotaId {
        &self.quota
    }

    /// The quota's amount per period (its slots, for a concurrency quota).
    ///
    /// See [`Rejected`] for an example.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Units of the quota available at the moment of the decision.
    ///
    /// See [`Rejected`] for an example.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// Time until the quota is fully replenished.
    ///
    /// See [`Rejected`] for an example.
    pub fn reset(&self) -> Duration {
        self.reset
    }

    /// How long until this call would be admitted if nobody else came first. `None` for
    /// a concurrency quota, where it depends on when a call in flight ends.
    ///
    /// See [`Rejected`] for an example.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rate limited by quota `{}` (limit {}, remaining {})",
            self.quota, self.limit, self.remaining
        )?;
        match self.retry_after {
            Some(d) => write!(f, ": retry after {:.3}s", d.as_secs_f64()),
            None => f.write_str(": retry when a call in flight ends"),
        }
    }
}

/// A call that can never be admitted: its cost is larger than a quota's capacity.
///
/// ```
/// use tollgate::{Cost, Error, Limiter, Quota};
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let limiter = Limiter::builder().quota(Quota::tokens(10_000).per_minute()).build()?;
/// let Err(Error::TooLarge(e)) = limiter.acquire("bob", Cost::input(12_000)).await else {
///     panic!("12,000 tokens never fit a 10,000-token bucket");
/// };
/// assert_eq!((e.cost(), e.capacity()), (12_000, 10_000));
/// assert!(e.to_string().contains("tokens/60s"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooLarge {
    pub(crate) quota: QuotaId,
    pub(crate) cost: u64,
    pub(crate) capacity: u64,
}

impl TooLarge {
    /// The quota the call can never fit.
    ///
    /// See [`TooLarge`] for an example.
    pub fn quota(&self) -> &QuotaId {
        &self.quota
    }

    /// The call's cost in that quota's units.
    ///
    /// See [`TooLarge`] for an example.
    pub fn cost(&self) -> u64 {
        self.cost
    }

    /// The most the quota can ever admit at once (its burst).
    ///
    /// See [`TooLarge`] for an example.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }
}

impl fmt::Display for TooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the call costs {} in quota `{}`, more than its capacity {}: it can never be admitted; \
             make the call smaller or raise the quota's burst",
            self.cost, self.quota, self.capacity
        )
    }
}

/// Everything a limiter call can fail with.
///
/// ```
/// use tollgate::{Cost, Error, Limiter, Quota};
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let limiter = Limiter::builder().quota(Quota::requests(1).per_second()).build()?;
/// let err = limiter.try_acquire("", Cost::request()).await.unwrap_err();
/// assert!(matches!(err, Error::InvalidKey(_)));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A quota has no room now, or not within the allowed wait.
    #[error("{0}")]
    Limited(Rejected),
    /// The cost exceeds a quota's capacity; waiting would never help.
    #[error("{0}")]
    TooLarge(TooLarge),
    /// The key is empty or longer than [`crate::MAX_KEY_LEN`] bytes.
    #[error("invalid key: {0}")]
    InvalidKey(KeyError),
    /// The shared store (Redis) cannot be reached and the limiter fails closed.
    #[error("{0}")]
    Unavailable(StoreUnavailable),
    /// The limiter's configuration is invalid (from an async `build`, such as Redis's).
    #[error(transparent)]
    Config(#[from] crate::ConfigError),
}

/// The shared store could not decide a call: Redis is down, too slow, or answered
/// something unexpected. A limiter that fails closed returns this until Redis is back.
///
/// ```
/// use tollgate::StoreUnavailable;
/// let e = StoreUnavailable::new("connection refused");
/// assert!(e.to_string().contains("connection refused"));
/// assert_eq!(e.detail(), "connection refused");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreUnavailable {
    detail: Arc<str>,
}

impl StoreUnavailable {
    /// An outage described by `detail`.
    ///
    /// See [`StoreUnavailable`] for an example.
    pub fn new(detail: &str) -> StoreUnavailable {
        StoreUnavailable {
            detail: detail.into(),
        }
    }

    /// What went wrong, as the store reported it.
    ///
    /// See [`StoreUnavailable`] for an example.
    pub fn detail(&self) -> &str {
        &self.detail
    }
}

impl fmt::Display for StoreUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the limiter's Redis store is unavailable ({}); the call was not admitted: retry \
             shortly, or build the limiter with `fail_open` to decide locally during outages",
            self.detail
        )
    }
}

impl Error {
    /// When to retry: `Some` only for [`Error::Limited`] on a rate quota.
    ///
    /// ```
    /// use tollgate::{Cost, Limiter, Quota};
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let limiter = Limiter::builder().quota(Quota::requests(1).per_second()).build()?;
    /// limiter.try_acquire("k", Cost::request()).await?;
    /// let err = limiter.try_acquire("k", Cost::request()).await.unwrap_err();
    /// assert!(err.retry_after().is_some());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Limited(r) => r.retry_after,
            _ => None,
        }
    }
}

/// What is wrong with a key.
///
/// ```
/// use tollgate::KeyError;
/// assert_eq!(KeyError::Empty.to_string(), "the key is empty");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The key is the empty string.
    #[error("the key is empty")]
    Empty,
    /// The key is longer than [`crate::MAX_KEY_LEN`] bytes.
    #[error("the key is {0} bytes long; the most is {max}", max = crate::MAX_KEY_LEN)]
    TooLong(usize),
}
