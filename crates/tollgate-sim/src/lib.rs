//! `tollgate sim`: an OpenAI- and Anthropic-compatible API that enforces rate limits the
//! way OpenAI does, offline, for tests, benchmarks and seeing how an app behaves at the
//! limit.
//!
//! It serves `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings`,
//! `/v1/responses` and Anthropic's `/v1/messages`, and `GET /stats`; any other path is `404`, as at the real
//! API (so a client that doubles its base URL's `/v1` fails here as it would there).
//! Every API key (`Authorization: Bearer`, `x-api-key` or `api-key`; none at all is the
//! key `""`) has its own requests-per-minute and tokens-per-minute buckets, full at start
//! (or as full as [`SimConfig::start_fill`] says, like a key another app has partly
//! spent) and refilled continuously; a request is
//! counted at admission as its prompt tokens plus `max_tokens × n`
//! ([`tollgate::estimate`]), exactly as OpenAI counts it, and a request that does not fit
//! gets a `429` with OpenAI's error body, `retry-after`, `retry-after-ms` and
//! `x-ratelimit-*` headers (successes carry the same headers). Responses are generated
//! text whose `usage` is exact; `"stream": true` gets server-sent events with a final
//! usage chunk. A latency model and fault injection (500/503s, slow responses, dropped
//! connections) are set in [`SimConfig`].
//!
//! ```no_run
//! use tollgate_sim::{Sim, SimConfig};
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let sim = Sim::start("127.0.0.1:8089".parse()?, SimConfig { rpm: 600, tpm: 90_000, ..SimConfig::default() }).await?;
//! println!("point your app at http://{}/v1", sim.addr());
//! sim.wait().await?;
//! # Ok(()) }
//! ```
//!
//! What this crate must never do: depend on tollgate's limiter. Its buckets are a
//! separate, plain implementation, so tests that run tollgate against it check one
//! implementation against another.

mod bucket;
mod respond;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tollgate::estimate::{Endpoint, Estimate, estimate};

use bucket::Bucket;

/// How the simulator limits, answers and misbehaves.
///
/// ```
/// let config = tollgate_sim::SimConfig { rpm: 60, tpm: 10_000, ..Default::default() };
/// assert!(config.check().is_ok());
/// ```
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Requests per minute per API key (bucket capacity; refilled continuously).
    pub rpm: u64,
    /// Tokens per minute per API key.
    pub tpm: u64,
    /// Time before a response starts (time to first token).
    pub latency: Duration,
    /// Time per generated token after the first.
    pub token_latency: Duration,
    /// Tokens generated per choice when the request sets no lower maximum.
    pub output_tokens: u64,
    /// Share of requests (0 to 1) answered with a 500 or 503, before admission.
    pub error_rate: f64,
    /// Share of admitted requests delayed by [`SimConfig::slow`] more.
    pub slow_rate: f64,
    /// Extra delay of a slow response.
    pub slow: Duration,
    /// Share of admitted requests whose connection is dropped before the body ends.
    pub drop_rate: f64,
    /// Seed of the fault and jitter draws, so a run can be repeated.
    pub seed: u64,
    /// API keys accepted; empty accepts any key (and none).
    pub keys: Vec<String>,
    /// Length of each returned embedding vector.
    pub embedding_dims: usize,
    /// How full each key's buckets are when the key is first seen: 1.0 (the default) is
    /// a fresh key, 0.0 one whose budget an earlier run or another app has just spent.
    pub start_fill: f64,
    /// Answer every request with a valid key 429 `insufficient_quota`, as OpenAI does
    /// for an account out of credit (Anthropic: 400 "Your credit balance is too low").
    pub out_of_credit: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            rpm: 600,
            tpm: 90_000,
            latency: Duration::from_millis(50),
            token_latency: Duration::ZERO,
            output_tokens: 64,
            error_rate: 0.0,
            slow_rate: 0.0,
            slow: Duration::from_secs(10),
            drop_rate: 0.0,
            seed: 0,
            keys: Vec::new(),
            embedding_dims: 8,
            start_fill: 1.0,
            out_of_credit: false,
        }
    }
}

/// A setting the simulator cannot run with.
///
/// ```
/// let err = tollgate_sim::SimConfig { rpm: 0, ..Default::default() }.check().unwrap_err();
/// assert_eq!(err.to_string(), "--rpm must be at least 1");
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// A limit of zero.
    #[error("--{0} must be at least 1")]
    ZeroLimit(&'static str),
    /// A share or fill outside 0..=1.
    #[error("--{name} must be between 0 and 1, not {value}")]
    BadRate {
        /// The flag.
        name: &'static str,
        /// Its value.
        value: f64,
    },
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The server stopped on an I/O error.
    #[error("the simulator stopped: {0}")]
    Serve(std::io::Error),
}

