//! `tollgate serve`: an OpenAI/Anthropic-compatible proxy that gives each caller its own
//! request, token and concurrency limits and paces all traffic to the provider
//! accounts' limits.
//!
//! Every request is authenticated by its API key (stored as a SHA-256 in the
//! configuration), its tokens are estimated for its endpoint, and one
//! [`tollgate::Limiter`] decision covers the caller's tier limits and the upstream
//! account's limits together: a caller's limits hold across every account that serves
//! it, an account's limits across every caller and tier (see
//! [`tollgate::LimiterBuilder::share_with`] and
//! [`tollgate::LimiterBuilder::share_keys_with`]). The answer is settled with the usage the
//! provider reports, streams included. The gateway uses the library for every limit; it
//! never counts or decides anything itself.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = tollgate_gateway::Config::load("tollgate.toml")?;
//! let gateway = tollgate_gateway::Gateway::new(config).await?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! gateway.serve(listener, std::future::pending()).await?;
//! # Ok(()) }
//! ```

pub mod config;
pub mod metrics;
mod models;
mod pace;
mod proxy;
mod redact;
mod server;
pub mod sse;
pub mod target;
mod unseen;
pub mod usage;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use tollgate::{Accounting, Clock, Limiter, LimiterBuilder, Quota};

pub use config::{Config, ConfigError};

/// Why the gateway could not start.
///
/// ```
/// let e = tollgate_gateway::GatewayError::Config(tollgate_gateway::Config::parse("").unwrap_err());
/// assert!(e.to_string().contains("no upstream"));
/// ```
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A tier's or an upstream's limits cannot be built.
    #[error("limits of {what}: {error}")]
    Limits {
        /// Which tier and upstream.
        what: String,
        /// Why.
        error: tollgate::Error,
    },
    /// The HTTP client or the listener failed.
    #[error("{0}")]
    Io(String),
}

/// The client the gateway forwards with: HTTP/1.1 to `http://` upstreams, TLS (webpki
/// roots) with HTTP/2 or HTTP/1.1 as the upstream chooses to `https://` ones, pooled
/// keep-alive connections. It never follows a redirect: that goes back to the caller
/// like any other answer.
pub(crate) type Http = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Full<bytes::Bytes>,
>;

fn client(connect_timeout: Duration) -> Result<Http, GatewayError> {
    let mut tcp = hyper_util::client::legacy::connect::HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(Some(connect_timeout));
    let tls = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(Arc::new(rustls::crypto::ring::default_provider()))
        .map_err(|e| GatewayError::Io(format!("cannot set up TLS for the upstreams: {e}")))?
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(tcp);
    Ok(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_max_idle_per_host(1024)
            .build(tls),
    )
}

/// A caller, as the gateway knows it.
#[derive(Debug, Clone)]
pub(crate) struct CallerInfo {
    pub(crate) name: String,
    pub(crate) tier: usize,
}

/// One upstream, ready to forward to.
pub(crate) struct UpstreamState {
    pub(crate) name: String,
    pub(crate) kind: config::Kind,
    /// Its URL up to and without the trailing `/` of its path, checked once: each
    /// request's URI is this and its own path and query (less the API root both end and
    /// begin with, see [`target::upstream_uri`]).
    pub(crate) prefix: String,
    /// Callers' own keys go through, each paced as an account of its own.
    pub(crate) forward_key: bool,
    /// The header carrying the gateway's key for this upstream, in the upstream's
    /// spelling (marked sensitive, so it never shows in debug output).
    pub(crate) auth: Option<(http::HeaderName, http::HeaderValue)>,
    /// The gateway's key for this upstream, in lowercase, to take out of whatever comes
    /// back from it.
    pub(crate) secret: Option<String>,
    pub(crate) models: Vec<String>,
    /// The same, by canonical name, for routing.
    pub(crate) listed: Vec<String>,
    pub(crate) default: bool,
    /// The account serving models without limits of their own.
    pub(crate) default_account: usize,
    /// The accounts of models with limits of their own.
    pub(crate) model_accounts: HashMap<String, usize>,
}

