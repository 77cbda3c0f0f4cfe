//! Retrying failed LLM API calls: exponential backoff with full jitter that
//! honours the waits providers ask for.
//!
//! * [`Backoff`] computes delays. Without a hint it uses AWS's "full jitter":
//!   a uniformly random delay in `[0, min(cap, base * 2^attempt)]`. With a hint
//!   from the provider (`Retry-After`, or a reset time, see
//!   [`crate::provider::RateLimitHeaders::wait_hint`]) it waits the hint plus
//!   a small random extra, never less than the hint.
//! * [`is_retryable`] says which HTTP statuses are worth retrying.
//! * [`retry`] drives an async operation that reports each outcome as an
//!   [`Attempt`], sleeping with `tokio::time::sleep` between tries.
//!
//! # What this module never does
//!
//! * **No I/O** other than `retry`'s sleeps (and the operation it is given).
//! * **Never panics and never overflows**: attempt numbers up to `u32::MAX`
//!   and hints up to [`Duration::MAX`] are fine; delays saturate.
//! * **Never waits less than a provider's hint**, and never sleeps for a hint
//!   longer than [`Backoff::max_hint`]: [`retry`] gives up instead
//!   ([`GiveUp::HintTooLong`]).

use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use http::StatusCode;

/// Default base delay, 500 ms: the ceiling of the first retry's delay.
///
/// # Example
///
/// ```
/// use tollgate::retry::{Backoff, DEFAULT_BASE};
///
/// assert_eq!(Backoff::default().base(), DEFAULT_BASE);
/// ```
pub const DEFAULT_BASE: Duration = Duration::from_millis(500);

/// Default cap on a computed (hint-less) delay, 60 s.
///
/// # Example
///
/// ```
/// use tollgate::retry::{Backoff, DEFAULT_CAP};
///
/// assert_eq!(Backoff::default().cap(), DEFAULT_CAP);
/// ```
pub const DEFAULT_CAP: Duration = Duration::from_secs(60);

/// Default number of attempts in all, the first call included: 8.
///
/// # Example
///
/// ```
/// use tollgate::retry::{Backoff, DEFAULT_MAX_ATTEMPTS};
///
/// assert_eq!(Backoff::default().max_attempts(), DEFAULT_MAX_ATTEMPTS);
/// ```
pub const DEFAULT_MAX_ATTEMPTS: u32 = 8;

/// Default upper bound of the random extra added to a provider's hint,
/// 250 ms, so that clients told the same reset time do not all return at
/// once.
///
/// # Example
///
/// ```
/// use tollgate::retry::{Backoff, DEFAULT_HINT_JITTER};
///
/// assert_eq!(Backoff::default().hint_jitter(), DEFAULT_HINT_JITTER);
/// ```
pub const DEFAULT_HINT_JITTER: Duration = Duration::from_millis(250);

/// Default longest hint [`retry`] is willing to sleep for, 5 minutes.
///
/// # Example
///
/// ```
/// use tollgate::retry::{Backoff, DEFAULT_MAX_HINT};
///
/// assert_eq!(Backoff::default().max_hint(), DEFAULT_MAX_HINT);
/// ```
pub const DEFAULT_MAX_HINT: Duration = Duration::from_secs(5 * 60);

/// The largest `base`, `cap` or `hint_jitter` a [`Backoff`] accepts: one
/// day. Larger values are rejected with [`BackoffError::TooLong`].
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use tollgate::retry::{Backoff, BackoffError, MAX_SETTING};
///
/// let err = Backoff::builder().cap(MAX_SETTING + Duration::from_secs(1)).build();
/// assert!(matches!(err, Err(BackoffError::TooLong { .. })));
/// ```
pub const MAX_SETTING: Duration = Duration::from_secs(24 * 60 * 60);

/// An invalid [`Backoff`] configuration, returned by
/// [`BackoffBuilder::build`]. Nothing is clamped silently.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use tollgate::retry::{Backoff, BackoffError};
///
/// let err = Backoff::builder().base(Duration::ZERO).build().unwrap_err();
/// assert_eq!(err, BackoffError::ZeroBase);
/// assert_eq!(err.to_string(), "backoff base delay must be greater than zero");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BackoffError {
    /// `base` was zero, which would make every computed delay zero.
    #[error("backoff base delay must be greater than zero")]
    ZeroBase,
    /// `cap` was below `base`.
    #[error("backoff cap ({cap:?}) must be at least the base delay ({base:?})")]
    CapBelowBase {
        /// The base delay given.
        base: Duration,
        /// The cap given.
        cap: Duration,
    },
    /// A setting was above [`MAX_SETTING`].
    #[error("backoff {setting} ({value:?}) exceeds the maximum of {max:?}")]
    TooLong {
        /// Which setting: `"base"`, `"cap"` or `"hint_jitter"`.
        setting: &'static str,
        /// The value given.
        value: Duration,
        /// The largest value allowed, [`MAX_SETTING`].
        max: Duration,
    },
    /// `max_attempts` was zero: the operation would never run.
    #[error("backoff max_attempts must be at least 1")]
    ZeroAttempts,
}

