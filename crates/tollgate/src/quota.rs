//! What a limit is: a dimension, an amount per period, a burst capacity, an algorithm, a
//! scope (per key or shared by every key) and an accounting mode.
//!
//! A [`Quota`] is a plain description; nothing here keeps state or reads a clock. It is
//! checked once, when the limiter is built ([`crate::LimiterBuilder::build`]), and every
//! mistake (a zero amount, a zero or overflowing period, a burst below one call, a
//! non-finite multiplier) becomes a [`ConfigError`] naming the quota, never a panic.

use std::fmt;
use std::time::Duration;

use crate::cost::Cost;

/// Which part of a call a quota counts.
///
/// ```
/// use tollgate::{Dimension, Quota};
/// assert_eq!(Quota::input_tokens(10).per_minute().dimension(), Dimension::InputTokens);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dimension {
    /// Requests: one per call unless [`Cost::requests`] says otherwise.
    Requests,
    /// Tokens: input + burndown × output (burndown 1.0 unless set, 5.0 for AWS Bedrock).
    Tokens,
    /// Input (prompt) tokens only, as Vertex AI counts them apart from output.
    InputTokens,
    /// Output (completion) tokens only.
    OutputTokens,
    /// Calls in flight at once: a slot is taken by a permit and freed when it is settled
    /// or dropped.
    Concurrency,
    /// Money: [`Cost::spend`] at admission, [`crate::Usage::spend`] on settle, in
    /// whatever unit the caller uses for both (micro-dollars, credits).
    Spend,
}

impl Dimension {
    fn label(self) -> &'static str {
        match self {
            Dimension::Requests => "requests",
            Dimension::Tokens => "tokens",
            Dimension::InputTokens => "input_tokens",
            Dimension::OutputTokens => "output_tokens",
            Dimension::Concurrency => "concurrency",
            Dimension::Spend => "spend",
        }
    }
}

impl fmt::Display for Dimension {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// How a rate quota decides, each with its own guarantee.
///
/// ```
/// use tollgate::{Algorithm, Quota};
/// let q = Quota::requests(10).per_minute().algorithm(Algorithm::SlidingWindow);
/// assert_eq!(q.get_algorithm(), Algorithm::SlidingWindow);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Algorithm {
    /// The generic cell rate algorithm: a token bucket holding `burst` units that refills
    /// at `amount / period`, kept as one number per key. In **every** interval of length
    /// `L`, what it admits is at most `burst + amount × L / period`. Under steady demand
    /// it admits exactly that rate. The default, and the upstash library's TokenBucket.
    #[default]
    Gcra,
    /// A counter per aligned window of `period` (windows start at the limiter's epoch).
    /// Each window admits at most `amount`; an interval straddling two windows can see up
    /// to `2 × amount`. The upstash library's FixedWindow. No `burst` setting.
    FixedWindow,
    /// The upstash library's SlidingWindow: the previous window's count, weighted by how
    /// much of it still overlaps the trailing period, plus the current window's count
    /// must stay within `amount`. Decided in exact integer arithmetic. In every interval
    /// of length `L` it admits at most `amount + amount × L / period`, and never more
    /// than `amount` inside one aligned window. No `burst` setting.
    SlidingWindow,
}

/// Whether `Permit::settle` may change what a call was charged in a quota.
///
/// ```
/// use tollgate::{Accounting, Quota};
/// // Mirror OpenAI: the estimate (prompt + max_tokens) is what the account is charged.
/// let q = Quota::tokens(90_000).per_minute().accounting(Accounting::Estimate);
/// assert_eq!(q.get_accounting(), Accounting::Estimate);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Accounting {
    /// Charge the actual usage: the estimate is charged at admission and `settle`
    /// refunds what was not used or charges what went over. The default for token
    /// dimensions (per-user budgets; upstash's handler charging after the call).
    #[default]
    Actual,
    /// Charge the estimate and keep it, whatever `settle` reports (OpenAI counts
    /// `max_tokens` at admission). Request quotas always behave this way.
    Estimate,
}

