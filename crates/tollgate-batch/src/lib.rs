//! `tollgate batch`: streams a JSONL file of API requests through a provider as fast as
//! its rate limits allow, retries what fails, loses nothing and resumes after a crash.
//!
//! Each input line is a request body (the format of OpenAI's cookbook script
//! `api_request_parallel_processor.py`, with an optional `metadata` field carried to the
//! output) or a Batch API request (`custom_id`, `method`, `url`, `body`). For each line
//! the runner estimates the tokens the provider will count ([`tollgate::estimate`]),
//! waits its turn in a [`tollgate::Limiter`] (FIFO; in memory, or shared through Redis
//! with other processes), sends it, settles with the usage the provider reports, and
//! appends exactly one line to the results file (`[request, response(, metadata)]`, or
//! the Batch API's output object) or to the failures file (with the input line number,
//! the error and the attempt count).
//!
//! - Limits come from [`BatchConfig::rpm`] / [`BatchConfig::tpm`], or are learned from
//!   the provider's `x-ratelimit-limit-*` headers of the first answers (sent one at a time).
//!   When an answer reports a limit below the one given, the provider's is used from
//!   then on (a warning says so); a higher one never raises a limit given.
//! - Every run, fresh or resumed, sends its first request alone and absorbs its answer's
//!   rate-limit headers before any other goes out; so does the first request after the
//!   shared Redis store was unavailable or is found to have lost the budget (the `look`
//!   module): a key already spent at start costs one 429, not one per request of a burst.
//! - A 429 pauses every request until the provider's `retry-after` / reset (when that
//!   is more than [`tollgate::retry::Backoff::max_hint`] away, the run stops instead and
//!   [`Summary::stopped_because`] says why), and each response's
//!   `x-ratelimit-remaining-*` pulls the limiter down when the provider has less left
//!   than it thinks ([`tollgate::Limiter::absorb`]).
//! - 429, 5xx, timeouts and dropped connections are retried with exponential backoff and
//!   full jitter ([`tollgate::retry::Backoff`]); 400, a prompt over the limit, or a
//!   request that keeps failing goes to the failures file.
//! - A failure of the whole run stops it and writes nothing for the lines not answered
//!   ([`Summary::run_failure`]): 401/403, an account out of credit, or a provider that
//!   answers nothing for [`BatchConfig::give_up_after`]. The rerun sends those lines.
//! - Running the same command again skips every line already in the results or failures
//!   file, so a run killed at any point resumes without duplicates.
//!
//! ```no_run
//! use tollgate_batch::{BatchConfig, run};
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut config = BatchConfig::new("requests.jsonl", "results.jsonl", "https://api.openai.com/v1/chat/completions");
//! config.rpm = Some(500);
//! config.tpm = Some(90_000);
//! config.api_key = std::env::var("OPENAI_API_KEY").ok();
//! let summary = run(config, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! println!("{} succeeded, {} failed", summary.succeeded, summary.failed);
//! # Ok(()) }
//! ```
//!
//! What this crate must never do: limit on its own. Every admission decision is the
//! limiter's; this crate only turns provider answers into waits and retries.

mod input;
mod look;
mod output;
mod progress;

use std::future::Future;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;
use tokio::sync::{Semaphore, mpsc, watch};
use tollgate::estimate::{Endpoint, Estimate, estimate};
use tollgate::provider::RateLimitHeaders;
use tollgate::retry::Backoff;
use tollgate::{Accounting, Cost, Error as LimitError, Limiter, Quota, Usage};

pub use progress::Progress;

/// What a run does while the shared Redis store (`--redis`) cannot be reached.
///
/// ```
/// assert_eq!(tollgate_batch::OnRedisDown::default(), tollgate_batch::OnRedisDown::Wait);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnRedisDown {
    /// Send nothing until Redis answers again, then go on (the limiter fails closed:
    /// [`tollgate::StorePolicy::FailClosed`]).
    #[default]
    Wait,
    /// Stop the run: the requests in flight finish and are written, the rest is left
    /// for a rerun (the limiter fails closed; the run stops on the first refusal).
    Fail,
    /// Limit in this process alone, with the full limits, until Redis answers
    /// ([`tollgate::StorePolicy::FailOpen`] with a share of 1): other processes sharing
    /// the account are not counted meanwhile, so their sum may go over (the provider's
    /// 429s then pace the run).
    Local,
}

use input::{Format, Job, Malformed};
use look::{Look, Turn};
use output::Record;
use progress::Counters;

/// The most requests [`BatchConfig::max_in_flight`] allows.
///
/// ```
/// assert_eq!(tollgate_batch::MAX_IN_FLIGHT, 10_000);
/// ```
pub const MAX_IN_FLIGHT: usize = 10_000;

/// How many first answers may be read for rate-limit headers before the runner gives up
/// learning the limits.
const PROBES: u32 = 3;

/// How a batch runs. Build it with [`BatchConfig::new`] and set the fields you need.
///
/// ```
/// let mut config = tollgate_batch::BatchConfig::new("in.jsonl", "out.jsonl", "http://127.0.0.1:8089/v1/chat/completions");
/// config.rpm = Some(600);
/// assert_eq!(config.failures_path(), std::path::PathBuf::from("out.failures.jsonl"));
/// assert_eq!(config.max_in_flight, 64);
/// ```
#[derive(Debug, Clone)]
pub struct BatchConfig {
    /// The input file.
    pub input: PathBuf,
    /// The results file (appended to; created when missing).
    pub output: PathBuf,
    /// The failures file; default: the results file with `.failures.jsonl`.
    pub failures: Option<PathBuf>,
    /// Where cookbook-format lines are sent; Batch API lines go to their own `url` path
    /// on this URL's origin.
    pub url: String,
    /// Requests per minute; learned from the provider's headers when `None`, and
    /// lowered to the provider's when an answer reports less.
    pub rpm: Option<u64>,
    /// Tokens per minute (prompt + `max_tokens × n`, as OpenAI counts); learned when
    /// `None`, and lowered to the provider's when an answer reports less.
    pub tpm: Option<u64>,
    /// Requests waiting or in flight at once: 1 to [`MAX_IN_FLIGHT`].
    pub max_in_flight: usize,
    /// A Redis URL to share the limits with other processes using the same account.
    pub redis: Option<String>,
    /// The API key, sent as `Authorization: Bearer` (`x-api-key` to `/v1/messages`).
    pub api_key: Option<String>,
    /// The limiter key naming the provider account; default: a hash of the URL's origin
    /// and the API key, so processes with the same both share one budget. 1 to
    /// [`tollgate::MAX_KEY_LEN`] bytes.
    pub account: Option<String>,
    /// Attempts per line before it goes to the failures file.
    pub max_attempts: u32,
    /// Time limit of one attempt.
    pub timeout: Duration,
    /// How much later than it leaves tollgate a request may be counted by the provider
    /// (network and connection set-up). The limiter's burst is lowered by what the
    /// limits refill in this time, so a schedule exact at tollgate stays inside the
    /// limits at the provider.
    pub jitter: Duration,
    /// How progress is shown.
    pub progress: Progress,
    /// What the run does while Redis cannot be reached.
    pub on_redis_down: OnRedisDown,
    /// How long the provider may be unreachable (connections refused or timed out with
    /// no answer from it in between) before the run stops with
    /// [`RunFailureCause::Unreachable`]; more than zero.
    pub give_up_after: Duration,
    /// Send again the lines the failures file holds for a reason that may not hold any
    /// more (timeouts, dropped connections, 408/409, 429 but "too large", 5xx, 401/403,
    /// out of credit): they are removed from the failures file (rewritten whole, through
    /// a temporary file renamed over it) before the first request.
    pub retry_failures: bool,
}

impl BatchConfig {
    /// A configuration with the defaults: 64 in flight, 8 attempts, a 10-minute
    /// timeout, a 250 ms jitter allowance, limits learned from the provider.
    ///
    /// See [`BatchConfig`] for an example.
    pub fn new(
        input: impl Into<PathBuf>,
        output: impl Into<PathBuf>,
        url: impl Into<String>,
    ) -> BatchConfig {
        BatchConfig {
            input: input.into(),
            output: output.into(),
            failures: None,
            url: url.into(),
            rpm: None,
            tpm: None,
            max_in_flight: 64,
            redis: None,
            api_key: None,
            account: None,
            max_attempts: tollgate::retry::DEFAULT_MAX_ATTEMPTS,
            timeout: Duration::from_secs(600),
            jitter: Duration::from_millis(250),
            progress: Progress::Auto,
            on_redis_down: OnRedisDown::Wait,
            give_up_after: Duration::from_secs(120),
            retry_failures: false,
        }
    }