/// Retry delays: exponential backoff with full jitter, honouring provider
/// hints.
///
/// | setting | default | meaning |
/// | --- | --- | --- |
/// | `base` | [`DEFAULT_BASE`] (500 ms) | ceiling of the first retry's delay; each retry doubles it |
/// | `cap` | [`DEFAULT_CAP`] (60 s) | the ceiling never exceeds this |
/// | `max_attempts` | [`DEFAULT_MAX_ATTEMPTS`] (8) | calls in all, the first included |
/// | `hint_jitter` | [`DEFAULT_HINT_JITTER`] (250 ms) | a hinted delay is `hint + uniform[0, hint_jitter]` |
/// | `max_hint` | [`DEFAULT_MAX_HINT`] (5 min) | [`retry`] gives up rather than sleep for a longer hint |
///
/// Randomness comes from `fastrand`: the thread-local generator by default,
/// or a generator of the backoff's own when built with
/// [`BackoffBuilder::seed`] (deterministic; a clone copies the generator's
/// current state and then draws independently). For full control pass a
/// generator to [`Backoff::delay_with_rng`].
///
/// `Backoff` is `Send + Sync`; share one across tasks by reference or `Arc`.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use tollgate::retry::Backoff;
///
/// let backoff = Backoff::builder()
///     .base(Duration::from_millis(100))
///     .cap(Duration::from_secs(10))
///     .max_attempts(5)
///     .build()?;
///
/// // Without a hint: full jitter under the doubling ceiling.
/// assert!(backoff.delay(3, None) <= Duration::from_millis(800));
/// // With a hint: at least the hint.
/// let hint = Duration::from_secs(2);
/// assert!(backoff.delay(3, Some(hint)) >= hint);
/// # Ok::<(), tollgate::retry::BackoffError>(())
/// ```
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    max_attempts: u32,
    hint_jitter: Duration,
    max_hint: Duration,
    rng: Option<Mutex<fastrand::Rng>>,
}

impl Default for Backoff {
    /// The defaults listed on [`Backoff`], with the thread-local generator.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use tollgate::retry::Backoff;
    ///
    /// let backoff = Backoff::default();
    /// assert_eq!(backoff.cap(), Duration::from_secs(60));
    /// ```
    fn default() -> Self {
        Backoff {
            base: DEFAULT_BASE,
            cap: DEFAULT_CAP,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            hint_jitter: DEFAULT_HINT_JITTER,
            max_hint: DEFAULT_MAX_HINT,
            rng: None,
        }
    }
}

impl Clone for Backoff {
    /// Copies the settings and, for a seeded backoff, the generator's current
    /// state.
    ///
    /// # Example
    ///
    /// ```
    /// use tollgate::retry::Backoff;
    ///
    /// let a = Backoff::builder().seed(7).build()?;
    /// let b = a.clone();
    /// assert_eq!(a.delay(4, None), b.delay(4, None));
    /// # Ok::<(), tollgate::retry::BackoffError>(())
    /// ```
    fn clone(&self) -> Self {
        Backoff {
            rng: self.rng.as_ref().map(|rng| Mutex::new(lock(rng).clone())),
            ..*self
        }
    }
}

fn lock(rng: &Mutex<fastrand::Rng>) -> std::sync::MutexGuard<'_, fastrand::Rng> {
    // Nothing panics while the lock is held, and an RNG has no invariant a
    // panic could break, so a poisoned lock is still fine to use.
    rng.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Backoff {
    /// Starts a [`BackoffBuilder`] from the defaults.
    ///
    /// # Example
    ///
    /// ```
    /// use tollgate::retry::Backoff;
    ///
    /// let backoff = Backoff::builder().max_attempts(3).build()?;
    /// assert_eq!(backoff.max_attempts(), 3);
    /// # Ok::<(), tollgate::retry::BackoffError>(())
    /// ```
    pub fn builder() -> BackoffBuilder {
        BackoffBuilder::default()
    }

    /// The base delay.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use tollgate::retry::Backoff;
    ///
    /// assert_eq!(Backoff::default().base(), Duration::from_millis(500));
    /// ```
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The cap on computed delays.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use tollgate::retry::Backoff;
    ///
    /// assert_eq!(Backoff::default().cap(), Duration::from_secs(60));
    /// ```
    pub fn cap(&self) -> Duration {
        self.cap
    }

    /// How many calls [`retry`] makes at most, the first included.
    ///
    /// # Example
    ///
    /// ```
    /// use tollgate::retry::Backoff;
    ///
    /// assert_eq!(Backoff::default().max_attempts(), 8);
    /// ```
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The upper bound of the random extra added to a hint.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use tollgate::retry::Backoff;
    ///
    /// assert_eq!(Backoff::default().hint_jitter(), Duration::from_millis(250));
    /// ```
    pub fn hint_jitter(&self) -> Duration {
        self.hint_jitter
    }

    /// The longest hint [`retry`] sleeps for before giving up instead.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use tollgate::retry::Backoff;
    ///
    /// assert_eq!(Backoff::default().max_hint(), Duration::from_secs(300));
    /// ```
    pub fn max_hint(&self) -> Duration {
        self.max_hint
    }

    /// The full-jitter ceiling for zero-based retry `attempt`:
    /// `min(cap, base * 2^attempt)`, saturating at `cap` (no overflow for any
    /// `attempt`).
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use tollgate::retry::Backoff;
    ///
    /// let backoff = Backoff::default();
    /// assert_eq!(backoff.ceiling(0), Duration::from_millis(500));
    /// assert_eq!(backoff.ceiling(3), Duration::from_secs(4));
    /// assert_eq!(backoff.ceiling(u32::MAX), Duration::from_secs(60));
    /// ```
    pub fn ceiling(&self, attempt: u32) -> Duration {
        2u32.checked_pow(attempt)
            .and_then(|factor| self.base.checked_mul(factor))
            .map_or(self.cap, |d| d.min(self.cap))
    }

    /// The delay before retry number `attempt` (zero-based: `0` is the wait
    /// after the first failed call).
    ///
    /// * With `hint: Some(h)`: `h + uniform[0, hint_jitter]`, saturating at
    ///   [`Duration::MAX`]; never less than `h`. The exponential schedule and
    ///   `cap` do not apply: the provider knows best.
    /// * With `None`: full jitter, `uniform[0, self.ceiling(attempt)]`.
    ///
    /// Draws one number from the backoff's generator (see [`Backoff`]).
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use tollgate::retry::Backoff;
    ///
    /// let backoff = Backoff::builder().hint_jitter(Duration::ZERO).build()?;
    /// let hint = Duration::from_millis(1638);
    /// assert_eq!(backoff.delay(0, Some(hint)), hint);
    /// assert!(backoff.delay(100, None) <= backoff.cap());
    /// # Ok::<(), tollgate::retry::BackoffError>(())
    /// ```
    pub fn delay(&self, attempt: u32, hint: Option<Duration>) -> Duration {
        match &self.rng {
            Some(rng) => self.delay_with_rng(attempt, hint, &mut lock(rng)),
            None => self.compute(attempt, hint, |upper| fastrand::u64(0..=upper)),
        }
    }

    /// [`Backoff::delay`] drawing from the given generator instead of the
    /// backoff's own. Equal seeds give equal delays.
    ///
    /// # Example
    ///
    /// ```
    /// use tollgate::retry::Backoff;
    ///
    /// let backoff = Backoff::default();
    /// let mut a = fastrand::Rng::with_seed(42);
    /// let mut b = fastrand::Rng::with_seed(42);
    /// assert_eq!(
    ///     backoff.delay_with_rng(2, None, &mut a),
    ///     backoff.delay_with_rng(2, None, &mut b),
    /// );
    /// ```
    pub fn delay_with_rng(
        &self,
        attempt: u32,
        hint: Option<Duration>,
        rng: &mut fastrand::Rng,
    ) -> Duration {
        self.compute(attempt, hint, |upper| rng.u64(0..=upper))
    }

    fn compute(
        &self,
        attempt: u32,
        hint: Option<Duration>,
        draw: impl FnOnce(u64) -> u64,
    ) -> Duration {
        match hint {
            Some(hint) => hint.saturating_add(Duration::from_nanos(draw(nanos(self.hint_jitter)))),
            None => Duration::from_nanos(draw(nanos(self.ceiling(attempt)))),
        }
    }
}