/// Where a quota's state lives.
///
/// ```
/// use tollgate::{Quota, Scope};
/// assert_eq!(Quota::requests(3_500).per_minute().shared().get_scope(), Scope::Shared);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Scope {
    /// One budget per key (user, team, API key): the default.
    #[default]
    PerKey,
    /// One budget for all keys together (the provider account), decided in the same
    /// all-or-nothing decision as the per-key quotas.
    Shared,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Burst {
    Amount,
    Units(u64),
    Multiplier(f64),
}

/// One limit: `amount` of a [`Dimension`] per period, with a burst capacity.
///
/// Built with a dimension constructor and a period, then refined:
///
/// ```
/// use std::time::Duration;
/// use tollgate::{Algorithm, Quota};
///
/// let rpm = Quota::requests(10).per_minute();                    // upstash FixedWindow(10, 60) ...
/// let fixed = Quota::requests(10).per_minute().algorithm(Algorithm::FixedWindow); // ... exactly
/// let tpm = Quota::tokens(100_000).per_minute().burndown(5.0);   // input + 5 × output (Bedrock)
/// let daily = Quota::tokens(2_000_000).per(Duration::from_secs(86_400)).burst_multiplier(0.1);
/// let in_flight = Quota::concurrent(8);
/// let account = Quota::requests(3_500).per_minute().shared().named("account-rpm");
/// # let _ = (rpm, fixed, tpm, daily, in_flight, account);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Quota {
    pub(crate) dimension: Dimension,
    pub(crate) amount: u64,
    pub(crate) period: Option<Duration>,
    pub(crate) burst: Burst,
    pub(crate) algorithm: Algorithm,
    pub(crate) accounting: Option<Accounting>,
    pub(crate) scope: Scope,
    pub(crate) burndown: f64,
    pub(crate) name: Option<String>,
    pub(crate) max_wait: Option<Duration>,
}

impl Quota {
    fn new(dimension: Dimension, amount: u64) -> Quota {
        Quota {
            dimension,
            amount,
            period: None,
            burst: Burst::Amount,
            algorithm: Algorithm::Gcra,
            accounting: None,
            scope: Scope::PerKey,
            burndown: 1.0,
            name: None,
            max_wait: None,
        }
    }

