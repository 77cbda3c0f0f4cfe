//! The request path: authenticate, estimate, decide (the library), forward, settle.
//!
//! Each proxied request runs in a task of its own that owns what the permit borrows,
//! so a stream's permit lives until the stream ends and is settled with what was
//! generated, whether the stream finished or the client went away.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use axum::extract::{Request, State as AxState};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::Uri;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tollgate::estimate::Endpoint;
use tollgate::provider::{RateLimitHeaders, format_duration};
use tollgate::retry::Backoff;
use tollgate::{Cost, Error, Limiter, Permit, QuotaStatus, Usage};

use crate::config::{Kind, Price};
use crate::pace::{self, Turn};
use crate::usage::{Seen, StreamUsage};
use crate::{CallerInfo, Gate, Measure, State};

type St = AxState<Arc<State>>;

/// An error answer in the caller's API's shape.
fn error(status: StatusCode, anthropic: bool, kind: &str, code: &str, message: &str) -> Response {
    let body = if anthropic {
        let t = match status {
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
            StatusCode::NOT_FOUND => "not_found_error",
            s if s.is_server_error() => "api_error",
            _ => "invalid_request_error",
        };
        json!({"type": "error", "error": {"type": t, "message": message}})
    } else {
        json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
    };
    (status, axum::Json(body)).into_response()
}

/// The caller a request's API key names.
fn authenticate(st: &State, headers: &HeaderMap) -> Option<CallerInfo> {
    if let Some(open) = &st.open {
        return Some(open.clone());
    }
    let key = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
        .or_else(|| headers.get("api-key").and_then(|v| v.to_str().ok()))?;
    st.callers
        .get(&crate::config::hash_key(key.trim()))
        .cloned()
}

fn unauthorized(anthropic: bool) -> Response {
    error(
        StatusCode::UNAUTHORIZED,
        anthropic,
        "invalid_request_error",
        "invalid_api_key",
        "Invalid API key: send a key configured for this gateway in `Authorization: Bearer <key>` (or `x-api-key`).",
    )
}

/// `GET /v1/models`: the configured models.
pub(crate) async fn models(AxState(st): St, headers: HeaderMap) -> Response {
    if authenticate(&st, &headers).is_none() {
        return unauthorized(false);
    }
    let data: Vec<Value> = st
        .upstreams
        .iter()
        .flat_map(|u| {
            u.models
                .iter()
                .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": u.name}))
        })
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// `GET /v1/usage`: the caller's own limits, remaining and reset.
pub(crate) async fn usage(AxState(st): St, headers: HeaderMap) -> Response {
    let Some(caller) = authenticate(&st, &headers) else {
        return unauthorized(false);
    };
    let tier = &st.tiers[caller.tier];
    let prefix = format!("tier.{}.", tier.name);
    let mut quotas = Vec::new();
    let mut models: Vec<(&String, &Limiter)> =
        tier.models.iter().map(|(m, g)| (m, &g.limiter)).collect();
    models.sort_by_key(|(m, _)| *m);
    let tier_wide = tier.limiters.iter().flatten().next().map(|g| &g.limiter);
    for l in tier_wide
        .into_iter()
        .chain(models.into_iter().map(|(_, l)| l))
    {
        match l.status(&caller.name).await {
            Ok(status) => {
                for s in status
                    .iter()
                    .filter(|s| s.quota.name().starts_with(&prefix))
                {
                    let mut q = json!({
                        "name": s.quota.name(),
                        "limit": s.limit,
                        "remaining": s.remaining,
                        "reset_ms": s.reset.as_millis() as u64,
                    });
                    // Spend limits count micro-dollars; say so, and give dollars too.
                    if st.measures.get(s.quota.name()) == Some(&Measure::Spend) {
                        q["unit"] = json!("usd_micros");
                        q["limit_usd"] = json!(s.limit as f64 / 1e6);
                        q["remaining_usd"] = json!(s.remaining as f64 / 1e6);
                    }
                    quotas.push(q);
                }
            }
            Err(e) => return limiter_error(&st, &caller, &e, false),
        }
    }
    axum::Json(json!({"caller": caller.name, "tier": tier.name, "quotas": quotas})).into_response()
}

/// The request path as it is classified and forwarded, one spelling for one route:
/// escapes of unreserved characters decoded (RFC 3986 §6.2.2.2; `/v1/chat/completion%73`
/// is the chat route, and is estimated and limited as one), other escapes kept. A path
/// that could leave the upstream's base path or be read two ways is refused: a `.` or
/// `..` segment, an encoded `/` or `\`, a raw `\`, a `%` not followed by two hex digits.
/// (Tested in `tests::paths_have_one_spelling_and_cannot_climb`.)
fn normalize_path(raw: &str) -> Result<String, &'static str> {
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'\\' {
            return Err("a `\\` in the path");
        }
        if b != b'%' {
            if b.is_ascii() {
                out.push(char::from(b));
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
            i += 1;
            continue;
        }
        let hex = |c: u8| char::from(c).to_digit(16);
        let (Some(hi), Some(lo)) = (
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) else {
            return Err("a `%` not followed by two hex digits in the path");
        };
        let c = u8::try_from(hi * 16 + lo).unwrap_or(0);
        match c {
            b'/' | b'\\' => return Err("an encoded `/` or `\\` in the path"),
            c if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') => {
                out.push(char::from(c));
            }
            c => out.push_str(&format!("%{c:02X}")),
        }
        i += 3;
    }
    if out.split('/').any(|seg| seg == "." || seg == "..") {
        return Err("a `.` or `..` segment in the path");
    }
    Ok(out)
}

/// Whether the gateway may ask an upstream for a stream's usage chunk
/// (`stream_options.include_usage`): not Anthropic's API, and Azure only from
/// `api-version` 2024-09-01 (earlier versions refuse the field with a 400; their streams
/// are charged by counting the streamed text instead).
fn takes_stream_options(kind: Kind, path_and_query: &str) -> bool {
    match kind {
        Kind::Anthropic => false,
        Kind::Azure => path_and_query
            .split_once('?')
            .into_iter()
            .flat_map(|(_, q)| q.split('&'))
            .filter_map(|pair| pair.strip_prefix("api-version="))
            .any(|v| v >= "2024-09-01"),
        Kind::OpenAi | Kind::OpenaiCompatible => true,
    }
}

