//! Provider rate-limit headers: one typed view of what OpenAI, Anthropic and
//! Azure OpenAI say about the caller's remaining budget.
//!
//! [`parse`] reads a response's [`http::HeaderMap`] and returns a
//! [`RateLimitHeaders`]: a request budget, a token budget, Anthropic's
//! separate input and output token budgets, and the server's `Retry-After`
//! wait. Every reset time comes back as a [`Duration`] from the `now` the
//! caller passes in, so the whole module is a pure function of its arguments.
//!
//! | family | headers read |
//! | --- | --- |
//! | OpenAI, Azure OpenAI | `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`; resets are Go-style durations (`6m0s`, `1.5s`, `20ms`), see [`parse_duration`] |
//! | Anthropic | `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining,reset}`; resets are RFC 3339 timestamps (`2024-08-21T19:31:05Z`) |
//! | all | `retry-after-ms` (milliseconds, possibly fractional), then `retry-after` (seconds, possibly fractional, or an HTTP-date) |
//!
//! # What this module never does
//!
//! * **No I/O** and no clock reads: the current time is an argument.
//! * **Never panics on hostile header values.** Values that are not UTF-8,
//!   negative, fractional where an integer is expected, overflowing, absurdly
//!   long or plain garbage are ignored, as if the header were absent, and a
//!   `tracing` `debug` event names the header (with a short, escaped preview of
//!   the value).
//! * **Never returns a wait longer than [`MAX_WAIT`].** Every reset and
//!   `Retry-After` value above it (e.g. `retry-after: 99999999999`) is clamped
//!   to it, so callers can add any returned duration to an `Instant` without
//!   overflow. A value too large to be a [`Duration`] at all is malformed and
//!   ignored.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderMap;

/// The longest wait [`parse`] ever reports, seven days.
///
/// Resets and `Retry-After` values above it are clamped to it: no provider
/// asks for more than a day, and a bounded value can be added to an
/// [`std::time::Instant`] without overflowing.
///
/// # Example
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use http::HeaderMap;
/// use tollgate::provider::{parse, MAX_WAIT};
///
/// let mut headers = HeaderMap::new();
/// headers.insert("retry-after", "99999999999".parse().unwrap());
/// let parsed = parse(&headers, SystemTime::UNIX_EPOCH);
/// assert_eq!(parsed.retry_after, Some(MAX_WAIT));
/// assert_eq!(MAX_WAIT, Duration::from_secs(7 * 24 * 3600));
/// ```
pub const MAX_WAIT: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// Which provider's header family a response carries.
///
/// Detected by [`Provider::detect`] from header names alone, in this order:
/// any `anthropic-*` header means [`Provider::Anthropic`]; else any Azure
/// marker (`apim-request-id`, `azureml-model-session`, or an `x-ms-*` header)
/// means [`Provider::Azure`]; else any `x-ratelimit-*`, `openai-*` or
/// `retry-after-ms` header means [`Provider::OpenAi`]; else
/// [`Provider::Unknown`].
///
/// # Example
///
/// ```
/// use http::HeaderMap;
/// use tollgate::provider::Provider;
///
/// let mut headers = HeaderMap::new();
/// assert_eq!(Provider::detect(&headers), Provider::Unknown);
/// headers.insert("x-ratelimit-remaining-requests", "59".parse().unwrap());
/// assert_eq!(Provider::detect(&headers), Provider::OpenAi);
/// headers.insert("x-ms-region", "East US".parse().unwrap());
/// assert_eq!(Provider::detect(&headers), Provider::Azure);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Provider {
    /// OpenAI's API (`x-ratelimit-*`, `openai-*` headers).
    OpenAi,
    /// Anthropic's API (`anthropic-ratelimit-*` headers).
    Anthropic,
    /// Azure OpenAI (OpenAI-style headers plus Azure markers such as
    /// `apim-request-id` or `x-ms-region`).
    Azure,
    /// No known header family was found.
    #[default]
    Unknown,
}

impl Provider {
    /// Detects the provider from the header names present (values are not
    /// read); see [`Provider`] for the rules.
    ///
    /// # Example
    ///
    /// ```
    /// use http::HeaderMap;
    /// use tollgate::provider::Provider;
    ///
    /// let mut headers = HeaderMap::new();
    /// headers.insert("anthropic-ratelimit-requests-remaining", "49".parse().unwrap());
    /// assert_eq!(Provider::detect(&headers), Provider::Anthropic);
    /// ```
    pub fn detect(headers: &HeaderMap) -> Provider {
        let (mut anthropic, mut azure, mut openai) = (false, false, false);
        for name in headers.keys() {
            let name = name.as_str();
            anthropic |= name.starts_with("anthropic-");
            azure |= name == "apim-request-id"
                || name == "azureml-model-session"
                || name.starts_with("x-ms-");
            openai |= name.starts_with("x-ratelimit-")
                || name.starts_with("openai-")
                || name == "retry-after-ms";
        }
        if anthropic {
            Provider::Anthropic
        } else if azure {
            Provider::Azure
        } else if openai {
            Provider::OpenAi
        } else {
            Provider::Unknown
        }
    }
}

/// One rate-limit budget (requests, or tokens of some kind) as the provider
/// reported it. Each field is `None` when its header was absent or malformed.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use tollgate::provider::Budget;
///
/// let budget = Budget {
///     limit: Some(60),
///     remaining: Some(0),
///     reset: Some(Duration::from_secs(1)),
/// };
/// assert!(budget.is_exhausted());
/// assert!(!budget.is_empty());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Budget {
    /// The most the window allows (`*-limit-*`).
    pub limit: Option<u64>,
    /// What is left in the current window (`*-remaining-*`).
    pub remaining: Option<u64>,
    /// How long from `now` until the budget is fully replenished
    /// (`*-reset-*`), at most [`MAX_WAIT`]; zero if that time has passed.
    pub reset: Option<Duration>,
}

impl Budget {
    /// True when no field is known.
    ///
    /// # Example
    ///
    /// ```
    /// use tollgate::provider::Budget;
    ///
    /// assert!(Budget::default().is_empty());
    /// assert!(!Budget { limit: Some(10), ..Budget::default() }.is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.limit.is_none() && self.remaining.is_none() && self.reset.is_none()
    }

    /// True when the provider said nothing is left (`remaining == 0`).
    ///
    /// # Example
    ///
    /// ```
    /// use tollgate::provider::Budget;
    ///
    /// assert!(Budget { remaining: Some(0), ..Budget::default() }.is_exhausted());
    /// assert!(!Budget { remaining: Some(3), ..Budget::default() }.is_exhausted());
    /// assert!(!Budget::default().is_exhausted());
    /// ```
    pub fn is_exhausted(&self) -> bool {
        self.remaining == Some(0)
    }

    /// Field-wise `self.x.or(other.x)`.
    fn or(self, other: Budget) -> Budget {
        Budget {
            limit: self.limit.or(other.limit),
            remaining: self.remaining.or(other.remaining),
            reset: self.reset.or(other.reset),
        }
    }

    /// `Some(self)` unless every field is `None`.
    fn non_empty(self) -> Option<Budget> {
        (!self.is_empty()).then_some(self)
    }
}

