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
            StatusCode::FORBIDDEN => "permission_error",
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
        .and_then(bearer)
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
        .or_else(|| headers.get("api-key").and_then(|v| v.to_str().ok()))?;
    st.callers
        .get(&crate::config::hash_key(key.trim()))
        .cloned()
}

/// The credentials of an `Authorization` header of the `Bearer` scheme, however it is
/// spelled (the scheme is case-insensitive, RFC 9110 §11.1) and whatever spaces or tabs
/// surround them.
pub(crate) fn bearer(value: &str) -> Option<&str> {
    let value = value.trim_start_matches([' ', '\t']);
    let at = value.find([' ', '\t'])?;
    let (scheme, rest) = value.split_at(at);
    let token = rest.trim_matches([' ', '\t']);
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
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

/// What a normalized path names: an estimated endpoint, whether it is Anthropic's API,
/// and the Azure deployment it names (which, not the body's `model`, is the model Azure
/// serves). Only the routes' own shapes are estimated: `/v1/<route>`, Azure's
/// `/openai/deployments/<deployment>/<route>` and `/openai/v1/<route>`, and Anthropic's
/// `/v1/messages`; anything under `/v1/messages/` is Anthropic's and unestimated
/// (`count_tokens`, batches). A path that merely ends like a route
/// (`/v1/files/x/chat/completions`, OpenAI's `/v1/threads/{id}/messages`) is not one.
fn classify(path: &str) -> (Option<Endpoint>, bool, Option<&str>) {
    let trimmed = path.trim_end_matches('/');
    if trimmed == "/v1/messages" {
        return (Some(Endpoint::Messages), true, None);
    }
    if path.starts_with("/v1/messages/") {
        return (None, true, None);
    }
    let (deployment, route) = if let Some(rest) = trimmed.strip_prefix("/openai/deployments/") {
        match rest.split_once('/') {
            Some((d, route)) if !d.is_empty() => (Some(d), route),
            _ => return (None, false, None),
        }
    } else if let Some(route) = trimmed
        .strip_prefix("/openai/v1/")
        .or_else(|| trimmed.strip_prefix("/v1/"))
    {
        (None, route)
    } else {
        return (None, false, None);
    };
    let endpoint = match route {
        "chat/completions" => Endpoint::ChatCompletions,
        "completions" => Endpoint::Completions,
        "embeddings" => Endpoint::Embeddings,
        "responses" => Endpoint::Responses,
        _ => return (None, false, None),
    };
    (Some(endpoint), false, deployment)
}

/// The most of an upstream's error answer the gateway reads, and how long it waits for
/// it.
const ERROR_BODY_MAX: usize = 1 << 20;
const ERROR_BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// A body this large or of unknown length is read only after the caller's limits were
/// found not exhausted (a cheap check): reading and tokenising megabytes for a caller
/// already over its limit would cost the gateway more than the refusal.
const PRECHECK_BODY: u64 = 16 * 1024;

/// The output field a request without one gets its worst case written into.
fn output_field(endpoint: Endpoint, kind: Kind, model: &str) -> Option<&'static str> {
    match endpoint {
        Endpoint::ChatCompletions => {
            // OpenAI's reasoning models refuse `max_tokens`; every OpenAI model takes
            // `max_completion_tokens`, and other servers (vLLM, Ollama, Azure's older
            // API versions) take `max_tokens`.
            let reasoning = ["o1", "o3", "o4", "gpt-5"].iter().any(|p| {
                model
                    .strip_prefix(p)
                    .is_some_and(|r| r.is_empty() || r.starts_with('-'))
            });
            Some(if kind == Kind::OpenAi || reasoning {
                "max_completion_tokens"
            } else {
                "max_tokens"
            })
        }
        Endpoint::Responses => Some("max_output_tokens"),
        // Completions default to 16 and messages require `max_tokens`: always declared.
        Endpoint::Completions | Endpoint::Messages | Endpoint::Embeddings => None,
    }
}

/// Whether a body declares its most output: a chat's `max_completion_tokens` or
/// `max_tokens`, a response's `max_output_tokens` (a `null` declares nothing).
fn declares_output(endpoint: Endpoint, body: &Value) -> bool {
    let set = |f: &str| body.get(f).is_some_and(|v| !v.is_null());
    match endpoint {
        Endpoint::ChatCompletions => set("max_completion_tokens") || set("max_tokens"),
        Endpoint::Responses => set("max_output_tokens"),
        Endpoint::Completions | Endpoint::Messages | Endpoint::Embeddings => true,
    }
}