/// The estimated endpoint a normalized path names, and whether it is Anthropic's API.
/// OpenAI routes match by their last segments (so an Azure deployment path counts);
/// Anthropic's only as `/v1/messages` itself, and anything under it goes to Anthropic
/// unestimated (`/v1/messages/count_tokens`, batches), so OpenAI's
/// `/v1/threads/{id}/messages` is not taken for it.
fn classify(path: &str) -> (Option<Endpoint>, bool) {
    let trimmed = path.trim_end_matches('/');
    if trimmed == "/v1/messages" {
        return (Some(Endpoint::Messages), true);
    }
    if path.starts_with("/v1/messages/") {
        return (None, true);
    }
    let endpoint = Endpoint::from_path(path).filter(|e| *e != Endpoint::Messages);
    (endpoint, false)
}

/// Everything else: proxied.
pub(crate) async fn proxy(AxState(st): St, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let path = match normalize_path(parts.uri.path()) {
        Ok(path) => path,
        Err(why) => {
            return error(
                StatusCode::BAD_REQUEST,
                parts.uri.path().starts_with("/v1/messages"),
                "invalid_request_error",
                "invalid_path",
                &format!("This gateway does not accept {why}."),
            );
        }
    };
    let (endpoint, anthropic) = classify(&path);
    let Some(caller) = authenticate(&st, &parts.headers) else {
        return unauthorized(anthropic);
    };
    let body = match axum::body::to_bytes(body, st.max_body).await {
        Ok(b) => b,
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                anthropic,
                "invalid_request_error",
                "request_too_large",
                &format!(
                    "The request body is over this gateway's limit of {} bytes.",
                    st.max_body
                ),
            );
        }
    };
    // Known endpoints are estimated; anything else counts as one request.
    let mut json_body: Option<Value> = None;
    let mut cost = Cost::request();
    if let (Some(ep), &Method::POST) = (endpoint, &parts.method) {
        let v: Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    anthropic,
                    "invalid_request_error",
                    "invalid_json",
                    &format!("The request body is not valid JSON: {e}"),
                );
            }
        };
        match tollgate::estimate::estimate(ep, &v) {
            Ok(e) => cost = Cost::input(e.input).output(e.output),
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    anthropic,
                    "invalid_request_error",
                    "invalid_request",
                    &e.to_string(),
                );
            }
        }
        json_body = Some(v);
    }
    let model = json_body
        .as_ref()
        .and_then(|v| v.get("model"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let Some(up) = pick_upstream(&st, anthropic, &model) else {
        return error(
            StatusCode::NOT_FOUND,
            anthropic,
            "invalid_request_error",
            "no_upstream",
            &format!("No upstream of this gateway serves `{path}` for model `{model}`."),
        );
    };
    let u = &st.upstreams[up];
    let account = u
        .model_accounts
        .get(&model)
        .copied()
        .unwrap_or(u.default_account);
    // Spend: the estimate at the model's price. Known endpoints need a price when a
    // spend limit applies; other routes count as requests only.
    let price = st.prices.get(&model).copied().or(st.default_price);
    if let Some(p) = price {
        cost = cost.spend(p.micro_dollars(cost.input, cost.output));
    } else if json_body.is_some() {
        let tier = &st.tiers[caller.tier];
        let spends = tier.limiters[account].as_ref().is_some_and(|g| g.spends)
            || tier.models.get(&model).is_some_and(|g| g.spends);
        if spends {
            return error(
                StatusCode::BAD_REQUEST,
                anthropic,
                "invalid_request_error",
                "model_not_priced",
                &format!(
                    "This gateway has spend limits and no price for model `{model}`; its operator must add it under [prices] (or a \"*\" price) before it can be used."
                ),
            );
        }
    }
    let pace_key = match &st.accounts[account].pace {
        Some(pace) if u.forward_key => {
            Cow::Owned(pace.key(&pace::caller_account(&parts.headers), &model))
        }
        Some(pace) => Cow::Owned(pace.key("account", &model)),
        // Not paced apart: never read on the request path, and no allocation for it.
        None => Cow::Borrowed("account"),
    };
    let call = Call {
        st: st.clone(),
        caller,
        up,
        account,
        pace_key,
        method: parts.method,
        path_and_query: match parts.uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path.clone(),
        },
        headers: parts.headers,
        body,
        json: json_body,
        endpoint,
        model,
        cost,
        price,
        anthropic,
    };
    let (tx, rx) = oneshot::channel();
    let guard = crate::Calls::enter(&st);
    tokio::spawn(async move {
        call.run(tx).await;
        drop(guard);
    });
    rx.await.unwrap_or_else(|_| {
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            anthropic,
            "server_error",
            "internal_error",
            "The gateway failed while handling this request.",
        )
    })
}

/// Which upstream serves a request: one listing the model, else the default, else the
/// first that speaks the route's API.
fn pick_upstream(st: &State, anthropic: bool, model: &str) -> Option<usize> {
    let fits = |k: Kind| {
        if anthropic {
            k.serves_messages()
        } else {
            k.serves_openai()
        }
    };
    let ups = || {
        st.upstreams
            .iter()
            .enumerate()
            .filter(|(_, u)| fits(u.kind))
    };
    ups()
        .find(|(_, u)| u.models.iter().any(|m| m == model))
        .or_else(|| ups().find(|(_, u)| u.default))
        .or_else(|| ups().find(|(_, u)| u.models.is_empty()))
        .or_else(|| ups().next())
        .map(|(i, _)| i)
}

/// What the quota named `name` limits: as configured, or, for limits learned from an
/// upstream (`...requests_per_minute`, `...tokens_per_minute`), as its name says.
fn measure(st: &State, name: &str) -> Option<Measure> {
    st.measures.get(name).copied().or_else(|| {
        if name.ends_with("tokens_per_minute") {
            Some(Measure::Tokens)
        } else if name.ends_with("requests_per_minute") {
            Some(Measure::Requests)
        } else {
            None
        }
    })
}

