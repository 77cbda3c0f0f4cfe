//! The gateway's configuration: `tollgate.toml`, parsed and checked before the server
//! starts.
//!
//! Every mistake is one [`ConfigError`] that names the key and its line, and the server
//! does not start. This module only reads and checks; it never opens a socket or builds a
//! limiter.
//!
//! ```
//! let config = tollgate_gateway::Config::parse(r#"
//! [upstreams.sim]
//! kind = "openai-compatible"
//! url = "http://127.0.0.1:9000"
//!
//! [tiers.free]
//! limits = { requests_per_minute = 10, tokens_per_minute = 20000 }
//!
//! [callers.team-a]
//! key_sha256 = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
//! tier = "free"
//! "#).expect("a valid config");
//! assert_eq!(config.tiers["free"].limits.requests_per_minute.map(|l| l.limit), Some(10));
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// An invalid configuration: what is wrong, where, and how to fix it.
///
/// ```
/// let err = tollgate_gateway::Config::parse("listen = 5").unwrap_err();
/// assert!(err.to_string().contains("line 1"));
/// ```
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ConfigError {
    message: String,
}

impl ConfigError {
    fn at(src: &str, span: Option<std::ops::Range<usize>>, key: &str, what: String) -> Self {
        let line = span.map(|s| src[..s.start.min(src.len())].matches('\n').count() + 1);
        let message = match line {
            Some(l) => format!("line {l}: `{key}`: {what}"),
            None => format!("`{key}`: {what}"),
        };
        ConfigError { message }
    }
}

/// What kind of API an upstream speaks, which decides how the gateway authenticates to
/// it and which routes it serves.
///
/// ```
/// use tollgate_gateway::config::Kind;
/// assert!(Kind::Anthropic.serves_messages());
/// assert!(!Kind::OpenAi.serves_messages());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// api.openai.com: `Authorization: Bearer`.
    #[serde(rename = "openai")]
    OpenAi,
    /// api.anthropic.com: `x-api-key`, serves `/v1/messages`.
    Anthropic,
    /// Azure OpenAI: `api-key`.
    Azure,
    /// Any OpenAI-compatible server (vLLM, Ollama, `tollgate sim`, ...): `Authorization:
    /// Bearer` when a key is configured.
    #[serde(alias = "sim")]
    OpenaiCompatible,
}

impl Kind {
    /// Whether this upstream takes Anthropic's `/v1/messages`.
    ///
    /// ```
    /// assert!(tollgate_gateway::config::Kind::Anthropic.serves_messages());
    /// ```
    pub fn serves_messages(self) -> bool {
        matches!(self, Kind::Anthropic | Kind::OpenaiCompatible)
    }

    /// Whether this upstream takes OpenAI's routes (chat, completions, embeddings,
    /// responses).
    ///
    /// ```
    /// assert!(!tollgate_gateway::config::Kind::Anthropic.serves_openai());
    /// ```
    pub fn serves_openai(self) -> bool {
        !matches!(self, Kind::Anthropic)
    }
}

/// Rate and concurrency limits, each optional. Token limits count input + output
/// tokens. Each is a number, or a table giving the limit its own wait-or-reject policy
/// (see [`Limit`]).
///
/// ```
/// use tollgate_gateway::config::Limits;
/// assert!(Limits::default().is_empty());
/// ```
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Requests per minute.
    pub requests_per_minute: Option<Limit>,
    /// Requests per day.
    pub requests_per_day: Option<Limit>,
    /// Input + output tokens per minute.
    pub tokens_per_minute: Option<Limit>,
    /// Input + output tokens per day.
    pub tokens_per_day: Option<Limit>,
    /// Input (prompt) tokens per minute.
    pub input_tokens_per_minute: Option<Limit>,
    /// Output (completion) tokens per minute.
    pub output_tokens_per_minute: Option<Limit>,
    /// Requests in flight at once.
    pub concurrency: Option<Limit>,
    /// Dollars per day, at the models' `[prices]`: charged the estimate at admission,
    /// then what the call cost.
    pub spend_per_day: Option<Limit<f64>>,
    /// Dollars per 30 days, at the models' `[prices]`.
    pub spend_per_month: Option<Limit<f64>>,
}

impl Limits {
    /// Whether no limit is set.
    ///
    /// ```
    /// use tollgate_gateway::config::{Limit, Limits};
    /// let l = Limits { concurrency: Some(Limit::new(2)), ..Default::default() };
    /// assert!(!l.is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.entries().all(|(_, v)| v.is_none()) && self.spends().all(|(_, v)| v.is_none())
    }

    /// Each spend limit by its config name, with its period.
    pub(crate) fn spends(
        &self,
    ) -> impl Iterator<Item = (&'static str, Option<(&Limit<f64>, Duration)>)> {
        const DAY: Duration = Duration::from_secs(86_400);
        [
            (
                "spend_per_day",
                self.spend_per_day.as_ref().map(|l| (l, DAY)),
            ),
            (
                "spend_per_month",
                self.spend_per_month.as_ref().map(|l| (l, DAY * 30)),
            ),
        ]
        .into_iter()
    }

    /// Each limit by its config name.
    pub(crate) fn entries(&self) -> impl Iterator<Item = (&'static str, Option<&Limit>)> {
        [
            ("requests_per_minute", self.requests_per_minute.as_ref()),
            ("requests_per_day", self.requests_per_day.as_ref()),
            ("tokens_per_minute", self.tokens_per_minute.as_ref()),
            ("tokens_per_day", self.tokens_per_day.as_ref()),
            (
                "input_tokens_per_minute",
                self.input_tokens_per_minute.as_ref(),
            ),
            (
                "output_tokens_per_minute",
                self.output_tokens_per_minute.as_ref(),
            ),
            ("concurrency", self.concurrency.as_ref()),
        ]
        .into_iter()
    }
}

/// One limit: how much, and, when it has no room, whether a request waits for it and
/// how long.
///
/// Written as a number (`requests_per_minute = 60`: the policy of the tier serving the
/// request applies) or as a table with a policy of its own:
/// `tokens_per_minute = { limit = 90000, on_limit = "wait", max_wait = "20s" }`. A
/// `max_wait` alone means `on_limit = "wait"`; `on_limit = "wait"` alone waits up to the
/// tier's `max_wait`. A request is refused, naming this limit, as soon as this limit
/// alone would hold it back longer than it allows, while the request's other limits may
/// still make it wait: callers over their own limit get a 429 at once while the account
/// limit paces everyone else.
///
/// ```
/// let c = tollgate_gateway::Config::parse(r#"
/// open = true
/// [upstreams.openai]
/// kind = "openai"
/// url = "https://api.openai.com"
/// api_key = "sk-test"
/// limits = { tokens_per_minute = { limit = 90000, on_limit = "wait", max_wait = "20s" } }
/// [tiers.free]
/// limits = { requests_per_minute = 10 }
/// "#).unwrap();
/// let tpm = c.upstreams["openai"].limits.tokens_per_minute.unwrap();
/// assert_eq!(tpm.limit, 90_000);
/// let free = &c.tiers["free"]; // rejects: its own limits answer 429 at once ...
/// assert_eq!(free.limits.requests_per_minute.unwrap().wait(free), std::time::Duration::ZERO);
/// // ... while its requests wait up to 20 s for the account's tokens.
/// assert_eq!(tpm.wait(free), std::time::Duration::from_secs(20));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit<N = u64> {
    /// Units per period (requests, tokens), slots for `concurrency`, or dollars for
    /// spend limits.
    pub limit: N,
    /// Wait or reject when this limit has no room; `None`: as the tier says.
    pub on_limit: Option<OnLimit>,
    /// The longest this limit holds a request back; `None`: the tier's `max_wait`.
    pub max_wait: Option<Duration>,
}