/// One budget of an upstream: its general limits, or one model's.
pub(crate) struct AccountState {
    /// The account's quotas alone: the upstream's rate-limit headers are absorbed here.
    pub(crate) limiter: Option<Limiter>,
    /// An account paced apart from the callers' decision: to limits learned from its
    /// answers (none configured), or per caller key (callers' keys passed through).
    pub(crate) pace: Option<Arc<pace::Pace>>,
    /// An absorb is running: answers arriving meanwhile skip theirs (the next answer's
    /// headers are as fresh), so absorbing never queues requests behind it.
    pub(crate) absorbing: std::sync::atomic::AtomicBool,
}

/// A limiter, and the longest any of its quotas lets a request wait.
#[derive(Clone)]
pub(crate) struct Gate {
    pub(crate) limiter: Limiter,
    /// Zero: every quota rejects, so the gateway decides without waiting at all. Each
    /// quota carries its own wait ([`tollgate::Quota::max_wait`]).
    pub(crate) wait: Duration,
    /// Whether any quota is a spend limit (requests then need their model's price).
    pub(crate) spends: bool,
    /// Whether any quota counts tokens or spend: a request's worst-case output then
    /// matters, and one without `max_tokens` gets its model's maximum written in.
    pub(crate) tokens: bool,
}

/// A tier, ready to decide.
pub(crate) struct TierState {
    pub(crate) name: String,
    /// The time within which upstream 429s and 5xx are retried.
    pub(crate) max_wait: Duration,
    /// The longest the tier's policy lets a request wait for an account paced apart
    /// ([`AccountState::pace`]): `max_wait` when it waits, zero when it rejects.
    pub(crate) wait: Duration,
    /// Per account (same order as `accounts`): the limiter deciding the tier's and the
    /// account's quotas together; `None` when neither has a limit.
    pub(crate) limiters: Vec<Option<Gate>>,
    /// Each caller's own limits on one model (`model_limits`, by canonical name),
    /// decided before the others and given back if they refuse.
    pub(crate) models: HashMap<String, Gate>,
    /// Routes beyond the estimated ones its callers may use (`allow_routes`).
    pub(crate) routes: Vec<String>,
    /// Its own quotas that reject rather than wait, by name, with the time one unit of a
    /// rate takes to come back (`None`: concurrency): one with nothing left refuses a
    /// request before its body is read.
    pub(crate) rejecting: HashMap<String, Option<Duration>>,
}

/// What the quota named like this limits, for headers and error bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Measure {
    Requests,
    Tokens,
    Concurrency,
    /// Micro-dollars.
    Spend,
}

pub(crate) struct State {
    pub(crate) callers: HashMap<String, CallerInfo>,
    /// No callers configured: everyone is `anonymous` in the `default` tier.
    pub(crate) open: Option<CallerInfo>,
    pub(crate) tiers: Vec<TierState>,
    pub(crate) upstreams: Vec<UpstreamState>,
    pub(crate) accounts: Vec<AccountState>,
    pub(crate) measures: HashMap<String, Measure>,
    pub(crate) http: Http,
    pub(crate) metrics: metrics::Metrics,
    pub(crate) max_body: usize,
    pub(crate) upstream_timeout: Duration,
    /// The longest a client may take to send a request's body (`body_timeout`).
    pub(crate) body_timeout: Duration,
    /// The SHA-256 of the token `GET /metrics` requires, when one is configured.
    pub(crate) metrics_token: Option<[u8; 32]>,
    /// The client connections' timeouts and cap.
    pub(crate) guards: server::Guards,
    /// Models' prices, for spend limits, and the price of every other model (`"*"`).
    pub(crate) prices: HashMap<String, config::Price>,
    pub(crate) default_price: Option<config::Price>,
    /// Model names, resolved to one canonical name each.
    pub(crate) models: models::Models,
    /// Account limits go in callers' `x-ratelimit-*` headers too.
    pub(crate) expose_account_limits: bool,
    /// Requests being handled, settlement included (which runs after the answer is sent).
    pub(crate) calls: Calls,
}