/// Everything a response's headers said about rate limits.
///
/// Build it with [`parse`] (or [`RateLimitHeaders::parse`]). A budget is
/// `Some` when at least one of its headers parsed.
///
/// When a response carries both OpenAI-style and Anthropic-style headers
/// for the same budget, the detected [`Provider`]'s family wins field by
/// field and the other family fills the gaps.
///
/// # Example
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use http::HeaderMap;
/// use tollgate::provider::{Provider, RateLimitHeaders};
///
/// let mut headers = HeaderMap::new();
/// headers.insert("x-ratelimit-limit-requests", "60".parse().unwrap());
/// headers.insert("x-ratelimit-remaining-requests", "0".parse().unwrap());
/// headers.insert("x-ratelimit-reset-requests", "1s".parse().unwrap());
///
/// let parsed = RateLimitHeaders::parse(&headers, SystemTime::now());
/// assert_eq!(parsed.provider, Provider::OpenAi);
/// let requests = parsed.requests.unwrap();
/// assert_eq!(requests.limit, Some(60));
/// assert_eq!(parsed.wait_hint(), Some(Duration::from_secs(1)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub struct RateLimitHeaders {
    /// The header family detected, see [`Provider::detect`].
    pub provider: Provider,
    /// Request budget (`x-ratelimit-*-requests`,
    /// `anthropic-ratelimit-requests-*`).
    pub requests: Option<Budget>,
    /// Token budget (`x-ratelimit-*-tokens`, `anthropic-ratelimit-tokens-*`).
    pub tokens: Option<Budget>,
    /// Anthropic's input-token budget (`anthropic-ratelimit-input-tokens-*`).
    pub input_tokens: Option<Budget>,
    /// Anthropic's output-token budget (`anthropic-ratelimit-output-tokens-*`).
    pub output_tokens: Option<Budget>,
    /// How long the server asked the client to wait (`retry-after-ms`, else
    /// `retry-after`), at most [`MAX_WAIT`]; zero for an HTTP-date in the past.
    pub retry_after: Option<Duration>,
}

impl RateLimitHeaders {
    /// Same as the free function [`parse`].
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use http::HeaderMap;
    /// use tollgate::provider::RateLimitHeaders;
    ///
    /// let mut headers = HeaderMap::new();
    /// headers.insert("retry-after", "2".parse().unwrap());
    /// let parsed = RateLimitHeaders::parse(&headers, SystemTime::now());
    /// assert_eq!(parsed.retry_after, Some(Duration::from_secs(2)));
    /// ```
    pub fn parse(headers: &HeaderMap, now: SystemTime) -> RateLimitHeaders {
        parse(headers, now)
    }

    /// True when no budget and no `Retry-After` was found (the detected
    /// provider does not count).
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::SystemTime;
    /// use http::HeaderMap;
    /// use tollgate::provider::parse;
    ///
    /// let mut headers = HeaderMap::new();
    /// headers.insert("openai-version", "2020-10-01".parse().unwrap());
    /// assert!(parse(&headers, SystemTime::now()).is_empty());
    /// headers.insert("retry-after-ms", "20".parse().unwrap());
    /// assert!(!parse(&headers, SystemTime::now()).is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.budgets().next().is_none() && self.retry_after.is_none()
    }

    /// The budgets that were reported, in the order requests, tokens, input
    /// tokens, output tokens.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::SystemTime;
    /// use http::HeaderMap;
    /// use tollgate::provider::parse;
    ///
    /// let mut headers = HeaderMap::new();
    /// headers.insert("x-ratelimit-remaining-tokens", "0".parse().unwrap());
    /// let parsed = parse(&headers, SystemTime::now());
    /// assert_eq!(parsed.budgets().filter(|b| b.is_exhausted()).count(), 1);
    /// ```
    pub fn budgets(&self) -> impl Iterator<Item = &Budget> {
        [
            &self.requests,
            &self.tokens,
            &self.input_tokens,
            &self.output_tokens,
        ]
        .into_iter()
        .flatten()
    }

    /// How long to wait before the next request: `retry_after` when present,
    /// else the longest `reset` among exhausted budgets (`remaining == 0`),
    /// else `None` (no reason to wait, or nothing known).
    ///
    /// An exhausted budget with no reset contributes nothing.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use http::HeaderMap;
    /// use tollgate::provider::parse;
    ///
    /// let mut headers = HeaderMap::new();
    /// headers.insert("x-ratelimit-remaining-requests", "0".parse().unwrap());
    /// headers.insert("x-ratelimit-reset-requests", "120ms".parse().unwrap());
    /// headers.insert("x-ratelimit-remaining-tokens", "0".parse().unwrap());
    /// headers.insert("x-ratelimit-reset-tokens", "6m0s".parse().unwrap());
    /// let now = SystemTime::now();
    /// assert_eq!(parse(&headers, now).wait_hint(), Some(Duration::from_secs(360)));
    ///
    /// headers.insert("retry-after", "3".parse().unwrap());
    /// assert_eq!(parse(&headers, now).wait_hint(), Some(Duration::from_secs(3)));
    /// ```
    pub fn wait_hint(&self) -> Option<Duration> {
        self.retry_after.or_else(|| {
            self.budgets()
                .filter(|b| b.is_exhausted())
                .filter_map(|b| b.reset)
                .max()
        })
    }
}

