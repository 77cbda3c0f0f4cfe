//! tollgate keeps LLM API traffic inside its rate limits: requests, tokens (combined or
//! input and output apart, with a burndown weight for output), and calls in flight, per
//! key (user, team, API key) and shared by all keys (the provider account), exactly.
//!
//! Ask before each model call, settle after it with the real usage:
//!
//! ```
//! use tollgate::{Cost, Error, Limiter, Quota, Usage};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let limiter = Limiter::builder()
//!     .quota(Quota::requests(10).per_minute())                  // 10 requests per minute per user
//!     .quota(Quota::tokens(100_000).per_minute().burndown(5.0)) // input + 5 x output (Bedrock)
//!     .quota(Quota::input_tokens(4_000_000).per_minute())       // split mode (Vertex AI)
//!     .quota(Quota::output_tokens(128_000).per_minute())
//!     .quota(Quota::concurrent(8))                              // in-flight requests
//!     .build()?;                                                // in-memory store
//!
//! let permit = limiter.acquire("user-42", Cost::input(3_000).output(2_000)).await?; // waits, FIFO
//! let output_tokens = 1_234; // ... call the model ...
//! permit.settle(Usage::new(3_000, output_tokens)).await?;       // refund / charge the difference
//!
//! match limiter.try_acquire("user-42", Cost::input(3_000).output(2_000)).await { // never waits
//!     Ok(_permit) => {}
//!     Err(Error::Limited(r)) => println!("{} left of {}; retry in {:?}", r.remaining(), r.limit(), r.retry_after()),
//!     Err(e) => return Err(e.into()),
//! }
//! for q in limiter.status("user-42").await? {                    // consumes nothing
//!     println!("{}: {} of {} left, full in {:?}", q.quota, q.remaining, q.limit, q.reset);
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
//!
//! - [`Quota`]: a dimension, an amount per period, a burst, an [`Algorithm`] (GCRA by
//!   default; fixed or sliding window by name), an [`Accounting`] mode and a [`Scope`].
//! - [`Limiter`]: [`Limiter::try_acquire`] (never waits), [`Limiter::acquire`] (reserves
//!   its start in FIFO order and sleeps until it), [`Limiter::acquire_within`] (gives up
//!   at once when the start would be too late), [`Limiter::status`].
//! - [`Permit`]: settle with [`Usage`] to refund or charge the difference; dropped, it
//!   keeps the estimate and frees its concurrency slot.
//! - [`tokens`]: offline prompt-token counts for OpenAI models; [`provider`]: rate-limit
//!   headers of OpenAI, Anthropic and Azure in one typed view; [`retry`]: backoff with
//!   full jitter that honours `Retry-After`.
//!
//! A decision for a known key hashes the key once, takes its shard's lock (and the shared
//! quotas' lock when there are shared quotas) and does a few integer operations per
//! quota, with no heap allocation; see `docs/BENCHMARKS.md` for figures.

mod algo;
mod clock;
mod cost;
mod error;
pub mod estimate;
mod limiter;
pub mod provider;
mod quota;
pub mod retry;
mod store;
pub mod tokens;

pub use clock::{Clock, ManualClock};
pub use cost::{Cost, Usage};
pub use error::{Error, KeyError, QuotaId, Rejected, StoreUnavailable, TooLarge};
pub use limiter::{Limiter, LimiterBuilder, MAX_KEY_LEN, Permit, QuotaStatus, RedisBuilder};
pub use quota::{Accounting, Algorithm, ConfigError, Dimension, Quota, Scope};
/// The Redis client tollgate is built on, for [`LimiterBuilder::redis_client`] and
/// [`LimiterBuilder::redis_connection`].
pub use redis;
pub use store::redis::StorePolicy;

/// The README's code blocks, compiled and run as doc-tests.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
