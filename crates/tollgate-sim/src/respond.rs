//! Response bodies, error bodies, server-sent events and rate-limit headers in the
//! providers' formats.

use std::time::{Duration, SystemTime};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tollgate::estimate::{COMPLETIONS_DEFAULT_MAX_TOKENS, Endpoint, Estimate};

use crate::{Limits, SimConfig};

/// The generated text for `tokens` tokens: "hello" then " hello", one token each in
/// OpenAI's encodings.
fn text(tokens: u64) -> String {
    let mut s = String::with_capacity(tokens as usize * 6);
    for i in 0..tokens {
        s.push_str(if i == 0 { "hello" } else { " hello" });
    }
    s
}

fn piece(i: u64) -> &'static str {
    if i == 0 { "hello" } else { " hello" }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What one admitted request will be answered with.
pub(crate) struct Answer {
    endpoint: Endpoint,
    id: String,
    model: String,
    prompt: u64,
    choices: u64,
    per_choice: u64,
    truncated: bool,
    inputs: u64,
    dims: usize,
    stream: bool,
    include_usage: bool,
}

impl Answer {
    pub(crate) fn new(
        endpoint: Endpoint,
        request: &Value,
        estimated: Estimate,
        config: &SimConfig,
        id: u64,
    ) -> Answer {
        let u = |field: &str| request.get(field).and_then(Value::as_u64);
        let cap = match endpoint {
            Endpoint::ChatCompletions => u("max_completion_tokens").or_else(|| u("max_tokens")),
            Endpoint::Completions => {
                Some(u("max_tokens").unwrap_or(COMPLETIONS_DEFAULT_MAX_TOKENS))
            }
            Endpoint::Messages => u("max_tokens"),
            Endpoint::Responses => u("max_output_tokens"),
            Endpoint::Embeddings => Some(0),
        };
        let per_choice = cap.map_or(config.output_tokens, |c| c.min(config.output_tokens));
        let inputs = match request.get("input") {
            Some(Value::Array(items)) if items.iter().all(|i| !i.is_number()) => items.len() as u64,
            _ => 1,
        };
        let prefix = match endpoint {
            Endpoint::ChatCompletions => "chatcmpl",
            Endpoint::Completions => "cmpl",
            Endpoint::Messages => "msg",
            Endpoint::Responses => "resp",
            Endpoint::Embeddings => "emb",
        };
        Answer {
            endpoint,
            id: format!("{prefix}-sim{id}"),
            model: request
                .get("model")
                .and_then(Value::as_str)
                .unwrap_or("tollgate-sim")
                .to_owned(),
            prompt: estimated.input,
            choices: match endpoint {
                Endpoint::ChatCompletions | Endpoint::Completions => u("n").unwrap_or(1).max(1),
                _ => 1,
            },
            per_choice,
            truncated: cap.is_some_and(|c| c <= config.output_tokens),
            inputs,
            dims: config.embedding_dims,
            stream: request.get("stream").and_then(Value::as_bool) == Some(true)
                && endpoint != Endpoint::Embeddings,
            include_usage: request
                .pointer("/stream_options/include_usage")
                .and_then(Value::as_bool)
                == Some(true),
        }
    }

    pub(crate) fn output_tokens(&self) -> u64 {
        self.per_choice.saturating_mul(self.choices)
    }

