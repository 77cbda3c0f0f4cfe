//! What an API request will cost before it is sent: prompt tokens counted offline,
//! plus the output tokens it may generate, for each endpoint's JSON body.
//!
//! Providers that limit tokens per minute count a request at admission, before the model
//! has produced anything: OpenAI counts the prompt plus `max_tokens × n`. Anything in
//! front of such a provider (the batch runner, the gateway, the simulator) must count the
//! same way, or it will be refused for tokens it did not know it was spending. This
//! module reads a request body for one [`Endpoint`] and returns an [`Estimate`]:
//!
//! | endpoint | input counted | output counted |
//! |---|---|---|
//! | chat completions | every message (role, name, text parts) as [`crate::tokens`] counts a chat | the larger of `max_completion_tokens` and `max_tokens` (0 when both are absent) × `n` |
//! | completions | `prompt`: text, texts, or token arrays (their length) | `max_tokens` (default 16, as OpenAI's) × `n`, or × `best_of` when larger |
//! | embeddings | `input`: text, texts, or token arrays | 0 |
//! | Anthropic messages | `system` and every message's text blocks | `max_tokens` (required) |
//! | responses | `instructions` and `input` (text, or items with text parts) | `max_output_tokens` (0 when absent) |
//!
//! Parts that are not text (images, audio, files) and tool definitions are not counted:
//! add them yourself when your traffic carries them.
//!
//! What this module must never do: perform I/O, or panic on any JSON value. A body that
//! lacks what the endpoint needs is an [`EstimateError`] naming the field.

use serde_json::Value;

use crate::Cost;
use crate::tokens::{Encoding, REPLY_PRIMING_TOKENS, TOKENS_PER_MESSAGE, TOKENS_PER_NAME};

/// Output tokens OpenAI's legacy completions endpoint generates when `max_tokens` is absent.
///
/// ```
/// assert_eq!(tollgate::estimate::COMPLETIONS_DEFAULT_MAX_TOKENS, 16);
/// ```
pub const COMPLETIONS_DEFAULT_MAX_TOKENS: u64 = 16;

/// The most choices (`n`) one request may ask for, as OpenAI allows.
///
/// ```
/// assert_eq!(tollgate::estimate::MAX_CHOICES, 128);
/// ```
pub const MAX_CHOICES: u64 = 128;

/// An API endpoint whose request bodies this module can read.
///
/// ```
/// use tollgate::estimate::Endpoint;
///
/// assert_eq!(Endpoint::from_path("/v1/chat/completions"), Some(Endpoint::ChatCompletions));
/// assert_eq!(Endpoint::from_path("https://api.anthropic.com/v1/messages"), Some(Endpoint::Messages));
/// assert_eq!(Endpoint::from_path("/v1/files"), None);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// OpenAI `/v1/chat/completions`.
    ChatCompletions,
    /// OpenAI `/v1/completions` (legacy).
    Completions,
    /// OpenAI `/v1/embeddings`.
    Embeddings,
    /// Anthropic `/v1/messages`.
    Messages,
    /// OpenAI `/v1/responses`.
    Responses,
}

impl Endpoint {
    /// The endpoint a URL or path names, by its last segments (any prefix and query
    /// string are ignored), or `None` when it names none of them.
    ///
    /// ```
    /// use tollgate::estimate::Endpoint;
    ///
    /// let azure = "https://x.openai.azure.com/openai/deployments/gpt4o/chat/completions?api-version=2024-10-21";
    /// assert_eq!(Endpoint::from_path(azure), Some(Endpoint::ChatCompletions));
    /// assert_eq!(Endpoint::from_path("/v1/completions"), Some(Endpoint::Completions));
    /// ```
    pub fn from_path(path: &str) -> Option<Endpoint> {
        let path = path.split(['?', '#']).next().unwrap_or("");
        let path = path.trim_end_matches('/');
        if path.ends_with("/chat/completions") {
            Some(Endpoint::ChatCompletions)
        } else if path.ends_with("/completions") {
            Some(Endpoint::Completions)
        } else if path.ends_with("/embeddings") {
            Some(Endpoint::Embeddings)
        } else if path.ends_with("/messages") {
            Some(Endpoint::Messages)
        } else if path.ends_with("/responses") {
            Some(Endpoint::Responses)
        } else {
            None
        }
    }

    /// The endpoint's path on OpenAI's (or Anthropic's) API.
    ///
    /// ```
    /// assert_eq!(tollgate::estimate::Endpoint::Embeddings.path(), "/v1/embeddings");
    /// ```
    pub const fn path(&self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Embeddings => "/v1/embeddings",
            Endpoint::Messages => "/v1/messages",
            Endpoint::Responses => "/v1/responses",
        }
    }
}