impl<N> Limit<N> {
    /// A limit with the tier's policy.
    ///
    /// ```
    /// assert_eq!(tollgate_gateway::config::Limit::new(5).limit, 5);
    /// ```
    pub fn new(limit: N) -> Limit<N> {
        Limit {
            limit,
            on_limit: None,
            max_wait: None,
        }
    }

    /// The longest this limit lets a request of `tier` wait (zero: it rejects).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tollgate_gateway::config::{Limit, OnLimit};
    /// let c = tollgate_gateway::Config::parse(r#"
    /// open = true
    /// [upstreams.sim]
    /// kind = "sim"
    /// url = "http://127.0.0.1:9000"
    /// [tiers.free]
    /// max_wait = "5s"
    /// "#).unwrap();
    /// let free = &c.tiers["free"]; // rejects by default
    /// assert_eq!(Limit::new(5).wait(free), Duration::ZERO);
    /// let wait = Limit { on_limit: Some(OnLimit::Wait), ..Limit::new(5) };
    /// assert_eq!(wait.wait(free), Duration::from_secs(5));
    /// let own = Limit { max_wait: Some(Duration::from_secs(1)), ..Limit::new(5) };
    /// assert_eq!(own.wait(free), Duration::from_secs(1));
    /// ```
    pub fn wait(&self, tier: &Tier) -> Duration {
        match (self.on_limit, self.max_wait) {
            (Some(OnLimit::Reject), _) => Duration::ZERO,
            (_, Some(w)) => w,
            (Some(OnLimit::Wait), None) => tier.max_wait,
            (None, None) => tier.wait(),
        }
    }
}

/// The number a [`Limit`] holds: whole units (`u64`: requests, tokens, slots) or dollars
/// (`f64`: spend limits).
///
/// ```
/// use tollgate_gateway::config::Amount;
/// assert!(<u64 as Amount>::from_f64(1.5).is_err());
/// assert_eq!(<f64 as Amount>::from_u64(5), 5.0);
/// ```
pub trait Amount: Copy + for<'de> Deserialize<'de> {
    /// What the configuration may write, for error messages.
    const EXPECTING: &'static str;
    /// From a TOML integer that is not negative.
    fn from_u64(v: u64) -> Self;
    /// From a TOML integer.
    ///
    /// # Errors
    ///
    /// Why it is not a limit, for the configuration error.
    fn from_i64(v: i64) -> Result<Self, String>;
    /// From a TOML float.
    ///
    /// # Errors
    ///
    /// Why it is not a limit, for the configuration error.
    fn from_f64(v: f64) -> Result<Self, String>;
}

impl Amount for u64 {
    const EXPECTING: &'static str =
        "a whole number, or a table like { limit = 60, on_limit = \"wait\", max_wait = \"10s\" }";
    fn from_u64(v: u64) -> u64 {
        v
    }
    fn from_i64(v: i64) -> Result<u64, String> {
        u64::try_from(v)
            .map_err(|_| format!("{v} is negative; a limit is a whole number of at least 1"))
    }
    fn from_f64(v: f64) -> Result<u64, String> {
        Err(format!(
            "{v} is not a whole number; this limit counts whole units"
        ))
    }
}

impl Amount for f64 {
    const EXPECTING: &'static str =
        "an amount in dollars, or a table like { limit = 25.0, on_limit = \"reject\" }";
    fn from_u64(v: u64) -> f64 {
        v as f64
    }
    fn from_i64(v: i64) -> Result<f64, String> {
        if v < 0 {
            Err(format!("{v} is negative; a budget is more than 0 dollars"))
        } else {
            Ok(v as f64)
        }
    }
    fn from_f64(v: f64) -> Result<f64, String> {
        Ok(v)
    }
}

impl<'de, N: Amount> Deserialize<'de> for Limit<N> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Limit<N>, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table<N> {
            limit: N,
            #[serde(default)]
            on_limit: Option<OnLimit>,
            #[serde(default, deserialize_with = "some_duration")]
            max_wait: Option<Duration>,
        }
        struct Visitor<N>(std::marker::PhantomData<N>);
        impl<'de, N: Amount> serde::de::Visitor<'de> for Visitor<N> {
            type Value = Limit<N>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(N::EXPECTING)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Limit<N>, E> {
                Ok(Limit::new(N::from_u64(v)))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Limit<N>, E> {
                N::from_i64(v).map(Limit::new).map_err(E::custom)
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Limit<N>, E> {
                N::from_f64(v).map(Limit::new).map_err(E::custom)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Limit<N>, A::Error> {
                let t = Table::<N>::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                if t.on_limit == Some(OnLimit::Reject) && t.max_wait.is_some() {
                    return Err(serde::de::Error::custom(
                        "max_wait is for on_limit = \"wait\"; a limit that rejects never waits: drop one of them",
                    ));
                }
                Ok(Limit {
                    limit: t.limit,
                    on_limit: t.on_limit,
                    max_wait: t.max_wait,
                })
            }
        }
        d.deserialize_any(Visitor(std::marker::PhantomData))
    }
}

/// A model's price, in dollars per million tokens, for spend limits.
///
/// ```
/// let c = tollgate_gateway::Config::parse(r#"
/// [upstreams.sim]
/// kind = "sim"
/// url = "http://127.0.0.1:9000"
/// [prices]
/// "gpt-4o" = { input = 2.50, output = 10.00 }
/// "*" = { input = 5, output = 15 }
/// "#).unwrap();
/// let p = c.prices["gpt-4o"];
/// assert_eq!(p.micro_dollars(1_000, 500), 7_500); // $0.0075
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// Dollars per million input (prompt) tokens.
    pub input: f64,
    /// Dollars per million output (completion) tokens.
    pub output: f64,
}

impl Price {
    /// What `input` and `output` tokens cost, in micro-dollars (the unit of spend
    /// quotas), rounded up.
    ///
    /// ```
    /// let p = tollgate_gateway::config::Price { input: 0.15, output: 0.60 };
    /// assert_eq!(p.micro_dollars(100, 0), 15);
    /// assert_eq!(p.micro_dollars(1, 1), 1); // 0.75 µ$, rounded up
    /// ```
    pub fn micro_dollars(&self, input: u64, output: u64) -> u64 {
        // $ per million tokens is µ$ per token.
        let v = (input as f64) * self.input + (output as f64) * self.output;
        // Saturates for absurd figures (and NaN, which config checks rule out, is 0).
        v.ceil() as u64
    }
}

/// What a caller's request does when a limit has no room.
///
/// ```
/// assert_eq!(tollgate_gateway::config::OnLimit::default(), tollgate_gateway::config::OnLimit::Reject);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnLimit {
    /// Answer 429 at once, with `retry-after` the time until the call would fit.
    #[default]
    Reject,
    /// Queue (FIFO) up to the limit's `max_wait` (by default the tier's), then 429.
    Wait,
}