/// Parses every rate-limit header this module knows into one view.
///
/// All families' headers are read when present, whatever
/// [`Provider::detect`] says; `now` converts absolute times (Anthropic's
/// RFC 3339 resets, `Retry-After` HTTP-dates) into durations. Malformed
/// values are ignored (see the [module docs](self)); this never panics.
///
/// # Example
///
/// Anthropic's headers, half a minute before the reset:
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use http::HeaderMap;
/// use tollgate::provider::{parse, Provider};
///
/// let mut headers = HeaderMap::new();
/// headers.insert("anthropic-ratelimit-requests-limit", "50".parse().unwrap());
/// headers.insert("anthropic-ratelimit-requests-remaining", "49".parse().unwrap());
/// headers.insert(
///     "anthropic-ratelimit-requests-reset",
///     "2024-08-21T19:31:05Z".parse().unwrap(),
/// );
/// // 2024-08-21T19:30:35Z
/// let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_724_268_635);
///
/// let parsed = parse(&headers, now);
/// assert_eq!(parsed.provider, Provider::Anthropic);
/// let requests = parsed.requests.unwrap();
/// assert_eq!(requests.remaining, Some(49));
/// assert_eq!(requests.reset, Some(Duration::from_secs(30)));
/// ```
pub fn parse(headers: &HeaderMap, now: SystemTime) -> RateLimitHeaders {
    let provider = Provider::detect(headers);
    let openai = |[limit, remaining, reset]: [&str; 3]| Budget {
        limit: header(headers, limit, parse_u64),
        remaining: header(headers, remaining, parse_u64),
        reset: header(headers, reset, parse_duration).map(clamp_wait),
    };
    let anthropic = |[limit, remaining, reset]: [&str; 3]| Budget {
        limit: header(headers, limit, parse_u64),
        remaining: header(headers, remaining, parse_u64),
        reset: header(headers, reset, |s| {
            parse_rfc3339(s).map(|at| until(at, now))
        }),
    };
    let merge = |openai: Budget, anthropic: Budget| {
        if provider == Provider::Anthropic {
            anthropic.or(openai)
        } else {
            openai.or(anthropic)
        }
    };

    let retry_after = header(headers, "retry-after-ms", parse_millis)
        .or_else(|| {
            header(headers, "retry-after", |s| {
                parse_duration(s)
                    .or_else(|| httpdate::parse_http_date(s).ok().map(|at| until(at, now)))
            })
        })
        .map(clamp_wait);

    RateLimitHeaders {
        provider,
        requests: merge(openai(OPENAI_REQUESTS), anthropic(ANTHROPIC_REQUESTS)).non_empty(),
        tokens: merge(openai(OPENAI_TOKENS), anthropic(ANTHROPIC_TOKENS)).non_empty(),
        input_tokens: anthropic(ANTHROPIC_INPUT_TOKENS).non_empty(),
        output_tokens: anthropic(ANTHROPIC_OUTPUT_TOKENS).non_empty(),
        retry_after,
    }
}

/// Parses a Go-style duration (the format of OpenAI's `x-ratelimit-reset-*`
/// headers), liberally.
///
/// Accepted: a sequence of `<number><unit>` parts such as `6m0s`, `1h2m3s`,
/// `1.5s`, `120ms`, `500us`, `500µs`, `2d`, where a number is decimal with an
/// optional fraction (`1.5`, `.5`, `1.`) and the units are `ns`, `us`/`µs`/`μs`,
/// `ms`, `s`, `m`, `h` and `d` (24 h); ASCII whitespace around and between
/// parts; a leading `+`; and a lone unit-less number, read as seconds (`60`,
/// `0.25`).
///
/// Rejected (`None`): the empty string, negative values, a number without a
/// unit in a multi-part value (`1m30`), unknown units, and anything whose
/// total does not fit in a [`Duration`]. Fractions finer than a nanosecond
/// are truncated. No upper bound other than [`Duration::MAX`] is applied here
/// ([`parse`] clamps to [`MAX_WAIT`]). Never panics.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use tollgate::provider::parse_duration;
///
/// assert_eq!(parse_duration("6m0s"), Some(Duration::from_secs(360)));
/// assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
/// assert_eq!(parse_duration("20ms"), Some(Duration::from_millis(20)));
/// assert_eq!(parse_duration("500µs"), Some(Duration::from_micros(500)));
/// assert_eq!(parse_duration("60"), Some(Duration::from_secs(60)));
/// assert_eq!(parse_duration("-1s"), None);
/// assert_eq!(parse_duration("9999999999999999999999h"), None);
/// ```
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim_ascii();
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    if rest.is_empty() {
        return None;
    }
    let mut total: u128 = 0;
    let mut first = true;
    while !rest.is_empty() {
        let (number, after) = Decimal::parse(rest)?;
        let after = after.trim_ascii_start();
        let (unit_nanos, after) = match unit(after) {
            Some(found) => found,
            // A bare number is seconds, but only as the whole value.
            None if first && after.is_empty() => (NANOS_PER_SEC, after),
            None => return None,
        };
        total = total.checked_add(number.times(unit_nanos)?)?;
        rest = after.trim_ascii_start();
        first = false;
    }
    nanos_to_duration(total)
}

/// A duration the way OpenAI writes its resets (`6m0s`, `1.5s`, `120ms`), rounded up to
/// the millisecond: what [`parse_duration`] reads back.
///
/// ```
/// use std::time::Duration;
/// use tollgate::provider::{format_duration, parse_duration};
///
/// assert_eq!(format_duration(Duration::from_secs(360)), "6m0s");
/// assert_eq!(format_duration(Duration::from_millis(1500)), "1.5s");
/// assert_eq!(format_duration(Duration::from_micros(1)), "1ms");
/// assert_eq!(format_duration(Duration::from_secs(3_725)), "1h2m5s");
/// let d = Duration::from_millis(61_250);
/// assert_eq!(parse_duration(&format_duration(d)), Some(d));
/// ```
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_nanos().div_ceil(1_000_000);
    if ms < 1_000 {
        return format!("{ms}ms");
    }
    let (h, rest) = (ms / 3_600_000, ms % 3_600_000);
    let (m, rest) = (rest / 60_000, rest % 60_000);
    let secs = if rest % 1_000 == 0 {
        format!("{}s", rest / 1_000)
    } else {
        let s = format!("{}.{:03}", rest / 1_000, rest % 1_000);
        format!("{}s", s.trim_end_matches('0'))
    };
    match (h, m) {
        (0, 0) => secs,
        (0, m) => format!("{m}m{secs}"),
        (h, m) => format!("{h}h{m}m{secs}"),
    }
}

// Header names as [limit, remaining, reset].
const OPENAI_REQUESTS: [&str; 3] = [
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
];
const OPENAI_TOKENS: [&str; 3] = [
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
];
const ANTHROPIC_REQUESTS: [&str; 3] = [
    "anthropic-ratelimit-requests-limit",
    "anthropic-ratelimit-requests-remaining",
    "anthropic-ratelimit-requests-reset",
];
const ANTHROPIC_TOKENS: [&str; 3] = [
    "anthropic-ratelimit-tokens-limit",
    "anthropic-ratelimit-tokens-remaining",
    "anthropic-ratelimit-tokens-reset",
];
const ANTHROPIC_INPUT_TOKENS: [&str; 3] = [
    "anthropic-ratelimit-input-tokens-limit",
    "anthropic-ratelimit-input-tokens-remaining",
    "anthropic-ratelimit-input-tokens-reset",
];
const ANTHROPIC_OUTPUT_TOKENS: [&str; 3] = [
    "anthropic-ratelimit-output-tokens-limit",
    "anthropic-ratelimit-output-tokens-remaining",
    "anthropic-ratelimit-output-tokens-reset",
];