/// The URI of a request at an upstream: the upstream's prefix (its URL without a
/// trailing `/`) and the request's path and query, less the API root both spell. A base
/// written as SDKs write it (`https://api.openai.com/v1`, `https://x.openai.azure.com/openai`,
/// `https://openrouter.ai/api/v1`) and a request for `/v1/chat/completions` (or
/// `/openai/deployments/...`) make one `/v1`, not two. Only API roots (`v1`, `openai`) are
/// merged; any other base path is kept whole in front of the request's.
pub(crate) fn upstream_uri(prefix: &str, path_and_query: &str) -> String {
    const ROOTS: [&str; 2] = ["v1", "openai"];
    let path_at = prefix
        .find("://")
        .and_then(|i| prefix[i + 3..].find('/').map(|j| i + 3 + j))
        .unwrap_or(prefix.len());
    // The common case, a base without an API root at its end: nothing to merge, and
    // nothing collected on the request path.
    let last = prefix[path_at..].rsplit('/').next().unwrap_or("");
    if !ROOTS.contains(&last) {
        return format!("{prefix}{path_and_query}");
    }
    let base: Vec<&str> = prefix[path_at..].split('/').skip(1).collect();
    let path = path_and_query.split('?').next().unwrap_or("");
    let wanted: Vec<&str> = path.split('/').skip(1).collect();
    // The most segments the base ends with and the path begins with, all API roots (the
    // path's last segment is a resource, never a root).
    let most = base.len().min(wanted.len().saturating_sub(1));
    for k in (1..=most).rev() {
        let tail = &base[base.len() - k..];
        if tail == &wanted[..k] && tail.iter().all(|s| ROOTS.contains(s)) {
            let cut: usize = tail.iter().map(|s| s.len() + 1).sum();
            return format!("{}{path_and_query}", &prefix[..prefix.len() - cut]);
        }
    }
    format!("{prefix}{path_and_query}")
}

/// The answer to a refused or failed decision.
fn limiter_error(st: &State, caller: &CallerInfo, e: &Error, anthropic: bool) -> Response {
    match e {
        Error::Limited(r) => {
            let name = r.quota().name();
            st.metrics.count(
                "tollgate_rejected_total",
                &[("caller", &caller.name), ("quota", name)],
                1,
            );
            let measure = measure(st, name).unwrap_or(Measure::Requests);
            let kind = match measure {
                Measure::Requests => "requests",
                Measure::Tokens => "tokens",
                Measure::Concurrency => "concurrency",
                Measure::Spend => "spend",
            };
            let wait = r.retry_after();
            let message = match wait {
                Some(w) if measure == Measure::Spend => format!(
                    "Spend limit reached for caller `{}` on quota `{name}`: budget {}, remaining {}. Please try again in {}.",
                    caller.name,
                    dollars(r.limit()),
                    dollars(r.remaining()),
                    format_duration(w)
                ),
                Some(w) => format!(
                    "Rate limit reached for caller `{}` on quota `{name}`: limit {}, remaining {}. Please try again in {}.",
                    caller.name,
                    r.limit(),
                    r.remaining(),
                    format_duration(w)
                ),
                None => format!(
                    "Limit reached for caller `{}` on quota `{name}`: all {} slots are in use. Please try again when a request ends.",
                    caller.name,
                    r.limit()
                ),
            };
            let mut resp = error(
                StatusCode::TOO_MANY_REQUESTS,
                anthropic,
                kind,
                "rate_limit_exceeded",
                &message,
            );
            let h = resp.headers_mut();
            let wait = wait.unwrap_or(Duration::from_secs(1));
            insert(
                h,
                "retry-after",
                &wait.as_secs_f64().ceil().max(1.0).to_string(),
            );
            insert(h, "retry-after-ms", &wait.as_millis().max(1).to_string());
            insert(h, "x-tollgate-quota", name);
            resp
        }
        Error::TooLarge(t) => {
            let name = t.quota().name();
            st.metrics.count(
                "tollgate_rejected_total",
                &[("caller", &caller.name), ("quota", name)],
                1,
            );
            let (kind, message) = if measure(st, name) == Some(Measure::Spend) {
                (
                    "spend",
                    format!(
                        "Request too costly for caller `{}` on quota `{name}`: at most {} and the budget holds {}. Ask for fewer tokens (max_tokens) or a shorter prompt.",
                        caller.name,
                        dollars(t.cost()),
                        dollars(t.capacity())
                    ),
                )
            } else {
                (
                    "tokens",
                    format!(
                        "Request too large for caller `{}` on quota `{name}`: it needs {} and the quota holds at most {}. Ask for fewer tokens (max_tokens) or a shorter prompt.",
                        caller.name,
                        t.cost(),
                        t.capacity()
                    ),
                )
            };
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                anthropic,
                kind,
                "request_too_large",
                &message,
            )
        }
        Error::Unavailable(u) => {
            let mut resp = error(
                StatusCode::SERVICE_UNAVAILABLE,
                anthropic,
                "server_error",
                "limits_unavailable",
                &format!("The gateway cannot reach its shared limits: {u}"),
            );
            insert(resp.headers_mut(), "retry-after", "1");
            resp
        }
        other => error(
            StatusCode::BAD_REQUEST,
            anthropic,
            "invalid_request_error",
            "invalid_request",
            &other.to_string(),
        ),
    }
}

/// Micro-dollars as dollars: `$0.0075`, `$5.00`.
fn dollars(micros: u64) -> String {
    let (whole, frac) = (micros / 1_000_000, micros % 1_000_000);
    if frac % 10_000 == 0 {
        format!("${whole}.{:02}", frac / 10_000)
    } else {
        let digits = format!("{frac:06}");
        format!("${whole}.{}", digits.trim_end_matches('0'))
    }
}

fn insert(h: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(HeaderName::from_static(name), v);
    }
}