/// A provider account the gateway forwards to.
///
/// ```
/// let c = tollgate_gateway::Config::parse(r#"
/// [upstreams.openai]
/// kind = "openai"
/// url = "https://api.openai.com"
/// api_key = "sk-test"
/// limits = { requests_per_minute = 500, tokens_per_minute = 90000 }
/// "#).unwrap();
/// assert_eq!(c.upstreams["openai"].limits.tokens_per_minute.map(|l| l.limit), Some(90_000));
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// The API it speaks.
    pub kind: Kind,
    /// Base URL: scheme, host, port (and a path prefix, if any); the request's path
    /// (`/v1/chat/completions`) is appended. A base ending in the API's own root, as
    /// SDKs write it (`https://api.openai.com/v1`, `https://x.openai.azure.com/openai`),
    /// is not doubled: `/v1/chat/completions` goes to `https://api.openai.com/v1/chat/completions`.
    pub url: toml::Spanned<String>,
    /// The account's API key. Prefer `api_key_env`.
    #[serde(default)]
    pub api_key: Option<String>,
    /// The environment variable holding the account's API key.
    #[serde(default)]
    pub api_key_env: Option<toml::Spanned<String>>,
    /// Pass each caller's own key (`Authorization`, `x-api-key`, `api-key`) through to
    /// this upstream, and pace each distinct key as an account of its own (its state kept
    /// under a hash of the key). For a gateway with no `[callers]` and no key of its own
    /// for this upstream: what `tollgate serve --upstream URL` does when no key is set.
    #[serde(default)]
    pub forward_caller_key: bool,
    /// Models routed here (and listed by `GET /v1/models`); empty: any model.
    #[serde(default)]
    pub models: Vec<String>,
    /// Serve requests whose model no upstream lists.
    #[serde(default)]
    pub default: bool,
    /// The account's own limits, shared by every caller, for the models without limits
    /// of their own in `model_limits`.
    #[serde(default)]
    pub limits: Limits,
    /// Per-model limits of the account (providers limit each model apart): each model
    /// here is a budget of its own, and is routed to this upstream as if in `models`.
    #[serde(default)]
    pub model_limits: BTreeMap<String, Limits>,
}

/// A level of service: the limits each of its callers gets, each caller its own.
///
/// ```
/// let c = tollgate_gateway::Config::parse(r#"
/// open = true
/// [upstreams.sim]
/// kind = "sim"
/// url = "http://127.0.0.1:9000"
/// [tiers.pro]
/// on_limit = "wait"
/// max_wait = "30s"
/// limits = { tokens_per_minute = 200000, concurrency = 8 }
/// model_limits."gpt-4o" = { requests_per_minute = 60 }
/// "#).unwrap();
/// assert_eq!(c.tiers["pro"].max_wait, std::time::Duration::from_secs(30));
/// assert_eq!(c.tiers["pro"].model_limits["gpt-4o"].requests_per_minute.map(|l| l.limit), Some(60));
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    /// Each caller's limits, over every model.
    #[serde(default)]
    pub limits: Limits,
    /// Each caller's limits on one model, on top of `limits` (a caller may send 600
    /// requests a minute, 60 of them to the costly model).
    #[serde(default)]
    pub model_limits: BTreeMap<String, Limits>,
    /// Reject at once or wait when a limit has no room: the policy of the tier's limits
    /// and of the accounts' limits its requests meet, for each limit without a policy
    /// of its own ([`Limit`]). Default: reject.
    #[serde(default)]
    pub on_limit: OnLimit,
    /// The longest a request waits for room (`on_limit = "wait"`), and the time within
    /// which upstream 429s and 5xx are retried. Default 30 s.
    #[serde(default = "default_max_wait", deserialize_with = "duration")]
    pub max_wait: Duration,
    /// Routes beyond the estimated ones (`POST` chat, completions, embeddings, responses,
    /// messages) that the tier's callers may use, each a path prefix matched at a `/`
    /// (`"/v1/files"` allows `/v1/files/file-abc/content` too), optionally after a method
    /// (`"GET /v1/models/"`). Each such request counts as one request, never as tokens or
    /// spend. Files, batches, stored completions, assistants and vector stores belong to
    /// the upstream account: every caller allowed them sees and changes every other
    /// caller's. Default: none.
    #[serde(default)]
    pub allow_routes: Vec<toml::Spanned<String>>,
}

impl Tier {
    /// Whether `method` on `path` (normalized) is one of the tier's `allow_routes`.
    ///
    /// ```
    /// let c = tollgate_gateway::Config::parse(r#"
    /// [upstreams.sim]
    /// kind = "sim"
    /// url = "http://127.0.0.1:9000"
    /// [tiers.ops]
    /// allow_routes = ["/v1/files", "GET /v1/batches"]
    /// [callers.ops-bot]
    /// key_sha256 = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
    /// tier = "ops"
    /// "#).unwrap();
    /// let t = &c.tiers["ops"];
    /// assert!(t.allows("DELETE", "/v1/files/file-1"));
    /// assert!(t.allows("GET", "/v1/batches"));
    /// assert!(!t.allows("get", "/v1/batches")); // methods are case-sensitive
    /// assert!(!t.allows("POST", "/v1/batches"));
    /// assert!(!t.allows("GET", "/v1/filesystem"));
    /// ```
    pub fn allows(&self, method: &str, path: &str) -> bool {
        self.allow_routes
            .iter()
            .any(|r| route_allows(r.get_ref(), method, path))
    }
    /// The longest the tier's policy lets a request wait for a limit without a policy
    /// of its own: `max_wait` when it waits, zero when it rejects.
    ///
    /// ```
    /// let c = tollgate_gateway::Config::parse(r#"
    /// open = true
    /// [upstreams.sim]
    /// kind = "sim"
    /// url = "http://127.0.0.1:9000"
    /// [tiers.pro]
    /// on_limit = "wait"
    /// max_wait = "10s"
    /// "#).unwrap();
    /// assert_eq!(c.tiers["pro"].wait(), std::time::Duration::from_secs(10));
    /// ```
    pub fn wait(&self) -> Duration {
        match self.on_limit {
            OnLimit::Reject => Duration::ZERO,
            OnLimit::Wait => self.max_wait,
        }
    }
}