/// Whole nanoseconds of a setting; settings are at most a day, so this never
/// saturates in practice.
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Builds a validated [`Backoff`]; see the table on [`Backoff`] for the
/// settings and their defaults.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use tollgate::retry::BackoffBuilder;
///
/// let backoff = BackoffBuilder::default()
///     .base(Duration::from_millis(250))
///     .cap(Duration::from_secs(30))
///     .max_attempts(4)
///     .hint_jitter(Duration::from_millis(100))
///     .max_hint(Duration::from_secs(90))
///     .seed(1)
///     .build()?;
/// assert_eq!(backoff.base(), Duration::from_millis(250));
/// # Ok::<(), tollgate::retry::BackoffError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct BackoffBuilder {
    base: Duration,
    cap: Duration,
    max_attempts: u32,
    hint_jitter: Duration,
    max_hint: Duration,
    seed: Option<u64>,
}

impl Default for BackoffBuilder {
    /// A builder holding the defaults (same as [`Backoff::builder`]).
    ///
    /// # Example
    ///
    /// ```
    /// use tollgate::retry::BackoffBuilder;
    ///
    /// let backoff = BackoffBuilder::default().build()?;
    /// assert_eq!(backoff.max_attempts(), 8);
    /// # Ok::<(), tollgate::retry::BackoffError>(())
    /// ```
    fn default() -> Self {
        BackoffBuilder {
            base: DEFAULT_BASE,
            cap: DEFAULT_CAP,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            hint_jitter: DEFAULT_HINT_JITTER,
            max_hint: DEFAULT_MAX_HINT,
            seed: None,
        }
    }
}

impl BackoffBuilder {
    /// Sets the base delay: more than zero, at most `cap` and
    /// [`MAX_SETTING`].
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use tollgate::retry::Backoff;
    ///
    /// let backoff = Backoff::builder().base(Duration::from_secs(1)).build()?;
    /// assert_eq!(backoff.ceiling(1), Duration::from_secs(2));
    /// # Ok::<(), tollgate::retry::BackoffError>(())
    /// ```
    pub fn base(mut self, base: Duration) -> Self {
        self.base = base;
        self
    }

    /// Sets the cap on computed delays: at least `base`, at most
    /// [`MAX_SETTING`].
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use tollgate::retry::Backoff;
    ///
    /// let backoff = Backoff::builder().cap(Duration::from_secs(2)).build()?;
    /// assert_eq!(backoff.ceiling(10), Duration::from_secs(2));
    /// # Ok::<(), tollgate::retry::BackoffError>(())
    /// ```
    pub fn cap(mut self, cap: Duration) -> Self {
        self.cap = cap;
        self
    }