    /// Where failures go.
    ///
    /// See [`BatchConfig`] for an example.
    pub fn failures_path(&self) -> PathBuf {
        self.failures.clone().unwrap_or_else(|| {
            let stem = self
                .output
                .file_stem()
                .map_or_else(|| "results".into(), |s| s.to_string_lossy().into_owned());
            self.output.with_file_name(format!("{stem}.failures.jsonl"))
        })
    }
}

/// Why a batch could not run (a line that fails is not an error: it goes to the
/// failures file).
///
/// ```
/// let err = tollgate_batch::BatchError::Config("--max-in-flight must be at least 1".into());
/// assert_eq!(err.to_string(), "--max-in-flight must be at least 1");
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BatchError {
    /// A setting is wrong.
    #[error("{0}")]
    Config(String),
    /// The input file cannot be read. (Its cause is the error's source: print the
    /// chain, `{:#}` with anyhow, to see it.)
    #[error("cannot read {path}")]
    Input {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// An output file cannot be read or written (the cause is the error's source).
    #[error("cannot write {path}")]
    Output {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// An output file holds a line this runner did not write, so resuming cannot tell
    /// what is done.
    #[error(
        "{path} line {line} is not a line tollgate batch writes; move the file away or fix that line, then run again"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The line.
        line: u64,
    },
    /// The limiter could not be built (bad limits; the cause is the error's source).
    #[error("cannot set up the limiter")]
    Limiter(#[from] LimitError),
    /// Another run is writing to the same results file: two runs on one file would send
    /// and pay for every line twice.
    #[error(
        "another tollgate batch is writing to {path} ({holder}); wait for it to finish or stop it, then run again"
    )]
    Locked {
        /// The results file.
        path: PathBuf,
        /// Who holds it, as that run wrote it in the lock file.
        holder: String,
    },
    /// Redis cannot be reached at the start and [`OnRedisDown::Fail`] was asked for.
    #[error(
        "Redis at {url} cannot be reached ({cause}); nothing was sent. Start Redis (or fix --redis) and run the same command again, or pass --on-redis-down wait to wait for it, or --on-redis-down local to limit in this process alone"
    )]
    RedisDown {
        /// The Redis URL, without its password.
        url: String,
        /// Why it cannot be reached.
        cause: String,
    },
    /// Redis refused the credentials of the `--redis` URL: waiting would not help,
    /// whatever [`OnRedisDown`] says.
    #[error(
        "Redis at {url} refused the credentials ({cause}); nothing was sent. Fix the user or password in --redis and run the same command again"
    )]
    RedisAuth {
        /// The Redis URL, without its password.
        url: String,
        /// What Redis answered.
        cause: String,
    },
}

/// The longest `--jitter` allowed: it keeps this much of each minute's refill in hand,
/// so anything near the limits' period would leave next to nothing to send.
pub const MAX_JITTER: Duration = Duration::from_secs(10);

/// The longest `--timeout` allowed for one attempt.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);

/// What a run did, printed at the end and written by `--summary-json`.
///
/// ```
/// let s = tollgate_batch::Summary::default();
/// assert_eq!(s.succeeded + s.failed, 0);
/// ```
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Summary {
    /// Lines in the input.
    pub lines: u64,
    /// Lines skipped because an earlier run finished them.
    pub already_done: u64,
    /// Lines written to the results file by this run.
    pub succeeded: u64,
    /// Lines written to the failures file by this run.
    pub failed: u64,
    /// Of those, lines that could not be read as a request.
    pub malformed: u64,
    /// Lines not finished because the run was interrupted (a rerun does them).
    pub unfinished: u64,
    /// HTTP requests sent, retries included.
    pub requests_sent: u64,
    /// Attempts after the first.
    pub retries: u64,
    /// 429 answers from the provider.
    pub rate_limited: u64,
    /// 5xx answers.
    pub server_errors: u64,
    /// Timeouts and dropped connections.
    pub transport_errors: u64,
    /// Tokens estimated for the requests sent (prompt + `max_tokens × n`).
    pub tokens_estimated: u64,
    /// Prompt tokens the provider reported.
    pub prompt_tokens: u64,
    /// Completion tokens the provider reported.
    pub completion_tokens: u64,
    /// The requests-per-minute limit used at the end (the provider's, when it reported
    /// less than the one given).
    pub rpm: Option<u64>,
    /// The tokens-per-minute limit used at the end.
    pub tpm: Option<u64>,
    /// Wall time in seconds.
    pub elapsed_secs: f64,
    /// Whether the run was interrupted before every line was finished.
    pub interrupted: bool,
    /// Why the run stopped by itself (the provider asked to wait longer than the run
    /// waits), when it did; `None` after Ctrl-C or a finished run.
    pub stopped_because: Option<String>,
    /// A failure of the whole run (the key refused, the account out of credit, the
    /// provider unreachable): the run stopped and no line it did not finish was written.
    pub run_failure: Option<RunFailure>,
    /// Lines taken back from the failures file by [`BatchConfig::retry_failures`] (each
    /// is then counted again as succeeded, failed or unfinished).
    pub retried_failures: u64,
}

/// What makes every line fail, not one: the run stops at once and marks nothing done
/// for the lines not answered, so the rerun (once the cause is fixed) sends them.
///
/// ```
/// let f = tollgate_batch::RunFailure {
///     cause: tollgate_batch::RunFailureCause::Auth,
///     status: Some(401),
///     message: "Incorrect API key provided".into(),
/// };
/// assert!(f.to_string().contains("HTTP 401"));
/// ```
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RunFailure {
    /// The kind of failure.
    pub cause: RunFailureCause,
    /// The provider's HTTP status, when it answered.
    pub status: Option<u16>,
    /// The provider's message (or the transport error), with anything that looks like
    /// an API key redacted.
    pub message: String,
}

/// The kind of a [`RunFailure`].
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RunFailureCause {
    /// 401 or 403: the key is missing, wrong, revoked, or not allowed here.
    Auth,
    /// A 429 (or Anthropic's 400) saying the account is out of credit or over its
    /// billing limit.
    Credit,
    /// No answer from the provider (connections refused, timed out or dropped) for
    /// longer than [`BatchConfig::give_up_after`].
    Unreachable,
}

impl std::fmt::Display for RunFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.cause {
            RunFailureCause::Auth => "the provider refused the API key",
            RunFailureCause::Credit => "the provider says the account is out of credit",
            RunFailureCause::Unreachable => "the provider is unreachable",
        };
        match self.status {
            Some(status) => write!(f, "{what} (HTTP {status}: {})", self.message),
            None => write!(f, "{what} ({})", self.message),
        }
    }
}

/// Replaces anything in `text` that looks like an API key (the key in use, or a word
/// starting `sk-` as OpenAI's and Anthropic's keys do, masked or not) by `[redacted]`.
///
/// ```
/// let t = tollgate_batch::redact("Incorrect API key provided: sk-pr****1234.", Some("abc"));
/// assert_eq!(t, "Incorrect API key provided: [redacted].");
/// ```
pub fn redact(text: &str, key: Option<&str>) -> String {
    let mut text = text.to_owned();
    if let Some(key) = key.filter(|k| k.len() >= 4) {
        text = text.replace(key, "[redacted]");
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(at) = rest.find("sk-") {
        let starts_word = rest[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'));
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '*' | '.')))
            .unwrap_or(tail.len());
        // A sentence's full stop is not part of the key.
        let end = tail[..end].trim_end_matches('.').len();
        if starts_word {
            out.push_str("[redacted]");
            rest = &tail[end..];
        } else {
            out.push_str("sk-");
            rest = &tail[3..];
        }
    }
    out.push_str(rest);
    out
}