    fn usage(&self) -> Value {
        let output = self.output_tokens();
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": output,
            "total_tokens": self.prompt + output,
        })
    }

    fn finish(&self) -> &'static str {
        match (self.endpoint, self.truncated) {
            (Endpoint::Messages, true) => "max_tokens",
            (Endpoint::Messages, false) => "end_turn",
            (_, true) => "length",
            (_, false) => "stop",
        }
    }

    fn body(&self) -> Value {
        let created = unix_now();
        let content = text(self.per_choice);
        match self.endpoint {
            Endpoint::ChatCompletions => json!({
                "id": self.id, "object": "chat.completion", "created": created, "model": self.model,
                "choices": (0..self.choices).map(|i| json!({
                    "index": i,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": self.finish(),
                })).collect::<Vec<_>>(),
                "usage": self.usage(),
            }),
            Endpoint::Completions => json!({
                "id": self.id, "object": "text_completion", "created": created, "model": self.model,
                "choices": (0..self.choices).map(|i| json!({
                    "index": i, "text": content, "finish_reason": self.finish(),
                })).collect::<Vec<_>>(),
                "usage": self.usage(),
            }),
            Endpoint::Embeddings => json!({
                "object": "list", "model": self.model,
                "data": (0..self.inputs).map(|i| json!({
                    "object": "embedding", "index": i,
                    "embedding": (0..self.dims).map(|d| ((i as usize + d) % 7) as f64 / 7.0).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
                "usage": {"prompt_tokens": self.prompt, "total_tokens": self.prompt},
            }),
            Endpoint::Messages => json!({
                "id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": [{"type": "text", "text": content}],
                "stop_reason": self.finish(), "stop_sequence": null,
                "usage": {"input_tokens": self.prompt, "output_tokens": self.per_choice},
            }),
            Endpoint::Responses => self.response("completed", &content),
        }
    }

    /// A Responses API `response` object in `status`, its output `text`.
    fn response(&self, status: &str, text: &str) -> Value {
        let done = status == "completed";
        json!({
            "id": self.id, "object": "response", "created_at": unix_now(), "status": status,
            "model": self.model,
            "incomplete_details": if done && self.truncated { json!({"reason": "max_output_tokens"}) } else { Value::Null },
            "output": if done { json!([{"type": "message", "id": format!("msg-{}", self.id),
                "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}]) } else { json!([]) },
            "usage": if done { json!({"input_tokens": self.prompt, "output_tokens": self.per_choice,
                "total_tokens": self.prompt + self.per_choice}) } else { Value::Null },
        })
    }

    /// The server-sent events of a streamed answer, in order.
    fn events(&self) -> Vec<String> {
        let created = unix_now();
        let mut events = Vec::new();
        let data = |v: Value| format!("data: {v}\n\n");
        match self.endpoint {
            Endpoint::Responses => {
                let event = |name: &str, v: Value| format!("event: {name}\ndata: {v}\n\n");
                events.push(event(
                    "response.created",
                    json!({"type": "response.created", "response": self.response("in_progress", "")}),
                ));
                for i in 0..self.per_choice {
                    events.push(event(
                        "response.output_text.delta",
                        json!({"type": "response.output_text.delta", "output_index": 0,
                        "content_index": 0, "delta": piece(i)}),
                    ));
                }
                events.push(event(
                    "response.completed",
                    json!({"type": "response.completed",
                    "response": self.response("completed", &text(self.per_choice))}),
                ));
                return events;
            }
            Endpoint::Messages => {
                let event = |name: &str, v: Value| format!("event: {name}\ndata: {v}\n\n");
                events.push(event(
                    "message_start",
                    json!({"type": "message_start", "message": {
                        "id": self.id, "type": "message", "role": "assistant", "model": self.model,
                        "content": [], "stop_reason": null, "stop_sequence": null,
                        "usage": {"input_tokens": self.prompt, "output_tokens": 1},
                    }}),
                ));
                events.push(event(
                    "content_block_start",
                    json!({"type": "content_block_start", "index": 0,
                    "content_block": {"type": "text", "text": ""}}),
                ));
                for i in 0..self.per_choice {
                    events.push(event(
                        "content_block_delta",
                        json!({"type": "content_block_delta", "index": 0,
                        "delta": {"type": "text_delta", "text": piece(i)}}),
                    ));
                }
                events.push(event(
                    "content_block_stop",
                    json!({"type": "content_block_stop", "index": 0}),
                ));
                events.push(event(
                    "message_delta",
                    json!({"type": "message_delta",
                    "delta": {"stop_reason": self.finish(), "stop_sequence": null},
                    "usage": {"output_tokens": self.per_choice}}),
                ));
                events.push(event("message_stop", json!({"type": "message_stop"})));
                return events;
            }
            Endpoint::ChatCompletions => {
                let chunk = |choices: Value| {
                    json!({"id": self.id, "object": "chat.completion.chunk",
                    "created": created, "model": self.model, "choices": choices})
                };
                let first: Vec<Value> = (0..self.choices)
                    .map(|c| json!({"index": c, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}))
                    .collect();
                events.push(data(chunk(json!(first))));
                for i in 0..self.per_choice {
                    for c in 0..self.choices {
                        events.push(data(chunk(json!([{"index": c, "delta": {"content": piece(i)}, "finish_reason": null}]))));
                    }
                }
                for c in 0..self.choices {
                    events.push(data(chunk(
                        json!([{"index": c, "delta": {}, "finish_reason": self.finish()}]),
                    )));
                }
                if self.include_usage {
                    let mut last = chunk(json!([]));
                    last["usage"] = self.usage();
                    events.push(data(last));
                }
            }
            Endpoint::Completions | Endpoint::Embeddings => {
                let chunk = |choices: Value| {
                    json!({"id": self.id, "object": "text_completion",
                    "created": created, "model": self.model, "choices": choices})
                };
                for i in 0..self.per_choice {
                    for c in 0..self.choices {
                        events.push(data(chunk(
                            json!([{"index": c, "text": piece(i), "finish_reason": null}]),
                        )));
                    }
                }
                for c in 0..self.choices {
                    events.push(data(chunk(
                        json!([{"index": c, "text": "", "finish_reason": self.finish()}]),
                    )));
                }
                if self.include_usage {
                    let mut last = chunk(json!([]));
                    last["usage"] = self.usage();
                    events.push(data(last));
                }
            }
        }
        events.push("data: [DONE]\n\n".to_owned());
        events
    }

    /// The response after the latency model: whole after `delay` plus a token interval
    /// per token, or streamed with the first event after `delay`.
    pub(crate) async fn into_response(self, delay: Duration, per_token: Duration) -> Response {
        if !self.stream {
            let tokens = u32::try_from(self.per_choice.saturating_sub(1)).unwrap_or(u32::MAX);
            tokio::time::sleep(delay + per_token.saturating_mul(tokens)).await;
            return axum::Json(self.body()).into_response();
        }
        let events = self.events();
        let per_event = if events.len() > 1 {
            per_token.saturating_mul(u32::try_from(self.per_choice).unwrap_or(u32::MAX))
                / u32::try_from(events.len()).unwrap_or(u32::MAX)
        } else {
            Duration::ZERO
        };
        let stream = futures_util::stream::unfold(
            (events.into_iter(), true),
            move |(mut events, first)| async move {
                let event = events.next()?;
                tokio::time::sleep(if first { delay } else { per_event }).await;
                Some((
                    Ok::<Bytes, std::io::Error>(Bytes::from(event)),
                    (events, false),
                ))
            },
        );
        let mut response = Response::new(Body::from_stream(stream));
        response.headers_mut().insert(
            axum::http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        response.headers_mut().insert(
            axum::http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-cache"),
        );
        response
    }
}

/// An error in the provider's format: OpenAI's `{"error": {...}}`, or Anthropic's
/// `{"type": "error", "error": {...}}` on `/v1/messages`.
pub(crate) fn error(
    endpoint: Endpoint,
    status: StatusCode,
    kind: &str,
    code: &str,
    message: &str,
) -> Response {
    let body = if endpoint == Endpoint::Messages {
        let kind = match status.as_u16() {
            429 => "rate_limit_error",
            401 => "authentication_error",
            404 => "not_found_error",
            500 => "api_error",
            503 => "overloaded_error",
            _ => "invalid_request_error",
        };
        json!({"type": "error", "error": {"type": kind, "message": message}})
    } else {
        json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
    };
    (status, axum::Json(body)).into_response()
}

/// Why a request was refused with 429, and the buckets' state.
pub(crate) struct Limited {
    pub(crate) kind: &'static str,
    pub(crate) limit: u64,
    pub(crate) used: u64,
    pub(crate) requested: u64,
    /// Until it would fit; `None` when it never will (larger than the limit).
    pub(crate) wait: Option<Duration>,
    pub(crate) levels: Limits,
}

pub(crate) fn too_many(endpoint: Endpoint, limited: &Limited) -> Response {
    let what = if limited.kind == "tokens" {
        "tokens per min (TPM)"
    } else {
        "requests per min (RPM)"
    };
    let message = match limited.wait {
        Some(wait) => format!(
            "Rate limit reached on {what}: Limit {}, Used {}, Requested {}. Please try again in {}.",
            limited.limit,
            limited.used,
            limited.requested,
            tollgate::provider::format_duration(wait)
        ),
        None => format!(
            "Request too large on {what}: Limit {}, Requested {}. The input or output tokens must be reduced in order to run successfully.",
            limited.limit, limited.requested
        ),
    };
    let mut response = error(
        endpoint,
        StatusCode::TOO_MANY_REQUESTS,
        limited.kind,
        "rate_limit_exceeded",
        &message,
    );
    let headers = response.headers_mut();
    rate_limit_headers(endpoint, &limited.levels, headers);
    if let Some(wait) = limited.wait {
        let millis = wait.as_nanos().div_ceil(1_000_000);
        insert(headers, "retry-after-ms", &millis.to_string());
        insert(
            headers,
            "retry-after",
            &wait.as_nanos().div_ceil(1_000_000_000).to_string(),
        );
    }
    response
}

fn insert(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(HeaderName::from_static(name), value);
    }
}

pub(crate) fn rate_limit_headers(endpoint: Endpoint, limits: &Limits, headers: &mut HeaderMap) {
    insert(
        headers,
        "x-ratelimit-limit-requests",
        &limits.rpm.to_string(),
    );
    insert(headers, "x-ratelimit-limit-tokens", &limits.tpm.to_string());
    insert(
        headers,
        "x-ratelimit-remaining-requests",
        &limits.requests_left.to_string(),
    );
    insert(
        headers,
        "x-ratelimit-remaining-tokens",
        &limits.tokens_left.to_string(),
    );
    insert(
        headers,
        "x-ratelimit-reset-requests",
        &tollgate::provider::format_duration(limits.requests_reset),
    );
    insert(
        headers,
        "x-ratelimit-reset-tokens",
        &tollgate::provider::format_duration(limits.tokens_reset),
    );
    if endpoint == Endpoint::Messages {
        let now = SystemTime::now();
        insert(
            headers,
            "anthropic-ratelimit-requests-limit",
            &limits.rpm.to_string(),
        );
        insert(
            headers,
            "anthropic-ratelimit-requests-remaining",
            &limits.requests_left.to_string(),
        );
        insert(
            headers,
            "anthropic-ratelimit-requests-reset",
            &rfc3339(now + limits.requests_reset),
        );
        insert(
            headers,
            "anthropic-ratelimit-tokens-limit",
            &limits.tpm.to_string(),
        );
        insert(
            headers,
            "anthropic-ratelimit-tokens-remaining",
            &limits.tokens_left.to_string(),
        );
        insert(
            headers,
            "anthropic-ratelimit-tokens-reset",
            &rfc3339(now + limits.tokens_reset),
        );
    }
}

/// RFC 3339 in UTC with whole seconds, rounded up (Anthropic's reset format).
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_back_with_tollgates_parser() {
        for ms in [
            1u64, 120, 999, 1_000, 1_500, 17_250, 60_000, 360_000, 3_723_004,
        ] {
            let d = Duration::from_millis(ms);
            let text = tollgate::provider::format_duration(d);
            assert_eq!(tollgate::provider::parse_duration(&text), Some(d), "{text}");
        }
        assert_eq!(
            tollgate::provider::format_duration(Duration::from_secs(360)),
            "6m0s"
        );
        assert_eq!(
            tollgate::provider::format_duration(Duration::from_micros(1)),
            "1ms"
        );
    }

    #[test]
    fn rfc3339_matches_known_dates() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_724_268_665);
        assert_eq!(rfc3339(t), "2024-08-21T19:31:05Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(SystemTime::UNIX_EPOCH + Duration::from_millis(1)),
            "1970-01-01T00:00:01Z"
        );
    }
}