    /// Sets how many calls [`retry`] makes at most, the first included; at
    /// least 1 (1 means no retries).
    ///
    /// # Example
    ///
    /// ```
    /// use tollgate::retry::{Backoff, BackoffError};
    ///
    /// assert_eq!(Backoff::builder().max_attempts(0).build().unwrap_err(), BackoffError::ZeroAttempts);
    /// ```
    pub fn max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts;
        self
    }

    /// Sets the upper bound of the random extra added to a hint; zero waits
    /// exactly the hint. At most [`MAX_SETTING`].
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use tollgate::retry::Backoff;
    ///
    /// let backoff = Backoff::builder().hint_jitter(Duration::ZERO).build()?;
    /// assert_eq!(backoff.delay(0, Some(Duration::from_secs(3))), Duration::from_secs(3));
    /// # Ok::<(), tollgate::retry::BackoffError>(())
    /// ```
    pub fn hint_jitter(mut self, hint_jitter: Duration) -> Self {
        self.hint_jitter = hint_jitter;
        self
    }

    /// Sets the longest hint [`retry`] sleeps for; a longer one ends the loop
    /// with [`GiveUp::HintTooLong`]. Any value is accepted;
    /// [`Duration::MAX`] means always wait.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use tollgate::retry::Backoff;
    ///
    /// let backoff = Backoff::builder().max_hint(Duration::MAX).build()?;
    /// assert_eq!(backoff.max_hint(), Duration::MAX);
    /// # Ok::<(), tollgate::retry::BackoffError>(())
    /// ```
    pub fn max_hint(mut self, max_hint: Duration) -> Self {
        self.max_hint = max_hint;
        self
    }

    /// Gives the backoff its own generator seeded with `seed`, making its
    /// delays reproducible (for tests and simulations).
    ///
    /// # Example
    ///
    /// ```
    /// use tollgate::retry::Backoff;
    ///
    /// let a = Backoff::builder().seed(9).build()?;
    /// let b = Backoff::builder().seed(9).build()?;
    /// for attempt in 0..8 {
    ///     assert_eq!(a.delay(attempt, None), b.delay(attempt, None));
    /// }
    /// # Ok::<(), tollgate::retry::BackoffError>(())
    /// ```
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Checks the settings and builds the [`Backoff`].
    ///
    /// # Errors
    ///
    /// [`BackoffError::ZeroBase`], [`BackoffError::CapBelowBase`],
    /// [`BackoffError::TooLong`] (base, cap or hint_jitter above
    /// [`MAX_SETTING`]) or [`BackoffError::ZeroAttempts`].
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use tollgate::retry::{Backoff, BackoffError};
    ///
    /// let err = Backoff::builder()
    ///     .base(Duration::from_secs(2))
    ///     .cap(Duration::from_secs(1))
    ///     .build()
    ///     .unwrap_err();
    /// assert!(matches!(err, BackoffError::CapBelowBase { .. }));
    /// ```
    pub fn build(self) -> Result<Backoff, BackoffError> {
        for (setting, value) in [
            ("base", self.base),
            ("cap", self.cap),
            ("hint_jitter", self.hint_jitter),
        ] {
            if value > MAX_SETTING {
                return Err(BackoffError::TooLong {
                    setting,
                    value,
                    max: MAX_SETTING,
                });
            }
        }
        if self.base.is_zero() {
            return Err(BackoffError::ZeroBase);
        }
        if self.cap < self.base {
            return Err(BackoffError::CapBelowBase {
                base: self.base,
                cap: self.cap,
            });
        }
        if self.max_attempts == 0 {
            return Err(BackoffError::ZeroAttempts);
        }
        Ok(Backoff {
            base: self.base,
            cap: self.cap,
            max_attempts: self.max_attempts,
            hint_jitter: self.hint_jitter,
            max_hint: self.max_hint,
            rng: self
                .seed
                .map(|seed| Mutex::new(fastrand::Rng::with_seed(seed))),
        })
    }
}

/// Whether a response status is worth retrying.
///
/// Retryable: 408 Request Timeout, 409 Conflict (OpenAI uses it for
/// transient lock contention), 429 Too Many Requests, 500, 502, 503, 504,
/// 520–524 (Cloudflare's origin errors, seen in front of OpenAI) and 529
/// (Anthropic's "overloaded"). Everything else is not, notably 400, 401,
/// 403, 404, 413, 422, 501 and 505: the same request would fail again.
///
/// # Example
///
/// ```
/// use http::StatusCode;
/// use tollgate::retry::is_retryable;
///
/// assert!(is_retryable(StatusCode::TOO_MANY_REQUESTS));
/// assert!(is_retryable(StatusCode::from_u16(529).unwrap()));
/// assert!(!is_retryable(StatusCode::UNAUTHORIZED));
/// assert!(!is_retryable(StatusCode::OK));
/// ```
pub fn is_retryable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        408 | 409 | 429 | 500 | 502 | 503 | 504 | 520..=524 | 529
    )
}

/// Whether an error answer says that the same request can never succeed however long
/// it waits, although its status (429) says "too many requests": the account is out of
/// credit (`insufficient_quota`, `billing_hard_limit_reached`, "exceeded your current
/// quota"), or the request alone is over a limit ("Request too large"). Such answers are
/// never worth a retry: a retry is only one more refused request on the account.
///
/// `body` is the answer's body as the provider sent it (OpenAI's and Anthropic's error
/// JSON, or text); anything unreadable is not permanent.
///
/// # Example
///
/// ```
/// use http::StatusCode;
/// use tollgate::retry::is_permanent;
///
/// let quota = br#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#;
/// assert!(is_permanent(StatusCode::TOO_MANY_REQUESTS, quota));
/// let large = br#"{"error":{"message":"Request too large for gpt-4o on tokens per min (TPM): Limit 30000, Requested 50000.","type":"tokens","code":"rate_limit_exceeded"}}"#;
/// assert!(is_permanent(StatusCode::TOO_MANY_REQUESTS, large));
/// let busy = br#"{"error":{"message":"Rate limit reached for gpt-4o. Please try again in 1s.","type":"tokens","code":"rate_limit_exceeded"}}"#;
/// assert!(!is_permanent(StatusCode::TOO_MANY_REQUESTS, busy));
/// assert!(is_permanent(StatusCode::BAD_REQUEST, b"anything"));
/// ```
pub fn is_permanent(status: StatusCode, body: &[u8]) -> bool {
    if !is_retryable(status) {
        return true;
    }
    if status != StatusCode::TOO_MANY_REQUESTS {
        return false;
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(64 * 1024)]).to_ascii_lowercase();
    [
        "insufficient_quota",
        "billing_hard_limit",
        "exceeded your current quota",
        "request too large",
        "too large for",
        "credit balance is too low",
    ]
    .iter()
    .any(|needle| text.contains(needle))
}