/// The output the gateway wrote into a request that declared none.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Written {
    field: &'static str,
    /// Per choice.
    max: u64,
    /// Choices (`n`).
    choices: u64,
}

/// A refusal before the body is read: a limit of the caller's that rejects (it does
/// not wait) and has nothing left. The request would be refused whatever its cost.
async fn exhausted(st: &State, caller: &CallerInfo, anthropic: bool) -> Option<Response> {
    let tier = &st.tiers[caller.tier];
    let limiter = &tier.limiters.iter().flatten().next()?.limiter;
    let status = limiter.status(&caller.name).await.ok()?;
    let (s, unit) = status.iter().find_map(|s| {
        let unit = tier.rejecting.get(s.quota.name())?;
        (s.remaining == 0).then_some((s, *unit))
    })?;
    let measure = measure(st, s.quota.name()).unwrap_or(Measure::Requests);
    // The time until one unit is back: `reset` is until the whole limit is (GCRA, the
    // gateway's algorithm, gives a unit back every period / amount).
    let wait = unit.map(|unit| {
        let rest = unit.as_nanos() * u128::from(s.limit.saturating_sub(1));
        let rest = Duration::from_nanos(u64::try_from(rest).unwrap_or(u64::MAX));
        s.reset.saturating_sub(rest).max(Duration::from_millis(1))
    });
    let mut resp = refused(
        st,
        caller,
        s.quota.name(),
        measure,
        (s.limit, 0),
        wait,
        anthropic,
    );
    ratelimit_headers(st, &status, resp.headers_mut());
    Some(resp)
}