/// What a request will be counted as at admission.
///
/// ```
/// use tollgate::estimate::Estimate;
///
/// let e = Estimate { input: 120, output: 512 };
/// assert_eq!(e.total(), 632);
/// assert_eq!((e.cost().input, e.cost().output, e.cost().requests), (120, 512, 1));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Estimate {
    /// Prompt tokens.
    pub input: u64,
    /// Output tokens the request may generate (`max_tokens × n`).
    pub output: u64,
}

impl Estimate {
    /// Input plus output: what a combined tokens-per-minute limit counts.
    ///
    /// ```
    /// assert_eq!(tollgate::estimate::Estimate { input: 1, output: 2 }.total(), 3);
    /// ```
    pub const fn total(&self) -> u64 {
        self.input.saturating_add(self.output)
    }

    /// The limiter [`Cost`] of one request with these tokens.
    ///
    /// ```
    /// let cost = tollgate::estimate::Estimate { input: 10, output: 5 }.cost();
    /// assert_eq!(cost, tollgate::Cost::input(10).output(5));
    /// ```
    pub const fn cost(&self) -> Cost {
        Cost::input(self.input).output(self.output)
    }
}

/// Why a body could not be estimated; the message names the field.
///
/// ```
/// use tollgate::estimate::{estimate, Endpoint, EstimateError};
///
/// let err = estimate(Endpoint::ChatCompletions, &serde_json::json!({"model": "gpt-4o"})).unwrap_err();
/// assert_eq!(err, EstimateError::Missing("messages"));
/// assert_eq!(err.to_string(), "the request has no `messages` field");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EstimateError {
    /// The body is not a JSON object.
    #[error("the request body is not a JSON object")]
    NotAnObject,
    /// A required field is absent.
    #[error("the request has no `{0}` field")]
    Missing(&'static str),
    /// A field has the wrong type.
    #[error("the request's `{field}` field must be {expected}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What it must be.
        expected: &'static str,
    },
}

/// Estimates one request body for `endpoint`; see the [module docs](self) for what is
/// counted.
///
/// # Errors
///
/// [`EstimateError`] when the body is not an object or lacks a field the endpoint needs
/// (`messages`, `prompt`, `input`, Anthropic's `max_tokens`), a counted field has the
/// wrong type, or `n` is outside 1 to [`MAX_CHOICES`].
///
/// ```
/// use serde_json::json;
/// use tollgate::estimate::{estimate, Endpoint};
///
/// let body = json!({
///     "model": "gpt-4o-mini",
///     "messages": [{"role": "user", "content": "hello world"}],
///     "max_tokens": 100,
///     "n": 2,
/// });
/// let e = estimate(Endpoint::ChatCompletions, &body)?;
/// assert_eq!(e.input, 3 + 1 + 2 + 3); // per message + "user" + "hello world" + priming
/// assert_eq!(e.output, 200);
/// # Ok::<(), tollgate::estimate::EstimateError>(())
/// ```
pub fn estimate(endpoint: Endpoint, body: &Value) -> Result<Estimate, EstimateError> {
    let object = body.as_object().ok_or(EstimateError::NotAnObject)?;
    let model = object.get("model").and_then(Value::as_str).unwrap_or("");
    let enc = Encoding::for_model(model);
    let n = optional_u64(body, "n")?.unwrap_or(1);
    if !(1..=MAX_CHOICES).contains(&n) {
        return Err(EstimateError::Invalid {
            field: "n",
            expected: "an integer from 1 to 128",
        });
    }
    match endpoint {
        Endpoint::ChatCompletions => {
            let messages = required_array(body, "messages", "an array of messages")?;
            let mut input = REPLY_PRIMING_TOKENS;
            for message in messages {
                input = input.saturating_add(chat_message(enc, message)?);
            }
            // Both may be sent, and a server may honour either: the larger is the most
            // the request can generate.
            let max = optional_u64(body, "max_completion_tokens")?
                .unwrap_or(0)
                .max(optional_u64(body, "max_tokens")?.unwrap_or(0));
            Ok(Estimate {
                input,
                output: max.saturating_mul(n),
            })
        }
        Endpoint::Completions => {
            let prompt = object
                .get("prompt")
                .ok_or(EstimateError::Missing("prompt"))?;
            let input = texts_or_tokens(enc, prompt, "prompt")?;
            let max = optional_u64(body, "max_tokens")?.unwrap_or(COMPLETIONS_DEFAULT_MAX_TOKENS);
            let best_of = optional_u64(body, "best_of")?.unwrap_or(1);
            Ok(Estimate {
                input,
                output: max.saturating_mul(n.max(best_of)),
            })
        }
        Endpoint::Embeddings => {
            let input = object.get("input").ok_or(EstimateError::Missing("input"))?;
            Ok(Estimate {
                input: texts_or_tokens(enc, input, "input")?,
                output: 0,
            })
        }
        Endpoint::Messages => {
            let messages = required_array(body, "messages", "an array of messages")?;
            let mut input = REPLY_PRIMING_TOKENS;
            if let Some(system) = object.get("system") {
                input = input
                    .saturating_add(TOKENS_PER_MESSAGE)
                    .saturating_add(content_text(enc, system, "system")?);
            }
            for message in messages {
                input = input.saturating_add(chat_message(enc, message)?);
            }
            let max =
                optional_u64(body, "max_tokens")?.ok_or(EstimateError::Missing("max_tokens"))?;
            Ok(Estimate { input, output: max })
        }
        Endpoint::Responses => {
            let mut input = 0u64;
            if let Some(instructions) = object.get("instructions") {
                input = input.saturating_add(content_text(enc, instructions, "instructions")?);
            }
            match object.get("input") {
                None => return Err(EstimateError::Missing("input")),
                Some(Value::String(text)) => {
                    input = input.saturating_add(count(enc, text));
                }
                Some(Value::Array(items)) => {
                    input = input.saturating_add(REPLY_PRIMING_TOKENS);
                    for item in items {
                        input = input.saturating_add(chat_message(enc, item)?);
                    }
                }
                Some(_) => {
                    return Err(EstimateError::Invalid {
                        field: "input",
                        expected: "a string or an array of input items",
                    });
                }
            }
            Ok(Estimate {
                input,
                output: optional_u64(body, "max_output_tokens")?.unwrap_or(0),
            })
        }
    }
}