/// `x-ratelimit-*` headers for the binding (least remaining) requests and tokens quotas.
fn ratelimit_headers(st: &State, status: &[QuotaStatus], h: &mut HeaderMap) {
    const NAMES: [(Measure, [&str; 3]); 2] = [
        (
            Measure::Requests,
            [
                "x-ratelimit-limit-requests",
                "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests",
            ],
        ),
        (
            Measure::Tokens,
            [
                "x-ratelimit-limit-tokens",
                "x-ratelimit-remaining-tokens",
                "x-ratelimit-reset-tokens",
            ],
        ),
    ];
    for (measure, [limit, remaining, reset]) in NAMES {
        let binding = status
            .iter()
            .filter(|s| self::measure(st, s.quota.name()) == Some(measure))
            .min_by_key(|s| (s.remaining, std::cmp::Reverse(s.reset)));
        if let Some(s) = binding {
            h.insert(HeaderName::from_static(limit), HeaderValue::from(s.limit));
            h.insert(
                HeaderName::from_static(remaining),
                HeaderValue::from(s.remaining),
            );
            insert(h, reset, &format_duration(s.reset));
        }
    }
}

/// Whether `name` is one of the hop-by-hop headers a message's `Connection` header
/// lists (RFC 9110, 7.6.1): they concern this hop only and are never passed on.
fn named_by_connection(headers: &HeaderMap, name: &HeaderName) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|listed| listed.trim().eq_ignore_ascii_case(name.as_str()))
}

/// Request headers never forwarded: hop-by-hop, the caller's credentials, the choice of
/// which organization or project of the account is billed (the gateway's operator
/// chose the account, and its limits are that account's), and the encodings it accepts
/// (the gateway reads the answer to count usage, so it takes it uncompressed).
fn forwardable(name: &HeaderName) -> bool {
    !matches!(
        name.as_str(),
        "host"
            | "accept-encoding"
            | "content-length"
            | "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "authorization"
            | "x-api-key"
            | "api-key"
            | "openai-organization"
            | "openai-project"
    )
}

/// Response headers never passed back: hop-by-hop, the length (the body may change), the
/// upstream account's identity, cookies (the upstream's, shared by every caller) and its
/// rate-limit headers (the caller gets its own).
fn returnable(name: &HeaderName) -> bool {
    let n = name.as_str();
    !(matches!(
        n,
        "content-length"
            | "connection"
            | "keep-alive"
            | "transfer-encoding"
            | "trailer"
            | "upgrade"
            | "openai-organization"
            | "openai-project"
            | "anthropic-organization-id"
            | "set-cookie"
    ) || n.starts_with("x-ratelimit-")
        || n.starts_with("anthropic-ratelimit-"))
}

struct Call {
    st: Arc<State>,
    caller: CallerInfo,
    up: usize,
    /// The budget of the upstream this call spends: the model's own, or the general one.
    account: usize,
    /// The key of that budget when it is paced apart ([`crate::AccountState::pace`]): a
    /// hash of the caller's own key when it is passed through, else `account`; with the
    /// model for learned limits, which providers report per model.
    pace_key: Cow<'static, str>,
    method: Method,
    path_and_query: String,
    headers: HeaderMap,
    body: Bytes,
    json: Option<Value>,
    endpoint: Option<Endpoint>,
    model: String,
    cost: Cost,
    /// The model's price, for spend limits.
    price: Option<Price>,
    anthropic: bool,
}

enum Forwarded {
    Answer(http::Response<Incoming>),
    Failed(Response),
}