/// Runs a batch until every line is finished or `shutdown` completes; on shutdown, no
/// new request is sent, the requests in flight finish and are written, and the rest is
/// left for a rerun.
///
/// # Errors
///
/// [`BatchError`] when the run cannot start or an output file cannot be written. Lines
/// that fail are written to the failures file, not returned.
///
/// See the [crate docs](crate) for an example.
pub async fn run(
    config: BatchConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Summary, BatchError> {
    let started = Instant::now();
    let url = reqwest::Url::parse(&config.url)
        .map_err(|e| BatchError::Config(format!("--url {:?} is not a URL: {e}", config.url)))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(BatchError::Config(format!(
            "--url {:?} must be http:// or https://",
            config.url
        )));
    }
    if !(1..=MAX_IN_FLIGHT).contains(&config.max_in_flight) {
        return Err(BatchError::Config(format!(
            "--max-in-flight must be 1 to {MAX_IN_FLIGHT}, not {}",
            config.max_in_flight
        )));
    }
    if let Some(account) = &config.account
        && (account.is_empty() || account.len() > tollgate::MAX_KEY_LEN)
    {
        return Err(BatchError::Config(format!(
            "--account must be 1 to {} bytes long, not {}",
            tollgate::MAX_KEY_LEN,
            account.len()
        )));
    }
    if config.max_attempts == 0 {
        return Err(BatchError::Config(
            "--max-attempts must be at least 1".into(),
        ));
    }
    for (name, v) in [("rpm", config.rpm), ("tpm", config.tpm)] {
        if v == Some(0) {
            return Err(BatchError::Config(format!("--{name} must be at least 1")));
        }
    }
    if config.timeout.is_zero() || config.timeout > MAX_TIMEOUT {
        return Err(BatchError::Config(format!(
            "--timeout must be more than 0 and at most a day (one attempt's time limit, e.g. 10m), not {}",
            tollgate::provider::format_duration(config.timeout)
        )));
    }
    if config.jitter > MAX_JITTER {
        return Err(BatchError::Config(format!(
            "--jitter must be from 0 to {} (it keeps that much of each minute's refill in hand; 250ms covers a network's delay), not {}",
            tollgate::provider::format_duration(MAX_JITTER),
            tollgate::provider::format_duration(config.jitter)
        )));
    }
    if config.give_up_after.is_zero() {
        return Err(BatchError::Config(
            "--give-up-after must be more than 0 (for example 2m)".into(),
        ));
    }
    let failures = config.failures_path();
    check_distinct(&config.input, &config.output, &failures)?;
    // One run per results file, held until this run returns.
    let _lock = {
        let results = config.output.clone();
        tokio::task::spawn_blocking(move || output::lock(&results))
            .await
            .map_err(|e| BatchError::Config(format!("locking the results file failed: {e}")))??
    };
    let _ = tokio::task::spawn_blocking(|| {
        tollgate::tokens::Encoding::O200kBase.warm_up();
        tollgate::tokens::Encoding::Cl100kBase.warm_up();
    })
    .await;
    let input_file = std::fs::File::open(&config.input).map_err(|source| BatchError::Input {
        path: config.input.clone(),
        source,
    })?;
    let mut done = {
        let (results, failures) = (config.output.clone(), failures.clone());
        let retry = config.retry_failures;
        tokio::task::spawn_blocking(move || output::scan(&results, &failures, retry))
            .await
            .map_err(|e| BatchError::Config(format!("scanning the output files failed: {e}")))??
    };
    if done.requeued > 0 {
        tracing::info!(
            lines = done.requeued,
            "--retry-failures: sending again the lines that failed for a reason that may have passed"
        );
    }
    if !done.is_empty() {
        tracing::info!(
            lines = done.count,
            "resuming: skipping lines already in the output files"
        );
    }

    let counters = Arc::new(Counters::default());
    // Count the lines for the progress bar, unless the input is a pipe: a second reader
    // would take lines away from the first.
    if input_file.metadata().is_ok_and(|m| m.is_file()) {
        let counters = counters.clone();
        let path = config.input.clone();
        tokio::task::spawn_blocking(move || {
            if let Ok(n) = count_lines(&path) {
                counters.total.store(n, Relaxed);
            }
        });
    }
    let (stop_tx, stop) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    {
        let stop_tx = stop_tx.clone();
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
    }
    // Both files are opened (created) before the first request: a results file that
    // cannot be written stops the run before anything is sent and paid for.
    let writer = output::Writer::open(config.output.clone(), failures)?;
    let (records, writer_error) = spawn_writer(writer, stop_tx.clone());
    let limits = Arc::new(Mutex::new((config.rpm, config.tpm)));
    let (progress_stop, progress_rx) = watch::channel(false);
    let progress = {
        let (counters, limits, mode) = (counters.clone(), limits.clone(), config.progress);
        tokio::spawn(async move { progress::show(mode, &counters, &limits, progress_rx).await })
    };

    let api_key = config.api_key.clone().filter(|k| !k.is_empty());
    let account = config.account.clone().unwrap_or_else(|| {
        let origin = url.origin().ascii_serialization();
        let secret = api_key.as_deref().unwrap_or("");
        format!(
            "account-{:016x}",
            input::fnv(format!("{origin}\n{secret}").as_bytes())
        )
    });
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(config.max_in_flight)
        .build()
        .map_err(|e| BatchError::Config(format!("cannot build the HTTP client: {e}")))?;
    let outage = Arc::new(Outage {
        counters: counters.clone(),
        url: config.redis.as_deref().map(redacted).unwrap_or_default(),
        policy: config.on_redis_down,
    });
    let ctx = Ctx {
        outage: outage.clone(),
        client,
        url,
        api_key,
        limits: Arc::default(),
        shown: limits.clone(),
        lowering: Arc::default(),
        look: Arc::new(Look::new()),
        config: Arc::new(config.clone()),
        account,
        gate: Arc::new(Mutex::new(None)),
        counters: counters.clone(),
        records,
        backoff: Backoff::default(),
        max_attempts: config.max_attempts,
        stop: stop.clone(),
        stop_tx: stop_tx.clone(),
        stop_reason: Arc::default(),
        run_failure: Arc::default(),
        reach: Arc::new(Mutex::new(Reach {
            last_answer: Instant::now(),
            down_since: None,
        })),
        timeout: config.timeout,
    };
    let stop_reason = ctx.stop_reason.clone();
    let run_failure = ctx.run_failure.clone();
    // Watches for a provider unreachable longer than --give-up-after.
    let watchdog = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let tick = (ctx.config.give_up_after / 10)
                .clamp(Duration::from_millis(50), Duration::from_secs(1));
            loop {
                tokio::time::sleep(tick).await;
                let down = ctx
                    .reach
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .down_since
                    .clone();
                if let Some((since, error)) = down
                    && since.elapsed() >= ctx.config.give_up_after
                {
                    ctx.fail_run(RunFailure {
                        cause: RunFailureCause::Unreachable,
                        status: None,
                        message: format!(
                            "no answer for {}; last error: {error}",
                            tollgate::provider::format_duration(since.elapsed())
                        ),
                    });
                    return;
                }
            }
        })
    };
    let mut probes = if config.rpm.is_none() || config.tpm.is_none() {
        PROBES
    } else {
        0
    };
    // A limit given is enforced from the first request, while the other is learned.
    if config.rpm.is_some() || config.tpm.is_some() {
        let mut stop = stop.clone();
        match connect(&config, config.rpm, config.tpm, &outage, &mut stop).await {
            Ok(Some(limiter)) => ctx.replace_limiter(limiter, config.rpm, config.tpm),
            Ok(None) => {}
            Err(e) => {
                let _ = progress_stop.send(true);
                return Err(e);
            }
        }
    }
    let ctx = Arc::new(ctx);
    if config.redis.is_some() {
        // Held weakly: the run's end (every `Ctx` dropped) closes the writer's channel.
        tokio::spawn(watch_redis(Arc::downgrade(&ctx), stop.clone()));
    }
    let slots = Arc::new(Semaphore::new(config.max_in_flight));

    let mut reader =
        tokio::io::BufReader::with_capacity(256 * 1024, tokio::fs::File::from_std(input_file));
    let mut line_no = 0u64;
    let mut buf = Vec::new();
    let mut custom_ids = input::CustomIds::default();
    // An error that ends the run early; the requests in flight still finish and are
    // written first, so nothing paid for is lost.
    let mut failed = None;
    let mut stopped = false;
    loop {
        if *stop.borrow() {
            stopped = true;
            break;
        }
        buf.clear();
        let mut stop_read = stop.clone();
        let n = tokio::select! {
            n = reader.read_until(b'\n', &mut buf) => match n {
                Ok(n) => n,
                Err(source) => {
                    failed = Some(BatchError::Input { path: config.input.clone(), source });
                    break;
                }
            },
            _ = stop_read.wait_for(|s| *s) => { stopped = true; break; }
        };
        if n == 0 {
            break;
        }
        line_no += 1;
        while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            buf.pop();
        }
        let job = match custom_ids.check(input::parse(line_no, &buf)) {
            Ok(job) => job,
            Err(bad) => {
                if done.take(line_no, None) {
                    counters.skipped.fetch_add(1, Relaxed);
                } else {
                    counters.malformed.fetch_add(1, Relaxed);
                    ctx.fail_malformed(bad);
                }
                continue;
            }
        };
        if done.take(line_no, Some(job.identity)) {
            counters.skipped.fetch_add(1, Relaxed);
            continue;
        }
        let mut stop_wait = stop.clone();
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            _ = stop_wait.wait_for(|s| *s) => { stopped = true; break; }
        };
        if probes > 0 {
            // The first requests go alone until an answer's headers give the missing limits.
            let seen = ctx.run_job(job).await;
            drop(slot);
            // A line that failed before it was sent told nothing: it does not count.
            if seen.is_some() {
                probes -= 1;
            }
            let learned = |b: Option<tollgate::provider::Budget>| b.and_then(|b| b.limit);
            let heard = seen
                .as_ref()
                .map(|s| (learned(s.requests), learned(s.tokens)));
            // A flag the provider's limit was found below is held lowered already.
            let held = ctx.limits();
            let rpm = held.rpm.or(heard.and_then(|h| h.0));
            let tpm = held.tpm.or(heard.and_then(|h| h.1));
            if (rpm.is_none() || tpm.is_none()) && probes > 0 {
                continue;
            }
            probes = 0;
            if rpm.is_none() && tpm.is_none() {
                tracing::warn!(
                    "the provider sent no rate-limit headers and no --rpm or --tpm was given: sending up to --max-in-flight at once, pausing only on 429s"
                );
            } else if (rpm, tpm) != (held.rpm, held.tpm) {
                tracing::info!(?rpm, ?tpm, "limits learned from the provider's headers");
                let mut stop_connect = stop.clone();
                let limiter = match connect(&config, rpm, tpm, &outage, &mut stop_connect).await {
                    Ok(Some(limiter)) => limiter,
                    Ok(None) => {
                        stopped = true;
                        break;
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                };
                if let Some(seen) = &seen {
                    let _ = limiter
                        .absorb(&ctx.account, seen, Duration::from_secs(1))
                        .await;
                }
                ctx.replace_limiter(limiter, rpm, tpm);
                ctx.mark_alive().await;
            }
            continue;
        }
        let ctx = ctx.clone();
        tokio::spawn(async move {
            ctx.run_job(job).await;
            drop(slot);
        });
    }
    if failed.is_some() {
        let _ = stop_tx.send(true);
    }
    // Every task holds a slot until it has finished: taking them all waits for the last.
    let all = u32::try_from(config.max_in_flight).unwrap_or(u32::MAX);
    let _ = slots.acquire_many(all).await;
    watchdog.abort();
    drop(ctx);
    let writer_error = writer_error.await.unwrap_or(None);
    let _ = progress_stop.send(true);
    let _ = progress.await;
    if let Some(e) = writer_error.or(failed) {
        return Err(e);
    }
    let c = &counters;
    let (rpm, tpm) = *limits.lock().unwrap_or_else(PoisonError::into_inner);
    let finished = c.done();
    let lines = if stopped {
        c.total.load(Relaxed).max(line_no)
    } else {
        line_no
    };
    Ok(Summary {
        lines,
        already_done: c.skipped.load(Relaxed),
        succeeded: c.succeeded.load(Relaxed),
        failed: c.failed.load(Relaxed),
        malformed: c.malformed.load(Relaxed),
        unfinished: lines.saturating_sub(finished),
        requests_sent: c.sent.load(Relaxed),
        retries: c.retries.load(Relaxed),
        rate_limited: c.rate_limited.load(Relaxed),
        server_errors: c.server_errors.load(Relaxed),
        transport_errors: c.transport_errors.load(Relaxed),
        tokens_estimated: c.tokens_estimated.load(Relaxed),
        prompt_tokens: c.prompt_tokens.load(Relaxed),
        completion_tokens: c.completion_tokens.load(Relaxed),
        rpm,
        tpm,
        elapsed_secs: started.elapsed().as_secs_f64(),
        interrupted: stopped || lines > finished,
        run_failure: run_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone(),
        retried_failures: done.requeued,
        stopped_because: stop_reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone(),
    })
}