impl SimConfig {
    /// Checks the limits and shares.
    ///
    /// # Errors
    ///
    /// [`SimError::ZeroLimit`] or [`SimError::BadRate`].
    ///
    /// ```
    /// let bad = tollgate_sim::SimConfig { drop_rate: 1.5, ..Default::default() };
    /// assert!(bad.check().is_err());
    /// ```
    pub fn check(&self) -> Result<(), SimError> {
        if self.rpm == 0 {
            return Err(SimError::ZeroLimit("rpm"));
        }
        if self.tpm == 0 {
            return Err(SimError::ZeroLimit("tpm"));
        }
        for (name, value) in [
            ("error-rate", self.error_rate),
            ("slow-rate", self.slow_rate),
            ("drop-rate", self.drop_rate),
            ("start-fill", self.start_fill),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(SimError::BadRate { name, value });
            }
        }
        Ok(())
    }
}

/// What the simulator has seen, as `GET /stats` returns it.
///
/// ```
/// let stats = tollgate_sim::Stats::default();
/// assert_eq!(stats.rate_limited, 0);
/// ```
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct Stats {
    /// Requests received on the API routes.
    pub requests: u64,
    /// Requests admitted (counted against the limits).
    pub admitted: u64,
    /// Requests refused with 429.
    pub rate_limited: u64,
    /// Requests answered with an injected 500 or 503.
    pub errors_injected: u64,
    /// Admitted requests whose connection was dropped.
    pub dropped: u64,
    /// Requests refused with 400 or 401 (or 429 `insufficient_quota` with
    /// [`SimConfig::out_of_credit`]).
    pub invalid: u64,
    /// Tokens counted at admission (prompt + `max_tokens × n`), all keys.
    pub tokens_admitted: u64,
    /// Output tokens generated, all keys.
    pub output_tokens: u64,
    /// The most requests one key had admitted in any trailing minute.
    pub max_requests_per_minute: u64,
    /// The most tokens one key had admitted in any trailing minute.
    pub max_tokens_per_minute: u64,
    /// Milliseconds from the first admission to the last.
    pub admission_span_ms: u64,
    /// The limits per key.
    pub rpm: u64,
    /// The limits per key.
    pub tpm: u64,
}

struct KeyState {
    requests: Bucket,
    tokens: Bucket,
    window: VecDeque<(Instant, u64)>,
    window_tokens: u64,
}

struct Shared {
    config: SimConfig,
    keys: Mutex<HashMap<String, KeyState>>,
    stats: Mutex<(Stats, Option<Instant>)>,
    rng: Mutex<fastrand::Rng>,
    next_id: std::sync::atomic::AtomicU64,
}

impl Shared {
    fn stats(&self) -> std::sync::MutexGuard<'_, (Stats, Option<Instant>)> {
        self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn roll(&self) -> f64 {
        self.rng
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .f64()
    }
}

/// A running simulator.
///
/// ```no_run
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let sim = tollgate_sim::Sim::start("127.0.0.1:0".parse()?, Default::default()).await?;
/// let url = format!("http://{}/v1/chat/completions", sim.addr());
/// # let _ = url;
/// sim.shutdown().await?;
/// # Ok(()) }
/// ```
pub struct Sim {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), std::io::Error>>,
}

impl Sim {
    /// Binds `addr` (port 0 picks a free port) and starts serving.
    ///
    /// # Errors
    ///
    /// A bad [`SimConfig`], or [`SimError::Bind`].
    ///
    /// See [`Sim`] for an example.
    pub async fn start(addr: SocketAddr, config: SimConfig) -> Result<Sim, SimError> {
        config.check()?;
        // Load the tokenizer tables now, not on the first request: a first request that
        // waits for them would let a queue build and then arrive at once.
        let _ = tokio::task::spawn_blocking(warm_up).await;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| SimError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| SimError::Bind { addr, source })?;
        let shared = Arc::new(Shared {
            stats: Mutex::new((
                Stats {
                    rpm: config.rpm,
                    tpm: config.tpm,
                    ..Stats::default()
                },
                None,
            )),
            rng: Mutex::new(fastrand::Rng::with_seed(config.seed)),
            config,
            keys: Mutex::new(HashMap::new()),
            next_id: std::sync::atomic::AtomicU64::new(1),
        });
        let app = router(shared.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
        });
        Ok(Sim {
            addr,
            shared,
            stop,
            task,
        })
    }

    /// The address it listens on.
    ///
    /// See [`Sim`] for an example.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What it has seen so far.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let sim = tollgate_sim::Sim::start("127.0.0.1:0".parse()?, Default::default()).await?;
    /// assert_eq!(sim.stats().admitted, 0);
    /// # Ok(()) }
    /// ```
    pub fn stats(&self) -> Stats {
        self.shared.stats().0.clone()
    }

    /// Stops accepting, finishes the requests in flight and returns.
    ///
    /// # Errors
    ///
    /// [`SimError::Serve`] when the server had failed.
    ///
    /// See [`Sim`] for an example.
    pub async fn shutdown(self) -> Result<(), SimError> {
        let _ = self.stop.send(());
        join(self.task).await
    }

    /// Serves until the server stops (it stops only on an I/O error).
    ///
    /// # Errors
    ///
    /// [`SimError::Serve`].
    ///
    /// See the [crate docs](crate) for an example.
    pub async fn wait(self) -> Result<(), SimError> {
        let Sim { stop, task, .. } = self;
        let result = join(task).await;
        drop(stop);
        result
    }
}