/// Counts the requests being handled, so shutdown can wait for their settlements too.
#[derive(Default)]
pub(crate) struct Calls {
    open: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

/// One request being handled; dropped when it is settled.
pub(crate) struct CallGuard(Arc<State>);

impl Calls {
    /// Counts a request until the guard drops.
    pub(crate) fn enter(state: &Arc<State>) -> CallGuard {
        state
            .calls
            .open
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        CallGuard(state.clone())
    }

    /// Resolves when no request is being handled.
    async fn idle(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.open.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let calls = &self.0.calls;
        if calls.open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
            calls.idle.notify_waiters();
        }
    }
}

/// A configured gateway, ready to serve.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let config = tollgate_gateway::Config::parse(r#"
/// [upstreams.sim]
/// kind = "sim"
/// url = "http://127.0.0.1:9"
/// "#).unwrap();
/// let gateway = tollgate_gateway::Gateway::new(config).await.unwrap();
/// let _app: axum::Router = gateway.router();
/// # });
/// ```
#[derive(Clone)]
pub struct Gateway {
    state: Arc<State>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("callers", &self.state.callers.len())
            .field("upstreams", &self.state.upstreams.len())
            .finish_non_exhaustive()
    }
}

/// How much later than the gateway decides a request its upstream may count it
/// (connection set-up, a first request's longer way): an account paced apart keeps this
/// much of its refill in hand, as the batch runner's `--jitter` does, so a schedule exact
/// at the gateway stays inside the limits at the provider, whose clock starts when the
/// first request arrives.
pub(crate) const SEND_ALLOWANCE: Duration = Duration::from_millis(250);

/// The burst of an account paced apart with `amount` a `period`: the amount less what
/// it refills in [`SEND_ALLOWANCE`], at least 1.
pub(crate) fn paced_burst(amount: u64, period: Duration) -> u64 {
    let slack = (u128::from(amount) * SEND_ALLOWANCE.as_nanos()).div_ceil(period.as_nanos().max(1));
    amount
        .saturating_sub(u64::try_from(slack).unwrap_or(u64::MAX))
        .max(1)
}

/// Whose limits a set of quotas holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// Each caller's own (per key), tokens charged as used.
    Caller,
    /// The provider account's, shared by every caller, tokens charged as the provider
    /// counts them (the estimate at admission).
    Account,
    /// A provider account that is each caller's own (its key passed through): per key,
    /// counted as the provider counts.
    OwnAccount,
}

/// The quotas of a set of limits, named `<prefix>.<limit>`, as `owner` holds them; with
/// the wait each allows a request of `tier`, when given.
fn quotas(
    limits: &config::Limits,
    prefix: &str,
    owner: Owner,
    tier: Option<&config::Tier>,
) -> Vec<(Quota, Measure)> {
    let shared = owner == Owner::Account;
    let provider = owner != Owner::Caller;
    let mut out = Vec::new();
    for (name, value) in limits.entries() {
        let Some(limit) = value else { continue };
        let n = limit.limit;
        let (q, m) = match name {
            "requests_per_minute" => (Quota::requests(n).per_minute(), Measure::Requests),
            "requests_per_day" => (Quota::requests(n).per_day(), Measure::Requests),
            "tokens_per_minute" => (Quota::tokens(n).per_minute(), Measure::Tokens),
            "tokens_per_day" => (Quota::tokens(n).per_day(), Measure::Tokens),
            "input_tokens_per_minute" => (Quota::input_tokens(n).per_minute(), Measure::Tokens),
            "output_tokens_per_minute" => (Quota::output_tokens(n).per_minute(), Measure::Tokens),
            _ => (Quota::concurrent(n), Measure::Concurrency),
        };
        let q = q.named(format!("{prefix}.{name}"));
        // A caller's tokens are charged as used (refunded on settle); an account's as
        // the provider counts them, the estimate at admission.
        let q = if provider && m == Measure::Tokens {
            q.accounting(Accounting::Estimate)
        } else {
            q
        };
        let q = if shared { q.shared() } else { q };
        // A caller's own account is paced apart, with the provider's clock in mind.
        let q = match (owner, q.period()) {
            (Owner::OwnAccount, Some(period)) => {
                let burst = paced_burst(q.amount(), period);
                q.burst(burst)
            }
            _ => q,
        };
        let q = match tier {
            Some(t) => q.max_wait(limit.wait(t)),
            None => q,
        };
        out.push((q, m));
    }
    // Budgets in micro-dollars, charged the estimate, then what the call cost (an
    // account's as much as a caller's: that is what the provider bills).
    for (name, value) in limits.spends() {
        let Some((limit, period)) = value else {
            continue;
        };
        let micros = (limit.limit * 1e6).round() as u64;
        let q = Quota::spend(micros)
            .per(period)
            .named(format!("{prefix}.{name}"));
        let q = if shared { q.shared() } else { q };
        let q = match tier {
            Some(t) => q.max_wait(limit.wait(t)),
            None => q,
        };
        out.push((q, Measure::Spend));
    }
    out
}