    /// `amount` units of spend per period (set the period next): a budget in money, in
    /// the unit of the [`Cost::spend`] the calls carry (micro-dollars: `5_000_000` is
    /// $5). Charged the estimate at admission and corrected to [`crate::Usage::spend`]
    /// on settle.
    ///
    /// ```
    /// use tollgate::{Cost, Limiter, Quota, Usage};
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let limiter = Limiter::builder().quota(Quota::spend(5_000_000).per_day()).build()?; // $5 a day
    /// let permit = limiter.acquire("team-a", Cost::input(1_000).output(500).spend(7_500)).await?;
    /// permit.settle(Usage::new(1_000, 120).spend(3_700)).await?;   // it cost $0.0037
    /// assert_eq!(limiter.status("team-a").await?[0].remaining, 4_996_300);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub fn spend(amount: u64) -> Quota {
        Quota::new(Dimension::Spend, amount)
    }

    /// `amount` requests per period (set the period next).
    ///
    /// ```
    /// let q = tollgate::Quota::requests(500).per_minute();
    /// assert_eq!(q.amount(), 500);
    /// ```
    pub fn requests(amount: u64) -> Quota {
        Quota::new(Dimension::Requests, amount)
    }

    /// `amount` tokens per period, counting input + burndown × output.
    ///
    /// ```
    /// let q = tollgate::Quota::tokens(90_000).per_minute();
    /// # let _ = q;
    /// ```
    pub fn tokens(amount: u64) -> Quota {
        Quota::new(Dimension::Tokens, amount)
    }

    /// `amount` input (prompt) tokens per period.
    ///
    /// ```
    /// let q = tollgate::Quota::input_tokens(4_000_000).per_minute();
    /// # let _ = q;
    /// ```
    pub fn input_tokens(amount: u64) -> Quota {
        Quota::new(Dimension::InputTokens, amount)
    }

    /// `amount` output (completion) tokens per period.
    ///
    /// ```
    /// let q = tollgate::Quota::output_tokens(128_000).per_minute();
    /// # let _ = q;
    /// ```
    pub fn output_tokens(amount: u64) -> Quota {
        Quota::new(Dimension::OutputTokens, amount)
    }

    /// At most `slots` calls in flight at once. Has no period.
    ///
    /// ```
    /// let q = tollgate::Quota::concurrent(8);
    /// assert_eq!(q.amount(), 8);
    /// ```
    pub fn concurrent(slots: u64) -> Quota {
        Quota::new(Dimension::Concurrency, slots)
    }

    /// The period over which `amount` is allowed.
    ///
    /// ```
    /// let q = tollgate::Quota::requests(5).per(std::time::Duration::from_millis(1_500));
    /// assert_eq!(q.period(), Some(std::time::Duration::from_millis(1_500)));
    /// ```
    pub fn per(mut self, period: Duration) -> Quota {
        self.period = Some(period);
        self
    }

    /// Per second.
    ///
    /// ```
    /// let q = tollgate::Quota::requests(5).per_second();
    /// # let _ = q;
    /// ```
    pub fn per_second(self) -> Quota {
        self.per(Duration::from_secs(1))
    }

    /// Per minute: how providers state RPM and TPM.
    ///
    /// ```
    /// let q = tollgate::Quota::requests(5).per_minute();
    /// assert_eq!(q.period(), Some(std::time::Duration::from_secs(60)));
    /// ```
    pub fn per_minute(self) -> Quota {
        self.per(Duration::from_secs(60))
    }

    /// Per hour.
    ///
    /// ```
    /// let q = tollgate::Quota::requests(5).per_hour();
    /// # let _ = q;
    /// ```
    pub fn per_hour(self) -> Quota {
        self.per(Duration::from_secs(3_600))
    }

    /// Per day (86,400 s).
    ///
    /// ```
    /// let q = tollgate::Quota::tokens(1_000_000).per_day();
    /// # let _ = q;
    /// ```
    pub fn per_day(self) -> Quota {
        self.per(Duration::from_secs(86_400))
    }

    /// The burst capacity in units: how much may go at once from a full bucket (GCRA
    /// only). Default: `amount`, as providers allow. Must hold at least one call's cost.
    ///
    /// ```
    /// // 600 requests per minute, at most 10 back to back: paced at one per 100 ms.
    /// let q = tollgate::Quota::requests(600).per_minute().burst(10);
    /// # let _ = q;
    /// ```
    pub fn burst(mut self, units: u64) -> Quota {
        self.burst = Burst::Units(units);
        self
    }

    /// The burst capacity as a multiple of `amount` (LLMRateLimiter's
    /// `burst_multiplier`; GCRA only). `0.1` lets a tenth of the period's amount go at
    /// once, `2.0` twice the amount. Rounded down to whole units.
    ///
    /// ```
    /// let q = tollgate::Quota::tokens(100_000).per_minute().burst_multiplier(1.5);
    /// # let _ = q;
    /// ```
    pub fn burst_multiplier(mut self, multiplier: f64) -> Quota {
        self.burst = Burst::Multiplier(multiplier);
        self
    }

    /// How much output tokens weigh in a [`Dimension::Tokens`] quota: the quota counts
    /// `input + burndown × output` (AWS Bedrock: 5.0). The rate is rounded to the
    /// nearest 1/1000; the weighted output is then rounded up to a whole token.
    ///
    /// ```
    /// use tollgate::{Cost, Quota};
    /// let q = Quota::tokens(100_000).per_minute().burndown(5.0);
    /// assert_eq!(q.charge(&Cost::input(3_000).output(1_000)), 8_000);
    /// ```
    pub fn burndown(mut self, rate: f64) -> Quota {
        self.burndown = rate;
        self
    }

    /// Choose the algorithm (default [`Algorithm::Gcra`]).
    ///
    /// ```
    /// use tollgate::{Algorithm, Quota};
    /// let q = Quota::requests(10).per_minute().algorithm(Algorithm::FixedWindow);
    /// # let _ = q;
    /// ```
    pub fn algorithm(mut self, algorithm: Algorithm) -> Quota {
        self.algorithm = algorithm;
        self
    }

    /// Choose whether `settle` corrects the charge to actual usage.
    ///
    /// ```
    /// use tollgate::{Accounting, Quota};
    /// let q = Quota::tokens(10_000).per_minute().accounting(Accounting::Estimate);
    /// # let _ = q;
    /// ```
    pub fn accounting(mut self, accounting: Accounting) -> Quota {
        self.accounting = Some(accounting);
        self
    }

    /// Make this one budget shared by every key (a provider account's limit), checked in
    /// the same decision as the per-key quotas.
    ///
    /// ```
    /// let q = tollgate::Quota::tokens(2_000_000).per_minute().shared();
    /// # let _ = q;
    /// ```
    pub fn shared(mut self) -> Quota {
        self.scope = Scope::Shared;
        self
    }

    /// The longest this quota may hold a call back: a call that would wait longer for
    /// this quota's room is refused at once, naming this quota, whatever wait the caller
    /// accepts. `Duration::ZERO` makes the quota reject instead of queueing, while the
    /// call's other quotas may still make it wait: a per-user limit that answers 429 at
    /// once next to an account limit that paces everyone. Default: no limit of its own
    /// (the caller's `acquire`, `acquire_within` or `try_acquire` decides).
    ///
    /// The wait counted is the one this quota alone imposes, from the moment it is
    /// decided; with per-key and shared quotas together, a shared quota is decided once
    /// the key's own turn has come (see [`crate::Limiter::acquire`]). A concurrency
    /// quota's wait is the time until one of its slots frees.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tollgate::{Cost, Error, Limiter, Quota};
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let limiter = Limiter::builder()
    ///     .quota(Quota::requests(1).per_minute().max_wait(Duration::ZERO).named("user-rpm"))
    ///     .build()?;
    /// limiter.acquire("u", Cost::request()).await?;
    /// // The caller would wait a minute; the quota refuses at once instead.
    /// let Err(Error::Limited(r)) = limiter.acquire("u", Cost::request()).await else { panic!() };
    /// assert_eq!(r.quota().name(), "user-rpm");
    /// assert!(r.retry_after() > Some(Duration::from_secs(59)));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub fn max_wait(mut self, max_wait: Duration) -> Quota {
        self.max_wait = Some(max_wait);
        self
    }

    /// Name the quota; rejections and status reports use it. Default:
    /// `"<dimension>/<period>"` such as `"tokens/60s"`, with `"shared:"` in front for
    /// shared quotas.
    ///
    /// ```
    /// let q = tollgate::Quota::requests(10).per_minute().named("free-tier-rpm");
    /// assert_eq!(q.name(), "free-tier-rpm");
    /// ```
    pub fn named(mut self, name: impl Into<String>) -> Quota {
        self.name = Some(name.into());
        self
    }

    /// The dimension counted.
    ///
    /// ```
    /// assert_eq!(tollgate::Quota::concurrent(2).dimension(), tollgate::Dimension::Concurrency);
    /// ```
    pub fn dimension(&self) -> Dimension {
        self.dimension
    }

    /// The amount per period (slots for a concurrency quota).
    ///
    /// ```
    /// assert_eq!(tollgate::Quota::requests(7).per_second().amount(), 7);
    /// ```
    pub fn amount(&self) -> u64 {
        self.amount
    }

    /// The period, if set (a concurrency quota has none).
    ///
    /// ```
    /// assert_eq!(tollgate::Quota::concurrent(2).period(), None);
    /// ```
    pub fn period(&self) -> Option<Duration> {
        self.period
    }

    /// The algorithm.
    ///
    /// ```
    /// assert_eq!(tollgate::Quota::requests(1).per_second().get_algorithm(), tollgate::Algorithm::Gcra);
    /// ```
    pub fn get_algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The accounting mode in effect: as set, else [`Accounting::Estimate`] for requests
    /// and concurrency, [`Accounting::Actual`] for token dimensions.
    ///
    /// ```
    /// use tollgate::{Accounting, Quota};
    /// assert_eq!(Quota::tokens(1).per_second().get_accounting(), Accounting::Actual);
    /// assert_eq!(Quota::requests(1).per_second().get_accounting(), Accounting::Estimate);
    /// ```
    pub fn get_accounting(&self) -> Accounting {
        match (self.dimension, self.accounting) {
            (Dimension::Requests | Dimension::Concurrency, _) => Accounting::Estimate,
            (_, Some(a)) => a,
            (_, None) => Accounting::Actual,
        }
    }

    /// The longest this quota may hold a call back ([`Quota::max_wait`]), if set.
    ///
    /// ```
    /// use std::time::Duration;
    /// let q = tollgate::Quota::requests(1).per_second().max_wait(Duration::from_secs(2));
    /// assert_eq!(q.get_max_wait(), Some(Duration::from_secs(2)));
    /// ```
    pub fn get_max_wait(&self) -> Option<Duration> {
        self.max_wait
    }

    /// The scope.
    ///
    /// ```
    /// assert_eq!(tollgate::Quota::requests(1).per_second().get_scope(), tollgate::Scope::PerKey);
    /// ```
    pub fn get_scope(&self) -> Scope {
        self.scope
    }

    /// The quota's name (given, or derived from dimension, period and scope).
    ///
    /// ```
    /// assert_eq!(tollgate::Quota::tokens(5).per_minute().name(), "tokens/60s");
    /// assert_eq!(tollgate::Quota::requests(5).per_second().shared().name(), "shared:requests/1s");
    /// ```
    pub fn name(&self) -> String {
        if let Some(name) = &self.name {
            return name.clone();
        }
        let scope = match self.scope {
            Scope::Shared => "shared:",
            Scope::PerKey => "",
        };
        match self.period {
            Some(p) => format!("{scope}{}/{}", self.dimension, format_period(p)),
            None => format!("{scope}{}", self.dimension),
        }
    }

    /// How many units of this quota's dimension `cost` takes. Saturates at `u64::MAX`
    /// (which no quota can hold, so an absurd cost is rejected as too large).
    ///
    /// ```
    /// use tollgate::{Cost, Quota};
    /// let cost = Cost::input(3_000).output(2_000);
    /// assert_eq!(Quota::requests(10).per_minute().charge(&cost), 1);
    /// assert_eq!(Quota::tokens(100_000).per_minute().charge(&cost), 5_000);
    /// assert_eq!(Quota::output_tokens(100_000).per_minute().charge(&cost), 2_000);
    /// ```
    pub fn charge(&self, cost: &Cost) -> u64 {
        charge(self.dimension, burndown_milli(self.burndown), cost)
    }
}