/// One caller: an app, a team or a user, known by its API key's SHA-256.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Caller {
    /// Lowercase hex SHA-256 of the caller's API key (`tollgate hash-key <key>`).
    pub key_sha256: toml::Spanned<String>,
    /// The caller's tier.
    pub tier: toml::Spanned<String>,
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address to listen on. Default `127.0.0.1:8080`.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Share limits with other gateway instances through this Redis URL.
    #[serde(default)]
    pub redis: Option<String>,
    /// Key prefix in Redis. Default `tollgate:gw:`.
    #[serde(default = "default_prefix")]
    pub redis_prefix: String,
    /// Largest request body accepted, in bytes. Default 16 MiB.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Longest an upstream may take to send its response headers, and then its whole
    /// body (a stream: between two chunks). Default 600 s.
    #[serde(default = "default_upstream_timeout", deserialize_with = "duration")]
    pub upstream_timeout: Duration,
    /// Longest a client may take to send a request's whole header block, counted from
    /// when the connection is accepted or its previous answer was written: a client
    /// trickling its headers (slowloris) is disconnected. Default 10 s.
    #[serde(
        default = "default_header_timeout",
        deserialize_with = "spanned_duration"
    )]
    pub header_timeout: toml::Spanned<Duration>,
    /// A connection with no request in flight and no byte read or written for this long
    /// is closed. A request waiting for its upstream's answer, or an answer still
    /// streaming, is in flight and is never cut by it. Default 60 s.
    #[serde(
        default = "default_idle_timeout",
        deserialize_with = "spanned_duration"
    )]
    pub idle_timeout: toml::Spanned<Duration>,
    /// Longest a client may take to send a request's body. Default 30 s.
    #[serde(
        default = "default_body_timeout",
        deserialize_with = "spanned_duration"
    )]
    pub body_timeout: toml::Spanned<Duration>,
    /// Longest the TCP connection to an upstream may take to open. Default 5 s.
    #[serde(
        default = "default_connect_timeout",
        deserialize_with = "spanned_duration"
    )]
    pub connect_timeout: toml::Spanned<Duration>,
    /// Most client connections open at once; those accepted beyond it are closed at once
    /// (counted in `tollgate_connections_refused_total`), so file descriptors stay
    /// bounded and the listener never stalls. Default 10000.
    #[serde(default = "default_max_connections")]
    pub max_connections: toml::Spanned<usize>,
    /// The environment variable holding a bearer token that `GET /metrics` then requires
    /// (`Authorization: Bearer <token>`). Unset: `/metrics` is open.
    #[serde(default)]
    pub metrics_token_env: Option<toml::Spanned<String>>,
    /// Serve everyone, without `[callers]`, as the caller `anonymous` in the tier
    /// `default`. Required when tiers are defined and no caller is, so that a gateway
    /// is never left open by a forgotten `[callers]` table.
    #[serde(default)]
    pub open: Option<toml::Spanned<bool>>,
    /// Provider accounts, by name.
    #[serde(default)]
    pub upstreams: BTreeMap<String, Upstream>,
    /// Levels of service, by name.
    #[serde(default)]
    pub tiers: BTreeMap<String, Tier>,
    /// Callers, by name. With none, the gateway is open: every request is served as the
    /// caller `anonymous` in the tier `default` (unlimited when there is no such tier).
    #[serde(default)]
    pub callers: BTreeMap<String, Caller>,
    /// Models' prices, for spend limits; `"*"` prices every model not listed.
    #[serde(default)]
    pub prices: BTreeMap<String, Price>,
    /// The most output tokens a model generates per answer, for requests that set no
    /// `max_tokens` (their worst case, reserved and written into the request), over the
    /// built-in table ([`tollgate::estimate::max_output_tokens`]); `"*"` for every model
    /// neither knows (default 32768). Models are matched as limits are: case folded,
    /// provider prefix and date suffix dropped.
    #[serde(default)]
    pub max_output_tokens: BTreeMap<String, u64>,
    /// The most input tokens one image part can cost on a model, counted for requests
    /// whose tokens or spend are limited (the estimate counts text only); `"*"` for every
    /// model not listed (default 4000; gpt-4o-mini, which bills an image as up to 36,835
    /// tokens, is built in).
    #[serde(default)]
    pub image_input_tokens: BTreeMap<String, u64>,
    /// Other names of models: `"fast" = "gpt-4o-mini"` sends `fast` as `gpt-4o-mini`,
    /// limited and priced as it.
    #[serde(default)]
    pub model_aliases: BTreeMap<String, String>,
    /// Only models an upstream lists (`models` or `model_limits`) are served; any other
    /// gets 404 `model_not_found` from the gateway. Default false: an unlisted model goes
    /// to the default upstream.
    #[serde(default)]
    pub strict_models: bool,
    /// Put the upstream accounts' limits in callers' `x-ratelimit-*` headers too. Default
    /// false: a caller's headers report its own limits only, never what the account has
    /// left (which tells of other callers' traffic).
    #[serde(default)]
    pub expose_account_limits: bool,
}

/// The default of `[max_output_tokens] "*"`: the worst case reserved for a request
/// without `max_tokens` to a model no table knows.
pub const DEFAULT_MAX_OUTPUT_TOKENS: u64 = 32_768;

/// The default of `[image_input_tokens] "*"`: the worst case of one image on a model
/// without an entry (OpenAI's high-detail images cost at most 1,105 tokens on gpt-4o and
/// 3,779 on gpt-4.1-nano; Anthropic's about 1,600).
pub const DEFAULT_IMAGE_INPUT_TOKENS: u64 = 4_000;

/// Whether an `allow_routes` entry (`"/v1/files"`, `"GET /v1/batches"`) allows `method`
/// on `path`.
pub(crate) fn route_allows(entry: &str, method: &str, path: &str) -> bool {
    let (m, prefix) = match entry.split_once(' ') {
        Some((m, p)) => (Some(m), p.trim()),
        None => (None, entry),
    };
    // Methods are case-sensitive (RFC 9110 §9.1): `get` is not `GET`.
    if m.is_some_and(|m| m != method) {
        return false;
    }
    let prefix = prefix.trim_end_matches('/');
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || prefix.is_empty(),
        None => false,
    }
}

fn default_listen() -> String {
    "127.0.0.1:8080".to_string()
}
fn default_prefix() -> String {
    "tollgate:gw:".to_string()
}
fn default_max_body() -> usize {
    16 << 20
}
fn default_upstream_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_max_wait() -> Duration {
    Duration::from_secs(30)
}
fn default_header_timeout() -> toml::Spanned<Duration> {
    toml::Spanned::new(0..0, Duration::from_secs(10))
}
fn default_idle_timeout() -> toml::Spanned<Duration> {
    toml::Spanned::new(0..0, Duration::from_secs(60))
}
fn default_body_timeout() -> toml::Spanned<Duration> {
    toml::Spanned::new(0..0, Duration::from_secs(30))
}
fn default_connect_timeout() -> toml::Spanned<Duration> {
    toml::Spanned::new(0..0, Duration::from_secs(5))
}
fn default_max_connections() -> toml::Spanned<usize> {
    toml::Spanned::new(0..0, 10_000)
}

fn spanned_duration<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<toml::Spanned<Duration>, D::Error> {
    let s = toml::Spanned::<String>::deserialize(d)?;
    let span = s.span();
    let v = parse_duration(s.get_ref())?;
    Ok(toml::Spanned::new(span, v))
}

fn some_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s)
}

fn parse_duration<E: serde::de::Error>(s: &str) -> Result<Duration, E> {
    tollgate::provider::parse_duration(s).ok_or_else(|| {
        E::custom(format!(
            "`{s}` is not a duration: write it like \"30s\", \"1.5s\", \"250ms\" or \"2m0s\""
        ))
    })
}

/// The lowercase hex SHA-256 of an API key: what `key_sha256` holds.
///
/// ```
/// assert_eq!(
///     tollgate_gateway::config::hash_key("foo"),
///     "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
/// );
/// ```
pub fn hash_key(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
        out.push(char::from_digit(u32::from(b & 15), 16).unwrap_or('0'));
    }
    out
}

/// The caller name used when no callers are configured.
pub const ANONYMOUS: &str = "anonymous";
/// The tier of the anonymous caller.
pub const DEFAULT_TIER: &str = "default";

impl Config {
    /// Parse and check a configuration.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the key and line of the first mistake: TOML syntax, an
    /// unknown key, a wrong type, a bad duration or URL, a limit of 0, a caller whose
    /// tier does not exist, a key hash that is not 64 hex digits or is used twice, an
    /// `api_key_env` that is not set, no upstream.
    ///
    /// ```
    /// let err = tollgate_gateway::Config::parse(r#"
    /// [upstreams.sim]
    /// kind = "sim"
    /// url = "http://127.0.0.1:9000"
    /// [callers.a]
    /// key_sha256 = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
    /// tier = "gold"
    /// "#).unwrap_err();
    /// assert_eq!(err.to_string(), "line 7: `callers.a.tier`: no tier is named `gold`; define [tiers.gold] or use one of: (none)");
    /// ```
    pub fn parse(src: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(src).map_err(|e| {
            let mut what = e.message().to_string();
            if what.starts_with("unknown field") {
                // The commonest cause: a top-level key written below a [table], which
                // TOML reads as that table's.
                what.push_str(
                    " (a key written below a [table] header belongs to that table: top-level keys such as `open` or `strict_models` go above the first one)",
                );
            }
            ConfigError::at(src, e.span(), "tollgate.toml", what)
        })?;
        config.check(src)?;
        Ok(config)
    }