/// Refuses a results or failures path that names the input or each other: appending
/// to the input would feed the run its own output, and one file cannot be both.
fn check_distinct(input: &Path, results: &Path, failures: &Path) -> Result<(), BatchError> {
    // Where a path leads: the file itself when it exists, else its directory's real
    // path with its name, so `./out.jsonl` and `out.jsonl` compare equal.
    let resolve = |path: &Path| {
        std::fs::canonicalize(path).ok().or_else(|| {
            let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
            let dir = std::fs::canonicalize(parent.unwrap_or(Path::new("."))).ok()?;
            Some(dir.join(path.file_name()?))
        })
    };
    let [input_at, results_at, failures_at] = [input, results, failures].map(resolve);
    let same = |a: &Option<PathBuf>, b: &Option<PathBuf>| a.is_some() && a == b;
    for (name, path, at) in [
        ("results file (-o)", results, &results_at),
        ("failures file (--failures)", failures, &failures_at),
    ] {
        if same(at, &input_at) {
            return Err(BatchError::Config(format!(
                "the {name} {} is the input file; write the output to another file",
                path.display()
            )));
        }
    }
    if same(&results_at, &failures_at) {
        return Err(BatchError::Config(format!(
            "the results and failures files are both {}; give --failures another path",
            results.display()
        )));
    }
    Ok(())
}

/// Counts the lines of a file (a last line without a newline counts).
/// An error and its causes, each once: `error sending request for url (…): client error
/// (Connect): tcp connect error: Connection refused (os error 111)`, less any cause
/// whose text its parent already shows.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

fn count_lines(path: &Path) -> std::io::Result<u64> {
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 256 * 1024];
    let (mut lines, mut last) = (0u64, b'\n');
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
        last = buf[n - 1];
    }
    Ok(lines + u64::from(last != b'\n'))
}

/// The burst of a per-minute limit of `amount`: the limit less what it refills in
/// `jitter` (see `--jitter`), at least 1.
fn burst(amount: u64, jitter: Duration) -> u64 {
    let slack = (u128::from(amount) * jitter.as_nanos()).div_ceil(60_000_000_000);
    amount
        .saturating_sub(u64::try_from(slack).unwrap_or(u64::MAX))
        .max(1)
}

/// The quotas, with their bursts: requests and tokens per minute, each with its burst
/// lowered by what it refills during the jitter allowance; tokens charged as estimated,
/// as OpenAI does.
fn quotas(config: &BatchConfig, rpm: Option<u64>, tpm: Option<u64>) -> Vec<(Quota, u64)> {
    let mut quotas = Vec::new();
    if let Some(rpm) = rpm {
        let b = burst(rpm, config.jitter);
        quotas.push((Quota::requests(rpm).per_minute().burst(b), b));
    }
    if let Some(tpm) = tpm {
        let b = burst(tpm, config.jitter);
        let q = Quota::tokens(tpm)
            .per_minute()
            .burst(b)
            .accounting(Accounting::Estimate);
        quotas.push((q, b));
    }
    if config.redis.is_some() && !quotas.is_empty() {
        quotas.push((look::alive_quota(), 0));
    }
    quotas
}

/// The limiter holding [`quotas`]; on Redis, each decision reports its quotas' status
/// (no extra round trip), where a state Redis has lost shows (see [`look::alive_quota`]).
async fn build_limiter(
    config: &BatchConfig,
    rpm: Option<u64>,
    tpm: Option<u64>,
) -> Result<Limiter, BatchError> {
    let policy = match config.on_redis_down {
        OnRedisDown::Local => tollgate::StorePolicy::FailOpen { share: 1.0 },
        OnRedisDown::Wait | OnRedisDown::Fail => tollgate::StorePolicy::FailClosed,
    };
    build_limiter_with(config, rpm, tpm, policy).await
}