/// Burndown in thousandths (5.0 → 5000). Invalid values are caught by validation; this
/// clamps so it never panics.
pub(crate) fn burndown_milli(rate: f64) -> u64 {
    if rate.is_finite() && rate > 0.0 {
        (rate * 1000.0).round().min(u64::MAX as f64) as u64
    } else {
        0
    }
}

/// Units of `dimension` taken by `cost`.
#[inline]
pub(crate) fn charge(dimension: Dimension, burndown_milli: u64, cost: &Cost) -> u64 {
    match dimension {
        Dimension::Requests => cost.requests,
        Dimension::InputTokens => cost.input,
        Dimension::OutputTokens => cost.output,
        Dimension::Concurrency => 1,
        Dimension::Spend => cost.spend,
        Dimension::Tokens => {
            let weighted = if burndown_milli == 1000 {
                u128::from(cost.output)
            } else {
                (u128::from(cost.output) * u128::from(burndown_milli)).div_ceil(1000)
            };
            let total = u128::from(cost.input) + weighted;
            u64::try_from(total).unwrap_or(u64::MAX)
        }
    }
}

fn format_period(p: Duration) -> String {
    let nanos = p.as_nanos();
    if nanos.is_multiple_of(1_000_000_000) {
        format!("{}s", p.as_secs())
    } else if nanos.is_multiple_of(1_000_000) {
        format!("{}ms", nanos / 1_000_000)
    } else {
        format!("{nanos}ns")
    }
}