/// The outcome of one call of the operation given to [`retry`].
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use http::StatusCode;
/// use tollgate::retry::Attempt;
///
/// let done: Attempt<&str, String> = Attempt::Done("ok");
/// let again: Attempt<&str, String> = Attempt::Retry {
///     error: "rate limited".to_string(),
///     hint: Some(Duration::from_secs(2)),
/// };
/// let fatal: Attempt<&str, String> =
///     Attempt::for_status(StatusCode::BAD_REQUEST, "bad".to_string(), None);
/// assert!(matches!(fatal, Attempt::Fail(_)));
/// # let _ = (done, again);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Attempt<T, E> {
    /// Success: stop and return the value.
    Done(T),
    /// A transient failure: try again after a delay, if attempts remain.
    Retry {
        /// The failure, kept in case it turns out to be the last one.
        error: E,
        /// How long the provider asked to wait, if it said (see
        /// [`crate::provider::RateLimitHeaders::wait_hint`]).
        hint: Option<Duration>,
    },
    /// A permanent failure: stop now.
    Fail(E),
}

impl<T, E> Attempt<T, E> {
    /// Classifies a failed response: [`Attempt::Retry`] with `hint` when
    /// [`is_retryable`] says so, else [`Attempt::Fail`].
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use http::StatusCode;
    /// use tollgate::retry::Attempt;
    ///
    /// let hint = Some(Duration::from_secs(1));
    /// let attempt: Attempt<(), &str> =
    ///     Attempt::for_status(StatusCode::SERVICE_UNAVAILABLE, "busy", hint);
    /// assert_eq!(attempt, Attempt::Retry { error: "busy", hint });
    /// ```
    pub fn for_status(status: StatusCode, error: E, hint: Option<Duration>) -> Self {
        if is_retryable(status) {
            Attempt::Retry { error, hint }
        } else {
            Attempt::Fail(error)
        }
    }
}

/// Why [`retry`] stopped without a value.
///
/// # Example
///
/// ```
/// use tollgate::retry::GiveUp;
///
/// assert_ne!(GiveUp::Fatal, GiveUp::Exhausted);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GiveUp {
    /// The operation returned [`Attempt::Fail`].
    Fatal,
    /// Every one of [`Backoff::max_attempts`] calls returned
    /// [`Attempt::Retry`].
    Exhausted,
    /// The provider asked to wait longer than [`Backoff::max_hint`].
    HintTooLong {
        /// The wait asked for.
        hint: Duration,
        /// The longest wait allowed.
        max: Duration,
    },
}

/// [`retry`]'s failure: the last error, how many calls were made and why
/// the loop stopped.
///
/// Its `Display` does not repeat the inner error; `source()` returns it.
///
/// # Example
///
/// ```
/// use tollgate::retry::{GiveUp, RetryError};
///
/// let err = RetryError { attempts: 3, reason: GiveUp::Exhausted, error: "timeout" };
/// assert_eq!(err.to_string(), "still failing after 3 attempts, giving up");
/// assert_eq!(err.into_inner(), "timeout");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryError<E> {
    /// Calls made, the first included (at least 1).
    pub attempts: u32,
    /// Why the loop stopped.
    pub reason: GiveUp,
    /// The error from the last call.
    pub error: E,
}

impl<E> RetryError<E> {
    /// The error from the last call.
    ///
    /// # Example
    ///
    /// ```
    /// use tollgate::retry::{GiveUp, RetryError};
    ///
    /// let err = RetryError { attempts: 1, reason: GiveUp::Fatal, error: 404 };
    /// assert_eq!(err.into_inner(), 404);
    /// ```
    pub fn into_inner(self) -> E {
        self.error
    }
}