/// The most output tokens a model generates in one answer (per choice), as its provider
/// documents it, for the models this table knows: the worst case of a request that sets
/// no `max_tokens`. A model is matched by the longest known name it starts with, up to a
/// `-` (`gpt-4o-2024-08-06` is `gpt-4o`, `gpt-4o-mini-2024-07-18` is `gpt-4o-mini`), after
/// any provider prefix (`openai/`) and case are dropped; `None` for a model it does not
/// know, whose worst case is the caller's to set (the gateway's `[max_output_tokens]`).
///
/// ```
/// use tollgate::estimate::max_output_tokens;
///
/// assert_eq!(max_output_tokens("gpt-4o"), Some(16_384));
/// assert_eq!(max_output_tokens("openai/GPT-4o-2024-08-06"), Some(16_384));
/// assert_eq!(max_output_tokens("gpt-4.1-mini"), Some(32_768));
/// assert_eq!(max_output_tokens("my-llama"), None);
/// ```
pub fn max_output_tokens(model: &str) -> Option<u64> {
    const KNOWN: [(&str, u64); 24] = [
        ("gpt-3.5-turbo", 4_096),
        ("gpt-4", 8_192),
        ("gpt-4-turbo", 4_096),
        ("gpt-4o", 16_384),
        ("gpt-4o-mini", 16_384),
        ("chatgpt-4o-latest", 16_384),
        ("gpt-4.1", 32_768),
        ("gpt-4.1-mini", 32_768),
        ("gpt-4.1-nano", 32_768),
        ("gpt-5", 128_000),
        ("o1", 100_000),
        ("o1-mini", 65_536),
        ("o1-pro", 100_000),
        ("o3", 100_000),
        ("o3-mini", 100_000),
        ("o3-pro", 100_000),
        ("o4-mini", 100_000),
        ("claude-3-haiku", 4_096),
        ("claude-3-opus", 4_096),
        ("claude-3-5-haiku", 8_192),
        ("claude-3-5-sonnet", 8_192),
        ("claude-3-7-sonnet", 64_000),
        ("claude-sonnet-4", 64_000),
        ("claude-opus-4", 32_000),
    ];
    let lower = model.trim().to_ascii_lowercase();
    let name = lower.rsplit('/').next().unwrap_or(&lower);
    KNOWN
        .iter()
        .filter(|(known, _)| {
            name.strip_prefix(known)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
        })
        .max_by_key(|(known, _)| known.len())
        .map(|(_, max)| *max)
}

fn count(enc: Encoding, text: &str) -> u64 {
    u64::try_from(enc.count(text)).unwrap_or(u64::MAX)
}

fn optional_u64(body: &Value, field: &'static str) -> Result<Option<u64>, EstimateError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or(EstimateError::Invalid {
            field,
            expected: "a non-negative integer",
        }),
    }
}

fn required_array<'a>(
    body: &'a Value,
    field: &'static str,
    expected: &'static str,
) -> Result<&'a Vec<Value>, EstimateError> {
    body.get(field)
        .ok_or(EstimateError::Missing(field))?
        .as_array()
        .ok_or(EstimateError::Invalid { field, expected })
}