/// The longest any of these quotas lets a request wait.
fn longest_wait<'q>(quotas: impl IntoIterator<Item = &'q (Quota, Measure)>) -> Duration {
    quotas
        .into_iter()
        .filter_map(|(q, _)| q.get_max_wait())
        .max()
        .unwrap_or(Duration::ZERO)
}

impl Gateway {
    /// Build every limiter the configuration describes (on Redis when `config.redis` is
    /// set) and the HTTP client.
    ///
    /// # Errors
    ///
    /// [`GatewayError::Limits`] when limits cannot be built (Redis unreachable at start,
    /// numbers too large), [`GatewayError::Io`] when the HTTP client cannot be built.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let config = tollgate_gateway::Config::parse("[upstreams.a]\nkind = \"sim\"\nurl = \"http://127.0.0.1:9\"").unwrap();
    /// assert!(tollgate_gateway::Gateway::new(config).await.is_ok());
    /// # });
    /// ```
    pub async fn new(config: Config) -> Result<Gateway, GatewayError> {
        let clock = Clock::system();
        let model_names = models::Models::new(&config);
        let mut measures = HashMap::new();
        let redis = config.redis.clone();
        let prefix = config.redis_prefix.clone();
        let build = |b: LimiterBuilder, what: String| {
            let redis = redis.clone();
            let prefix = prefix.clone();
            async move {
                let r = match redis {
                    // Each decision brings its quotas' status for the `x-ratelimit-*`
                    // headers: no second round trip per request.
                    Some(url) => {
                        b.redis(url)
                            .prefix(prefix)
                            .status_with_decisions(true)
                            .build()
                            .await
                    }
                    None => b.build().map_err(tollgate::Error::from),
                };
                r.map_err(|error| GatewayError::Limits { what, error })
            }
        };
        let mut upstreams = Vec::new();
        // Each upstream's budgets: its general limits, then each model's own, with the
        // quotas that describe them.
        let mut accounts = Vec::new();
        // Each account's limits and the prefix of its quotas' names.
        let mut account_limits: Vec<(&config::Limits, String)> = Vec::new();
        let mut account_names: Vec<String> = Vec::new();
        let no_limits = config::Limits::default();
        let store = pace::Store {
            redis: redis.clone(),
            prefix: prefix.clone(),
        };
        for (name, u) in &config.upstreams {
            // Callers' own accounts are paced per key, apart from the callers' decision.
            let general = if u.forward_caller_key {
                &no_limits
            } else {
                &u.limits
            };
            let mut budgets = vec![(None, general, format!("upstream.{name}"))];
            for (model, l) in &u.model_limits {
                budgets.push((Some(model.clone()), l, format!("upstream.{name}.{model}")));
            }
            let mut model_accounts = HashMap::new();
            let default_account = accounts.len();
            for (model, limits, prefix) in budgets {
                let what = match &model {
                    Some(m) => format!("`{name}`, model `{m}`"),
                    None => format!("`{name}`"),
                };
                // The limiter of an account's quotas alone, when it has any.
                let account_limiter =
                    async |qs: Vec<(Quota, Measure)>, measures: &mut HashMap<String, Measure>| {
                        if qs.is_empty() {
                            return Ok(None);
                        }
                        let mut b = Limiter::builder().clock(clock.clone());
                        for (q, m) in qs {
                            measures.insert(q.name(), m);
                            b = b.quota(q);
                        }
                        build(b, format!("upstream {what}")).await.map(Some)
                    };
                let qs = quotas(limits, &prefix, Owner::Account, None);
                let limiter = account_limiter(qs, &mut measures).await?;
                // Paced apart: a caller's own account (per key, to its configured limits
                // or learned ones), or an account with no limits configured (learned).
                let pace = if u.forward_caller_key {
                    let own = quotas(&u.limits, &prefix, Owner::OwnAccount, None);
                    let configured = account_limiter(own, &mut measures).await?;
                    Some(Arc::new(pace::Pace::new(name, configured, store.clone())))
                } else if model.is_none() && limiter.is_none() {
                    Some(Arc::new(pace::Pace::new(name, None, store.clone())))
                } else {
                    None
                };
                if let Some(m) = model {
                    model_accounts.insert(model_names.resolve(&m).canonical, accounts.len());
                }
                account_names.push(what);
                accounts.push(AccountState {
                    limiter,
                    pace,
                    absorbing: std::sync::atomic::AtomicBool::new(false),
                });
                account_limits.push((limits, prefix));
            }
            let api_key = match (&u.api_key, &u.api_key_env) {
                (Some(k), _) => Some(k.clone()),
                (None, Some(var)) => std::env::var(var.get_ref()).ok(),
                (None, None) => None,
            };
            let mut models = u.models.clone();
            models.extend(
                u.model_limits
                    .keys()
                    .filter(|m| !u.models.contains(m))
                    .cloned(),
            );
            let base = url::Url::parse(u.url.get_ref())
                .map_err(|e| GatewayError::Io(format!("upstream `{name}`: bad URL: {e}")))?;
            let prefix = format!(
                "{}{}",
                &base[..url::Position::BeforePath],
                base.path().trim_end_matches('/')
            );
            // Lowercase: redaction compares in any case of letters.
            let secret = api_key.as_ref().map(|k| k.to_ascii_lowercase());
            let auth = match api_key {
                Some(k) => {
                    let (header, value) = match u.kind {
                        config::Kind::Anthropic => ("x-api-key", k),
                        config::Kind::Azure => ("api-key", k),
                        config::Kind::OpenAi | config::Kind::OpenaiCompatible => {
                            ("authorization", format!("Bearer {k}"))
                        }
                    };
                    let mut value = http::HeaderValue::from_str(&value).map_err(|_| {
                        GatewayError::Io(format!(
                            "upstream `{name}`: its API key holds characters no HTTP header can carry"
                        ))
                    })?;
                    value.set_sensitive(true);
                    Some((http::HeaderName::from_static(header), value))
                }
                None => None,
            };
            let listed = models
                .iter()
                .map(|m| model_names.resolve(m).canonical)
                .collect();
            upstreams.push(UpstreamState {
                name: name.clone(),
                kind: u.kind,
                prefix,
                forward_key: u.forward_caller_key,
                auth,
                secret,
                models,
                listed,
                default: u.default,
                default_account,
                model_accounts,
            });
        }
        let mut tier_configs: Vec<(String, config::Tier)> = config
            .tiers
            .iter()
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect();
        let open = config.callers.is_empty();
        if open && !config.tiers.contains_key(config::DEFAULT_TIER) {
            tier_configs.push((
                config::DEFAULT_TIER.to_string(),
                config::Tier {
                    limits: config::Limits::default(),
                    model_limits: Default::default(),
                    on_limit: config::OnLimit::Reject,
                    max_wait: Duration::from_secs(30),
                    allow_routes: Vec::new(),
                },
            ));
        }
        let mut tiers = Vec::new();
        for (tname, t) in &tier_configs {
            let own = quotas(&t.limits, &format!("tier.{tname}"), Owner::Caller, Some(t));
            for (q, m) in &own {
                measures.insert(q.name(), *m);
            }
            let mut limiters: Vec<Option<Gate>> = Vec::new();
            let mut first: Option<Limiter> = None;
            for (ai, (limits, prefix)) in account_limits.iter().enumerate() {
                // The account's quotas, waiting as long as each allows this tier.
                let account = quotas(limits, prefix, Owner::Account, Some(t));
                if own.is_empty() && account.is_empty() {
                    limiters.push(None);
                    continue;
                }
                let mut b = Limiter::builder();
                for (q, _) in own.iter().chain(&account) {
                    b = b.quota(q.clone());
                }
                match (&accounts[ai].limiter, &first) {
                    (Some(a), Some(f)) if !own.is_empty() => b = b.share_with(a).share_keys_with(f),
                    (Some(a), _) => b = b.share_with(a),
                    (None, Some(f)) if !own.is_empty() => b = b.share_keys_with(f),
                    _ => b = b.clock(clock.clone()),
                }
                let l = build(
                    b,
                    format!("tier `{tname}` on upstream {}", account_names[ai]),
                )
                .await?;
                if first.is_none() && !own.is_empty() {
                    first = Some(l.clone());
                }
                limiters.push(Some(Gate {
                    limiter: l,
                    wait: longest_wait(own.iter().chain(&account)),
                    spends: own
                        .iter()
                        .chain(&account)
                        .any(|(_, m)| *m == Measure::Spend),
                    tokens: own
                        .iter()
                        .chain(&account)
                        .any(|(_, m)| matches!(m, Measure::Spend | Measure::Tokens)),
                }));
            }
            let mut models = HashMap::new();
            for (model, limits) in &t.model_limits {
                let own = quotas(
                    limits,
                    &format!("tier.{tname}.model.{model}"),
                    Owner::Caller,
                    Some(t),
                );
                let wait = longest_wait(&own);
                let spends = own.iter().any(|(_, m)| *m == Measure::Spend);
                let tokens = own
                    .iter()
                    .any(|(_, m)| matches!(m, Measure::Spend | Measure::Tokens));
                let mut b = Limiter::builder().clock(clock.clone());
                for (q, m) in own {
                    measures.insert(q.name(), m);
                    b = b.quota(q);
                }
                let limiter = build(b, format!("tier `{tname}` on model `{model}`")).await?;
                models.insert(
                    model_names.resolve(model).canonical,
                    Gate {
                        limiter,
                        wait,
                        spends,
                        tokens,
                    },
                );
            }
            tiers.push(TierState {
                name: tname.clone(),
                max_wait: t.max_wait,
                wait: t.wait(),
                limiters,
                models,
                routes: t.allow_routes.iter().map(|r| r.get_ref().clone()).collect(),
                rejecting: own
                    .iter()
                    .filter(|(q, _)| q.get_max_wait().unwrap_or(Duration::ZERO).is_zero())
                    .map(|(q, _)| {
                        let unit = q.period().map(|p| {
                            let nanos = p.as_nanos() / u128::from(q.amount().max(1));
                            Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
                        });
                        (q.name(), unit)
                    })
                    .collect(),
            });
        }
        let tier_index = |n: &str| tiers.iter().position(|t| t.name == n).unwrap_or(0);
        let callers = config
            .callers
            .iter()
            .map(|(name, c)| {
                (
                    c.key_sha256.get_ref().clone(),
                    CallerInfo {
                        name: name.clone(),
                        tier: tier_index(c.tier.get_ref()),
                    },
                )
            })
            .collect();
        let open = open.then(|| CallerInfo {
            name: config::ANONYMOUS.to_string(),
            tier: tier_index(config::DEFAULT_TIER),
        });
        let http = client(*config.connect_timeout.get_ref())?;
        let metrics_token = match &config.metrics_token_env {
            Some(var) => {
                let token = std::env::var(var.get_ref()).map_err(|_| {
                    GatewayError::Io(format!(
                        "metrics_token_env: the environment variable `{}` is not set",
                        var.get_ref()
                    ))
                })?;
                Some(sha256(token.as_bytes()))
            }
            None => None,
        };
        Ok(Gateway {
            state: Arc::new(State {
                callers,
                open,
                tiers,
                upstreams,
                accounts,
                measures,
                http,
                metrics: metrics::Metrics::default(),
                max_body: config.max_body_bytes,
                upstream_timeout: config.upstream_timeout,
                body_timeout: *config.body_timeout.get_ref(),
                metrics_token,
                guards: server::Guards {
                    header_timeout: *config.header_timeout.get_ref(),
                    idle_timeout: *config.idle_timeout.get_ref(),
                    max_connections: *config.max_connections.get_ref(),
                },
                prices: config
                    .prices
                    .iter()
                    .filter(|(m, _)| m.as_str() != "*")
                    .map(|(m, p)| (model_names.resolve(m).canonical, *p))
                    .collect(),
                default_price: config.prices.get("*").copied(),
                models: model_names,
                expose_account_limits: config.expose_account_limits,
                calls: Calls::default(),
            }),
        })
    }

