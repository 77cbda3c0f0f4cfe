//! Input a request carries that the library's estimate does not count: tool and
//! function definitions, tool calls and their results, structured-output schemas,
//! images; and input no one can count before the call (audio, files, a conversation kept
//! at the provider).
//!
//! [`tollgate::estimate`] counts what the provider counts at admission: the messages'
//! text. The provider bills the rest too, so a caller whose tokens or spend are limited
//! could otherwise send a 40,000-word tool description or twenty images as "18 tokens".
//! For such a request the gateway adds what this module finds to the estimate's input,
//! and refuses what it cannot bound. This module only reads a body; it never decides.

use serde_json::Value;
use tollgate::estimate::Endpoint;
use tollgate::tokens::Encoding;

/// Why a request's input cannot be bounded before the call: what, and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Unbounded(pub(crate) String);

/// Input of a `kind` part no tokenizer can count before the call.
fn unbounded(kind: &str) -> Unbounded {
    Unbounded(format!(
        "a `{kind}` part costs tokens this gateway cannot know before the call, and your tokens or spend are limited here: send its content as text, or ask the gateway's operator for a tier without token or spend limits"
    ))
}

/// Counts what the estimate leaves out.
struct Counter {
    enc: Encoding,
    /// The worst case of one image.
    image: u64,
    total: u64,
}

impl Counter {
    fn json(&mut self, v: &Value) {
        if !v.is_null() {
            let text = v.to_string();
            self.total = self
                .total
                .saturating_add(u64::try_from(self.enc.count(&text)).unwrap_or(u64::MAX));
        }
    }

    fn text(&mut self, s: &str) {
        self.total = self
            .total
            .saturating_add(u64::try_from(self.enc.count(s)).unwrap_or(u64::MAX));
    }

    /// A message's or item's content: a string (counted by the estimate) or parts.
    fn content(&mut self, content: &Value) -> Result<(), Unbounded> {
        let Value::Array(parts) = content else {
            return Ok(());
        };
        for part in parts {
            let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
            match kind {
                // Text the estimate counted.
                "text" | "input_text" | "output_text" => {}
                "" if part.get("text").is_some() => {}
                "image_url" | "input_image" | "image" => {
                    self.total = self.total.saturating_add(self.image);
                }
                "input_audio" | "audio" | "file" | "input_file" | "document" => {
                    return Err(unbounded(kind));
                }
                // Anthropic's tool result: text or parts of its own.
                "tool_result" => match part.get("content") {
                    Some(Value::String(s)) => self.text(s),
                    Some(inner @ Value::Array(_)) => {
                        // Its text parts are not the message's: the estimate missed them.
                        for p in inner.as_array().into_iter().flatten() {
                            if let Some(t) = p.get("text").and_then(Value::as_str) {
                                self.text(t);
                            }
                        }
                        self.content(inner)?;
                    }
                    _ => {}
                },
                // Tool calls, thinking, refusals, anything newer: their JSON.
                _ => self.json(part),
            }
        }
        Ok(())
    }

    /// A chat message or a Responses input item: what is not its role, name or text.
    fn message(&mut self, m: &Value) -> Result<(), Unbounded> {
        let Some(obj) = m.as_object() else {
            return Ok(());
        };
        match obj.get("type").and_then(Value::as_str) {
            None | Some("message") => {}
            Some("item_reference") => {
                return Err(Unbounded(
                    "an `item_reference` input item stands for input kept at the provider, which this gateway cannot count, and your tokens or spend are limited here: send the item itself".into(),
                ));
            }
            // function_call, function_call_output, reasoning, ...: all of it is input.
            Some(_) => {
                self.json(m);
                return Ok(());
            }
        }
        for (key, v) in obj {
            match key.as_str() {
                "role" | "name" | "type" | "id" | "status" => {}
                "content" => self.content(v)?,
                // tool_calls, function_call, tool_call_id, audio, ...
                _ => self.json(v),
            }
        }
        Ok(())
    }
}

/// The input tokens of `body` that [`tollgate::estimate::estimate`] does not count for
/// `endpoint`, each image counted as `image_tokens`.
///
/// # Errors
///
/// [`Unbounded`] for input that cannot be bounded before the call: audio and file parts,
/// a Responses request continuing a conversation kept at the provider
/// (`previous_response_id`, `conversation`, `item_reference`).
pub(crate) fn input(
    endpoint: Endpoint,
    body: &Value,
    model: &str,
    image_tokens: u64,
) -> Result<u64, Unbounded> {
    let mut c = Counter {
        enc: Encoding::for_model(model),
        image: image_tokens,
        total: 0,
    };
    for key in ["tools", "functions", "response_format", "tool_choice"] {
        if let Some(v) = body.get(key) {
            c.json(v);
        }
    }
    match endpoint {
        Endpoint::ChatCompletions | Endpoint::Messages => {
            for m in body
                .get("messages")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                c.message(m)?;
            }
            if let Some(system) = body.get("system") {
                c.content(system)?;
            }
        }
        Endpoint::Responses => {
            for key in ["previous_response_id", "conversation"] {
                if body.get(key).is_some_and(|v| !v.is_null()) {
                    return Err(Unbounded(format!(
                        "`{key}` continues a conversation kept at the provider, billed as input this gateway cannot see, and your tokens or spend are limited here: send the conversation in `input`"
                    )));
                }
            }
            if let Some(text) = body.get("text") {
                c.json(text);
            }
            for item in body
                .get("input")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                c.message(item)?;
            }
        }
        Endpoint::Completions | Endpoint::Embeddings => {}
    }
    Ok(c.total)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn text_alone_adds_nothing() {
        let body = json!({"model": "gpt-4o", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "hello"}]},
        ]});
        assert_eq!(
            input(Endpoint::ChatCompletions, &body, "gpt-4o", 1000),
            Ok(0)
        );
    }

    #[test]
    fn tools_images_and_tool_results_are_counted() {
        let long = "word ".repeat(2_000);
        let body = json!({"model": "gpt-4o",
        "tools": [{"type": "function", "function": {"name": "f", "description": long}}],
        "messages": [
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
            ]},
            {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "f", "arguments": "{\"a\": 1}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "done"},
        ]});
        let n = input(Endpoint::ChatCompletions, &body, "gpt-4o", 1000).expect("bounded");
        assert!(n >= 2_000 + 2 * 1000, "{n}");
        let anthropic = json!({"model": "claude-sonnet-4", "max_tokens": 10, "messages": [
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                "content": long}]}]});
        let n = input(Endpoint::Messages, &anthropic, "claude-sonnet-4", 1000).expect("bounded");
        assert!(n >= 2_000, "{n}");
        let responses = json!({"model": "gpt-4o", "input": [
            {"type": "function_call_output", "call_id": "c1", "output": long}]});
        let n = input(Endpoint::Responses, &responses, "gpt-4o", 1000).expect("bounded");
        assert!(n >= 2_000, "{n}");
    }

    #[test]
    fn what_cannot_be_counted_is_refused() {
        let audio = json!({"messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]});
        assert!(input(Endpoint::ChatCompletions, &audio, "gpt-4o", 1).is_err());
        let kept = json!({"previous_response_id": "resp_1", "input": "go on"});
        let e = input(Endpoint::Responses, &kept, "gpt-4o", 1).expect_err("refused");
        assert!(e.0.contains("previous_response_id"), "{e:?}");
        let reference = json!({"input": [{"type": "item_reference", "id": "msg_1"}]});
        assert!(input(Endpoint::Responses, &reference, "gpt-4o", 1).is_err());
    }
}