const NANOS_PER_MICRO: u128 = 1_000;
const NANOS_PER_MILLI: u128 = 1_000_000;
const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Splits a unit off the front of `s`: its length in nanoseconds and the rest.
fn unit(s: &str) -> Option<(u128, &str)> {
    // Longest first: "ms" before "m".
    const UNITS: [(&str, u128); 9] = [
        ("ns", 1),
        ("us", NANOS_PER_MICRO),
        ("\u{b5}s", NANOS_PER_MICRO),  // MICRO SIGN
        ("\u{3bc}s", NANOS_PER_MICRO), // GREEK SMALL LETTER MU
        ("ms", NANOS_PER_MILLI),
        ("s", NANOS_PER_SEC),
        ("m", 60 * NANOS_PER_SEC),
        ("h", 3_600 * NANOS_PER_SEC),
        ("d", 86_400 * NANOS_PER_SEC),
    ];
    UNITS
        .iter()
        .find_map(|&(name, nanos)| s.strip_prefix(name).map(|rest| (nanos, rest)))
}

/// A non-negative decimal number: integer part plus a fraction `frac / scale`.
#[derive(Debug, Clone, Copy)]
struct Decimal {
    int: u128,
    frac: u128,
    scale: u128,
}

impl Decimal {
    /// Fraction digits kept; later ones are below a nanosecond for every unit
    /// and are dropped.
    const MAX_FRACTION_DIGITS: u32 = 18;

    /// Parses `digits[.digits]` (at least one digit overall) off the front of
    /// `s`, returning the number and the rest. `None` on overflow.
    fn parse(s: &str) -> Option<(Decimal, &str)> {
        let bytes = s.as_bytes();
        let mut i = 0;
        let mut int: u128 = 0;
        while let Some(d) = bytes.get(i).filter(|b| b.is_ascii_digit()) {
            int = int.checked_mul(10)?.checked_add(u128::from(d - b'0'))?;
            i += 1;
        }
        let mut digits = i;
        let (mut frac, mut scale) = (0u128, 1u128);
        if bytes.get(i) == Some(&b'.') {
            i += 1;
            let mut kept = 0;
            while let Some(d) = bytes.get(i).filter(|b| b.is_ascii_digit()) {
                if kept < Self::MAX_FRACTION_DIGITS {
                    frac = frac * 10 + u128::from(d - b'0');
                    scale *= 10;
                    kept += 1;
                }
                i += 1;
                digits += 1;
            }
        }
        // Everything up to `i` is ASCII, so `i` is a char boundary.
        (digits > 0).then(|| (Decimal { int, frac, scale }, &s[i..]))
    }

    /// The number times `unit` nanoseconds, truncated; `None` on overflow.
    fn times(self, unit: u128) -> Option<u128> {
        // frac < scale <= 10^18 and unit <= 8.64e13, so this cannot overflow.
        let fraction = self.frac * unit / self.scale;
        self.int.checked_mul(unit)?.checked_add(fraction)
    }
}

fn nanos_to_duration(nanos: u128) -> Option<Duration> {
    let secs = u64::try_from(nanos / NANOS_PER_SEC).ok()?;
    // The remainder is below 10^9, so it fits.
    let subsec = u32::try_from(nanos % NANOS_PER_SEC).ok()?;
    Some(Duration::new(secs, subsec))
}

/// `retry-after-ms`: a non-negative decimal number of milliseconds.
fn parse_millis(s: &str) -> Option<Duration> {
    let (number, rest) = Decimal::parse(s)?;
    if !rest.is_empty() {
        return None;
    }
    nanos_to_duration(number.times(NANOS_PER_MILLI)?)
}

fn parse_u64(s: &str) -> Option<u64> {
    s.parse().ok()
}

fn clamp_wait(d: Duration) -> Duration {
    d.min(MAX_WAIT)
}

/// Time from `now` until `at`, zero if `at` has passed, at most [`MAX_WAIT`].
fn until(at: SystemTime, now: SystemTime) -> Duration {
    clamp_wait(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Reads header `name` with `parse`, trimming ASCII whitespace first. Absent
/// gives `None` silently; malformed gives `None` and a debug event.
fn header<T>(headers: &HeaderMap, name: &str, parse: impl FnOnce(&str) -> Option<T>) -> Option<T> {
    let value = headers.get(name)?;
    let bytes = value.as_bytes();
    let parsed = std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| parse(s.trim_ascii()));
    if parsed.is_none() {
        tracing::debug!(
            header = name,
            value = ?preview(bytes),
            len = bytes.len(),
            "ignoring malformed rate-limit header"
        );
    }
    parsed
}

/// The start of a header value for logs: at most 64 bytes, lossily decoded
/// (logged with `Debug`, so control characters come out escaped).
fn preview(bytes: &[u8]) -> String {
    const MAX: usize = 64;
    let mut shown = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX)]).into_owned();
    if bytes.len() > MAX {
        shown.push('…');
    }
    shown
}