    /// The gateway's routes: `/healthz`, `/metrics`, `GET /v1/models`, `GET
    /// /v1/usage`, and every other path proxied when its route is allowed (see
    /// docs/GATEWAY.md, "Routes"), refused otherwise.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let config = tollgate_gateway::Config::parse("[upstreams.a]\nkind = \"sim\"\nurl = \"http://127.0.0.1:9\"").unwrap();
    /// let app = tollgate_gateway::Gateway::new(config).await.unwrap().router();
    /// # let _ = app;
    /// # });
    /// ```
    pub fn router(&self) -> Router {
        Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/metrics", get(metrics_handler))
            .route("/v1/models", get(proxy::models))
            .route("/v1/usage", get(proxy::usage))
            .fallback(proxy::proxy)
            .with_state(self.state.clone())
    }

    /// The gateway's metrics.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let config = tollgate_gateway::Config::parse("[upstreams.a]\nkind = \"sim\"\nurl = \"http://127.0.0.1:9\"").unwrap();
    /// let g = tollgate_gateway::Gateway::new(config).await.unwrap();
    /// assert_eq!(g.metrics().counter("tollgate_admitted_total", &[]), 0);
    /// # });
    /// ```
    pub fn metrics(&self) -> &metrics::Metrics {
        &self.state.metrics
    }