async fn join(task: JoinHandle<Result<(), std::io::Error>>) -> Result<(), SimError> {
    match task.await {
        Ok(result) => result.map_err(SimError::Serve),
        Err(join) => Err(SimError::Serve(std::io::Error::other(join))),
    }
}

fn warm_up() {
    tollgate::tokens::Encoding::O200kBase.warm_up();
    tollgate::tokens::Encoding::Cl100kBase.warm_up();
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/stats", get(stats))
        .route("/v1/{*path}", post(api))
        .with_state(shared)
}

async fn stats(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(shared.stats().0.clone()).into_response()
}

/// Which key a request belongs to.
fn api_key(headers: &HeaderMap) -> String {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        });
    bearer
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
        .or_else(|| headers.get("api-key").and_then(|v| v.to_str().ok()))
        .unwrap_or("")
        .trim()
        .to_owned()
}

async fn api(
    State(shared): State<Arc<Shared>>,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // The real APIs serve these exact paths; anything else (`/v1/v1/chat/completions`,
    // a trailing `/`, `/v1/foo/chat/completions`) is a 404 there and here.
    let endpoint = match path.as_str() {
        "chat/completions" => Endpoint::ChatCompletions,
        "completions" => Endpoint::Completions,
        "embeddings" => Endpoint::Embeddings,
        "messages" => Endpoint::Messages,
        "responses" => Endpoint::Responses,
        _ => {
            return respond::error(
                Endpoint::ChatCompletions,
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "unknown_url",
                &format!(
                    "Unknown request URL: POST /v1/{path}. The simulator serves /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses and /v1/messages."
                ),
            );
        }
    };
    shared.stats().0.requests += 1;
    let config = &shared.config;
    let key = api_key(&headers);
    if !config.keys.is_empty() && !config.keys.contains(&key) {
        shared.stats().0.invalid += 1;
        // OpenAI echoes the key given, masked but for its first 3 and last 4 characters.
        let chars: Vec<char> = key.chars().collect();
        let shown = if chars.len() > 7 {
            let (head, tail) = (&chars[..3], &chars[chars.len() - 4..]);
            format!(
                "{}{}{}",
                head.iter().collect::<String>(),
                "*".repeat(chars.len() - 7),
                tail.iter().collect::<String>()
            )
        } else {
            key.clone()
        };
        let message = if key.is_empty() {
            "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).".to_owned()
        } else {
            format!(
                "Incorrect API key provided: {shown}. You can find your API key at https://platform.openai.com/account/api-keys."
            )
        };
        return respond::error(
            endpoint,
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            &message,
        );
    }
    if config.out_of_credit {
        shared.stats().0.invalid += 1;
        return if endpoint == Endpoint::Messages {
            respond::error(
                endpoint,
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_request_error",
                "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits.",
            )
        } else {
            respond::error(
                endpoint,
                StatusCode::TOO_MANY_REQUESTS,
                "insufficient_quota",
                "insufficient_quota",
                "You exceeded your current quota, please check your plan and billing details. For more information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors.",
            )
        };
    }
    let parsed: Result<serde_json::Value, _> = serde_json::from_slice(&body);
    let (request, estimated) = match parsed
        .map_err(|e| format!("We could not parse the JSON body of your request: {e}"))
        .and_then(|v| {
            estimate(endpoint, &v)
                .map(|e| (v, e))
                .map_err(|e| e.to_string())
        }) {
        Ok(ok) => ok,
        Err(message) => {
            shared.stats().0.invalid += 1;
            return respond::error(
                endpoint,
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_request",
                &message,
            );
        }
    };
    if config.error_rate > 0.0 && shared.roll() < config.error_rate {
        shared.stats().0.errors_injected += 1;
        tokio::time::sleep(config.latency).await;
        let status = if shared.roll() < 0.5 {
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        return respond::error(
            endpoint,
            status,
            "server_error",
            "server_error",
            "The server had an error while processing your request (injected by tollgate sim).",
        );
    }
    let limits = match admit(&shared, endpoint, &key, estimated) {
        Ok(limits) => limits,
        Err(refusal) => return *refusal,
    };
    let dropped = config.drop_rate > 0.0 && shared.roll() < config.drop_rate;
    let slow = config.slow_rate > 0.0 && shared.roll() < config.slow_rate;
    let id = shared
        .next_id
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let answer = respond::Answer::new(endpoint, &request, estimated, config, id);
    let mut delay = config.latency;
    if slow {
        delay += config.slow;
    }
    if dropped {
        shared.stats().0.dropped += 1;
        let stream = futures_util::stream::once(async move {
            tokio::time::sleep(delay).await;
            Err::<Bytes, _>(std::io::Error::other("connection dropped by tollgate sim"))
        });
        let mut response = Response::new(Body::from_stream(stream));
        limits.apply(endpoint, response.headers_mut());
        return response;
    }
    shared.stats().0.output_tokens += answer.output_tokens();
    let mut response = answer.into_response(delay, config.token_latency).await;
    limits.apply(endpoint, response.headers_mut());
    response
}

/// The bucket levels after an admission, for the rate-limit headers.
struct Limits {
    rpm: u64,
    tpm: u64,
    requests_left: u64,
    tokens_left: u64,
    requests_reset: Duration,
    tokens_reset: Duration,
}

impl Limits {
    fn apply(&self, endpoint: Endpoint, headers: &mut HeaderMap) {
        respond::rate_limit_headers(endpoint, self, headers);
    }
}

/// Counts the request against its key's buckets, or answers 429.
fn admit(
    shared: &Shared,
    endpoint: Endpoint,
    key: &str,
    estimated: Estimate,
) -> Result<Limits, Box<Response>> {
    let config = &shared.config;
    let now = Instant::now();
    let tokens = estimated.total();
    let mut keys = shared.keys.lock().unwrap_or_else(PoisonError::into_inner);
    let state = keys.entry(key.to_owned()).or_insert_with(|| KeyState {
        requests: Bucket::filled(config.rpm, config.start_fill, now),
        tokens: Bucket::filled(config.tpm, config.start_fill, now),
        window: VecDeque::new(),
        window_tokens: 0,
    });
    let levels = |state: &KeyState| Limits {
        rpm: config.rpm,
        tpm: config.tpm,
        requests_left: state.requests.level(now),
        tokens_left: state.tokens.level(now),
        requests_reset: state.requests.until_full(now),
        tokens_reset: state.tokens.until_full(now),
    };
    let wait_requests = state.requests.wait_for(1, now);
    let wait_tokens = state.tokens.wait_for(tokens, now);
    if tokens > config.tpm || wait_requests > Duration::ZERO || wait_tokens > Duration::ZERO {
        // Which limit refuses: tokens when the request can never fit or waits longest.
        let (kind, limit, left, requested, wait) = if tokens > config.tpm {
            ("tokens", config.tpm, config.tpm, tokens, None)
        } else if wait_tokens >= wait_requests {
            let left = state.tokens.level(now);
            ("tokens", config.tpm, left, tokens, Some(wait_tokens))
        } else {
            let left = state.requests.level(now);
            ("requests", config.rpm, left, 1, Some(wait_requests))
        };
        let limited = respond::Limited {
            kind,
            limit,
            used: limit.saturating_sub(left),
            requested,
            wait,
            levels: levels(state),
        };
        drop(keys);
        shared.stats().0.rate_limited += 1;
        return Err(Box::new(respond::too_many(endpoint, &limited)));
    }
    state.requests.take(1, now);
    state.tokens.take(tokens, now);
    state.window.push_back((now, tokens));
    state.window_tokens += tokens;
    while let Some(&(t, n)) = state.window.front() {
        if now.duration_since(t) < Duration::from_secs(60) {
            break;
        }
        state.window.pop_front();
        state.window_tokens -= n;
    }
    let window_requests = state.window.len() as u64;
    let window_tokens = state.window_tokens;
    let limits = levels(state);
    drop(keys);
    let mut stats = shared.stats();
    let (stats, first) = &mut *stats;
    stats.admitted += 1;
    stats.tokens_admitted += tokens;
    stats.max_requests_per_minute = stats.max_requests_per_minute.max(window_requests);
    stats.max_tokens_per_minute = stats.max_tokens_per_minute.max(window_tokens);
    let first = *first.get_or_insert(now);
    stats.admission_span_ms =
        u64::try_from(now.duration_since(first).as_millis()).unwrap_or(u64::MAX);
    Ok(limits)
}