/// A quota that cannot be built, naming which one and why.
///
/// ```
/// use tollgate::{ConfigError, Limiter, Quota};
/// let err = Limiter::builder().quota(Quota::requests(0).per_minute()).build().unwrap_err();
/// assert!(matches!(err, ConfigError::ZeroAmount { .. }));
/// assert!(err.to_string().contains("requests/60s"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The limiter has no quota at all.
    #[error("the limiter has no quota: add at least one with .quota(...)")]
    NoQuotas,
    /// An amount of zero would admit nothing, ever.
    #[error("quota `{quota}`: the amount is 0; a quota must allow at least 1 unit")]
    ZeroAmount {
        /// The quota's name.
        quota: String,
    },
    /// A rate quota needs a period.
    #[error(
        "quota `{quota}`: no period; add .per_second(), .per_minute(), .per_hour(), .per_day() or .per(duration)"
    )]
    MissingPeriod {
        /// The quota's name.
        quota: String,
    },
    /// The period is zero or too long to count in nanoseconds as a `u64` (~584 years).
    #[error("quota `{quota}`: the period must be between 1 ns and 584 years, got {period:?}")]
    BadPeriod {
        /// The quota's name.
        quota: String,
        /// The period given.
        period: Duration,
    },
    /// A concurrency quota was given a period, burst or algorithm, which it cannot use.
    #[error("quota `{quota}`: a concurrency quota takes only a slot count; {what} does not apply")]
    NotForConcurrency {
        /// The quota's name.
        quota: String,
        /// The setting that does not apply.
        what: &'static str,
    },
    /// The burst is below one unit, or not a finite positive multiple.
    #[error("quota `{quota}`: the burst must be at least 1 unit; {detail}")]
    BadBurst {
        /// The quota's name.
        quota: String,
        /// What was wrong.
        detail: String,
    },
    /// Window algorithms have no burst separate from their amount.
    #[error(
        "quota `{quota}`: {algorithm:?} has no burst setting; its amount is its burst (use Algorithm::Gcra for a separate burst)"
    )]
    BurstNotSupported {
        /// The quota's name.
        quota: String,
        /// The algorithm chosen.
        algorithm: Algorithm,
    },
    /// The burndown multiplier is negative, not finite or above 1,000,000.
    #[error("quota `{quota}`: burndown must be a finite number from 0 to 1000000, got {rate}")]
    BadBurndown {
        /// The quota's name.
        quota: String,
        /// The rate given.
        rate: String,
    },
    /// Burndown only applies to the combined [`Dimension::Tokens`].
    #[error("quota `{quota}`: burndown only applies to Quota::tokens, not to {dimension}")]
    BurndownNotForDimension {
        /// The quota's name.
        quota: String,
        /// The quota's dimension.
        dimension: Dimension,
    },
    /// Two concurrency quotas in one scope (per key, or shared): one is all it takes.
    #[error("quota `{quota}`: a limiter takes one concurrency quota per key and one shared")]
    TwoConcurrencyQuotas {
        /// The second quota's name.
        quota: String,
    },
    /// Two quotas share a name, so a rejection could not say which one refused.
    #[error("two quotas are named `{quota}`; name them apart with .named(...)")]
    DuplicateName {
        /// The name used twice.
        quota: String,
    },
    /// More rate quotas than one limiter decides at once.
    #[error("a limiter holds at most {max} rate quotas {what} (per key and shared together)")]
    TooManyQuotas {
        /// The most allowed.
        max: usize,
        /// Which quotas ("in all").
        what: &'static str,
    },
    /// The numbers overflow the limiter's arithmetic.
    #[error("quota `{quota}`: amount × period is too large to count exactly ({detail})")]
    Overflow {
        /// The quota's name.
        quota: String,
        /// What overflowed.
        detail: String,
    },
    /// A setting of the shared store (Redis) is invalid: the URL, the key prefix, or a
    /// quota the store cannot count exactly.
    #[error("Redis store: {detail}")]
    Store {
        /// What is wrong and how to fix it.
        detail: String,
    },
    /// [`crate::LimiterBuilder::share_with`] was given a limiter whose shared quotas,
    /// store or clock do not match.
    #[error("share_with: {detail}")]
    ShareMismatch {
        /// What differs and how to fix it.
        detail: String,
    },
    /// The fail-open share is not in `(0, 1]`.
    #[error("the fail-open share must be a number in (0, 1], got {share}")]
    BadShare {
        /// The share given.
        share: String,
    },
}