/// [`build_limiter`] with the store policy given.
async fn build_limiter_with(
    config: &BatchConfig,
    rpm: Option<u64>,
    tpm: Option<u64>,
    policy: tollgate::StorePolicy,
) -> Result<Limiter, BatchError> {
    let mut builder = Limiter::builder();
    for (q, _) in quotas(config, rpm, tpm) {
        builder = builder.quota(q);
    }
    let limiter = match &config.redis {
        None => builder.build().map_err(LimitError::from)?,
        Some(url) => {
            builder
                .redis(url.clone())
                .prefix("tollgate:batch:")
                .status_with_decisions(true)
                .policy(policy)
                .build()
                .await?
        }
    };
    Ok(limiter)
}

/// A Redis URL as it may be shown: without its password.
fn redacted(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "the --redis URL".to_owned(),
    }
}

/// The limiter for `rpm` and `tpm`, with Redis down at the start handled as
/// [`BatchConfig::on_redis_down`] says: [`BatchError::RedisDown`] (fail), one warning
/// and a wait until Redis answers (wait; `None` when the run is stopped meanwhile), or one
/// warning and a limiter deciding in this process until Redis answers (local).
async fn connect(
    config: &BatchConfig,
    rpm: Option<u64>,
    tpm: Option<u64>,
    outage: &Outage,
    stop: &mut watch::Receiver<bool>,
) -> Result<Option<Limiter>, BatchError> {
    if config.redis.is_none() {
        return build_limiter(config, rpm, tpm).await.map(Some);
    }
    loop {
        // Failing closed first, so an unreachable Redis says why even when the run would
        // then limit locally.
        let closed = build_limiter_with(config, rpm, tpm, tollgate::StorePolicy::FailClosed).await;
        let cause = match closed {
            Ok(limiter) if config.on_redis_down != OnRedisDown::Local => {
                return Ok(Some(limiter));
            }
            Ok(_) => None,
            Err(BatchError::Limiter(LimitError::Unavailable(u))) => Some(u.detail().to_owned()),
            Err(e) => return Err(e),
        };
        if let Some(cause) = cause.as_deref().filter(|c| refused_credentials(c)) {
            return Err(BatchError::RedisAuth {
                url: outage.url.clone(),
                cause: cause.to_owned(),
            });
        }
        match (config.on_redis_down, cause) {
            (OnRedisDown::Fail, Some(cause)) => {
                return Err(BatchError::RedisDown {
                    url: outage.url.clone(),
                    cause,
                });
            }
            (OnRedisDown::Local, cause) => {
                if let Some(cause) = cause {
                    outage.down(&cause);
                }
                return build_limiter(config, rpm, tpm).await.map(Some);
            }
            (_, Some(cause)) => {
                outage.down(&cause);
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.wait_for(|s| *s) => return Ok(None),
                }
            }
            (_, None) => unreachable!("a limiter built failing closed was returned above"),
        }
    }
}

/// Follows the shared store's health until the run ends: an outage is said once when it
/// starts (a limiter deciding locally refuses nothing, so only this sees it) and once
/// when Redis answers again.
async fn watch_redis(ctx: std::sync::Weak<Ctx>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let Some(ctx) = ctx.upgrade() else { return };
        let up = ctx.limits().limiter.as_ref().and_then(Limiter::redis_up);
        match up {
            Some(true) => ctx.outage.up(),
            Some(false) if ctx.config.on_redis_down == OnRedisDown::Local => {
                ctx.outage.down("it stopped answering");
            }
            _ => {}
        }
    }
}

/// Whether Redis's answer says the credentials are wrong (no wait makes them right).
fn refused_credentials(cause: &str) -> bool {
    let c = cause.to_ascii_lowercase();
    [
        "authentication",
        "noauth",
        "wrongpass",
        "invalid password",
        "invalid username",
    ]
    .iter()
    .any(|s| c.contains(s))
}

/// An outage of the shared Redis store: said once when it starts and once when it ends,
/// whatever the number of requests waiting, and shown on the progress line meanwhile.
struct Outage {
    counters: Arc<Counters>,
    /// The Redis URL without its password.
    url: String,
    policy: OnRedisDown,
}

impl Outage {
    /// Redis cannot be reached: says so unless an outage is known already.
    fn down(&self, cause: &str) {
        let mut down = self
            .counters
            .redis_down
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if down.is_some() {
            return;
        }
        let waiting = self.policy != OnRedisDown::Local;
        *down = Some(progress::RedisDown {
            since: Instant::now(),
            waiting,
        });
        let url = &self.url;
        // The store's own word for a call refused while it is marked down names no
        // cause: the call that found it down had it.
        let cause = if cause == "Redis is down" {
            "it stopped answering"
        } else {
            cause
        };
        if waiting {
            tracing::warn!(
                "Redis at {url} is down ({cause}): requests not yet given a turn wait until it answers (--on-redis-down local limits in this process alone meanwhile; --on-redis-down fail stops the run instead)"
            );
        } else {
            tracing::warn!(
                "Redis at {url} is down ({cause}): limiting in this process alone until it answers (other processes sharing the account are not counted meanwhile)"
            );
        }
    }

    /// Redis answers: says how long it was down, when it was.
    fn up(&self) {
        let was = self
            .counters
            .redis_down
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(was) = was {
            tracing::warn!(
                "Redis at {} is back after {:.1}s: limiting on Redis again",
                self.url,
                was.since.elapsed().as_secs_f64()
            );
        }
    }
}

/// Sends records to a writer thread; returns its first error when it ends.
fn spawn_writer(
    mut writer: output::Writer,
    stop: Arc<watch::Sender<bool>>,
) -> (
    mpsc::UnboundedSender<Record>,
    tokio::sync::oneshot::Receiver<Option<BatchError>>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Record>();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut error = None;
        while let Some(record) = rx.blocking_recv() {
            if let Err(e) = writer.write(&record) {
                tracing::error!("{e}; stopping");
                let _ = stop.send(true);
                error = Some(e);
                break;
            }
        }
        let _ = done_tx.send(error);
    });
    (tx, done_rx)
}

/// What every request task shares.
#[derive(Clone)]
struct Ctx {
    /// Says when Redis goes down and comes back.
    outage: Arc<Outage>,
    client: reqwest::Client,
    url: reqwest::Url,
    api_key: Option<String>,
    /// The limiter in use and the limits it holds.
    limits: Arc<Mutex<Limits>>,
    /// The limits as the progress line and the summary show them.
    shown: Arc<Mutex<(Option<u64>, Option<u64>)>>,
    /// Held while a limiter is replaced by one with lower limits.
    lowering: Arc<tokio::sync::Mutex<()>>,
    /// Who looks at the provider's budget before the others go.
    look: Arc<Look>,
    config: Arc<BatchConfig>,
    account: String,
    /// Until when the provider asked everyone to wait.
    gate: Arc<Mutex<Option<Instant>>>,
    counters: Arc<Counters>,
    records: mpsc::UnboundedSender<Record>,
    backoff: Backoff,
    max_attempts: u32,
    stop: watch::Receiver<bool>,
    /// Stops the run (no new request; those in flight finish).
    stop_tx: Arc<watch::Sender<bool>>,
    /// Why the run stopped by itself, when it did.
    stop_reason: Arc<Mutex<Option<String>>>,
    /// The failure of the whole run, when there is one.
    run_failure: Arc<Mutex<Option<RunFailure>>>,
    /// Whether the provider answers.
    reach: Arc<Mutex<Reach>>,
    timeout: Duration,
}

/// Whether the provider answers: when it last did, and since when every attempt has
/// failed without an answer (connection refused, timed out or dropped).
struct Reach {
    last_answer: Instant,
    down_since: Option<(Instant, String)>,
}

/// The limiter in use and the limits it holds. Replaced, never changed in place, when the
/// first answers give limits that no flag gave or the provider reports a lower one.
#[derive(Clone, Default)]
struct Limits {
    limiter: Option<Limiter>,
    rpm: Option<u64>,
    tpm: Option<u64>,
    /// Counts the replacements: a permit from an older limiter is given back and taken
    /// again from the new one.
    generation: u64,
}

/// Why a line failed.
struct Failure {
    message: String,
    status: Option<u16>,
    code: Option<String>,
    attempts: u32,
    response: Option<Value>,
}

/// A request counted in [`Counters::on_the_way`] until its answer arrives (or the task
/// ends).
struct OnTheWay<'a> {
    counters: &'a Counters,
    /// The order it was sent in.
    order: u64,
}