impl Call {
    async fn run(mut self, tx: oneshot::Sender<Response>) {
        let st = self.st.clone();
        let tier = &st.tiers[self.caller.tier];
        let gate = tier.limiters[self.account].clone();
        let key = self.caller.name.clone();
        let started = Instant::now();
        let mut tx = tx;
        let model_gate = tier.models.get(&self.model).cloned();
        // The account's own pace, when it is paced apart: its limiter (declared before
        // the permits, which borrow it) and, for the request that looks, the right to.
        let pace_limiter: Option<Limiter>;
        let looking: Option<pace::Looking>;
        let decided = tokio::select! {
            r = decide(model_gate.as_ref(), gate.as_ref(), &key, self.cost) => r,
            // The client went away while waiting: dropping the decision gives back its
            // reservations.
            () = tx.closed() => return,
        };
        let mut permit = match decided {
            Ok(p) => p,
            Err(e) => {
                let mut resp = limiter_error(&st, &self.caller, &e, self.anthropic);
                let mut status = Vec::new();
                for g in [&model_gate, &gate].into_iter().flatten() {
                    if let Ok(s) = g.limiter.status(&key).await {
                        status.extend(s);
                    }
                }
                ratelimit_headers(&st, &status, resp.headers_mut());
                let _ = tx.send(resp);
                return;
            }
        };
        // An account paced apart takes its turn after the caller's own limits allowed
        // the request (a caller over its own budget hears so at once), waiting as long
        // as the tier lets a request wait; refused, the caller's permits are given back.
        let wait = tier.wait;
        match &st.accounts[self.account].pace {
            Some(pace) => {
                let turn = tokio::select! {
                    t = pace.turn(&self.pace_key, wait) => t,
                    () = tx.closed() => { permit.give_back(); return; }
                };
                (pace_limiter, looking) = match turn {
                    Turn::Limiter(l) => (Some(l), None),
                    Turn::Look(l) => (None, Some(l)),
                    Turn::Free => (None, None),
                };
            }
            None => (pace_limiter, looking) = (None, None),
        }
        if let Some(l) = &pace_limiter {
            let left = wait.saturating_sub(started.elapsed());
            let turn = async {
                if left.is_zero() {
                    l.try_acquire(&self.pace_key, self.cost).await
                } else {
                    l.acquire_within(&self.pace_key, self.cost, left).await
                }
            };
            let paced = tokio::select! {
                r = turn => r,
                () = tx.closed() => { permit.give_back(); return; }
            };
            match paced {
                Ok(p) => permit.0[2] = Some(p),
                Err(e) => {
                    let mut resp = limiter_error(&st, &self.caller, &e, self.anthropic);
                    let mut status = permit.status().await;
                    if let Ok(s) = l.status(&self.pace_key).await {
                        status.extend(s);
                    }
                    ratelimit_headers(&st, &status, resp.headers_mut());
                    permit.give_back();
                    let _ = tx.send(resp);
                    return;
                }
            }
        }
        let waited = started.elapsed();
        let upstream = &st.upstreams[self.up];
        st.metrics.count(
            "tollgate_admitted_total",
            &[("caller", &key), ("upstream", &upstream.name)],
            1,
        );
        st.metrics
            .observe("tollgate_wait_seconds", &[], waited.as_secs_f64());
        let mut rl = HeaderMap::new();
        ratelimit_headers(&st, &permit.status().await, &mut rl);
        // Streams of OpenAI chat and completions get usage asked for, and the usage chunk
        // is kept from a caller who did not ask.
        let streaming = self
            .json
            .as_ref()
            .is_some_and(|v| v.get("stream").and_then(Value::as_bool) == Some(true));
        let mut strip = false;
        if streaming
            && takes_stream_options(upstream.kind, &self.path_and_query)
            && matches!(
                self.endpoint,
                Some(Endpoint::ChatCompletions | Endpoint::Completions)
            )
            && let Some(v) = self.json.as_mut()
        {
            let asked = v
                .pointer("/stream_options/include_usage")
                .and_then(Value::as_bool)
                == Some(true);
            if !asked && let Some(obj) = v.as_object_mut() {
                let opts = obj.entry("stream_options").or_insert_with(|| json!({}));
                if let Some(o) = opts.as_object_mut() {
                    o.insert("include_usage".into(), Value::Bool(true));
                    strip = true;
                    if let Ok(b) = serde_json::to_vec(v) {
                        self.body = Bytes::from(b);
                    }
                }
            }
        }
        let deadline = started
            .checked_add(tier.max_wait)
            .unwrap_or(started + Duration::from_secs(86_400));
        let answer = if streaming {
            tokio::select! {
                a = self.forward(deadline) => a,
                () = tx.closed() => {
                    // Gone before the stream began: dropping the upstream connection
                    // stops the generation, so charge the estimate's prompt only.
                    settle(permit, Usage::new(self.cost.input, 0), self.price).await;
                    return;
                }
            }
        } else {
            // A whole answer is generated, and billed, whether or not the caller stays
            // for it: wait for it and charge what it used (the sends below go nowhere).
            self.forward(deadline).await
        };
        // The look is over: its answer's headers were learned from in `forward` (or it
        // failed, and the next request looks).
        drop(looking);
        let answer = match answer {
            Forwarded::Answer(a) => a,
            Forwarded::Failed(mut resp) => {
                resp.headers_mut().extend(rl);
                let _ = tx.send(resp);
                settle(permit, Usage::new(0, 0), self.price).await;
                return;
            }
        };
        let status = answer.status();
        let mut headers = HeaderMap::new();
        for (n, v) in answer.headers() {
            if returnable(n) && !named_by_connection(answer.headers(), n) {
                headers.append(n.clone(), v.clone());
            }
        }
        headers.extend(rl);
        let is_stream = answer
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if !status.is_success() {
            // Nothing generated: tokens back, the request counted.
            let body = tokio::time::timeout(st.upstream_timeout, whole(answer))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            let _ = tx.send(build(status, headers, Body::from(body)));
            settle(permit, Usage::new(0, 0), self.price).await;
            return;
        }
        if is_stream {
            self.stream(answer, status, headers, permit, strip, tx)
                .await;
            return;
        }
        let body = match tokio::time::timeout(st.upstream_timeout, whole(answer)).await {
            Ok(Ok(b)) => b,
            _ => {
                let mut resp = error(
                    StatusCode::BAD_GATEWAY,
                    self.anthropic,
                    "server_error",
                    "upstream_error",
                    &format!(
                        "The upstream `{}` failed while sending its answer.",
                        upstream.name
                    ),
                );
                // The caller's own limits, as on every answer.
                for (n, v) in &headers {
                    if n.as_str().starts_with("x-ratelimit-") {
                        resp.headers_mut().append(n.clone(), v.clone());
                    }
                }
                let _ = tx.send(resp);
                settle(permit, Usage::new(self.cost.input, 0), self.price).await;
                return;
            }
        };
        let used = crate::usage::from_body(&body);
        // The caller has its answer before the settlement's round trip.
        let _ = tx.send(build(status, headers, Body::from(body)));
        if let Some(u) = used {
            self.count_tokens(u);
            settle(permit, u, self.price).await;
        }
        // No usage reported: the estimate stands (the permit drops unsettled).
    }

    fn count_tokens(&self, u: Usage) {
        let up = &self.st.upstreams[self.up].name;
        for (kind, n) in [("input", u.input), ("output", u.output)] {
            self.st.metrics.count(
                "tollgate_tokens_total",
                &[
                    ("caller", &self.caller.name),
                    ("upstream", up),
                    ("kind", kind),
                ],
                n,
            );
        }
        if let Some(p) = self.price {
            self.st.metrics.count(
                "tollgate_spend_micro_usd_total",
                &[("caller", &self.caller.name), ("upstream", up)],
                p.micro_dollars(u.input, u.output),
            );
        }
    }