/// A quota after validation: resolved burst, period in nanoseconds, name.
#[derive(Debug, Clone)]
pub(crate) struct Checked {
    pub(crate) quota: Quota,
    pub(crate) name: std::sync::Arc<str>,
    pub(crate) period_ns: u64,
    pub(crate) capacity: u64,
    pub(crate) burndown_milli: u64,
    pub(crate) accounting: Accounting,
}

impl Quota {
    pub(crate) fn check(&self) -> Result<Checked, ConfigError> {
        let name = self.name();
        let quota = || name.clone();
        if self.amount == 0 {
            return Err(ConfigError::ZeroAmount { quota: quota() });
        }
        let burndown_milli = burndown_milli(self.burndown);
        if !(self.burndown.is_finite() && (0.0..=1_000_000.0).contains(&self.burndown)) {
            return Err(ConfigError::BadBurndown {
                quota: quota(),
                rate: self.burndown.to_string(),
            });
        }
        if self.burndown != 1.0 && self.dimension != Dimension::Tokens {
            return Err(ConfigError::BurndownNotForDimension {
                quota: quota(),
                dimension: self.dimension,
            });
        }
        if self.dimension == Dimension::Concurrency {
            let what = if self.period.is_some() {
                Some("a period")
            } else if self.burst != Burst::Amount {
                Some("a burst")
            } else if self.algorithm != Algorithm::Gcra {
                Some("an algorithm")
            } else {
                None
            };
            if let Some(what) = what {
                return Err(ConfigError::NotForConcurrency {
                    quota: quota(),
                    what,
                });
            }
            return Ok(Checked {
                quota: self.clone(),
                name: name.as_str().into(),
                period_ns: 0,
                capacity: self.amount,
                burndown_milli,
                accounting: Accounting::Estimate,
            });
        }
        let period = self
            .period
            .ok_or_else(|| ConfigError::MissingPeriod { quota: quota() })?;
        let period_ns = u64::try_from(period.as_nanos()).unwrap_or(0);
        if period_ns == 0 {
            return Err(ConfigError::BadPeriod {
                quota: quota(),
                period,
            });
        }
        let capacity = match (self.burst, self.algorithm) {
            (Burst::Amount, _) => self.amount,
            (_, Algorithm::FixedWindow | Algorithm::SlidingWindow) => {
                return Err(ConfigError::BurstNotSupported {
                    quota: quota(),
                    algorithm: self.algorithm,
                });
            }
            (Burst::Units(0), _) => {
                return Err(ConfigError::BadBurst {
                    quota: quota(),
                    detail: "got 0".into(),
                });
            }
            (Burst::Units(n), _) => n,
            (Burst::Multiplier(m), _) => {
                let units = self.amount as f64 * m;
                if !(m.is_finite() && m > 0.0 && units >= 1.0) {
                    return Err(ConfigError::BadBurst {
                        quota: quota(),
                        detail: format!("burst_multiplier {m} × amount {} < 1", self.amount),
                    });
                }
                if units >= u64::MAX as f64 {
                    return Err(ConfigError::Overflow {
                        quota: quota(),
                        detail: format!("burst_multiplier {m} × amount {}", self.amount),
                    });
                }
                units as u64
            }
        };
        // The GCRA keeps time scaled by `amount` in a u128: now (< 2^64 ns) × amount
        // plus capacity × period must fit with room for sums.
        let scaled_capacity = u128::from(capacity) * u128::from(period_ns);
        if scaled_capacity > 1u128 << 126 {
            return Err(ConfigError::Overflow {
                quota: quota(),
                detail: format!("burst {capacity} × period {period_ns} ns"),
            });
        }
        Ok(Checked {
            quota: self.clone(),
            name: name.as_str().into(),
            period_ns,
            capacity,
            burndown_milli,
            accounting: self.get_accounting(),
        })
    }
}