/// Parses an RFC 3339 timestamp: `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`.
/// Also accepts `t` or a space for `T`, `z` for `Z`, an offset without its
/// colon, and leap second `:60`. Fractions finer than a nanosecond are
/// truncated.
fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    let num = |at: usize, len: usize| -> Option<u32> {
        let digits = b.get(at..at + len)?;
        digits.iter().try_fold(0u32, |acc, &d| {
            d.is_ascii_digit().then(|| acc * 10 + u32::from(d - b'0'))
        })
    };
    let sep = |at: usize, allowed: &[u8]| b.get(at).is_some_and(|c| allowed.contains(c));

    let year = num(0, 4)?;
    let month = num(5, 2)?;
    let day = num(8, 2)?;
    let hour = num(11, 2)?;
    let minute = num(14, 2)?;
    let second = num(17, 2)?;
    let separators_ok =
        sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt ") && sep(13, b":") && sep(16, b":");
    if !separators_ok
        || !(1..=12).contains(&month)
        || day == 0
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }

    let mut i = 19;
    let mut nanos: u32 = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while let Some(d) = b.get(i).filter(|d| d.is_ascii_digit()) {
            if i - start < 9 {
                nanos = nanos * 10 + u32::from(d - b'0');
            }
            i += 1;
        }
        let kept = (i - start).min(9);
        if kept == 0 {
            return None;
        }
        nanos *= 10u32.pow(9 - kept as u32);
    }

    let offset_secs: i64 = match b.get(i) {
        Some(b'Z' | b'z') => {
            i += 1;
            0
        }
        Some(&sign @ (b'+' | b'-')) => {
            let hours = num(i + 1, 2)?;
            let colon = usize::from(sep(i + 3, b":"));
            let minutes = num(i + 3 + colon, 2)?;
            if hours > 23 || minutes > 59 {
                return None;
            }
            i += 5 + colon;
            let magnitude = i64::from(hours * 3600 + minutes * 60);
            if sign == b'-' { -magnitude } else { magnitude }
        }
        _ => return None,
    };
    if i != b.len() {
        return None;
    }

    let days = days_from_civil(i64::from(year), month, day);
    let secs = days * 86_400 + i64::from(hour * 3600 + minute * 60 + second) - offset_secs;
    let whole = if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(secs.unsigned_abs()))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))
    };
    whole?.checked_add(Duration::from_nanos(u64::from(nanos)))
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400)) => {
            29
        }
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`). `month` is 1..=12 and `day` 1..=31.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let month_from_march = i64::from((month + 9) % 12);
    let day_of_year = (153 * month_from_march + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for &(name, value) in pairs {
            map.append(name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn at(unix: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(unix)
    }

    const MS: fn(u64) -> Duration = Duration::from_millis;
    const SECS: fn(u64) -> Duration = Duration::from_secs;

    /// 2024-08-21T19:31:05Z
    const ANTHROPIC_RESET_UNIX: u64 = 1_724_268_665;

    #[test]
    fn openai_documented_header_set() {
        // The example from OpenAI's rate-limit guide.
        let map = headers(&[
            ("x-ratelimit-limit-requests", "60"),
            ("x-ratelimit-limit-tokens", "150000"),
            ("x-ratelimit-remaining-requests", "59"),
            ("x-ratelimit-remaining-tokens", "149984"),
            ("x-ratelimit-reset-requests", "1s"),
            ("x-ratelimit-reset-tokens", "6m0s"),
            ("openai-processing-ms", "412"),
        ]);
        let parsed = parse(&map, at(0));
        assert_eq!(parsed.provider, Provider::OpenAi);
        assert_eq!(
            parsed.requests,
            Some(Budget {
                limit: Some(60),
                remaining: Some(59),
                reset: Some(SECS(1)),
            })
        );
        assert_eq!(
            parsed.tokens,
            Some(Budget {
                limit: Some(150_000),
                remaining: Some(149_984),
                reset: Some(SECS(360)),
            })
        );
        assert_eq!(parsed.input_tokens, None);
        assert_eq!(parsed.output_tokens, None);
        assert_eq!(parsed.retry_after, None);
        assert_eq!(parsed.wait_hint(), None);
        assert!(!parsed.is_empty());
    }

    #[test]
    fn openai_429_with_retry_after_ms() {
        let map = headers(&[
            ("x-ratelimit-limit-tokens", "30000"),
            ("x-ratelimit-remaining-tokens", "0"),
            ("x-ratelimit-reset-tokens", "1.638s"),
            ("retry-after-ms", "1638"),
            ("retry-after", "2"),
        ]);
        let parsed = parse(&map, at(0));
        assert_eq!(parsed.retry_after, Some(MS(1638)));
        assert_eq!(parsed.wait_hint(), Some(MS(1638)));
        assert_eq!(parsed.tokens.unwrap().reset, Some(MS(1638)));
    }

    #[test]
    fn anthropic_documented_header_set() {
        let reset = "2024-08-21T19:31:05Z";
        let map = headers(&[
            ("anthropic-ratelimit-requests-limit", "50"),
            ("anthropic-ratelimit-requests-remaining", "0"),
            ("anthropic-ratelimit-requests-reset", reset),
            ("anthropic-ratelimit-tokens-limit", "90000"),
            ("anthropic-ratelimit-tokens-remaining", "89000"),
            ("anthropic-ratelimit-tokens-reset", "2024-08-21T19:31:00Z"),
            ("anthropic-ratelimit-input-tokens-limit", "80000"),
            ("anthropic-ratelimit-input-tokens-remaining", "79500"),
            ("anthropic-ratelimit-input-tokens-reset", reset),
            ("anthropic-ratelimit-output-tokens-limit", "16000"),
            ("anthropic-ratelimit-output-tokens-remaining", "15500"),
            ("anthropic-ratelimit-output-tokens-reset", reset),
            ("retry-after", "25"),
            ("request-id", "req_018EeWyXxfu5pfWkrYcMdjWG"),
            (
                "anthropic-organization-id",
                "3b1f8c4e-0000-0000-0000-000000000000",
            ),
        ]);
        let now = at(ANTHROPIC_RESET_UNIX - 30);
        let parsed = parse(&map, now);
        assert_eq!(parsed.provider, Provider::Anthropic);
        assert_eq!(
            parsed.requests,
            Some(Budget {
                limit: Some(50),
                remaining: Some(0),
                reset: Some(SECS(30)),
            })
        );
        assert_eq!(parsed.tokens.unwrap().reset, Some(SECS(25)));
        assert_eq!(
            parsed.input_tokens,
            Some(Budget {
                limit: Some(80_000),
                remaining: Some(79_500),
                reset: Some(SECS(30)),
            })
        );
        assert_eq!(parsed.output_tokens.unwrap().limit, Some(16_000));
        assert_eq!(parsed.retry_after, Some(SECS(25)));
        assert_eq!(parsed.wait_hint(), Some(SECS(25)));
    }

    #[test]
    fn anthropic_reset_in_the_past_saturates_at_zero() {
        let map = headers(&[
            ("anthropic-ratelimit-tokens-remaining", "0"),
            ("anthropic-ratelimit-tokens-reset", "2024-08-21T19:31:05Z"),
        ]);
        let parsed = parse(&map, at(ANTHROPIC_RESET_UNIX + 100));
        assert_eq!(parsed.tokens.unwrap().reset, Some(Duration::ZERO));
        assert_eq!(parsed.wait_hint(), Some(Duration::ZERO));
    }

    #[test]
    fn azure_header_set() {
        let map = headers(&[
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-remaining-tokens", "1000"),
            ("retry-after-ms", "5000"),
            ("retry-after", "5"),
            ("apim-request-id", "9b2c7a9e-1111-2222-3333-444455556666"),
            ("x-ms-region", "East US"),
            ("azureml-model-session", "d001-20240101"),
        ]);
        let parsed = parse(&map, at(0));
        assert_eq!(parsed.provider, Provider::Azure);
        assert_eq!(
            parsed.requests,
            Some(Budget {
                remaining: Some(0),
                ..Budget::default()
            })
        );
        assert_eq!(parsed.tokens.unwrap().remaining, Some(1000));
        assert_eq!(parsed.retry_after, Some(SECS(5)));
        // Retry-After wins over resets.
        assert_eq!(parsed.wait_hint(), Some(SECS(5)));
    }

    #[test]
    fn detection_order() {
        assert_eq!(Provider::detect(&HeaderMap::new()), Provider::Unknown);
        assert_eq!(
            Provider::detect(&headers(&[("retry-after", "1")])),
            Provider::Unknown
        );
        assert_eq!(
            Provider::detect(&headers(&[("openai-version", "2020-10-01")])),
            Provider::OpenAi
        );
        assert_eq!(
            Provider::detect(&headers(&[("retry-after-ms", "1")])),
            Provider::OpenAi
        );
        assert_eq!(
            Provider::detect(&headers(&[
                ("x-ratelimit-limit-requests", "1"),
                ("x-ms-client-request-id", "abc"),
            ])),
            Provider::Azure
        );
        assert_eq!(
            Provider::detect(&headers(&[
                ("x-ms-region", "x"),
                ("anthropic-ratelimit-requests-limit", "1"),
            ])),
            Provider::Anthropic
        );
    }

    #[test]
    fn mixed_families_prefer_the_detected_one() {
        let map = headers(&[
            ("x-ratelimit-limit-requests", "10"),
            ("x-ratelimit-remaining-requests", "5"),
            ("anthropic-ratelimit-requests-limit", "50"),
        ]);
        let requests = parse(&map, at(0)).requests.unwrap();
        // Anthropic wins the limit, OpenAI fills in remaining.
        assert_eq!(requests.limit, Some(50));
        assert_eq!(requests.remaining, Some(5));
    }

    #[test]
    fn wait_hint_takes_the_longest_exhausted_reset() {
        let map = headers(&[
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "20ms"),
            ("x-ratelimit-remaining-tokens", "12"),
            ("x-ratelimit-reset-tokens", "1h"),
        ]);
        // Tokens are not exhausted, so their long reset does not count.
        assert_eq!(parse(&map, at(0)).wait_hint(), Some(MS(20)));

        let exhausted_without_reset = headers(&[("x-ratelimit-remaining-requests", "0")]);
        assert_eq!(parse(&exhausted_without_reset, at(0)).wait_hint(), None);
    }

    #[test]
    fn empty_and_irrelevant_headers() {
        let parsed = parse(&HeaderMap::new(), at(0));
        assert!(parsed.is_empty());
        assert_eq!(parsed, RateLimitHeaders::default());
        let parsed = parse(&headers(&[("content-type", "application/json")]), at(0));
        assert!(parsed.is_empty());
    }

    #[test]
    fn duration_forms() {
        let cases: &[(&str, Duration)] = &[
            ("6m0s", SECS(360)),
            ("1s", SECS(1)),
            ("1.5s", MS(1500)),
            ("120ms", MS(120)),
            ("20ms", MS(20)),
            ("1h2m3s", SECS(3723)),
            ("0s", Duration::ZERO),
            ("0", Duration::ZERO),
            ("500us", Duration::from_micros(500)),
            ("500\u{b5}s", Duration::from_micros(500)),
            ("500\u{3bc}s", Duration::from_micros(500)),
            ("750ns", Duration::from_nanos(750)),
            ("2d", SECS(2 * 86_400)),
            ("60", SECS(60)),
            ("0.25", MS(250)),
            (".5s", MS(500)),
            ("1.s", SECS(1)),
            ("+3s", SECS(3)),
            ("  7s  ", SECS(7)),
            ("1m 30s", SECS(90)),
            ("1.638s", MS(1638)),
            ("59.999s", MS(59_999)),
            ("1.0000000001s", Duration::new(1, 0)),
            ("0.000000001s", Duration::from_nanos(1)),
            ("1.5m", SECS(90)),
            ("2h45m", SECS(2 * 3600 + 45 * 60)),
            ("6m0.123s", Duration::from_millis(360_123)),
            ("30s1ms", MS(30_001)),
        ];
        for &(text, expected) in cases {
            assert_eq!(parse_duration(text), Some(expected), "{text:?}");
        }
    }

    #[test]
    fn duration_rejects() {
        let long_digits = "9".repeat(10_000);
        let cases = [
            "",
            "   ",
            "-1s",
            "-0s",
            "s",
            "ms",
            ".s",
            ".",
            "1",
            "1x",
            "1S",
            "1m30",
            "1.5.5s",
            "1s-",
            "abc",
            "1e3s",
            "0x10s",
            "NaN",
            "inf",
            "1,5s",
            "++1s",
            "9999999999999999999999h",
            "18446744073709551616s", // u64::MAX + 1 seconds
            "213503982334602d",      // just over u64::MAX seconds
            &long_digits,
        ];
        for text in cases {
            // "1" on its own is valid, so only test it with a suffix.
            if text == "1" {
                continue;
            }
            assert_eq!(parse_duration(text), None, "{text:?}");
        }
        assert_eq!(
            parse_duration("18446744073709551615s"),
            Some(Duration::from_secs(u64::MAX))
        );
    }

    #[test]
    fn rfc3339_forms() {
        let base = at(ANTHROPIC_RESET_UNIX);
        let cases: &[(&str, SystemTime)] = &[
            ("2024-08-21T19:31:05Z", base),
            ("2024-08-21t19:31:05z", base),
            ("2024-08-21 19:31:05Z", base),
            ("2024-08-21T19:31:05.25Z", base + MS(250)),
            (
                "2024-08-21T19:31:05.123456789Z",
                base + Duration::from_nanos(123_456_789),
            ),
            (
                "2024-08-21T19:31:05.1234567891234Z",
                base + Duration::from_nanos(123_456_789),
            ),
            ("2024-08-21T21:31:05+02:00", base),
            ("2024-08-21T15:01:05-04:30", base),
            ("2024-08-21T21:31:05+0200", base),
            ("2024-08-21T19:31:05.5-00:00", base + MS(500)),
            ("1970-01-01T00:00:00Z", UNIX_EPOCH),
            ("2000-02-29T00:00:00Z", at(951_782_400)),
            ("2016-12-31T23:59:60Z", at(1_483_228_800)),
        ];
        for &(text, expected) in cases {
            assert_eq!(parse_rfc3339(text), Some(expected), "{text:?}");
        }
        // Before the epoch still works.
        assert_eq!(
            parse_rfc3339("1969-12-31T23:59:59Z"),
            UNIX_EPOCH.checked_sub(SECS(1))
        );
    }

    #[test]
    fn rfc3339_rejects() {
        let cases = [
            "",
            "2024-08-21",
            "2024-08-21T19:31:05",
            "2024-08-21T19:31Z",
            "2024-13-21T19:31:05Z",
            "2024-00-21T19:31:05Z",
            "2023-02-29T19:31:05Z",
            "2024-04-31T19:31:05Z",
            "2024-08-21T24:00:00Z",
            "2024-08-21T19:60:05Z",
            "2024-08-21T19:31:61Z",
            "2024-08-21T19:31:05.Z",
            "2024-08-21T19:31:05+24:00",
            "2024-08-21T19:31:05+02:60",
            "2024-08-21T19:31:05+02",
            "2024-08-21T19:31:05Zjunk",
            "2024/08/21T19:31:05Z",
            "+2024-08-21T19:31:05Z",
            "2024-08-21T19:31:0\u{b5}Z",
            "Wed, 21 Oct 2015 07:28:00 GMT",
        ];
        for text in cases {
            assert_eq!(parse_rfc3339(text), None, "{text:?}");
        }
    }

    #[test]
    fn anthropic_reset_with_offset_and_fraction() {
        let map = headers(&[(
            "anthropic-ratelimit-requests-reset",
            "2024-08-21T21:31:05.750+02:00",
        )]);
        let parsed = parse(&map, at(ANTHROPIC_RESET_UNIX - 2));
        assert_eq!(parsed.requests.unwrap().reset, Some(MS(2750)));
    }

    #[test]
    fn retry_after_forms() {
        let now = at(1_445_412_480); // Wed, 21 Oct 2015 07:28:00 GMT
        let cases: &[(&str, &str, Duration)] = &[
            ("retry-after", "120", SECS(120)),
            ("retry-after", "0", Duration::ZERO),
            ("retry-after", "1.5", MS(1500)),
            ("retry-after", "Wed, 21 Oct 2015 07:28:30 GMT", SECS(30)),
            // HTTP-date in the past: no wait.
            (
                "retry-after",
                "Wed, 21 Oct 2015 07:27:00 GMT",
                Duration::ZERO,
            ),
            // The obsolete formats httpdate also accepts.
            ("retry-after", "Wednesday, 21-Oct-15 07:28:10 GMT", SECS(10)),
            ("retry-after", "Wed Oct 21 07:28:05 2015", SECS(5)),
            ("retry-after-ms", "20", MS(20)),
            ("retry-after-ms", "1.5", Duration::from_micros(1500)),
            ("retry-after-ms", " 250 ", MS(250)),
        ];
        for &(name, value, expected) in cases {
            let parsed = parse(&headers(&[(name, value)]), now);
            assert_eq!(parsed.retry_after, Some(expected), "{name}: {value:?}");
            assert_eq!(parsed.wait_hint(), Some(expected));
        }
    }

    #[test]
    fn malformed_retry_after_ms_falls_back_to_retry_after() {
        let map = headers(&[("retry-after-ms", "soon"), ("retry-after", "3")]);
        assert_eq!(parse(&map, at(0)).retry_after, Some(SECS(3)));
    }

    #[test]
    fn absurd_waits_are_clamped() {
        let cases: &[(&str, &str)] = &[
            ("retry-after", "99999999999"),
            ("retry-after-ms", "18446744073709551615"),
            ("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT"),
        ];
        for &(name, value) in cases {
            let parsed = parse(&headers(&[(name, value)]), at(0));
            assert_eq!(parsed.retry_after, Some(MAX_WAIT), "{name}: {value:?}");
        }
        let map = headers(&[
            ("x-ratelimit-reset-tokens", "100000h"),
            ("anthropic-ratelimit-requests-reset", "9999-12-31T23:59:59Z"),
        ]);
        let parsed = parse(&map, at(0));
        assert_eq!(parsed.tokens.unwrap().reset, Some(MAX_WAIT));
        assert_eq!(parsed.requests.unwrap().reset, Some(MAX_WAIT));
    }

    #[test]
    fn malformed_values_are_ignored() {
        let garbage = [
            "",
            " ",
            "-1",
            "-5s",
            "1.5",
            "1e3",
            "0x10",
            "abc",
            "NaN",
            "18446744073709551616", // u64::MAX + 1
            "99999999999999999999999999999999999999999999",
            "9999999999999999999999h",
            "1m30",
            "2024-08-21",
            "Wed, 32 Oct 2015 07:28:00 GMT",
        ];
        let names = [
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-requests",
            "anthropic-ratelimit-tokens-limit",
            "anthropic-ratelimit-input-tokens-reset",
            "anthropic-ratelimit-output-tokens-remaining",
            "retry-after",
            "retry-after-ms",
        ];
        for name in names {
            for value in garbage {
                let map = headers(&[(name, value)]);
                let parsed = parse(&map, at(0));
                // Some garbage is valid for some headers ("1.5" is a fine
                // retry-after); check only the ones that must be rejected.
                let valid_somewhere = match name {
                    "retry-after" => value == "1.5",
                    // Fits a Duration as milliseconds (and is then clamped).
                    "retry-after-ms" => matches!(value, "1.5" | "18446744073709551616"),
                    "x-ratelimit-reset-requests" => matches!(value, "1.5"),
                    _ => false,
                };
                if !valid_somewhere {
                    assert!(parsed.is_empty(), "{name}: {value:?} gave {parsed:?}");
                }
            }
        }
    }

    #[test]
    fn non_utf8_and_long_values_are_ignored() {
        let mut map = HeaderMap::new();
        map.insert(
            "x-ratelimit-limit-requests",
            HeaderValue::from_bytes(b"6\xff0").unwrap(),
        );
        map.insert(
            "x-ratelimit-reset-tokens",
            HeaderValue::from_bytes(b"1\xb5s").unwrap(),
        );
        map.insert(
            "retry-after",
            HeaderValue::from_bytes("9".repeat(100_000).as_bytes()).unwrap(),
        );
        map.insert(
            "anthropic-ratelimit-tokens-reset",
            HeaderValue::from_bytes(b"2024-08-21T19:31:05\xc3\xa9").unwrap(),
        );
        assert!(parse(&map, at(0)).is_empty());
        // Exercise the log preview on both sides of its cut-off.
        assert_eq!(preview(b"abc"), "abc");
        assert_eq!(preview(&[b'x'; 100]).chars().count(), 65);
    }

    #[test]
    fn utf8_micro_sign_in_a_header() {
        let mut map = HeaderMap::new();
        for (name, text) in [
            ("x-ratelimit-reset-requests", "500\u{b5}s"),
            ("x-ratelimit-reset-tokens", "1ms500\u{3bc}s"),
        ] {
            map.insert(name, HeaderValue::from_bytes(text.as_bytes()).unwrap());
        }
        let parsed = parse(&map, at(0));
        assert_eq!(
            parsed.requests.unwrap().reset,
            Some(Duration::from_micros(500))
        );
        assert_eq!(
            parsed.tokens.unwrap().reset,
            Some(Duration::from_micros(1500))
        );
    }

    #[test]
    fn valid_headers_survive_malformed_neighbours() {
        let map = headers(&[
            ("x-ratelimit-limit-requests", "lots"),
            ("x-ratelimit-remaining-requests", "7"),
            ("x-ratelimit-reset-requests", "soon"),
        ]);
        assert_eq!(
            parse(&map, at(0)).requests,
            Some(Budget {
                remaining: Some(7),
                ..Budget::default()
            })
        );
    }

    #[test]
    fn only_the_first_of_repeated_headers_counts() {
        let map = headers(&[("retry-after", "1"), ("retry-after", "100")]);
        assert_eq!(parse(&map, at(0)).retry_after, Some(SECS(1)));
    }

    #[test]
    fn extreme_now_does_not_panic() {
        let map = headers(&[
            ("anthropic-ratelimit-tokens-reset", "0000-01-01T00:00:00Z"),
            ("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT"),
        ]);
        let far_past = UNIX_EPOCH.checked_sub(SECS(100 * 365 * 86_400)).unwrap();
        for now in [far_past, UNIX_EPOCH, at(u64::from(u32::MAX) * 100)] {
            let _ = parse(&map, now);
        }
    }

    const ALL_HEADERS: [&str; 22] = [
        "x-ratelimit-limit-requests",
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-requests",
        "x-ratelimit-reset-tokens",
        "anthropic-ratelimit-requests-limit",
        "anthropic-ratelimit-requests-remaining",
        "anthropic-ratelimit-requests-reset",
        "anthropic-ratelimit-tokens-limit",
        "anthropic-ratelimit-tokens-remaining",
        "anthropic-ratelimit-tokens-reset",
        "anthropic-ratelimit-input-tokens-limit",
        "anthropic-ratelimit-input-tokens-remaining",
        "anthropic-ratelimit-input-tokens-reset",
        "anthropic-ratelimit-output-tokens-limit",
        "anthropic-ratelimit-output-tokens-remaining",
        "anthropic-ratelimit-output-tokens-reset",
        "retry-after",
        "retry-after-ms",
        "x-ms-region",
        "openai-version",
    ];

    /// Header-ish text: mostly the alphabets the parsers look at.
    fn plausible_value() -> impl Strategy<Value = String> {
        prop_oneof![
            "[0-9.+ -]{0,30}(ns|us|µs|ms|s|m|h|d)?([0-9.]{0,5}(ms|s|m|h))?",
            "[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{0,12})?([Zz]|[+-][0-9]{2}:?[0-9]{2})?",
            "[A-Za-z]{3}, [0-9]{1,2} [A-Za-z]{3} [0-9]{4} [0-9:]{8} GMT",
        ]
    }

    proptest! {
        #[test]
        fn parse_never_panics_on_arbitrary_bytes(
            values in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..48), ALL_HEADERS.len()),
            now_secs in any::<u64>(),
        ) {
            let mut map = HeaderMap::new();
            for (name, bytes) in ALL_HEADERS.iter().zip(&values) {
                // Bytes a HeaderValue cannot hold (CR, LF, NUL, ...) cannot
                // reach us either.
                if let Ok(value) = HeaderValue::from_bytes(bytes) {
                    map.insert(*name, value);
                }
            }
            let now = UNIX_EPOCH.checked_add(Duration::from_secs(now_secs)).unwrap_or(UNIX_EPOCH);
            let parsed = parse(&map, now);
            for budget in parsed.budgets() {
                prop_assert!(budget.reset.is_none_or(|r| r <= MAX_WAIT));
            }
            prop_assert!(parsed.wait_hint().is_none_or(|w| w <= MAX_WAIT));
        }

        #[test]
        fn parse_never_panics_on_plausible_values(
            values in proptest::collection::vec(plausible_value(), ALL_HEADERS.len()),
            now_secs in 0u64..4_000_000_000,
        ) {
            let mut map = HeaderMap::new();
            for (name, text) in ALL_HEADERS.iter().zip(&values) {
                if let Ok(value) = HeaderValue::from_str(text) {
                    map.insert(*name, value);
                }
            }
            let parsed = parse(&map, at(now_secs));
            prop_assert!(parsed.wait_hint().is_none_or(|w| w <= MAX_WAIT));
        }

        #[test]
        fn parse_duration_never_panics(text in any::<String>()) {
            let _ = parse_duration(&text);
        }

        #[test]
        fn parse_duration_never_panics_on_plausible_text(text in plausible_value()) {
            let _ = parse_duration(&text);
            let _ = parse_millis(&text);
            let _ = parse_rfc3339(&text);
        }

        #[test]
        fn go_format_round_trips(h in 0u64..10_000, m in 0u64..60, s in 0u64..60, ms in 0u64..1000) {
            let text = format!("{h}h{m}m{s}.{ms:03}s");
            let expected = Duration::from_secs(h * 3600 + m * 60 + s) + Duration::from_millis(ms);
            prop_assert_eq!(parse_duration(&text), Some(expected));
        }

        #[test]
        fn rfc3339_matches_an_independent_formatter(secs in 0u64..253_402_300_800) {
            let text = rfc3339_of(secs);
            prop_assert_eq!(parse_rfc3339(&text), Some(at(secs)), "{}", text);
        }
    }

    /// Formats unix seconds as RFC 3339 UTC, independently of the parser
    /// (civil-from-days by repeated subtraction).
    fn rfc3339_of(secs: u64) -> String {
        let (mut days, rem) = (secs / 86_400, secs % 86_400);
        let mut year = 1970u32;
        loop {
            let len = if days_in_month(year, 2) == 29 {
                366
            } else {
                365
            };
            if days < len {
                break;
            }
            days -= len;
            year += 1;
        }
        let mut month = 1;
        while days >= u64::from(days_in_month(year, month)) {
            days -= u64::from(days_in_month(year, month));
            month += 1;
        }
        format!(
            "{year:04}-{month:02}-{:02}T{:02}:{:02}:{:02}Z",
            days + 1,
            rem / 3600,
            rem % 3600 / 60,
            rem % 60
        )
    }
}