    /// Send to the upstream, retrying 429s, 5xx and transport failures while the
    /// retry's delay ends before `deadline`.
    async fn forward(&self, deadline: Instant) -> Forwarded {
        let st = &self.st;
        let upstream = &st.upstreams[self.up];
        // The caller's path was checked and normalized: it is a valid URI's path, and
        // the prefix was checked at startup.
        let Ok(uri) = Uri::try_from(upstream_uri(&upstream.prefix, &self.path_and_query)) else {
            return Forwarded::Failed(error(
                StatusCode::BAD_REQUEST,
                self.anthropic,
                "invalid_request_error",
                "invalid_path",
                "This gateway cannot forward this path.",
            ));
        };
        let mut headers = HeaderMap::with_capacity(self.headers.len() + 2);
        for (n, v) in &self.headers {
            // A body the gateway rewrote is JSON, whatever the caller said.
            if forwardable(n)
                && !named_by_connection(&self.headers, n)
                && !(self.json.is_some() && n == header::CONTENT_TYPE)
            {
                headers.append(n.clone(), v.clone());
            }
        }
        if let Some((n, v)) = &upstream.auth {
            headers.insert(n.clone(), v.clone());
        }
        if upstream.forward_key {
            // The caller's own account: its credentials, and its choice of organization
            // and project, go through as it sent them.
            for name in pace::OWN_ACCOUNT_HEADERS {
                for v in self.headers.get_all(name) {
                    headers.append(HeaderName::from_static(name), v.clone());
                }
            }
        }
        if self.json.is_some() {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
        let backoff = Backoff::default();
        let mut attempt = 0u32;
        loop {
            let mut req = http::Request::new(Full::new(self.body.clone()));
            *req.method_mut() = self.method.clone();
            *req.uri_mut() = uri.clone();
            *req.headers_mut() = headers.clone();
            let sent = Instant::now();
            let result = tokio::time::timeout(st.upstream_timeout, st.http.request(req)).await;
            let elapsed = sent.elapsed();
            let labels = |code: &str| {
                st.metrics.count(
                    "tollgate_upstream_responses_total",
                    &[("upstream", &upstream.name), ("status", code)],
                    1,
                );
            };
            st.metrics.observe(
                "tollgate_upstream_seconds",
                &[("upstream", &upstream.name)],
                elapsed.as_secs_f64(),
            );
            let (retryable, hint, failure) = match result {
                Ok(Ok(resp)) => {
                    labels(resp.status().as_str());
                    let rl = RateLimitHeaders::parse(resp.headers(), SystemTime::now());
                    let acct = &st.accounts[self.account];
                    if let Some(pace) = &acct.pace {
                        // Learned at once (the others may be waiting for it), else
                        // absorbed off the request's path.
                        pace.observe(&self.pace_key, resp.status(), &rl, elapsed)
                            .await;
                    } else if acct.limiter.is_some()
                        && !rl.is_empty()
                        && !acct.absorbing.swap(true, Ordering::Acquire)
                    {
                        // Off the request's path: the answer never waits for it.
                        let (st, account, name) = (st.clone(), self.account, upstream.name.clone());
                        tokio::spawn(async move {
                            let acct = &st.accounts[account];
                            // Cleared however this ends.
                            let _clear = Clear(&acct.absorbing);
                            if let Some(l) = &acct.limiter
                                && let Err(e) = l.absorb("account", &rl, elapsed).await
                            {
                                tracing::warn!(upstream = %name, error = %e, "could not absorb the upstream's rate-limit headers");
                            }
                        });
                    }
                    if !tollgate::retry::is_retryable(resp.status()) {
                        return Forwarded::Answer(resp);
                    }
                    let hint = rl.wait_hint();
                    (true, hint, Ok(resp))
                }
                Ok(Err(e)) => {
                    labels("0");
                    tracing::warn!(upstream = %upstream.name, error = %Chain(&e), "upstream request failed");
                    // The error's causes may name the upstream's host, which may be an
                    // internal one: the caller gets what happened, the log the details.
                    let (status, what) = if timed_out(&e) {
                        (StatusCode::GATEWAY_TIMEOUT, "timed out")
                    } else if e.is_connect() {
                        (StatusCode::BAD_GATEWAY, "could not be reached")
                    } else {
                        (StatusCode::BAD_GATEWAY, "failed while answering")
                    };
                    (
                        true,
                        None,
                        Err((status, format!("The upstream `{}` {what}.", upstream.name))),
                    )
                }
                Err(_) => {
                    labels("0");
                    (
                        true,
                        None,
                        Err((
                            StatusCode::GATEWAY_TIMEOUT,
                            format!(
                                "The upstream `{}` did not answer within {}.",
                                upstream.name,
                                format_duration(st.upstream_timeout)
                            ),
                        )),
                    )
                }
            };
            let delay = backoff.delay(attempt, hint);
            if retryable
                && attempt + 1 < backoff.max_attempts()
                && Instant::now() + delay < deadline
            {
                tokio::time::sleep(delay).await;
                if self.retry_turn(deadline).await {
                    st.metrics.count(
                        "tollgate_upstream_retries_total",
                        &[("upstream", &upstream.name)],
                        1,
                    );
                    attempt += 1;
                    continue;
                }
            }
            return match failure {
                Ok(resp) => Forwarded::Answer(resp),
                Err((status, message)) => Forwarded::Failed(error(
                    status,
                    self.anthropic,
                    "server_error",
                    "upstream_error",
                    &message,
                )),
            };
        }
    }

    /// A retry is one more request at the provider: it takes its turn in the account's
    /// quotas (one request; what a failed attempt used of the tokens is unknown) within
    /// `deadline`, so retries during an outage never send the account past its pace.
    /// False when the turn would come too late, or the limiter cannot decide. The
    /// permit drops unsettled: the request stays counted.
    async fn retry_turn(&self, deadline: Instant) -> bool {
        let acct = &self.st.accounts[self.account];
        let (limiter, key) = match &acct.pace {
            Some(pace) => (pace.limiter(&self.pace_key), &*self.pace_key),
            None => (acct.limiter.clone(), "account"),
        };
        let Some(account) = limiter else {
            return true;
        };
        let left = deadline.saturating_duration_since(Instant::now());
        account
            .acquire_within(key, Cost::request(), left)
            .await
            .is_ok()
    }

    /// Pass a stream on event by event, reading its usage; settle when it ends or the
    /// client goes away.
    async fn stream(
        &self,
        answer: http::Response<Incoming>,
        status: StatusCode,
        headers: HeaderMap,
        permit: Permits<'_>,
        strip: bool,
        tx: oneshot::Sender<Response>,
    ) {
        // An `Err` aborts the caller's body, so a stream the upstream broke off does
        // not look finished.
        let (chunks, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
        let body =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|b| (b, rx)) },
            );
        if tx
            .send(build(status, headers, Body::from_stream(body)))
            .is_err()
        {
            settle(permit, Usage::new(self.cost.input, 0), self.price).await;
            return;
        }
        let mut tracker = StreamUsage::new(&self.model, self.cost.input);
        let mut parser = crate::sse::Parser::new();
        let mut upstream = answer.into_body();
        let mut gone = false;
        let mut broken = None;
        'read: loop {
            let next = tokio::select! {
                n = tokio::time::timeout(self.st.upstream_timeout, next_data(&mut upstream)) => n,
                () = chunks.closed() => { gone = true; break 'read; }
            };
            let chunk = match next {
                Ok(Some(Ok(c))) => c,
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    tracing::warn!(error = %e, "upstream stream failed");
                    broken = Some("the upstream's stream failed");
                    break;
                }
                Err(_) => {
                    tracing::warn!("upstream stream idle past the upstream timeout");
                    broken = Some("the upstream's stream went idle past the timeout");
                    break;
                }
            };
            let events = match parser.push(&chunk) {
                Ok(ev) => ev,
                Err(e) => {
                    tracing::warn!(error = %e, "upstream stream unreadable");
                    broken = Some("the upstream's stream could not be read");
                    break;
                }
            };
            for ev in events {
                let seen = tracker.observe(ev.event.as_deref(), &ev.data);
                if strip && seen == Seen::UsageOnlyChunk {
                    continue;
                }
                if chunks.send(Ok(ev.raw)).await.is_err() {
                    gone = true;
                    break 'read;
                }
            }
        }
        if let Some(why) = broken {
            let _ = chunks.send(Err(std::io::Error::other(why))).await;
        } else if !gone && let Some(ev) = std::mem::take(&mut parser).finish() {
            tracker.observe(ev.event.as_deref(), &ev.data);
            let _ = chunks.send(Ok(ev.raw)).await;
        }
        if gone {
            self.st.metrics.count(
                "tollgate_client_disconnects_total",
                &[("caller", &self.caller.name)],
                1,
            );
        }
        let used = tracker.usage();
        self.count_tokens(used);
        settle(permit, used, self.price).await;
    }
}