impl<'a> OnTheWay<'a> {
    fn new(counters: &'a Counters, tokens: u64) -> OnTheWay<'a> {
        let order = counters.sends.fetch_add(1, Relaxed);
        counters
            .on_the_way
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(order, tokens);
        OnTheWay { counters, order }
    }
}

impl Drop for OnTheWay<'_> {
    fn drop(&mut self) {
        self.counters
            .on_the_way
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.order);
    }
}

impl Failure {
    /// A failure with no answer from the provider behind it.
    fn before_sending(message: String, code: &str, attempts: u32) -> Failure {
        Failure {
            message,
            status: None,
            code: Some(code.to_owned()),
            attempts,
            response: None,
        }
    }
}

impl Ctx {
    fn fail_malformed(&self, bad: Malformed) {
        self.counters.failed.fetch_add(1, Relaxed);
        let mut record = json!({
            "line": bad.line,
            "error": {"message": bad.error, "code": "malformed_line", "status": null},
            "attempts": 0,
        });
        if let Some(id) = bad.custom_id {
            record["custom_id"] = json!(id);
        }
        let _ = self.records.send(Record::Failure(record));
    }

    fn fail(&self, job: Job, failure: Failure) {
        self.counters.failed.fetch_add(1, Relaxed);
        let error =
            json!({"message": failure.message, "code": failure.code, "status": failure.status});
        let record = match job.format {
            // The Batch API's error-file shape, plus the line and the attempt count.
            Format::BatchApi => json!({
                "id": format!("batch_req_{}", job.line),
                "custom_id": job.custom_id,
                "response": failure.response.map(|body| json!({
                    "status_code": failure.status, "request_id": "", "body": body,
                })),
                "error": error,
                "line": job.line,
                "attempts": failure.attempts,
            }),
            Format::Cookbook => {
                let mut record = json!({
                    "line": job.line,
                    "error": error,
                    "attempts": failure.attempts,
                    "request": job.body,
                });
                if let Some(metadata) = job.metadata {
                    record["metadata"] = metadata;
                }
                if let Some(response) = failure.response {
                    record["response"] = response;
                }
                record
            }
        };
        let _ = self.records.send(Record::Failure(record));
    }

    fn succeed(&self, job: Job, status: u16, request_id: String, response: Value) {
        self.counters.succeeded.fetch_add(1, Relaxed);
        let record = match job.format {
            Format::Cookbook => match job.metadata {
                Some(metadata) => json!([job.body, response, metadata]),
                None => json!([job.body, response]),
            },
            Format::BatchApi => json!({
                "id": format!("batch_req_{}", job.line),
                "custom_id": job.custom_id,
                "response": {"status_code": status, "request_id": request_id, "body": response},
                "error": null,
            }),
        };
        let _ = self.records.send(Record::Result(record));
    }

    /// The limiter in use and the limits it holds.
    fn limits(&self) -> Limits {
        self.limits
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Puts `limiter`, holding `rpm` and `tpm`, in place of the one in use.
    fn replace_limiter(&self, limiter: Limiter, rpm: Option<u64>, tpm: Option<u64>) {
        let mut limits = self.limits.lock().unwrap_or_else(PoisonError::into_inner);
        *limits = Limits {
            limiter: Some(limiter),
            rpm,
            tpm,
            generation: limits.generation + 1,
        };
        *self.shown.lock().unwrap_or_else(PoisonError::into_inner) = (rpm, tpm);
    }

    /// When the provider reports a limit below one the limiter holds (a flag set too
    /// high), replaces the limiter by one holding the provider's limit, pulled down to
    /// what the headers say is left, and says so once per limit lowered. A limit the
    /// limiter does not hold is learned only from the first answers (see [`run`]), and a
    /// higher one reported never raises a flag: it may be kept low on purpose.
    ///
    /// `order` is the order the answered request was sent in: the requests sent after it
    /// and not answered yet are the ones its headers may not count.
    async fn lower_limits(&self, seen: &RateLimitHeaders, age: Duration, order: u64) {
        let lower = |held: Option<u64>, budget: Option<tollgate::provider::Budget>| {
            held.zip(budget.and_then(|b| b.limit))
                .and_then(|(held, limit)| (0 < limit && limit < held).then_some(limit))
        };
        let wanted = |l: &Limits| (lower(l.rpm, seen.requests), lower(l.tpm, seen.tokens));
        if wanted(&self.limits()) == (None, None) {
            return;
        }
        let _one_at_a_time = self.lowering.lock().await;
        let current = self.limits();
        let (rpm, tpm) = wanted(&current);
        if (rpm, tpm) == (None, None) {
            return;
        }
        let (new_rpm, new_tpm) = (rpm.or(current.rpm), tpm.or(current.tpm));
        let limiter = match build_limiter(&self.config, new_rpm, new_tpm).await {
            Ok(limiter) => limiter,
            Err(e) => {
                tracing::warn!(
                    "the provider reports lower limits, but no limiter holding them could be built ({e}): keeping the limits given"
                );
                return;
            }
        };
        // The headers cannot count the requests sent after the answered one and still on
        // their way, which the old limiter admitted: they are taken from what is left.
        let (requests, tokens) = self
            .counters
            .on_the_way
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .range(order + 1..)
            .fold((0u64, 0u64), |(n, t), (_, tokens)| {
                (n + 1, t.saturating_add(*tokens))
            });
        let mut left = *seen;
        let less = |budget: &mut Option<tollgate::provider::Budget>, n: u64| {
            if let Some(remaining) = budget.as_mut().and_then(|b| b.remaining.as_mut()) {
                *remaining = remaining.saturating_sub(n);
            }
        };
        less(&mut left.requests, requests);
        less(&mut left.tokens, tokens);
        let _ = limiter.absorb(&self.account, &left, age).await;
        self.replace_limiter(limiter, new_rpm, new_tpm);
        // The new limiter's state was just set from the provider's: as good as a look.
        self.mark_alive().await;
        for (name, flag, limit) in [("--rpm", current.rpm, rpm), ("--tpm", current.tpm, tpm)] {
            if let (Some(flag), Some(limit)) = (flag, limit) {
                tracing::warn!(
                    "the provider reports a limit of {limit}, below the {flag} of {name}: using {limit} from now on (pass {name} {limit} to start there)"
                );
            }
        }
    }

    /// Whether the limits live in Redis, shared with other processes: each decision is
    /// then checked for the mark a look leaves, to find a state Redis lost (in memory
    /// nothing loses it).
    fn shared(&self) -> bool {
        self.config.redis.is_some()
    }

    /// Leaves the mark of a look in the shared state when it is missing (see
    /// [`look::alive_quota`]).
    async fn mark_alive(&self) {
        let limits = self.limits();
        if let (true, Some(limiter)) = (self.shared(), &limits.limiter) {
            // Refused when the mark is there already: it stays as it was made.
            let _ = limiter.try_acquire(&self.account, look::mark_alive()).await;
        }
    }

    /// Whether the shared state that granted `permit` is the one in Redis now. Not when
    /// the decision found the state without the mark a look leaves (Redis restarted
    /// empty or was flushed), nor when the state is now without it, nor when it was
    /// marked again since this permit's turn was reserved (lost and set again from the
    /// provider's headers, which do not count the reservation): then a look is wanted
    /// where the mark is missing, and the permit must be taken again.
    async fn state_kept(&self, limiter: &Limiter, permit: &tollgate::Permit<'_>) -> bool {
        let Ok(held) = permit.status().await else {
            return true;
        };
        let mut kept = !look::lost(&held);
        // A turn reserved earlier: is the state still the one it was reserved in? (A
        // grant's own round trip counts as waiting on Redis; a state lost and marked again
        // within that is not possible: a look takes a provider's round trip.)
        if kept
            && permit.waited() > Duration::from_millis(100)
            && let Ok(now) = limiter.status(&self.account).await
        {
            kept = !look::lost(&now);
            if kept && !look::same_mark(&held, &now, permit.waited()) {
                tracing::debug!(
                    "the shared budget was lost and set again since this request's turn was reserved: taking it again"
                );
                return false;
            }
        }
        if !kept && self.look.want() {
            tracing::warn!(
                "the shared budget in Redis was found empty while this run had spent it (Redis restarted or was flushed?): one request looks at the provider's budget before the others go"
            );
        }
        kept
    }

    /// Waits while the provider asked everyone to pause; false when the run stops.
    async fn wait_gate(&self) -> bool {
        loop {
            if *self.stop.borrow() {
                return false;
            }
            let until = *self.gate.lock().unwrap_or_else(PoisonError::into_inner);
            match until {
                Some(until) if until > Instant::now() => {
                    let mut stop = self.stop.clone();
                    tokio::select! {
                        () = tokio::time::sleep_until(until.into()) => {}
                        _ = stop.wait_for(|s| *s) => return false,
                    }
                }
                _ => return true,
            }
        }
    }

    /// Stops the run for `reason` (the first reason given is kept).
    fn stop_for(&self, reason: String) {
        let mut slot = self
            .stop_reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            tracing::error!("stopping: {reason}");
            *slot = Some(reason);
        }
        let _ = self.stop_tx.send(true);
    }