impl<E> fmt::Display for RetryError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.attempts;
        let s = if n == 1 { "" } else { "s" };
        match self.reason {
            GiveUp::Fatal => write!(f, "failed with a non-retryable error after {n} attempt{s}"),
            GiveUp::Exhausted => write!(f, "still failing after {n} attempt{s}, giving up"),
            GiveUp::HintTooLong { hint, max } => write!(
                f,
                "server asked to wait {hint:?}, more than the allowed {max:?}; \
                 gave up after {n} attempt{s}"
            ),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for RetryError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// Calls `op` until it returns [`Attempt::Done`] or [`Attempt::Fail`], at most
/// [`Backoff::max_attempts`] times, sleeping [`Backoff::delay`] between calls
/// with `tokio::time::sleep`.
///
/// After the `n`-th call (1-based) returns `Retry { error, hint }`, the loop:
/// gives up with [`GiveUp::Exhausted`] if `n == max_attempts`; else gives up
/// with [`GiveUp::HintTooLong`] if `hint > max_hint`; else sleeps
/// `backoff.delay(n - 1, hint)` and calls again. Each retry emits a `tracing`
/// `debug` event. Dropping the future cancels the loop. Tokio's timer has
/// millisecond granularity, so actual sleeps are rounded up to whole
/// milliseconds (never shorter than the delay).
///
/// # Errors
///
/// A [`RetryError`] holding the last error, the number of calls made and the
/// [`GiveUp`] reason.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use tollgate::retry::{retry, Attempt, Backoff};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let backoff = Backoff::builder().max_attempts(4).build()?;
/// let mut calls = 0;
/// let result = retry(&backoff, || {
///     calls += 1;
///     let outcome = if calls < 3 {
///         // e.g. a 429 whose headers said to wait 1 s
///         Attempt::Retry { error: "rate limited", hint: Some(Duration::from_secs(1)) }
///     } else {
///         Attempt::Done(42)
///     };
///     async move { outcome }
/// })
/// .await;
/// assert_eq!(result, Ok(42));
/// assert_eq!(calls, 3);
/// # Ok(())
/// # }
/// ```
pub async fn retry<F, Fut, T, E>(backoff: &Backoff, mut op: F) -> Result<T, RetryError<E>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Attempt<T, E>>,
{
    let mut attempts: u32 = 0;
    loop {
        attempts = attempts.saturating_add(1);
        let (error, hint) = match op().await {
            Attempt::Done(value) => return Ok(value),
            Attempt::Fail(error) => {
                return Err(RetryError {
                    attempts,
                    reason: GiveUp::Fatal,
                    error,
                });
            }
            Attempt::Retry { error, hint } => (error, hint),
        };
        if attempts >= backoff.max_attempts {
            return Err(RetryError {
                attempts,
                reason: GiveUp::Exhausted,
                error,
            });
        }
        if let Some(hint) = hint.filter(|&hint| hint > backoff.max_hint) {
            return Err(RetryError {
                attempts,
                reason: GiveUp::HintTooLong {
                    hint,
                    max: backoff.max_hint,
                },
                error,
            });
        }
        let delay = backoff.delay(attempts - 1, hint);
        tracing::debug!(
            attempt = attempts,
            ?hint,
            ?delay,
            "retrying after a transient failure"
        );
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::cell::RefCell;
    use tokio::time::Instant;

    const MS: fn(u64) -> Duration = Duration::from_millis;
    const SECS: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn defaults() {
        let b = Backoff::default();
        assert_eq!(b.base(), MS(500));
        assert_eq!(b.cap(), SECS(60));
        assert_eq!(b.max_attempts(), 8);
        assert_eq!(b.hint_jitter(), MS(250));
        assert_eq!(b.max_hint(), SECS(300));
        let built = Backoff::builder().build().unwrap();
        assert_eq!(
            (
                built.base,
                built.cap,
                built.max_attempts,
                built.hint_jitter,
                built.max_hint
            ),
            (b.base, b.cap, b.max_attempts, b.hint_jitter, b.max_hint)
        );
    }

    #[test]
    fn validation() {
        let build = |f: fn(BackoffBuilder) -> BackoffBuilder| f(Backoff::builder()).build().err();
        assert_eq!(
            build(|b| b.base(Duration::ZERO)),
            Some(BackoffError::ZeroBase)
        );
        assert_eq!(
            build(|b| b.max_attempts(0)),
            Some(BackoffError::ZeroAttempts)
        );
        assert_eq!(
            build(|b| b.base(SECS(2)).cap(SECS(1))),
            Some(BackoffError::CapBelowBase {
                base: SECS(2),
                cap: SECS(1)
            })
        );
        for (setting, f) in [
            (
                "base",
                (|b| b.base(Duration::MAX)) as fn(BackoffBuilder) -> BackoffBuilder,
            ),
            ("cap", |b| b.cap(MAX_SETTING + Duration::from_nanos(1))),
            ("hint_jitter", |b| b.hint_jitter(Duration::MAX)),
        ] {
            assert!(
                matches!(build(f), Some(BackoffError::TooLong { setting: s, .. }) if s == setting),
                "{setting}"
            );
        }
        // Edge values that are fine.
        assert_eq!(build(|b| b.base(Duration::from_nanos(1))), None);
        assert_eq!(build(|b| b.base(SECS(60)).cap(SECS(60))), None);
        assert_eq!(build(|b| b.base(MAX_SETTING).cap(MAX_SETTING)), None);
        assert_eq!(
            build(|b| b.max_attempts(u32::MAX).max_hint(Duration::ZERO)),
            None
        );
        assert_eq!(build(|b| b.hint_jitter(Duration::ZERO)), None);
        // Errors render.
        assert!(
            build(|b| b.cap(Duration::MAX))
                .unwrap()
                .to_string()
                .contains("cap")
        );
    }

    #[test]
    fn ceiling_doubles_then_caps() {
        let b = Backoff::default();
        let expected = [500, 1000, 2000, 4000, 8000, 16_000, 32_000, 60_000, 60_000];
        for (attempt, ms) in (0..).zip(expected) {
            assert_eq!(b.ceiling(attempt), MS(ms), "attempt {attempt}");
        }
        for attempt in [31, 32, 33, 64, 1000, u32::MAX] {
            assert_eq!(b.ceiling(attempt), SECS(60));
        }
        // Largest settings: no overflow either.
        let big = Backoff::builder()
            .base(MAX_SETTING)
            .cap(MAX_SETTING)
            .build()
            .unwrap();
        assert_eq!(big.ceiling(u32::MAX), MAX_SETTING);
        assert!(big.delay(u32::MAX, None) <= MAX_SETTING);
    }

    #[test]
    fn hinted_delays() {
        let exact = Backoff::builder()
            .hint_jitter(Duration::ZERO)
            .build()
            .unwrap();
        for hint in [Duration::ZERO, MS(20), SECS(3), Duration::MAX] {
            assert_eq!(exact.delay(0, Some(hint)), hint);
            assert_eq!(exact.delay(u32::MAX, Some(hint)), hint);
        }
        let jittered = Backoff::builder().seed(1).build().unwrap();
        let mut spread = std::collections::HashSet::new();
        for _ in 0..200 {
            let d = jittered.delay(5, Some(SECS(2)));
            assert!((SECS(2)..=SECS(2) + MS(250)).contains(&d), "{d:?}");
            spread.insert(d);
        }
        assert!(spread.len() > 100, "hint jitter should spread delays");
        // Saturates rather than overflowing.
        assert_eq!(jittered.delay(0, Some(Duration::MAX)), Duration::MAX);
    }

    #[test]
    fn seeded_backoffs_are_deterministic_and_match_delay_with_rng() {
        let a = Backoff::builder().seed(1234).build().unwrap();
        let b = a.clone();
        let mut rng = fastrand::Rng::with_seed(1234);
        for attempt in 0..20 {
            let hint = (attempt % 3 == 0).then(|| MS(u64::from(attempt) * 10));
            let expected = a.delay_with_rng(attempt, hint, &mut rng);
            assert_eq!(a.delay(attempt, hint), expected);
            assert_eq!(b.delay(attempt, hint), expected);
        }
        // Different seeds differ somewhere.
        let c = Backoff::builder().seed(1235).build().unwrap();
        let d = Backoff::builder().seed(1234).build().unwrap();
        assert!((0..20).any(|n| c.delay(n, None) != d.delay(n, None)));
    }

    #[test]
    fn unseeded_delays_stay_in_bounds() {
        let b = Backoff::default();
        for attempt in 0..40 {
            assert!(b.delay(attempt, None) <= b.ceiling(attempt));
        }
    }

    #[test]
    fn retryable_statuses() {
        let retryable = [
            408, 409, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524, 529,
        ];
        for code in 100..=999u16 {
            let status = StatusCode::from_u16(code).unwrap();
            assert_eq!(is_retryable(status), retryable.contains(&code), "{code}");
        }
        for code in [400, 401, 403, 404, 413, 422, 501, 505] {
            assert!(!is_retryable(StatusCode::from_u16(code).unwrap()));
        }
    }

    #[test]
    fn attempt_for_status() {
        let hint = Some(SECS(1));
        assert_eq!(
            Attempt::<(), _>::for_status(StatusCode::TOO_MANY_REQUESTS, "e", hint),
            Attempt::Retry { error: "e", hint }
        );
        assert_eq!(
            Attempt::<(), _>::for_status(StatusCode::NOT_FOUND, "e", hint),
            Attempt::Fail("e")
        );
    }

    #[test]
    fn retry_error_display_and_source() {
        #[derive(Debug, thiserror::Error)]
        #[error("inner")]
        struct Inner;
        let err = RetryError {
            attempts: 1,
            reason: GiveUp::Fatal,
            error: Inner,
        };
        assert_eq!(
            err.to_string(),
            "failed with a non-retryable error after 1 attempt"
        );
        let source = std::error::Error::source(&err).unwrap();
        assert_eq!(source.to_string(), "inner");
        let err = RetryError {
            attempts: 2,
            reason: GiveUp::HintTooLong {
                hint: SECS(600),
                max: SECS(300),
            },
            error: Inner,
        };
        assert_eq!(
            err.to_string(),
            "server asked to wait 600s, more than the allowed 300s; gave up after 2 attempts"
        );
    }

    /// Tokio's timer rounds sleeps up to whole milliseconds.
    fn assert_slept(slept: Duration, delay: Duration) {
        assert!(
            slept >= delay && slept < delay + MS(1),
            "slept {slept:?} for a delay of {delay:?}"
        );
    }

    /// Runs `retry` with an operation that replays `script` (then keeps
    /// returning `Retry` without a hint) and records when each call happened,
    /// relative to the start.
    async fn run_script(
        backoff: &Backoff,
        script: Vec<Attempt<u32, &'static str>>,
    ) -> (Result<u32, RetryError<&'static str>>, Vec<Duration>) {
        let start = Instant::now();
        let calls = RefCell::new(Vec::new());
        let script = RefCell::new(script.into_iter());
        let result = retry(backoff, || {
            calls.borrow_mut().push(start.elapsed());
            let next = script.borrow_mut().next().unwrap_or(Attempt::Retry {
                error: "again",
                hint: None,
            });
            async move { next }
        })
        .await;
        (result, calls.into_inner())
    }

    #[tokio::test(start_paused = true)]
    async fn honours_hints_exactly() {
        let backoff = Backoff::builder()
            .hint_jitter(Duration::ZERO)
            .build()
            .unwrap();
        let script = vec![
            Attempt::Retry {
                error: "429",
                hint: Some(SECS(3)),
            },
            Attempt::Retry {
                error: "429",
                hint: Some(MS(1500)),
            },
            Attempt::Retry {
                error: "529",
                hint: Some(Duration::ZERO),
            },
            Attempt::Done(7),
        ];
        let (result, calls) = run_script(&backoff, script).await;
        assert_eq!(result, Ok(7));
        assert_eq!(calls, vec![Duration::ZERO, SECS(3), MS(4500), MS(4500)]);
    }

    #[tokio::test(start_paused = true)]
    async fn hints_with_jitter_are_never_shorter() {
        let backoff = Backoff::builder().seed(5).build().unwrap();
        let mut expected_rng = fastrand::Rng::with_seed(5);
        let hints = [SECS(1), SECS(2), MS(20)];
        let script: Vec<_> = hints
            .iter()
            .map(|&h| Attempt::Retry {
                error: "429",
                hint: Some(h),
            })
            .chain([Attempt::Done(1)])
            .collect();
        let (result, calls) = run_script(&backoff, script).await;
        assert_eq!(result, Ok(1));
        for (i, hint) in hints.iter().enumerate() {
            let slept = calls[i + 1] - calls[i];
            let attempt = u32::try_from(i).unwrap();
            let expected = backoff.delay_with_rng(attempt, Some(*hint), &mut expected_rng);
            assert_slept(slept, expected);
            assert!(slept >= *hint && slept <= *hint + MS(251), "{slept:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn stops_at_the_attempt_cap_with_exact_full_jitter_sleeps() {
        let backoff = Backoff::builder().max_attempts(5).seed(99).build().unwrap();
        let mut expected_rng = fastrand::Rng::with_seed(99);
        let (result, calls) = run_script(&backoff, Vec::new()).await;
        assert_eq!(
            result,
            Err(RetryError {
                attempts: 5,
                reason: GiveUp::Exhausted,
                error: "again",
            })
        );
        assert_eq!(calls.len(), 5);
        for (attempt, pair) in (0..).zip(calls.windows(2)) {
            let delay = backoff.delay_with_rng(attempt, None, &mut expected_rng);
            assert!(delay <= backoff.ceiling(attempt));
            assert_slept(pair[1] - pair[0], delay);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn single_attempt_never_sleeps() {
        let backoff = Backoff::builder().max_attempts(1).build().unwrap();
        let start = Instant::now();
        let (result, calls) = run_script(&backoff, Vec::new()).await;
        assert_eq!(result.unwrap_err().attempts, 1);
        assert_eq!(calls, vec![Duration::ZERO]);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn fail_stops_immediately() {
        let backoff = Backoff::default();
        let script = vec![
            Attempt::Retry {
                error: "503",
                hint: Some(SECS(1)),
            },
            Attempt::Fail("401"),
            Attempt::Done(1),
        ];
        let (result, calls) = run_script(&backoff, script).await;
        assert_eq!(
            result,
            Err(RetryError {
                attempts: 2,
                reason: GiveUp::Fatal,
                error: "401",
            })
        );
        assert_eq!(calls.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_on_a_hint_beyond_max_hint() {
        let backoff = Backoff::builder().max_hint(SECS(30)).build().unwrap();
        let start = Instant::now();
        let script = vec![
            Attempt::Retry {
                error: "429",
                hint: Some(SECS(30)),
            },
            Attempt::Retry {
                error: "429 daily",
                hint: Some(SECS(31)),
            },
        ];
        let (result, calls) = run_script(&backoff, script).await;
        assert_eq!(
            result,
            Err(RetryError {
                attempts: 2,
                reason: GiveUp::HintTooLong {
                    hint: SECS(31),
                    max: SECS(30),
                },
                error: "429 daily",
            })
        );
        assert_eq!(calls.len(), 2);
        // Slept for the first (allowed) hint only, not the second.
        assert!(start.elapsed() >= SECS(30) && start.elapsed() <= SECS(30) + MS(250));
    }

    #[tokio::test(start_paused = true)]
    async fn works_with_provider_hints() {
        use crate::provider::parse;
        let mut headers = http::HeaderMap::new();
        headers.insert("retry-after-ms", "1638".parse().unwrap());
        let hint = parse(&headers, std::time::SystemTime::now()).wait_hint();
        let backoff = Backoff::builder()
            .hint_jitter(Duration::ZERO)
            .build()
            .unwrap();
        let script = vec![
            Attempt::for_status(StatusCode::TOO_MANY_REQUESTS, "429", hint),
            Attempt::Done(3),
        ];
        let (result, calls) = run_script(&backoff, script).await;
        assert_eq!(result, Ok(3));
        assert_eq!(calls, vec![Duration::ZERO, MS(1638)]);
    }

    fn any_backoff() -> impl Strategy<Value = Backoff> {
        (
            1u64..=86_400_000_000_000,
            0u64..=86_400_000_000_000,
            0u64..=86_400_000_000_000,
            any::<u64>(),
        )
            .prop_map(|(base, extra, jitter, seed)| {
                let base = Duration::from_nanos(base);
                Backoff::builder()
                    .base(base)
                    .cap((base + Duration::from_nanos(extra)).min(MAX_SETTING))
                    .hint_jitter(Duration::from_nanos(jitter))
                    .seed(seed)
                    .build()
                    .unwrap()
            })
    }

    proptest! {
        #[test]
        fn full_jitter_stays_within_bounds(backoff in any_backoff(), attempt in any::<u32>()) {
            let ceiling = backoff.ceiling(attempt);
            prop_assert!(ceiling <= backoff.cap());
            prop_assert!(ceiling >= backoff.base());
            if attempt < 32 {
                let exact = backoff.base().checked_mul(1 << attempt).map_or(backoff.cap(), |d| d.min(backoff.cap()));
                prop_assert_eq!(ceiling, exact);
            }
            prop_assert!(backoff.delay(attempt, None) <= ceiling);
        }

        #[test]
        fn hinted_delay_stays_within_bounds(
            backoff in any_backoff(),
            attempt in any::<u32>(),
            hint_nanos in any::<u64>(),
            hint_secs in prop_oneof![Just(0u64), 0u64..100_000, Just(u64::MAX)],
        ) {
            let hint = Duration::from_secs(hint_secs).saturating_add(Duration::from_nanos(hint_nanos));
            let delay = backoff.delay(attempt, Some(hint));
            prop_assert!(delay >= hint);
            prop_assert!(delay <= hint.saturating_add(backoff.hint_jitter()));
        }

        #[test]
        fn retry_loop_sleeps_stay_within_bounds(
            seed in any::<u64>(),
            max_attempts in 1u32..12,
            hints in proptest::collection::vec(proptest::option::of(0u64..120_000), 0..12),
        ) {
            let backoff = Backoff::builder().max_attempts(max_attempts).seed(seed).build().unwrap();
            let script: Vec<_> = hints
                .iter()
                .map(|h| Attempt::Retry { error: "e", hint: h.map(MS) })
                .collect();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            let (result, calls) = runtime.block_on(run_script(&backoff, script));
            let err = result.unwrap_err();
            // Every call asks for a retry (the script runs out into hint-less
            // ones), so the loop always ends at the cap.
            prop_assert_eq!(err.reason, GiveUp::Exhausted);
            prop_assert_eq!(err.attempts, max_attempts);
            prop_assert_eq!(calls.len(), usize::try_from(max_attempts).unwrap());
            for (i, pair) in calls.windows(2).enumerate() {
                let slept = pair[1] - pair[0];
                let attempt = u32::try_from(i).unwrap();
                match hints.get(i).copied().flatten().map(MS) {
                    // + 1 ms: tokio's timer rounds sleeps up to whole milliseconds.
                    Some(hint) => prop_assert!(slept >= hint && slept <= hint + backoff.hint_jitter() + MS(1)),
                    None => prop_assert!(slept <= backoff.ceiling(attempt) + MS(1)),
                }
            }
        }
    }
}