/// An answer's whole body.
async fn whole(answer: http::Response<Incoming>) -> Result<Bytes, hyper::Error> {
    Ok(answer.into_body().collect().await?.to_bytes())
}

/// The next piece of a body's data (trailers skipped); `None` at its end.
async fn next_data(body: &mut Incoming) -> Option<Result<Bytes, hyper::Error>> {
    loop {
        match body.frame().await? {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    return Some(Ok(data));
                }
            }
            Err(e) => return Some(Err(e)),
        }
    }
}

/// Whether a request failed because it ran out of time (connecting, here).
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(e), |e| e.source()).any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
    })
}

/// An error and its causes, for the log: `client error (Connect): tcp connect error:
/// Connection refused`.
struct Chain<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

/// Clears the flag when dropped.
struct Clear<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for Clear<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// What admitted a request: the caller's limits on its model (when its tier has them),
/// the decision over the tier's and the account's limits, and the account's own pace
/// when it is paced apart.
struct Permits<'a>([Option<Permit<'a>>; 3]);

impl Permits<'_> {
    /// Gives every permit back: the request was refused after all, or its caller left
    /// before it was sent.
    fn give_back(self) {
        for p in self.0.into_iter().flatten() {
            p.cancel();
        }
    }

    /// Every quota's status after the decisions, for the `x-ratelimit-*` headers.
    async fn status(&self) -> Vec<QuotaStatus> {
        let mut out = Vec::new();
        for p in self.0.iter().flatten() {
            if let Ok(s) = p.status().await {
                out.extend(s);
            }
        }
        out
    }
}

/// A permit given back when dropped, unless taken.
struct GiveBack<'a>(Option<Permit<'a>>);

impl Drop for GiveBack<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            p.cancel();
        }
    }
}

/// Decide a request: the caller's model limits first, then the tier's and the
/// account's together, each quota waiting no longer than it allows (a gate whose quotas
/// all reject never waits), and the whole no longer than the longest of them. When the
/// second refuses, or the caller leaves while it waits, the first is given back whole:
/// a refused request costs nothing anywhere.
async fn decide<'a>(
    model: Option<&'a Gate>,
    main: Option<&'a Gate>,
    key: &'a str,
    cost: Cost,
) -> Result<Permits<'a>, Error> {
    let started = Instant::now();
    let longest = model.iter().chain(&main).map(|g| g.wait).max();
    let longest = longest.unwrap_or(Duration::ZERO);
    let one = async |g: &'a Gate| {
        let wait = g.wait.min(longest.saturating_sub(started.elapsed()));
        if wait.is_zero() {
            g.limiter.try_acquire(key, cost).await
        } else {
            g.limiter.acquire_within(key, cost, wait).await
        }
    };
    let mut first = GiveBack(None);
    if let Some(g) = model {
        first.0 = Some(one(g).await?);
    }
    let second = match main {
        Some(g) => Some(one(g).await?),
        None => None,
    };
    Ok(Permits([first.0.take(), second, None]))
}

/// Settle a request's permits with what it used, and what that cost at its price.
async fn settle(permits: Permits<'_>, usage: Usage, price: Option<Price>) {
    let usage = match price {
        Some(p) => usage.spend(p.micro_dollars(usage.input, usage.output)),
        None => usage,
    };
    for p in permits.0.into_iter().flatten() {
        if let Err(e) = p.settle(usage).await {
            tracing::warn!(error = %e, "could not settle a request's usage");
        }
    }
}