    /// Serve on `listener` until `shutdown` completes, then stop accepting and wait for
    /// the requests in flight (streams included) to finish and be settled (a
    /// settlement runs after its answer is sent; on Redis it is a round trip that would
    /// otherwise be lost when the process exits).
    ///
    /// Each connection is guarded by the configuration's `header_timeout`,
    /// `idle_timeout` and `max_connections` (see the `server` module).
    ///
    /// # Errors
    ///
    /// [`GatewayError::Io`] when serving fails.
    ///
    /// ```no_run
    /// # async fn run(g: tollgate_gateway::Gateway) -> Result<(), tollgate_gateway::GatewayError> {
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await.unwrap();
    /// let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    /// # drop(stop);
    /// g.serve(listener, async { stopped.await.ok(); }).await
    /// # }
    /// ```
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), GatewayError> {
        let guards = self.state.guards;
        server::serve(
            listener,
            self.router(),
            guards,
            self.state.clone(),
            shutdown,
        )
        .await;
        self.state.calls.idle().await;
        Ok(())
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

/// `GET /metrics`: the metrics in Prometheus's text format; with `metrics_token_env`
/// set, only for `Authorization: Bearer <token>` (the scheme in any case), compared in
/// constant time (as SHA-256 digests), else 401.
async fn metrics_handler(
    axum::extract::State(st): axum::extract::State<Arc<State>>,
    headers: http::HeaderMap,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if let Some(want) = &st.metrics_token {
        let given = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| sha256(token.trim().as_bytes()));
        let ok =
            given.is_some_and(|g| g.iter().zip(want).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0);
        if !ok {
            let body = serde_json::json!({"error": {
                "message": "GET /metrics requires `Authorization: Bearer <token>` with the token in the gateway's metrics_token_env",
                "type": "invalid_request_error",
                "param": null,
                "code": "invalid_api_key",
            }});
            return (
                http::StatusCode::UNAUTHORIZED,
                [(http::header::WWW_AUTHENTICATE, "Bearer")],
                axum::Json(body),
            )
                .into_response();
        }
    }
    (
        [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(),
    )
        .into_response()
}