    /// Read and check the configuration file at `path`.
    ///
    /// # Errors
    ///
    /// The file cannot be read, or [`Config::parse`] fails; the message starts with the
    /// path.
    ///
    /// ```
    /// let err = tollgate_gateway::Config::load("/nonexistent/tollgate.toml").unwrap_err();
    /// assert!(err.to_string().starts_with("/nonexistent/tollgate.toml"));
    /// ```
    pub fn load(path: &str) -> Result<Config, ConfigError> {
        let src = std::fs::read_to_string(path).map_err(|e| ConfigError {
            message: format!("{path}: cannot read it: {e}"),
        })?;
        Config::parse(&src).map_err(|e| ConfigError {
            message: format!("{path}: {}", e.message),
        })
    }

    fn check(&self, src: &str) -> Result<(), ConfigError> {
        let err = |span: Option<std::ops::Range<usize>>, key: String, what: String| {
            Err(ConfigError::at(src, span, &key, what))
        };
        if self.upstreams.is_empty() {
            return err(
                None,
                "upstreams".into(),
                "no upstream is configured: add one, e.g. [upstreams.openai] with kind and url"
                    .into(),
            );
        }
        if self.max_body_bytes == 0 {
            return err(None, "max_body_bytes".into(), "must be at least 1".into());
        }
        for (key, value, max, what) in [
            (
                "header_timeout",
                &self.header_timeout,
                Duration::from_secs(600),
                "10 minutes",
            ),
            ("idle_timeout", &self.idle_timeout, MAX_WAIT, "a day"),
            ("body_timeout", &self.body_timeout, MAX_WAIT, "a day"),
            (
                "connect_timeout",
                &self.connect_timeout,
                Duration::from_secs(600),
                "10 minutes",
            ),
        ] {
            let v = *value.get_ref();
            if v.is_zero() {
                return err(
                    Some(value.span()),
                    key.into(),
                    "is 0; it must be more than 0 (e.g. \"10s\")".into(),
                );
            }
            if v > max {
                return err(
                    Some(value.span()),
                    key.into(),
                    format!("is {v:?}, over {what}; no sane timeout is that long"),
                );
            }
        }
        let max_connections = *self.max_connections.get_ref();
        if !(1..=MAX_CONNECTIONS).contains(&max_connections) {
            return err(
                Some(self.max_connections.span()),
                "max_connections".into(),
                format!("is {max_connections}; it must be from 1 to {MAX_CONNECTIONS}"),
            );
        }
        if let Some(var) = &self.metrics_token_env
            && std::env::var(var.get_ref()).map_or(true, |v| v.is_empty())
        {
            return err(
                Some(var.span()),
                "metrics_token_env".into(),
                format!(
                    "the environment variable `{}` is not set; export it with the token `GET /metrics` requires",
                    var.get_ref()
                ),
            );
        }
        let mut defaults = 0;
        for (name, u) in &self.upstreams {
            let url = u.url.get_ref();
            match url::Url::parse(url) {
                Ok(parsed) if parsed.query().is_some() || parsed.fragment().is_some() => {
                    return err(
                        Some(u.url.span()),
                        format!("upstreams.{name}.url"),
                        format!(
                            "`{url}` has a query or fragment; give the base URL only (callers' queries, such as Azure's api-version, are passed through)"
                        ),
                    );
                }
                Ok(parsed) if !parsed.username().is_empty() || parsed.password().is_some() => {
                    return err(
                        Some(u.url.span()),
                        format!("upstreams.{name}.url"),
                        format!(
                            "`{url}` carries a user name or password; give the upstream's key as api_key or api_key_env instead"
                        ),
                    );
                }
                Ok(parsed) if matches!(parsed.scheme(), "http" | "https") && parsed.has_host() => {}
                Ok(_) => {
                    return err(
                        Some(u.url.span()),
                        format!("upstreams.{name}.url"),
                        format!("`{url}` must be an http:// or https:// URL with a host"),
                    );
                }
                Err(e) => {
                    return err(
                        Some(u.url.span()),
                        format!("upstreams.{name}.url"),
                        format!("`{url}` is not a URL: {e}"),
                    );
                }
            }
            if let Some(var) = &u.api_key_env {
                if u.api_key.is_some() {
                    return err(
                        Some(var.span()),
                        format!("upstreams.{name}.api_key_env"),
                        "set api_key or api_key_env, not both".into(),
                    );
                }
                if std::env::var(var.get_ref()).map_or(true, |v| v.is_empty()) {
                    return err(
                        Some(var.span()),
                        format!("upstreams.{name}.api_key_env"),
                        format!(
                            "the environment variable `{}` is not set; export it with the account's API key",
                            var.get_ref()
                        ),
                    );
                }
            }
            if u.forward_caller_key {
                let why = if u.api_key.is_some() || u.api_key_env.is_some() {
                    Some(
                        "the upstream has a key of its own (api_key or api_key_env): drop one of them",
                    )
                } else if !self.callers.is_empty() {
                    Some(
                        "callers authenticate to this gateway with their keys, which must never reach an upstream: drop [callers] or this setting",
                    )
                } else if !u.model_limits.is_empty() {
                    Some(
                        "model_limits are not supported with it: give the account's limits in `limits`",
                    )
                } else {
                    None
                };
                if let Some(why) = why {
                    return err(
                        None,
                        format!("upstreams.{name}.forward_caller_key"),
                        why.into(),
                    );
                }
            }
            check_limits(&u.limits, &format!("upstreams.{name}.limits"))
                .map_err(|m| ConfigError::at(src, None, &format!("upstreams.{name}.limits"), m))?;
            for (model, l) in &u.model_limits {
                let key = format!("upstreams.{name}.model_limits.{model}");
                check_limits(l, &key).map_err(|m| ConfigError::at(src, None, &key, m))?;
            }
            defaults += usize::from(u.default);
        }
        if defaults > 1 {
            return err(
                None,
                "upstreams.*.default".into(),
                "more than one upstream says default = true; keep one".into(),
            );
        }
        for (name, t) in &self.tiers {
            if t.max_wait > MAX_WAIT {
                return err(
                    None,
                    format!("tiers.{name}.max_wait"),
                    "is over a day; no caller waits that long for an answer".into(),
                );
            }
            for r in &t.allow_routes {
                if let Some(why) = bad_route(r.get_ref()) {
                    return err(
                        Some(r.span()),
                        format!("tiers.{name}.allow_routes"),
                        format!("`{}` {why}", r.get_ref()),
                    );
                }
            }
            check_limits(&t.limits, &format!("tiers.{name}.limits"))
                .map_err(|m| ConfigError::at(src, None, &format!("tiers.{name}.limits"), m))?;
            for (model, l) in &t.model_limits {
                let key = format!("tiers.{name}.model_limits.{model}");
                check_limits(l, &key).map_err(|m| ConfigError::at(src, None, &key, m))?;
            }
            // Where every upstream lists its models, a limit on a model none serves is
            // a typo that would never apply.
            let listed: Vec<&String> = self
                .upstreams
                .values()
                .flat_map(|u| u.models.iter().chain(u.model_limits.keys()))
                .collect();
            let closed = self
                .upstreams
                .values()
                .all(|u| !u.models.is_empty() || !u.model_limits.is_empty());
            for model in t.model_limits.keys() {
                let served = listed.iter().any(|m| {
                    let (m, model) = (m.to_ascii_lowercase(), model.to_ascii_lowercase());
                    m == model
                        || m.starts_with(&format!("{model}-"))
                        || model.starts_with(&format!("{m}-"))
                });
                if closed
                    && !served
                    && !self
                        .model_aliases
                        .keys()
                        .any(|a| a.eq_ignore_ascii_case(model))
                {
                    return err(
                        None,
                        format!("tiers.{name}.model_limits.{model}"),
                        format!(
                            "no upstream serves a model `{model}` (they list: {}); the limit would never apply",
                            listed
                                .iter()
                                .map(|m| m.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    );
                }
            }
        }
        for (model, p) in &self.prices {
            for (side, v) in [("input", p.input), ("output", p.output)] {
                if !(v.is_finite() && (0.0..=1e6).contains(&v)) {
                    return err(
                        None,
                        format!("prices.{model}.{side}"),
                        format!("is {v}; a price is dollars per million tokens, from 0 to 1000000"),
                    );
                }
            }
        }
        let spends = self
            .upstreams
            .values()
            .flat_map(|u| std::iter::once(&u.limits).chain(u.model_limits.values()))
            .chain(
                self.tiers
                    .values()
                    .flat_map(|t| std::iter::once(&t.limits).chain(t.model_limits.values())),
            )
            .any(|l| l.spends().any(|(_, v)| v.is_some()));
        if spends && self.prices.is_empty() {
            return err(
                None,
                "prices".into(),
                "spend limits are set but no model has a price: add [prices] with each model's dollars per million tokens, e.g. \"gpt-4o\" = { input = 2.50, output = 10.00 }, or \"*\" for every model".into(),
            );
        }
        for (model, n) in &self.max_output_tokens {
            if *n == 0 {
                return err(
                    None,
                    format!("max_output_tokens.{model}"),
                    "is 0; give the most output tokens the model generates in one answer".into(),
                );
            }
        }
        for (model, n) in &self.image_input_tokens {
            if *n == 0 {
                return err(
                    None,
                    format!("image_input_tokens.{model}"),
                    "is 0; give the most input tokens one image costs on the model".into(),
                );
            }
        }
        for (alias, target) in &self.model_aliases {
            if alias.trim().is_empty() || target.trim().is_empty() {
                return err(
                    None,
                    format!("model_aliases.{alias}"),
                    "an alias and its model are non-empty names".into(),
                );
            }
            if self
                .model_aliases
                .keys()
                .any(|a| a.eq_ignore_ascii_case(target))
            {
                return err(
                    None,
                    format!("model_aliases.{alias}"),
                    format!("`{target}` is itself an alias; name the model it stands for"),
                );
            }
        }
        if self.strict_models
            && self
                .upstreams
                .values()
                .all(|u| u.models.is_empty() && u.model_limits.is_empty())
        {
            return err(
                None,
                "strict_models".into(),
                "no upstream lists a model (`models` or `model_limits`), so every request would be refused: list them".into(),
            );
        }
        let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
        for (name, c) in &self.callers {
            if name.is_empty() || name.len() > tollgate::MAX_KEY_LEN {
                return err(
                    Some(c.tier.span()),
                    format!("callers.{name}"),
                    format!(
                        "a caller's name is its key in the limiter: 1 to {} bytes",
                        tollgate::MAX_KEY_LEN
                    ),
                );
            }
            let tier = c.tier.get_ref();
            if !self.tiers.contains_key(tier) {
                let known: Vec<&str> = self.tiers.keys().map(String::as_str).collect();
                return err(
                    Some(c.tier.span()),
                    format!("callers.{name}.tier"),
                    format!(
                        "no tier is named `{tier}`; define [tiers.{tier}] or use one of: {}",
                        if known.is_empty() {
                            "(none)".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                );
            }
            let h = c.key_sha256.get_ref();
            if h.len() != 64
                || !h
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return err(
                    Some(c.key_sha256.span()),
                    format!("callers.{name}.key_sha256"),
                    "must be 64 lowercase hex digits: the SHA-256 of the caller's key, as `tollgate hash-key <key>` prints it".into(),
                );
            }
            if let Some(other) = seen.insert(h, name) {
                return err(
                    Some(c.key_sha256.span()),
                    format!("callers.{name}.key_sha256"),
                    format!("the same key as caller `{other}`; give each caller its own key"),
                );
            }
        }
        match &self.open {
            Some(open) if *open.get_ref() && !self.callers.is_empty() => {
                return err(
                    Some(open.span()),
                    "open".into(),
                    "`open = true` serves everyone as `anonymous`, yet callers are defined: drop `open = true`, or the [callers] tables".into(),
                );
            }
            Some(open) if !*open.get_ref() && self.callers.is_empty() => {
                return err(
                    Some(open.span()),
                    "open".into(),
                    "`open = false` but no caller is defined: nobody could use the gateway; add [callers.NAME] or write `open = true`".into(),
                );
            }
            None if self.callers.is_empty() && !self.tiers.is_empty() => {
                return err(
                    table_line(src, "tiers"),
                    "callers".into(),
                    "tiers are defined but no caller is: the gateway would be open to anyone, unlimited by the tiers; add [callers.NAME] or write `open = true` to serve everyone as `anonymous` in tier `default`".into(),
                );
            }
            _ => {}
        }
        Ok(())
    }
}

/// Why an `allow_routes` entry is not one, if it is not.
fn bad_route(entry: &str) -> Option<&'static str> {
    let path = match entry.split_once(' ') {
        Some((m, p)) => {
            if !matches!(
                m,
                "GET" | "POST" | "PUT" | "PATCH" | "DELETE" | "HEAD" | "OPTIONS"
            ) {
                return Some(
                    "starts with no method this gateway forwards: write a path (\"/v1/files\") or a method in capitals and a path (\"GET /v1/batches\")",
                );
            }
            p.trim()
        }
        None => entry,
    };
    if !path.starts_with('/') {
        return Some("is not a path: write it from the root, like \"/v1/files\"");
    }
    if path.contains(['*', '?', '#']) {
        return Some(
            "is a prefix, not a pattern or a URL: no `*`, `?` or `#` (\"/v1/files\" allows everything under it)",
        );
    }
    if path
        .split('/')
        .any(|seg| seg == "." || seg == ".." || seg.contains('%'))
    {
        return Some("must be a plain path: no `.`/`..` segments and no `%` escapes");
    }
    None
}

fn check_limits(l: &Limits, key: &str) -> Result<(), String> {
    for (name, v) in l.entries() {
        let Some(v) = v else { continue };
        if v.limit == 0 {
            return Err(format!(
                "{key}.{name} is 0; a limit must allow at least 1 (leave it out for no limit)"
            ));
        }
        if v.max_wait.is_some_and(|w| w > MAX_WAIT) {
            return Err(format!(
                "{key}.{name}.max_wait is over a day; no caller waits that long for an answer"
            ));
        }
    }
    for (name, v) in l.spends() {
        let Some((v, _)) = v else { continue };
        if !(v.limit.is_finite() && v.limit >= 0.000_001 && v.limit <= MAX_DOLLARS) {
            return Err(format!(
                "{key}.{name} is {}; a budget is a number of dollars from 0.000001 to {MAX_DOLLARS}",
                v.limit
            ));
        }
        if v.max_wait.is_some_and(|w| w > MAX_WAIT) {
            return Err(format!(
                "{key}.{name}.max_wait is over a day; no caller waits that long for an answer"
            ));
        }
    }
    Ok(())
}

/// The span of the first line defining `table` (`[table.x]`, `[table]` or `table.x =`),
/// for errors about the table as a whole.
fn table_line(src: &str, table: &str) -> Option<std::ops::Range<usize>> {
    let mut offset = 0;
    for line in src.split_inclusive('\n') {
        let t = line.trim_start();
        let t = t.strip_prefix('[').unwrap_or(t).trim_start();
        if let Some(rest) = t.strip_prefix(table)
            && rest.trim_start().starts_with(['.', ']', '='])
        {
            return Some(offset..offset + line.len());
        }
        offset += line.len();
    }
    None
}

/// The most connections `max_connections` may allow.
const MAX_CONNECTIONS: usize = 1_000_000;

/// The largest spend limit, in dollars (a billion: micro-dollars stay exact).
const MAX_DOLLARS: f64 = 1e9;

/// The longest wait a configuration may ask for.
const MAX_WAIT: Duration = Duration::from_secs(86_400);

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "[upstreams.sim]\nkind = \"sim\"\nurl = \"http://127.0.0.1:9000\"\n";

    fn err(src: &str) -> String {
        match Config::parse(src) {
            Ok(_) => panic!("accepted: {src}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn mistakes_name_the_key_and_line() {
        let e = err(&format!(
            "{BASE}[tiers.free]\nlimits = {{ requests_per_minit = 5 }}\n"
        ));
        assert!(e.starts_with("line 5:"), "{e}");
        assert!(e.contains("requests_per_minit"), "{e}");
        let e = err(&format!("{BASE}[tiers.free]\nmax_wait = \"soon\"\n"));
        assert!(
            e.starts_with("line 5:") && e.contains("not a duration"),
            "{e}"
        );
        let e = err("[upstreams.x]\nkind = \"openai\"\nurl = \"ftp://example.com\"\n");
        assert_eq!(
            e,
            "line 3: `upstreams.x.url`: `ftp://example.com` must be an http:// or https:// URL with a host"
        );
        let e = err("[upstreams.x]\nkind = \"azure\"\nurl = \"https://a.example?api-version=1\"\n");
        assert!(
            e.starts_with("line 3: `upstreams.x.url`") && e.contains("base URL only"),
            "{e}"
        );
        let e = err("[upstreams.x]\nkind = \"openai\"\nurl = \"https://me:secret@a.example\"\n");
        assert!(
            e.starts_with("line 3: `upstreams.x.url`") && e.contains("api_key"),
            "{e}"
        );
        let e = err("[upstreams.x]\nkind = \"gpt\"\nurl = \"http://a\"\n");
        assert!(
            e.starts_with("line 2:") && e.contains("unknown variant"),
            "{e}"
        );
        let e = err(&format!(
            "{BASE}[tiers.t]\n[callers.a]\nkey_sha256 = \"abc\"\ntier = \"t\"\n"
        ));
        assert!(e.starts_with("line 6: `callers.a.key_sha256`"), "{e}");
        let e = err(&format!(
            "{BASE}[tiers.t]\nlimits = {{ concurrency = 0 }}\n"
        ));
        assert!(e.contains("tiers.t.limits.concurrency is 0"), "{e}");
        let e = err(&format!(
            "{BASE}[tiers.t]\nmodel_limits.\"gpt-4o\" = {{ requests_per_minute = 0 }}\n"
        ));
        assert!(
            e.contains("tiers.t.model_limits.gpt-4o.requests_per_minute is 0"),
            "{e}"
        );
        let e = err(&format!(
            "{BASE}api_key_env = \"TOLLGATE_TEST_SURELY_UNSET\"\n"
        ));
        assert!(
            e.starts_with("line 4: `upstreams.sim.api_key_env`") && e.contains("not set"),
            "{e}"
        );
        assert!(err("").contains("no upstream"));
    }

    #[test]
    fn a_limit_is_a_number_or_a_table_with_its_own_policy() {
        let c = Config::parse(&format!(
            "open = true\n{BASE}limits = {{ requests_per_minute = {{ limit = 500, max_wait = \"2s\" }}, concurrency = {{ limit = 4, on_limit = \"reject\" }} }}\n[tiers.t]\non_limit = \"wait\"\nmax_wait = \"7s\"\nlimits = {{ tokens_per_minute = 1000, requests_per_minute = {{ limit = 5, on_limit = \"wait\" }} }}\n"
        ))
        .expect("valid");
        let (up, t) = (&c.upstreams["sim"].limits, &c.tiers["t"]);
        let wait = |l: Option<Limit>| l.expect("set").wait(t);
        assert_eq!(wait(up.requests_per_minute), Duration::from_secs(2));
        assert_eq!(wait(up.concurrency), Duration::ZERO);
        assert_eq!(wait(t.limits.tokens_per_minute), Duration::from_secs(7));
        assert_eq!(wait(t.limits.requests_per_minute), Duration::from_secs(7));
        assert_eq!(t.limits.requests_per_minute.map(|l| l.limit), Some(5));

        let e = err(&format!(
            "{BASE}[tiers.t]\nlimits = {{ concurrency = {{ limit = 2, on_limit = \"reject\", max_wait = \"1s\" }} }}\n"
        ));
        assert!(
            e.starts_with("line 5:") && e.contains("max_wait is for on_limit = \"wait\""),
            "{e}"
        );
        let e = err(&format!(
            "{BASE}[tiers.t]\nlimits = {{ concurrency = {{ limt = 2 }} }}\n"
        ));
        assert!(e.starts_with("line 5:") && e.contains("limt"), "{e}");
        let e = err(&format!(
            "{BASE}[tiers.t]\nlimits = {{ concurrency = {{ limit = 2, max_wait = \"soon\" }} }}\n"
        ));
        assert!(e.contains("not a duration"), "{e}");
        let e = err(&format!(
            "{BASE}[tiers.t]\nlimits = {{ concurrency = -3 }}\n"
        ));
        assert!(e.contains("negative"), "{e}");
        let e = err(&format!(
            "{BASE}[tiers.t]\nlimits = {{ concurrency = \"8\" }}\n"
        ));
        assert!(e.contains("a whole number, or a table"), "{e}");
        let e = err(&format!(
            "{BASE}[tiers.t]\nlimits = {{ concurrency = {{ limit = 0 }} }}\n"
        ));
        assert!(e.contains("tiers.t.limits.concurrency is 0"), "{e}");
        let e = err(&format!(
            "{BASE}[tiers.t]\nlimits = {{ concurrency = {{ limit = 1, max_wait = \"90000s\" }} }}\n"
        ));
        assert!(e.contains("concurrency.max_wait is over a day"), "{e}");
    }

    #[test]
    fn spend_limits_are_dollars_and_need_prices() {
        let c = Config::parse(&format!(
            "open = true\n{BASE}[prices]\n\"*\" = {{ input = 1, output = 2.5 }}\n[tiers.t]\nlimits = {{ spend_per_day = 5, spend_per_month = {{ limit = 100.25, on_limit = \"reject\" }} }}\n"
        ))
        .expect("valid");
        let l = &c.tiers["t"].limits;
        assert_eq!(l.spend_per_day.map(|l| l.limit), Some(5.0));
        assert_eq!(l.spend_per_month.map(|l| l.limit), Some(100.25));
        assert!(!l.is_empty());
        let e = err(&format!(
            "{BASE}[tiers.t]\nlimits = {{ spend_per_day = 5 }}\n"
        ));
        assert!(
            e.contains("`prices`: spend limits are set but no model has a price"),
            "{e}"
        );
        let e = err(&format!(
            "{BASE}[prices]\nm = {{ input = 1, output = 1 }}\n[tiers.t]\nlimits = {{ spend_per_day = -5 }}\n"
        ));
        assert!(e.contains("negative"), "{e}");
        let e = err(&format!(
            "{BASE}[prices]\nm = {{ input = 1, output = 1 }}\n[tiers.t]\nlimits = {{ spend_per_day = 0.0 }}\n"
        ));
        assert!(e.contains("tiers.t.limits.spend_per_day is 0"), "{e}");
        let e = err(&format!(
            "{BASE}[prices]\nm = {{ input = -1, output = 1 }}\n"
        ));
        assert!(e.contains("`prices.m.input`: is -1"), "{e}");
        let e = err(&format!("{BASE}[prices]\nm = {{ input = 1 }}\n"));
        assert!(e.contains("output"), "{e}");
        let e = err(&format!(
            "{BASE}[tiers.t]\nlimits = {{ requests_per_minute = 1.5 }}\n"
        ));
        assert!(
            e.starts_with("line 5:") && e.contains("not a whole number"),
            "{e}"
        );
    }

    #[test]
    fn two_callers_cannot_share_a_key() {
        let h = hash_key("k");
        let e = err(&format!(
            "{BASE}[tiers.t]\n[callers.a]\nkey_sha256 = \"{h}\"\ntier = \"t\"\n[callers.b]\nkey_sha256 = \"{h}\"\ntier = \"t\"\n"
        ));
        assert!(
            e.starts_with("line 9: `callers.b.key_sha256`: the same key as caller `a`"),
            "{e}"
        );
    }

    #[test]
    fn caller_names_fit_the_limiter() {
        let long = "x".repeat(tollgate::MAX_KEY_LEN + 1);
        let e = err(&format!(
            "{BASE}[tiers.t]\n[callers.{long}]\nkey_sha256 = \"{}\"\ntier = \"t\"\n",
            hash_key("k")
        ));
        assert!(e.contains("a caller's name is its key"), "{e}");
    }

    #[test]
    fn the_example_config_is_valid() {
        let c = Config::parse(include_str!("../../../examples/tollgate.toml"))
            .expect("examples/tollgate.toml parses");
        assert_eq!(
            c.tiers["pro"].model_limits["gpt-4o"]
                .requests_per_minute
                .map(|l| l.limit),
            Some(30)
        );
        let tpm = c.upstreams["sim"].limits.tokens_per_minute.expect("set");
        assert_eq!(tpm.wait(&c.tiers["free"]), Duration::from_secs(20));
        assert_eq!(
            c.tiers["free"].limits.spend_per_day.map(|l| l.limit),
            Some(0.05)
        );
    }

    #[test]
    fn tiers_without_callers_need_open() {
        let e = err(&format!(
            "{BASE}[tiers.t]\nlimits = {{ concurrency = 2 }}\n"
        ));
        assert!(
            e.starts_with("line 4: `callers`: tiers are defined but no caller is"),
            "{e}"
        );
        assert!(e.contains("open = true"), "{e}");
        let c = Config::parse(&format!(
            "open = true\n{BASE}[tiers.default]\nlimits = {{ concurrency = 2 }}\n"
        ))
        .expect("open = true serves everyone");
        assert!(c.open.is_some_and(|o| *o.get_ref()));
        // No tiers, no callers: open as before, `open` or not.
        Config::parse(BASE).expect("no tiers");
        let h = hash_key("k");
        let e = err(&format!(
            "open = true\n{BASE}[tiers.t]\n[callers.a]\nkey_sha256 = \"{h}\"\ntier = \"t\"\n"
        ));
        assert!(
            e.starts_with("line 1: `open`: `open = true` serves everyone"),
            "{e}"
        );
        let e = err(&format!("open = false\n{BASE}"));
        assert!(e.starts_with("line 1: `open`:"), "{e}");
    }

    #[test]
    fn connection_guards_are_checked() {
        let c = Config::parse(&format!(
            "header_timeout = \"300ms\"\nidle_timeout = \"2m0s\"\nbody_timeout = \"1s\"\nconnect_timeout = \"250ms\"\nmax_connections = 3\n{BASE}"
        ))
        .expect("valid");
        assert_eq!(*c.header_timeout.get_ref(), Duration::from_millis(300));
        assert_eq!(*c.idle_timeout.get_ref(), Duration::from_secs(120));
        assert_eq!(*c.body_timeout.get_ref(), Duration::from_secs(1));
        assert_eq!(*c.connect_timeout.get_ref(), Duration::from_millis(250));
        assert_eq!(*c.max_connections.get_ref(), 3);
        for key in [
            "header_timeout",
            "idle_timeout",
            "body_timeout",
            "connect_timeout",
        ] {
            let e = err(&format!("listen = \"127.0.0.1:1\"\n{key} = \"0s\"\n{BASE}"));
            assert!(
                e.starts_with(&format!("line 2: `{key}`: is 0")),
                "{key}: {e}"
            );
            let e = err(&format!(
                "listen = \"127.0.0.1:1\"\n{key} = \"soon\"\n{BASE}"
            ));
            assert!(
                e.starts_with("line 2:") && e.contains("`soon` is not a duration"),
                "{key}: {e}"
            );
            let e = err(&format!("listen = \"127.0.0.1:1\"\n{key} = 10\n{BASE}"));
            assert!(e.starts_with("line 2:"), "{key}: {e}");
            let e = err(&format!("{key} = \"100000s\"\n{BASE}"));
            assert!(
                e.starts_with(&format!("line 1: `{key}`: is ")) && e.contains("over"),
                "{key}: {e}"
            );
        }
        let e = err(&format!("\nmax_connections = 0\n{BASE}"));
        assert!(e.starts_with("line 2: `max_connections`: is 0"), "{e}");
        let e = err(&format!("max_connections = -1\n{BASE}"));
        assert!(e.starts_with("line 1:"), "{e}");
        let e = err(&format!(
            "metrics_token_env = \"TOLLGATE_TEST_SURELY_UNSET\"\n{BASE}"
        ));
        assert!(
            e.starts_with("line 1: `metrics_token_env`")
                && e.contains("`TOLLGATE_TEST_SURELY_UNSET` is not set"),
            "{e}"
        );
    }

    #[test]
    fn defaults_are_sane() {
        let c = Config::parse(BASE).expect("valid");
        assert_eq!(c.listen, "127.0.0.1:8080");
        assert_eq!(c.max_body_bytes, 16 << 20);
        assert_eq!(c.upstream_timeout, Duration::from_secs(600));
        assert!(c.callers.is_empty());
        assert_eq!(*c.header_timeout.get_ref(), Duration::from_secs(10));
        assert_eq!(*c.idle_timeout.get_ref(), Duration::from_secs(60));
        assert_eq!(*c.body_timeout.get_ref(), Duration::from_secs(30));
        assert_eq!(*c.connect_timeout.get_ref(), Duration::from_secs(5));
        assert_eq!(*c.max_connections.get_ref(), 10_000);
        assert!(c.metrics_token_env.is_none() && c.open.is_none());
    }
}