fn build(status: StatusCode, headers: HeaderMap, body: Body) -> Response {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_base_url_and_a_path_share_their_api_root_once() {
        let cases = [
            (
                "https://api.openai.com/v1",
                "/v1/chat/completions",
                "https://api.openai.com/v1/chat/completions",
            ),
            (
                "https://api.openai.com",
                "/v1/chat/completions",
                "https://api.openai.com/v1/chat/completions",
            ),
            (
                "https://openrouter.ai/api/v1",
                "/v1/chat/completions?x=1",
                "https://openrouter.ai/api/v1/chat/completions?x=1",
            ),
            (
                "https://x.openai.azure.com/openai",
                "/openai/deployments/d/chat/completions?api-version=1",
                "https://x.openai.azure.com/openai/deployments/d/chat/completions?api-version=1",
            ),
            (
                "https://x.openai.azure.com/openai/v1",
                "/openai/v1/chat/completions",
                "https://x.openai.azure.com/openai/v1/chat/completions",
            ),
            (
                "https://api.anthropic.com/v1",
                "/v1/messages",
                "https://api.anthropic.com/v1/messages",
            ),
            // Not an API root: kept.
            (
                "http://h/tenant-a",
                "/tenant-a/v1/files",
                "http://h/tenant-a/tenant-a/v1/files",
            ),
            // The last segment is a resource, never merged.
            ("http://h/v1", "/v1", "http://h/v1/v1"),
            ("http://h:8080", "/v1/models", "http://h:8080/v1/models"),
        ];
        for (prefix, path, want) in cases {
            assert_eq!(upstream_uri(prefix, path), want, "{prefix} + {path}");
        }
    }

    #[test]
    fn paths_have_one_spelling_and_cannot_climb() {
        let ok = |p: &str| normalize_path(p).expect(p);
        assert_eq!(ok("/v1/chat/completion%73"), "/v1/chat/completions");
        assert_eq!(ok("/v1/%65mbeddings"), "/v1/embeddings");
        assert_eq!(ok("/v1/files/a%20b%3f"), "/v1/files/a%20b%3F");
        assert_eq!(ok("/v1/models/gpt-4o.x_y~z"), "/v1/models/gpt-4o.x_y~z");
        for bad in [
            "/%2e%2e/admin",
            "/v1/../admin",
            "/v1/./x",
            "/v1/%2E",
            "/v1/a%2Fb",
            "/v1/a%5cb",
            "/v1/a\\b",
            "/v1/a%2",
            "/v1/a%zz",
        ] {
            assert!(normalize_path(bad).is_err(), "{bad} is refused");
        }
    }

    #[test]
    fn azure_is_asked_for_the_usage_chunk_only_where_its_api_version_takes_it() {
        let chat = "/openai/deployments/d/chat/completions";
        assert!(takes_stream_options(
            Kind::Azure,
            &format!("{chat}?api-version=2024-10-21")
        ));
        assert!(takes_stream_options(
            Kind::Azure,
            &format!("{chat}?x=1&api-version=2024-09-01-preview")
        ));
        assert!(!takes_stream_options(
            Kind::Azure,
            &format!("{chat}?api-version=2024-02-01")
        ));
        assert!(!takes_stream_options(Kind::Azure, chat));
        assert!(takes_stream_options(Kind::OpenAi, "/v1/chat/completions"));
        assert!(!takes_stream_options(Kind::Anthropic, "/v1/messages"));
    }

    #[test]
    fn anthropic_is_its_own_path_and_openai_routes_match_by_their_end() {
        assert_eq!(classify("/v1/messages"), (Some(Endpoint::Messages), true));
        assert_eq!(classify("/v1/messages/"), (Some(Endpoint::Messages), true));
        assert_eq!(classify("/v1/messages/count_tokens"), (None, true));
        assert_eq!(classify("/v1/messages/batches"), (None, true));
        assert_eq!(classify("/v1/threads/t_1/messages"), (None, false));
        assert_eq!(
            classify("/openai/deployments/gpt4o/chat/completions"),
            (Some(Endpoint::ChatCompletions), false)
        );
        assert_eq!(classify("/v1/files"), (None, false));
    }

    /// A connect that ran out of time is a 504 ("timed out"), a refused one a 502: the
    /// timeout is found however deep in the error's causes it sits.
    #[test]
    fn a_timeout_is_found_among_an_errors_causes() {
        #[derive(Debug)]
        struct Wrapped(std::io::Error);
        impl std::fmt::Display for Wrapped {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("client error (Connect)")
            }
        }
        impl std::error::Error for Wrapped {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let late = Wrapped(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "deadline has elapsed",
        ));
        let refused = Wrapped(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(timed_out(&late));
        assert!(!timed_out(&refused));
        assert_eq!(
            Chain(&late).to_string(),
            "client error (Connect): deadline has elapsed"
        );
    }

    #[test]
    fn micro_dollars_read_as_dollars() {
        assert_eq!(dollars(5_000_000), "$5.00");
        assert_eq!(dollars(1_230_000), "$1.23");
        assert_eq!(dollars(7_500), "$0.0075");
        assert_eq!(dollars(3_100), "$0.0031");
        assert_eq!(dollars(1), "$0.000001");
        assert_eq!(dollars(0), "$0.00");
    }

    #[test]
    fn the_account_is_the_operators_choice_in_both_directions() {
        for name in [
            "authorization",
            "x-api-key",
            "api-key",
            "openai-organization",
            "openai-project",
        ] {
            assert!(!forwardable(&HeaderName::from_static(name)), "{name}");
        }
        for name in ["content-type", "x-request-id", "anthropic-version"] {
            assert!(forwardable(&HeaderName::from_static(name)), "{name}");
        }
        for name in [
            "set-cookie",
            "anthropic-organization-id",
            "openai-organization",
            "x-ratelimit-remaining-tokens",
        ] {
            assert!(!returnable(&HeaderName::from_static(name)), "{name}");
        }
        assert!(returnable(&HeaderName::from_static("x-request-id")));
    }

    #[test]
    fn headers_the_connection_header_names_stay_on_their_hop() {
        let mut h = HeaderMap::new();
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Trace"),
        );
        h.append(header::CONNECTION, HeaderValue::from_static("x-hop"));
        for name in ["x-trace", "x-hop", "keep-alive"] {
            assert!(
                named_by_connection(&h, &HeaderName::from_static(name)),
                "{name}"
            );
        }
        assert!(!named_by_connection(
            &h,
            &HeaderName::from_static("x-request-id")
        ));
        assert!(!named_by_connection(
            &HeaderMap::new(),
            &HeaderName::from_static("x-trace")
        ));
    }
}