/// Everything else: proxied, when the route is one the caller may use.
pub(crate) async fn proxy(AxState(st): St, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let path = match crate::target::normalize(parts.uri.path()) {
        Ok(path) => path,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                parts.uri.path().starts_with("/v1/messages"),
                "invalid_request_error",
                e.code(),
                &e.to_string(),
            );
        }
    };
    let (endpoint, anthropic, deployment) = classify(&path);
    let deployment = deployment.map(str::to_owned);
    let Some(caller) = authenticate(&st, &parts.headers) else {
        return unauthorized(anthropic);
    };
    let tier = &st.tiers[caller.tier];
    // Routes are an allow-list: the estimated ones by POST, and what the tier allows.
    let allowed = || {
        tier.routes
            .iter()
            .any(|r| crate::config::route_allows(r, parts.method.as_str(), &path))
    };
    let endpoint = match endpoint {
        Some(ep) if parts.method == Method::POST => Some(ep),
        _ if allowed() => None,
        Some(_) => {
            let mut resp = error(
                StatusCode::METHOD_NOT_ALLOWED,
                anthropic,
                "invalid_request_error",
                "method_not_allowed",
                &format!(
                    "This gateway takes {path} by POST only; its operator can allow `{} {path}` with allow_routes in [tiers.{}].",
                    parts.method, tier.name
                ),
            );
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            return resp;
        }
        None => {
            return error(
                StatusCode::FORBIDDEN,
                anthropic,
                "permission_error",
                "route_not_allowed",
                &format!(
                    "This gateway does not forward {} {path} for caller `{}`: its operator can allow it with allow_routes = [\"{path}\"] in [tiers.{}] (files, batches and stored objects are shared by every caller allowed them).",
                    parts.method, caller.name, tier.name
                ),
            );
        }
    };
    // An oversized body is refused from its declared length, before `100 Continue`.
    let length = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if length.is_some_and(|n| n > st.max_body as u64) {
        return too_large(&st, anthropic);
    }
    if length.is_none_or(|n| n > PRECHECK_BODY)
        && let Some(resp) = exhausted(&st, &caller, anthropic).await
    {
        return resp;
    }
    let body = match tokio::time::timeout(st.body_timeout, axum::body::to_bytes(body, st.max_body))
        .await
    {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            let over = std::iter::successors(Some(&e as &(dyn std::error::Error + 'static)), |e| {
                e.source()
            })
            .any(|e| e.is::<http_body_util::LengthLimitError>());
            if over {
                return too_large(&st, anthropic);
            }
            return error(
                StatusCode::BAD_REQUEST,
                anthropic,
                "invalid_request_error",
                "body_incomplete",
                "The request body broke off before its end (a connection closed early or a malformed chunk): send it again.",
            );
        }
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                anthropic,
                "invalid_request_error",
                "body_timeout",
                &format!(
                    "The request body did not arrive within {}: send it at once.",
                    format_duration(st.body_timeout)
                ),
            );
        }
    };
    // Known endpoints are estimated; an allowed route counts as one request.
    let mut json_body: Option<Value> = match endpoint {
        Some(_) => match serde_json::from_slice(&body) {
            Ok(v) => Some(v),
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    anthropic,
                    "invalid_request_error",
                    "invalid_json",
                    &format!("The request body is not valid JSON: {e}"),
                );
            }
        },
        None => None,
    };
    // On Azure the path's deployment is the model served, whatever the body says.
    let raw_model = match &deployment {
        Some(d) => d.as_str(),
        None => json_body
            .as_ref()
            .and_then(|v| v.get("model"))
            .and_then(Value::as_str)
            .unwrap_or(""),
    };
    let resolved = st.models.resolve(raw_model);
    if endpoint.is_some() && !st.models.served(&resolved.canonical) {
        return error(
            StatusCode::NOT_FOUND,
            anthropic,
            "invalid_request_error",
            "model_not_found",
            &format!(
                "The model `{raw_model}` does not exist on this gateway; GET /v1/models lists those it serves."
            ),
        );
    }
    if deployment.is_none()
        && let (Some(name), Some(obj)) = (
            &resolved.forward,
            json_body.as_mut().and_then(Value::as_object_mut),
        )
    {
        obj.insert("model".into(), Value::String(name.clone()));
    }
    let model = resolved.canonical;
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
    // The worst case is reserved: a request declaring no most output, where tokens or
    // spend are limited, gets its model's maximum written in (the provider then holds
    // it to what was reserved).
    let counts_tokens = tier.limiters[account].as_ref().is_some_and(|g| g.tokens)
        || tier.models.get(&model).is_some_and(|g| g.tokens);
    let mut written = None;
    if let (Some(ep), Some(v)) = (endpoint, json_body.as_mut())
        && counts_tokens
        && !declares_output(ep, v)
        && let Some(field) = output_field(ep, u.kind, &model)
        && let Some(obj) = v.as_object_mut()
    {
        let max = st.models.max_output(&model);
        let choices = match ep {
            Endpoint::ChatCompletions => obj.get("n").and_then(Value::as_u64).unwrap_or(1),
            _ => 1,
        };
        obj.insert(field.into(), Value::from(max));
        written = Some(Written {
            field,
            max,
            choices,
        });
    }
    let mut cost = Cost::request();
    if let (Some(ep), Some(v)) = (endpoint, &json_body) {
        let e = match tollgate::estimate::estimate(ep, v) {
            Ok(e) => e,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    anthropic,
                    "invalid_request_error",
                    "invalid_request",
                    &e.to_string(),
                );
            }
        };
        // Where tokens or spend are limited, what the estimate does not count (tools,
        // tool results, images) counts too, and what no one can count is refused.
        let unseen = if counts_tokens {
            match crate::unseen::input(ep, v, &model, st.models.image_tokens(&model)) {
                Ok(n) => n,
                Err(why) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        anthropic,
                        "invalid_request_error",
                        "input_not_estimable",
                        &format!("This request cannot be admitted: {}.", why.0),
                    );
                }
            }
        } else {
            0
        };
        cost = Cost::input(e.input.saturating_add(unseen)).output(e.output);
    }
    // What is forwarded is what was read: the parsed body written again, so an
    // upstream's parser cannot read it another way (a key given twice, which the
    // gateway read last-wins).
    let body = match &json_body {
        Some(v) => match serde_json::to_vec(v) {
            Ok(b) => Bytes::from(b),
            Err(_) => body,
        },
        None => body,
    };
    // Spend: the estimate at the model's price. Known endpoints need a price when a
    // spend limit applies; other routes count as requests only.
    let price = st.prices.get(&model).copied().or(st.default_price);
    if let Some(p) = price {
        cost = cost.spend(p.micro_dollars(cost.input, cost.output));
    } else if json_body.is_some() {
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
        written,
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

fn too_large(st: &State, anthropic: bool) -> Response {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        anthropic,
        "invalid_request_error",
        "request_too_large",
        &format!(
            "The request body is over this gateway's limit of {} bytes.",
            st.max_body
        ),
    )
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
        .find(|(_, u)| u.listed.iter().any(|m| m == model))
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

/// A 429 for the quota `name`: what it limits, its figures (`(limit, remaining)`) and
/// the wait until a request fits (`None`: when a request ends, for concurrency). An
/// account's figures tell of every caller's traffic: they are shown only with
/// `expose_account_limits`.
fn refused(
    st: &State,
    caller: &CallerInfo,
    name: &str,
    measure: Measure,
    (limit, remaining): (u64, u64),
    wait: Option<Duration>,
    anthropic: bool,
) -> Response {
    st.metrics.count(
        "tollgate_rejected_total",
        &[("caller", &caller.name), ("quota", name)],
        1,
    );
    let kind = match measure {
        Measure::Requests => "requests",
        Measure::Tokens => "tokens",
        Measure::Concurrency => "concurrency",
        Measure::Spend => "spend",
    };
    let own = exposed(st, name);
    let later = match wait {
        Some(w) => format!("Please try again in {}.", format_duration(w)),
        None => "Please try again when a request ends.".to_string(),
    };
    let message = match (own, wait) {
        (false, _) => format!(
            "Rate limit reached on the upstream account's quota `{name}`, shared by every caller of this gateway. {later}"
        ),
        (true, Some(_)) if measure == Measure::Spend => format!(
            "Spend limit reached for caller `{}` on quota `{name}`: budget {}, remaining {}. {later}",
            caller.name,
            dollars(limit),
            dollars(remaining),
        ),
        (true, Some(_)) => format!(
            "Rate limit reached for caller `{}` on quota `{name}`: limit {limit}, remaining {remaining}. {later}",
            caller.name,
        ),
        (true, None) => format!(
            "Limit reached for caller `{}` on quota `{name}`: all {limit} slots are in use. {later}",
            caller.name,
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

/// The answer to a refused or failed decision.
fn limiter_error(st: &State, caller: &CallerInfo, e: &Error, anthropic: bool) -> Response {
    match e {
        Error::Limited(r) => {
            let name = r.quota().name();
            let measure = measure(st, name).unwrap_or(Measure::Requests);
            refused(
                st,
                caller,
                name,
                measure,
                (r.limit(), r.remaining()),
                r.retry_after(),
                anthropic,
            )
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
/// Whether a quota's figures may be shown to a caller: its own (its tier's, or its own
/// account's when its key is passed through), or an account's with
/// `expose_account_limits`.
fn exposed(st: &State, name: &str) -> bool {
    name.starts_with("tier.")
        || st.expose_account_limits
        || st.upstreams.iter().any(|u| {
            u.forward_key
                && name
                    .strip_prefix("upstream.")
                    .and_then(|n| n.strip_prefix(u.name.as_str()))
                    .is_some_and(|rest| rest.starts_with('.'))
        })
}

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
            .filter(|s| {
                self::measure(st, s.quota.name()) == Some(measure) && exposed(st, s.quota.name())
            })
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
    /// The most output the gateway wrote into a request that declared none.
    written: Option<Written>,
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
        let mut decided = tokio::select! {
            r = decide(model_gate.as_ref(), gate.as_ref(), &key, self.cost) => r,
            // The client went away while waiting: dropping the decision gives back its
            // reservations.
            () = tx.closed() => return,
        };
        // A request whose most output the gateway wrote in is capped to what fits the
        // limit that refused it, rather than refused (twice at most: another limit may
        // refuse the capped request).
        for _ in 0..2 {
            let (Err(e), Some(w)) = (&decided, self.written) else {
                break;
            };
            let Some(max) = self.fitting(e, w) else {
                break;
            };
            self.cap(w, max);
            decided = tokio::select! {
                r = decide(model_gate.as_ref(), gate.as_ref(), &key, self.cost) => r,
                () = tx.closed() => return,
            };
        }
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
        self.pass_headers(answer.headers(), &self.secrets(), &mut headers);
        headers.extend(rl);
        if let Some(w) = self.written {
            headers.insert(
                HeaderName::from_static("x-tollgate-max-output-tokens"),
                HeaderValue::from(w.max),
            );
        }
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

    /// The most output per choice that fits the limit behind `e` (a refusal of this
    /// request's current cost), when capping the output the gateway wrote in would make
    /// it fit: a tokens limit counting output, or a spend limit.
    fn fitting(&self, e: &Error, w: Written) -> Option<u64> {
        let (name, room) = match e {
            Error::TooLarge(t) => (t.quota().name(), t.capacity()),
            Error::Limited(r) if r.retry_after().is_some() => (r.quota().name(), r.remaining()),
            _ => return None,
        };
        let input = self.cost.input;
        let output_room = match measure(&self.st, name)? {
            Measure::Tokens if name.ends_with("input_tokens_per_minute") => return None,
            Measure::Tokens if name.ends_with("output_tokens_per_minute") => room,
            Measure::Tokens => room.checked_sub(input)?,
            Measure::Spend => {
                let p = self.price?;
                let left = room.checked_sub(p.micro_dollars(input, 0))?;
                if p.output <= 0.0 {
                    return None;
                }
                (left as f64 / p.output).floor() as u64
            }
            Measure::Requests | Measure::Concurrency => return None,
        };
        let per_choice = output_room / w.choices.max(1);
        (per_choice >= 1 && per_choice < w.max).then_some(per_choice)
    }

    /// Lower the output the gateway wrote in to `max` per choice: the body and the cost
    /// follow.
    fn cap(&mut self, w: Written, max: u64) {
        let Some(obj) = self.json.as_mut().and_then(Value::as_object_mut) else {
            return;
        };
        obj.insert(w.field.into(), Value::from(max));
        if let Some(v) = &self.json
            && let Ok(b) = serde_json::to_vec(v)
        {
            self.body = Bytes::from(b);
        }
        let output = max.saturating_mul(w.choices);
        self.cost = Cost::input(self.cost.input).output(output);
        if let Some(p) = self.price {
            self.cost = self
                .cost
                .spend(p.micro_dollars(self.cost.input, self.cost.output));
        }
        self.written = Some(Written { max, ..w });
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
        let Ok(uri) = Uri::try_from(crate::target::upstream_uri(
            &upstream.prefix,
            &self.path_and_query,
        )) else {
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
                    let status = resp.status();
                    if status.is_redirection() {
                        // A redirect names where the upstream lives (an internal host, a
                        // URL with a key in it): never passed on, never followed.
                        return Forwarded::Failed(self.upstream_error(resp.into_parts().0, &[], 1));
                    }
                    if !(status.is_client_error() || status.is_server_error()) {
                        return Forwarded::Answer(resp);
                    }
                    // An error: read it (it is small) to tell a wait from a refusal
                    // that no wait cures, and to answer in the gateway's own words.
                    let (parts, body) = resp.into_parts();
                    let body = tokio::time::timeout(
                        ERROR_BODY_TIMEOUT,
                        http_body_util::Limited::new(body, ERROR_BODY_MAX).collect(),
                    )
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                    let hint = rl.wait_hint();
                    // A 429 is retried only when it says how long to wait (and that
                    // wait fits the caller's), never when it is permanent.
                    let retry = !tollgate::retry::is_permanent(status, &body)
                        && (status != StatusCode::TOO_MANY_REQUESTS || hint.is_some());
                    (retry, hint, Ok((parts, body)))
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
                    // An upstream that cannot be reached is tried once more, not for
                    // the caller's whole wait: it answers 502 quickly.
                    (
                        !e.is_connect() || attempt == 0,
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
                Ok((parts, body)) => {
                    Forwarded::Failed(self.upstream_error(parts, &body, attempt + 1))
                }
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

    /// The gateway's answer to an upstream's error answer. The caller never reads the
    /// upstream's credentials in it, nor takes the account's problem for its own: a
    /// 401/403 to the gateway's key is a 502 `upstream_auth_failed`, a 5xx is a 502
    /// (504 for the upstream's own timeout) in the gateway's words; any other 4xx is the
    /// caller's request as the upstream judged it, passed with anything that looks like
    /// a credential redacted.
    fn upstream_error(&self, parts: http::response::Parts, body: &[u8], attempts: u32) -> Response {
        let up = &self.st.upstreams[self.up];
        let code = parts.status.as_u16();
        let tries = if attempts > 1 {
            format!(" after {attempts} attempts")
        } else {
            String::new()
        };
        let mut resp = if matches!(code, 401 | 403) && !up.forward_key {
            error(
                StatusCode::BAD_GATEWAY,
                self.anthropic,
                "server_error",
                "upstream_auth_failed",
                &format!(
                    "The upstream `{}` refused this gateway's own credentials (HTTP {code}): the gateway's operator must fix its key for this upstream. Your key to the gateway is fine.",
                    up.name
                ),
            )
        } else if parts.status.is_redirection() {
            error(
                StatusCode::BAD_GATEWAY,
                self.anthropic,
                "server_error",
                "upstream_redirect",
                &format!(
                    "The upstream `{}` answered with a redirect (HTTP {code}), which this gateway neither follows nor passes on: its operator must fix the upstream's URL.",
                    up.name
                ),
            )
        } else if parts.status.is_server_error() {
            let (status, kind) = if code == 504 {
                (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout")
            } else {
                (StatusCode::BAD_GATEWAY, "upstream_error")
            };
            error(
                status,
                self.anthropic,
                "server_error",
                kind,
                &format!("The upstream `{}` failed with HTTP {code}{tries}.", up.name),
            )
        } else {
            let secrets = self.secrets();
            let mut headers = HeaderMap::new();
            self.pass_headers(&parts.headers, &secrets, &mut headers);
            build(
                parts.status,
                headers,
                Body::from(crate::redact::redact(body, &secrets).into_owned()),
            )
        };
        let h = resp.headers_mut();
        insert(h, "x-tollgate-upstream", &up.name);
        h.insert(
            HeaderName::from_static("x-tollgate-upstream-status"),
            HeaderValue::from(code),
        );
        resp
    }

    /// What must never reach the caller from this upstream: the gateway's key for it,
    /// and, when callers' keys are passed through, the caller's own credentials (which
    /// an answer could otherwise echo to whoever reads the logs of an intermediary).
    /// In lowercase, as [`crate::redact`] takes them: the upstream's is stored so, the
    /// caller's own are folded here (pass-through mode only).
    fn secrets(&self) -> Vec<Cow<'_, str>> {
        let up = &self.st.upstreams[self.up];
        let mut secrets: Vec<Cow<'_, str>> = up
            .secret
            .as_deref()
            .map(Cow::Borrowed)
            .into_iter()
            .collect();
        if up.forward_key {
            for name in pace::OWN_ACCOUNT_HEADERS {
                for v in self.headers.get_all(name) {
                    if let Ok(v) = v.to_str() {
                        secrets.push(Cow::Owned(bearer(v).unwrap_or(v).to_ascii_lowercase()));
                    }
                }
            }
        }
        secrets
    }

    /// The headers of an upstream's answer a caller may see: not hop-by-hop, not the
    /// account's (see [`returnable`]), and none whose value looks like a credential.
    fn pass_headers(&self, from: &HeaderMap, secrets: &[Cow<'_, str>], to: &mut HeaderMap) {
        for (n, v) in from {
            if returnable(n)
                && !named_by_connection(from, n)
                && !v
                    .to_str()
                    .map_or(true, |v| crate::redact::leaks(v, secrets))
            {
                to.append(n.clone(), v.clone());
            }
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
    fn only_the_routes_own_shapes_are_estimated() {
        assert_eq!(
            classify("/v1/messages"),
            (Some(Endpoint::Messages), true, None)
        );
        assert_eq!(
            classify("/v1/messages/"),
            (Some(Endpoint::Messages), true, None)
        );
        assert_eq!(classify("/v1/messages/count_tokens"), (None, true, None));
        assert_eq!(classify("/v1/messages/batches"), (None, true, None));
        assert_eq!(classify("/v1/threads/t_1/messages"), (None, false, None));
        assert_eq!(
            classify("/v1/files/f/chat/completions"),
            (None, false, None)
        );
        assert_eq!(classify("/v2/chat/completions"), (None, false, None));
        assert_eq!(
            classify("/openai/v1/responses"),
            (Some(Endpoint::Responses), false, None)
        );
        assert_eq!(
            classify("/openai/deployments/gpt4o/chat/completions"),
            (Some(Endpoint::ChatCompletions), false, Some("gpt4o"))
        );
        assert_eq!(
            classify("/openai/deployments/gpt4o/files/x/chat/completions"),
            (None, false, None)
        );
        assert_eq!(classify("/v1/files"), (None, false, None));
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