    /// Stops the run for a failure of the whole run (the first one is kept): nothing
    /// more is sent, and no line not answered yet is written.
    fn fail_run(&self, failure: RunFailure) {
        let mut slot = self
            .run_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            tracing::error!("stopping: {failure}");
            *slot = Some(failure);
        }
        drop(slot);
        let _ = self.stop_tx.send(true);
    }

    fn run_failed(&self) -> bool {
        self.run_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// The provider answered (any status): it is reachable.
    fn answered(&self) {
        let mut reach = self.reach.lock().unwrap_or_else(PoisonError::into_inner);
        reach.last_answer = Instant::now();
        reach.down_since = None;
    }

    /// An attempt sent at `sent` got no answer; returns whether the provider has not
    /// answered anything since (it may be down: the attempt does not use up the line's
    /// attempts, and `--give-up-after` decides).
    fn unanswered(&self, sent: Instant, error: &str) -> bool {
        let mut reach = self.reach.lock().unwrap_or_else(PoisonError::into_inner);
        if reach.last_answer > sent {
            return false;
        }
        if reach.down_since.is_none() {
            let since = sent.max(reach.last_answer);
            reach.down_since = Some((since, error.to_owned()));
        }
        true
    }

    fn pause_until(&self, until: Instant) {
        let mut gate = self.gate.lock().unwrap_or_else(PoisonError::into_inner);
        if gate.is_none_or(|g| g < until) {
            *gate = Some(until);
        }
    }

    /// Sleeps unless the run stops first; false when it stops.
    async fn sleep(&self, d: Duration) -> bool {
        let mut stop = self.stop.clone();
        tokio::select! {
            () = tokio::time::sleep(d) => true,
            _ = stop.wait_for(|s| *s) => false,
        }
    }

    /// Runs one line to its end (a result or a failure) unless the run stops first.
    /// Returns the rate-limit headers of the last answer.
    async fn run_job(&self, job: Job) -> Option<RateLimitHeaders> {
        let target = match &job.url {
            None => self.url.clone(),
            Some(path) => match self.url.join(path) {
                Ok(url) => url,
                Err(e) => {
                    let message = format!("line {}: cannot send to {path:?}: {e}", job.line);
                    self.fail(job, Failure::before_sending(message, "bad_url", 0));
                    return None;
                }
            },
        };
        let endpoint = Endpoint::from_path(target.path());
        let estimated = match endpoint.map(|e| estimate(e, &job.body)) {
            None => Estimate::default(),
            Some(Ok(e)) => e,
            Some(Err(e)) => {
                let message = format!("line {}: {e}", job.line);
                self.fail(job, Failure::before_sending(message, "invalid_request", 0));
                return None;
            }
        };
        let body = bytes_of(&job.body);
        let mut cost = estimated.cost();
        let mut attempt = 0u32;
        let mut seen = None;
        // Set when this line is the one request looking at the provider's budget.
        let mut looking = None;
        loop {
            if !self.wait_gate().await {
                return seen;
            }
            // Every other request waits while one looks; this one may be it.
            let mut epoch = None;
            if looking.is_none() {
                let mut stop = self.stop.clone();
                match self.look.turn(&mut stop).await {
                    Turn::Look(l) => {
                        tracing::debug!(
                            line = job.line,
                            "looking at the provider's budget: this request goes alone"
                        );
                        looking = Some(l);
                    }
                    Turn::Go(e) => epoch = Some(e),
                    Turn::Stop => return seen,
                }
            }
            let limits = self.limits();
            let permit = match &limits.limiter {
                None => None,
                Some(limiter) => {
                    let mut stop = self.stop.clone();
                    let acquired = tokio::select! {
                        r = limiter.acquire(&self.account, cost) => r,
                        _ = stop.wait_for(|s| *s) => return seen,
                    };
                    match acquired {
                        Ok(permit) => {
                            if limiter.redis_up() == Some(true) {
                                self.outage.up();
                            }
                            Some(permit)
                        }
                        // Over the burst (the limit less the jitter allowance) but within
                        // the limit itself: the provider admits it from a full bucket, so
                        // wait for a full burst rather than fail it.
                        Err(LimitError::TooLarge(t))
                            if limits.tpm.is_some_and(|tpm| t.cost() <= tpm)
                                && t.quota().name().starts_with("tokens")
                                && cost == estimated.cost() =>
                        {
                            let input = estimated.input.min(t.capacity());
                            cost = Cost::input(input).output(t.capacity() - input);
                            continue;
                        }
                        Err(LimitError::TooLarge(t)) => {
                            let message = format!(
                                "line {}: the request counts {} tokens, more than the limit {} can ever admit at once ({}): shorten the prompt or lower max_tokens",
                                job.line,
                                t.cost(),
                                t.quota(),
                                t.capacity()
                            );
                            self.fail(
                                job,
                                Failure::before_sending(message, "request_too_large", attempt),
                            );
                            return seen;
                        }
                        Err(LimitError::Unavailable(u)) => {
                            if self.config.on_redis_down == OnRedisDown::Fail {
                                self.stop_for(format!(
                                    "Redis at {} is down ({}) and --on-redis-down fail stops the run: the lines not answered were not written; run the same command again when Redis is back",
                                    self.outage.url,
                                    u.detail()
                                ));
                                return seen;
                            }
                            // Said once for the whole outage (see [`Outage`]).
                            self.outage.down(u.detail());
                            // Back from an outage, Redis may have lost the budget: one
                            // request looks at the provider's before the others go.
                            if looking.is_none() {
                                self.look.want();
                            }
                            if !self.sleep(Duration::from_millis(500)).await {
                                return seen;
                            }
                            continue;
                        }
                        Err(e) => {
                            let message = format!("line {}: {e}", job.line);
                            self.fail(job, Failure::before_sending(message, "limiter", attempt));
                            return seen;
                        }
                    }
                }
            };
            if permit.is_some()
                && self
                    .limits
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .generation
                    != limits.generation
            {
                // The limiter was replaced while this line waited: take a permit from
                // the new one, which holds the limits now known.
                drop(permit);
                continue;
            }
            if let (Some(epoch), Some(p)) = (epoch, &permit) {
                let trusted = match &limits.limiter {
                    // On Redis the mark tells exactly whether the state that granted the
                    // permit is still there: a permit reserved before a look that found
                    // the state as it was (an outage that lost nothing) stays good.
                    Some(limiter) if self.shared() => self.state_kept(limiter, p).await,
                    // In memory nothing loses the state; a look wanted, begun or ended
                    // while this line waited corrected it: the permit is taken again.
                    _ => self.look.still(epoch),
                };
                if !trusted {
                    tracing::debug!(
                        line = job.line,
                        "a permit granted before the last look is taken again"
                    );
                    // Dropped, never given back: a look may already have set the state
                    // from the provider's headers, which do not count this permit, and
                    // giving it back there would make room the provider does not have.
                    drop(permit);
                    continue;
                }
            }
            // A 429 may have paused everyone while this request waited its turn.
            if !self.wait_gate().await {
                return seen;
            }
            attempt += 1;
            let mut down = false;
            self.counters.record_send(estimated.total());
            let sent = Instant::now();
            let on_the_way = OnTheWay::new(&self.counters, estimated.total());
            let order = on_the_way.order;
            let answer = self.send(&target, endpoint, body.clone()).await;
            drop(on_the_way);
            // Admitted work counts in the rates shown; a 429 (counted apart) and a request
            // with no answer do not.
            let admitted = matches!(&answer, Ok((status, _, _)) if *status != http::StatusCode::TOO_MANY_REQUESTS);
            self.counters
                .record_answer(estimated.total(), sent.elapsed(), admitted);
            let (hint, failure) = match answer {
                Ok((status, headers, bytes)) => {
                    self.answered();
                    let headers_seen = tollgate::provider::parse(&headers, SystemTime::now());
                    if !headers_seen.is_empty()
                        && let Some(limiter) = &self.limits().limiter
                    {
                        // The look's answer sets the state from the provider's, and errs on
                        // the safe side once: no refill counted for the round trip (its
                        // first connection's set-up made the provider's count look up to
                        // 7 ms older than it was), and one unit less than it says is left
                        // (the two clocks' phases within a unit never agree). Without both,
                        // the request after a 429-ed look met a second 429, a millisecond
                        // before the provider's refill.
                        let (absorbed, age) = if looking.is_some() {
                            (look::one_less(&headers_seen), Duration::ZERO)
                        } else {
                            (headers_seen, sent.elapsed())
                        };
                        let _ = limiter.absorb(&self.account, &absorbed, age).await;
                        self.lower_limits(&headers_seen, sent.elapsed(), order)
                            .await;
                    }
                    let hint = headers_seen.wait_hint();
                    seen = Some(headers_seen);
                    // The provider answered with its rate-limit headers (absorbed above),
                    // or with success and none (it sends none): the look is over, the
                    // others may go. An error without them (a 5xx from a load balancer)
                    // told nothing: this request keeps looking as it is retried.
                    let told = !headers_seen.is_empty() || status.is_success();
                    if told && let Some(l) = looking.take() {
                        tracing::debug!(
                            line = job.line,
                            status = status.as_u16(),
                            "looked: the others may go"
                        );
                        self.mark_alive().await;
                        l.done();
                    }
                    // Kept as text when it is not JSON, or nests too deep for its output
                    // line to be read back on resume.
                    let response = serde_json::from_slice::<Value>(&bytes)
                        .ok()
                        .filter(|v| input::depth(v) + 2 <= input::MAX_DEPTH)
                        .unwrap_or_else(|| {
                            Value::String(String::from_utf8_lossy(&bytes).into_owned())
                        });
                    if status.is_success() {
                        let (input, output) = usage(&response);
                        self.counters.prompt_tokens.fetch_add(input, Relaxed);
                        self.counters.completion_tokens.fetch_add(output, Relaxed);
                        if let Some(permit) = permit {
                            let _ = permit.settle(Usage::new(input, output)).await;
                        }
                        let request_id = headers
                            .get("x-request-id")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned();
                        self.succeed(job, status.as_u16(), request_id, response);
                        return seen;
                    }
                    drop(permit);
                    let message = error_message(&response).unwrap_or_else(|| status.to_string());
                    let code = response
                        .pointer("/error/code")
                        .or_else(|| response.pointer("/error/type"))
                        .and_then(Value::as_str)
                        .map(str::to_owned);
                    let failure = Failure {
                        message: format!("HTTP {}: {message}", status.as_u16()),
                        status: Some(status.as_u16()),
                        code,
                        attempts: attempt,
                        response: Some(response),
                    };
                    let too_large = status == http::StatusCode::TOO_MANY_REQUESTS
                        && message.to_ascii_lowercase().contains("too large");
                    let lower = String::from_utf8_lossy(&bytes).to_ascii_lowercase();
                    let cause = match status.as_u16() {
                        401 | 403 => Some(RunFailureCause::Auth),
                        429 if !too_large && tollgate::retry::is_permanent(status, &bytes) => {
                            Some(RunFailureCause::Credit)
                        }
                        400 if lower.contains("credit balance is too low") => {
                            Some(RunFailureCause::Credit)
                        }
                        _ => None,
                    };
                    if let Some(cause) = cause {
                        if status == http::StatusCode::TOO_MANY_REQUESTS {
                            self.counters.rate_limited.fetch_add(1, Relaxed);
                        }
                        // Not this line's fault: it is not written, and neither is any
                        // other line not answered yet.
                        self.fail_run(RunFailure {
                            cause,
                            status: Some(status.as_u16()),
                            message: redact(&message, self.api_key.as_deref()),
                        });
                        return seen;
                    }
                    if status == http::StatusCode::TOO_MANY_REQUESTS {
                        self.counters.rate_limited.fetch_add(1, Relaxed);
                        if too_large {
                            self.fail(job, failure);
                            return seen;
                        }
                        match hint {
                            // A daily limit, most likely: waiting that long inside the run
                            // helps no one. Stop cleanly; a rerun after the reset resumes.
                            Some(hint) if hint > self.backoff.max_hint() => {
                                self.stop_for(format!(
                                    "the provider answered 429 and asked to wait {} (longer than the {} a run waits); run the same command again after that to finish",
                                    human(hint),
                                    human(self.backoff.max_hint())
                                ));
                                return seen;
                            }
                            Some(hint) => self.pause_until(Instant::now() + hint),
                            None => {}
                        }
                    } else if status.is_server_error() {
                        self.counters.server_errors.fetch_add(1, Relaxed);
                    }
                    if !tollgate::retry::is_retryable(status) {
                        self.fail(job, failure);
                        return seen;
                    }
                    (hint, failure)
                }
                Err(e) => {
                    drop(permit);
                    self.counters.transport_errors.fetch_add(1, Relaxed);
                    let error = redact(&chain(&e), self.api_key.as_deref());
                    if self.unanswered(sent, &error) {
                        // The provider may be down: this is not the line's fault, and the
                        // watchdog stops the run after --give-up-after.
                        down = true;
                    }
                    let failure = Failure {
                        message: format!("request failed: {error}"),
                        status: None,
                        code: Some(
                            if e.is_timeout() {
                                "timeout"
                            } else {
                                "connection"
                            }
                            .into(),
                        ),
                        attempts: attempt,
                        response: None,
                    };
                    (None, failure)
                }
            };
            if self.run_failed() {
                // Stopped for a failure of the whole run: nothing more is written.
                return seen;
            }
            if attempt >= self.max_attempts && down {
                // Attempts are not used up while the provider answers no one: keep
                // trying at the backoff's cap until it answers or the run gives up.
                self.counters.retries.fetch_add(1, Relaxed);
                if !self.sleep(self.backoff.delay(attempt - 1, None)).await {
                    return seen;
                }
                continue;
            }
            if attempt >= self.max_attempts {
                let mut failure = failure;
                failure.message = format!(
                    "gave up after {attempt} attempts; last: {}",
                    failure.message
                );
                self.fail(job, failure);
                return seen;
            }
            self.counters.retries.fetch_add(1, Relaxed);
            let hint = hint.map(|h| h.min(self.backoff.max_hint()));
            if !self.sleep(self.backoff.delay(attempt - 1, hint)).await {
                return seen;
            }
        }
    }

    async fn send(
        &self,
        target: &reqwest::Url,
        endpoint: Option<Endpoint>,
        body: bytes::Bytes,
    ) -> Result<(http::StatusCode, http::HeaderMap, bytes::Bytes), reqwest::Error> {
        let mut request = self
            .client
            .post(target.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .timeout(self.timeout)
            .body(body);
        if let Some(key) = &self.api_key {
            request = if endpoint == Some(Endpoint::Messages) {
                request
                    .header("x-api-key", key)
                    .header("anthropic-version", "2023-06-01")
            } else {
                request.bearer_auth(key)
            };
        }
        let response = request.send().await?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.bytes().await?;
        Ok((status, headers, bytes))
    }
}

/// A long wait as people read it: `23h0m`, `5m0s`.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s < 3600 {
        format!("{}m{}s", s / 60, s % 60)
    } else {
        format!("{}h{}m", s / 3600, s % 3600 / 60)
    }
}

fn bytes_of(v: &Value) -> bytes::Bytes {
    bytes::Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

/// Prompt and completion tokens from an OpenAI or Anthropic response body.
fn usage(response: &Value) -> (u64, u64) {
    let get = |p: &str| response.pointer(p).and_then(Value::as_u64);
    let input = get("/usage/prompt_tokens")
        .or_else(|| get("/usage/input_tokens"))
        .unwrap_or(0);
    let output = get("/usage/completion_tokens")
        .or_else(|| get("/usage/output_tokens"))
        .unwrap_or(0);
    (input, output)
}

fn error_message(response: &Value) -> Option<String> {
    response
        .pointer("/error/message")
        .and_then(Value::as_str)
        .map(str::to_owned)
}