/// One chat message (or responses input item): overhead, role, name, text content.
fn chat_message(enc: Encoding, message: &Value) -> Result<u64, EstimateError> {
    let Some(object) = message.as_object() else {
        return Err(EstimateError::Invalid {
            field: "messages",
            expected: "an array of message objects",
        });
    };
    let mut total = TOKENS_PER_MESSAGE;
    if let Some(role) = object.get("role").and_then(Value::as_str) {
        total = total.saturating_add(count(enc, role));
    }
    if let Some(name) = object.get("name").and_then(Value::as_str) {
        total = total
            .saturating_add(TOKENS_PER_NAME)
            .saturating_add(count(enc, name));
    }
    if let Some(content) = object.get("content") {
        total = total.saturating_add(content_text(enc, content, "content")?);
    }
    Ok(total)
}

/// Text content: a string, or an array of parts whose `text` fields are counted.
fn content_text(enc: Encoding, content: &Value, field: &'static str) -> Result<u64, EstimateError> {
    match content {
        Value::Null => Ok(0),
        Value::String(text) => Ok(count(enc, text)),
        Value::Array(parts) => Ok(parts.iter().fold(0u64, |total, part| {
            let text = part.get("text").and_then(Value::as_str).unwrap_or("");
            total.saturating_add(count(enc, text))
        })),
        _ => Err(EstimateError::Invalid {
            field,
            expected: "a string or an array of content parts",
        }),
    }
}

/// A `prompt` / `input` field: text, texts, token ids, or arrays of token ids.
fn texts_or_tokens(
    enc: Encoding,
    value: &Value,
    field: &'static str,
) -> Result<u64, EstimateError> {
    let invalid = EstimateError::Invalid {
        field,
        expected: "a string, an array of strings, or token arrays",
    };
    match value {
        Value::String(text) => Ok(count(enc, text)),
        Value::Array(items) => {
            let mut total = 0u64;
            for item in items {
                total = total.saturating_add(match item {
                    Value::String(text) => count(enc, text),
                    Value::Number(_) => 1,
                    Value::Array(ids) => u64::try_from(ids.len()).unwrap_or(u64::MAX),
                    _ => return Err(invalid),
                });
            }
            Ok(total)
        }
        _ => Err(invalid),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn every_endpoint_counts_what_the_provider_counts() {
        let e = |ep, body: Value| estimate(ep, &body).expect("valid body");
        let chat = e(
            Endpoint::ChatCompletions,
            json!({"model": "gpt-4", "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": [{"type": "text", "text": "hello world"}, {"type": "image_url"}]}
            ], "max_tokens": 10}),
        );
        assert_eq!(
            chat,
            Estimate {
                input: 17,
                output: 10
            }
        );
        let completions = e(
            Endpoint::Completions,
            json!({"prompt": ["a", [1, 2, 3]], "n": 2}),
        );
        assert_eq!(completions.input, 4);
        assert_eq!(completions.output, 32);
        let embeddings = e(Endpoint::Embeddings, json!({"input": [[1, 2], [3]]}));
        assert_eq!(
            embeddings,
            Estimate {
                input: 3,
                output: 0
            }
        );
        let messages = e(
            Endpoint::Messages,
            json!({"system": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 7}),
        );
        assert_eq!(messages.output, 7);
        assert!(messages.input > 3 + 3);
        let responses = e(
            Endpoint::Responses,
            json!({"input": "hello world", "max_output_tokens": 5}),
        );
        assert_eq!(
            responses,
            Estimate {
                input: 2,
                output: 5
            }
        );
    }

    #[test]
    fn bad_bodies_name_the_field_and_never_panic() {
        let err = |ep, body: Value| estimate(ep, &body).expect_err("invalid body");
        assert_eq!(
            err(Endpoint::Embeddings, json!([1])),
            EstimateError::NotAnObject
        );
        assert_eq!(
            err(Endpoint::Messages, json!({"messages": []})),
            EstimateError::Missing("max_tokens")
        );
        assert!(matches!(
            err(Endpoint::ChatCompletions, json!({"messages": [], "n": -1})),
            EstimateError::Invalid { field: "n", .. }
        ));
        assert!(matches!(
            err(Endpoint::ChatCompletions, json!({"messages": [], "n": 0})),
            EstimateError::Invalid { field: "n", .. }
        ));
        assert!(matches!(
            err(
                Endpoint::ChatCompletions,
                json!({"messages": [], "n": 100_000_000})
            ),
            EstimateError::Invalid { field: "n", .. }
        ));
        assert!(matches!(
            err(Endpoint::ChatCompletions, json!({"messages": ["x"]})),
            EstimateError::Invalid {
                field: "messages",
                ..
            }
        ));
        assert!(matches!(
            err(Endpoint::Embeddings, json!({"input": {"a": 1}})),
            EstimateError::Invalid { field: "input", .. }
        ));
    }
}
