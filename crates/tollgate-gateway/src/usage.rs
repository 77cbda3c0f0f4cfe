//! What a call used, read from the provider's answer: the `usage` object of a JSON
//! response, or the events of a stream (OpenAI's final usage chunk, Anthropic's
//! `message_start` / `message_delta`, the Responses API's `response.completed`), with
//! the streamed text counted as a last resort when the provider reports nothing.
//!
//! Pure functions over parsed JSON; no I/O.
//!
//! ```
//! use serde_json::json;
//! use tollgate_gateway::usage::from_json;
//! let u = from_json(&json!({"usage": {"prompt_tokens": 12, "completion_tokens": 30}})).unwrap();
//! assert_eq!((u.input, u.output), (12, 30));
//! ```

use serde_json::Value;
use tollgate::Usage;

/// The usage in a whole JSON answer (chat, completions, embeddings, responses, messages).
///
/// ```
/// use serde_json::json;
/// let u = tollgate_gateway::usage::from_json(&json!({"usage": {"input_tokens": 5, "output_tokens": 7}})).unwrap();
/// assert_eq!((u.input, u.output), (5, 7));
/// assert!(tollgate_gateway::usage::from_json(&json!({"usage": null})).is_none());
/// ```
pub fn from_json(body: &Value) -> Option<Usage> {
    usage_object(body.get("usage")?)
}

/// The usage in a whole JSON answer's bytes, reading only its `usage` member (the rest
/// is skipped, not built).
///
/// ```
/// let u = tollgate_gateway::usage::from_body(br#"{"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}"#);
/// assert_eq!(u.map(|u| (u.input, u.output)), Some((3, 4)));
/// assert!(tollgate_gateway::usage::from_body(b"not json").is_none());
/// ```
pub fn from_body(body: &[u8]) -> Option<Usage> {
    #[derive(serde::Deserialize)]
    struct Answer {
        usage: Option<Value>,
    }
    usage_object(&serde_json::from_slice::<Answer>(body).ok()?.usage?)
}

fn num(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

fn usage_object(u: &Value) -> Option<Usage> {
    if !u.is_object() {
        return None;
    }
    if u.get("prompt_tokens").is_some() {
        return Some(Usage::new(
            num(u, "prompt_tokens"),
            num(u, "completion_tokens"),
        ));
    }
    if u.get("input_tokens").is_some() || u.get("output_tokens").is_some() {
        // Anthropic counts cached prompt tokens apart; they are prompt tokens all the same.
        let input = num(u, "input_tokens")
            + num(u, "cache_creation_input_tokens")
            + num(u, "cache_read_input_tokens");
        return Some(Usage::new(input, num(u, "output_tokens")));
    }
    None
}

/// Follows a stream's events and tells what the call used.
///
/// ```
/// use tollgate_gateway::usage::StreamUsage;
/// let mut s = StreamUsage::new("gpt-4o-mini", 10);
/// s.observe(None, r#"{"choices":[{"delta":{"content":"Hello there"}}]}"#);
/// assert_eq!(s.usage().output, 2);                          // counted from the text
/// s.observe(None, r#"{"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":3}}"#);
/// assert_eq!((s.usage().input, s.usage().output), (9, 3));  // reported: exact
/// ```
#[derive(Debug)]
pub struct StreamUsage {
    model: String,
    estimated_input: u64,
    input: Option<u64>,
    output: Option<u64>,
    text: String,
}

/// What [`StreamUsage::observe`] learned from one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Anything else.
    Other,
    /// An OpenAI chunk carrying only usage (no choices): the one the gateway asked for
    /// with `stream_options.include_usage`.
    UsageOnlyChunk,
}

impl StreamUsage {
    /// A stream for `model`, whose prompt was estimated at `estimated_input` tokens.
    ///
    /// ```
    /// let s = tollgate_gateway::usage::StreamUsage::new("claude-3-5-haiku", 40);
    /// assert_eq!(s.usage().input, 40);
    /// ```
    pub fn new(model: &str, estimated_input: u64) -> StreamUsage {
        StreamUsage {
            model: model.to_string(),
            estimated_input,
            input: None,
            output: None,
            text: String::new(),
        }
    }

    /// Read one event's `data` (and `event` name).
    ///
    /// ```
    /// use tollgate_gateway::usage::{Seen, StreamUsage};
    /// let mut s = StreamUsage::new("m", 0);
    /// assert_eq!(s.observe(None, r#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#), Seen::UsageOnlyChunk);
    /// assert_eq!(s.observe(None, "[DONE]"), Seen::Other);
    /// ```
    pub fn observe(&mut self, event: Option<&str>, data: &str) -> Seen {
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            return Seen::Other;
        };
        let kind = event.or_else(|| v.get("type").and_then(Value::as_str));
        match kind {
            Some("message_start") => {
                // Its output count is a placeholder (1); the real one comes with
                // message_delta, and until then the streamed text is counted.
                if let Some(u) = v.pointer("/message/usage") {
                    self.input = Some(
                        num(u, "input_tokens")
                            + num(u, "cache_creation_input_tokens")
                            + num(u, "cache_read_input_tokens"),
                    );
                }
                return Seen::Other;
            }
            Some("message_delta") => {
                if let Some(u) = v.get("usage") {
                    self.output = Some(num(u, "output_tokens"));
                }
                return Seen::Other;
            }
            Some("content_block_delta") => {
                // Text, a tool call's arguments, or extended thinking: all output.
                for field in ["/delta/text", "/delta/partial_json", "/delta/thinking"] {
                    if let Some(t) = v.pointer(field).and_then(Value::as_str) {
                        self.text.push_str(t);
                    }
                }
                return Seen::Other;
            }
            Some("response.completed" | "response.incomplete" | "response.failed") => {
                if let Some(u) = v.pointer("/response/usage").and_then(usage_object) {
                    self.input = Some(u.input);
                    self.output = Some(u.output);
                }
                return Seen::Other;
            }
            Some(
                "response.output_text.delta"
                | "response.function_call_arguments.delta"
                | "response.refusal.delta",
            ) => {
                if let Some(t) = v.get("delta").and_then(Value::as_str) {
                    self.text.push_str(t);
                }
                return Seen::Other;
            }
            _ => {}
        }
        if let Some(choices) = v.get("choices").and_then(Value::as_array) {
            for c in choices {
                if let Some(t) = c.pointer("/delta/content").and_then(Value::as_str) {
                    self.text.push_str(t);
                } else if let Some(t) = c.get("text").and_then(Value::as_str) {
                    self.text.push_str(t);
                }
                // Tool calls are output too: their names and arguments as they stream
                // (and the older `function_call`).
                let calls = c.pointer("/delta/tool_calls").and_then(Value::as_array);
                let functions = calls
                    .into_iter()
                    .flatten()
                    .filter_map(|t| t.get("function"))
                    .chain(c.pointer("/delta/function_call"));
                for f in functions {
                    for field in ["name", "arguments"] {
                        if let Some(t) = f.get(field).and_then(Value::as_str) {
                            self.text.push_str(t);
                        }
                    }
                }
            }
            if let Some(u) = v.get("usage").and_then(usage_object) {
                self.input = Some(u.input);
                self.output = Some(u.output);
                if choices.is_empty() {
                    return Seen::UsageOnlyChunk;
                }
            }
        }
        Seen::Other
    }

    /// Whether the provider reported the output (else it is counted from the text).
    ///
    /// ```
    /// assert!(!tollgate_gateway::usage::StreamUsage::new("m", 0).reported());
    /// ```
    pub fn reported(&self) -> bool {
        self.output.is_some()
    }

    /// What the call used so far: reported numbers where the provider sent them, else
    /// the prompt estimate and the streamed text counted with the model's tokenizer.
    ///
    /// ```
    /// let s = tollgate_gateway::usage::StreamUsage::new("m", 3);
    /// assert_eq!((s.usage().input, s.usage().output), (3, 0));
    /// ```
    pub fn usage(&self) -> Usage {
        let output = self
            .output
            .unwrap_or_else(|| tollgate::tokens::count_text(&self.model, &self.text));
        Usage::new(self.input.unwrap_or(self.estimated_input), output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream that reports no usage is charged the output it streamed, tool calls
    /// included: for OpenAI chat, Anthropic messages and the Responses API alike.
    #[test]
    fn streamed_tool_calls_count_as_output() {
        let model = "gpt-4o";
        let args = r#"{"city": "Paris", "unit": "celsius", "days": 3}"#;
        let (a, b) = args.split_at(10);
        let want = tollgate::tokens::count_text(model, &format!("get_weather{args}"));
        assert!(want > 10, "{want}");

        let mut s = StreamUsage::new(model, 5);
        let first = serde_json::json!({"choices": [{"delta": {"tool_calls": [
            {"index": 0, "function": {"name": "get_weather", "arguments": a}}]}}]});
        let second = serde_json::json!({"choices": [{"delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": b}}]}}]});
        s.observe(None, &first.to_string());
        s.observe(None, &second.to_string());
        assert_eq!(s.usage(), Usage::new(5, want));

        let mut s = StreamUsage::new(model, 5);
        s.observe(
            None,
            &serde_json::json!({"choices": [{"delta": {"function_call": {"name": "get_weather", "arguments": args}}}]}).to_string(),
        );
        assert_eq!(s.usage().output, want);

        let mut s = StreamUsage::new(model, 5);
        for part in [a, b] {
            let ev = serde_json::json!({"type": "content_block_delta", "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": part}});
            s.observe(Some("content_block_delta"), &ev.to_string());
        }
        assert_eq!(s.usage().output, tollgate::tokens::count_text(model, args));

        let mut s = StreamUsage::new(model, 5);
        let ev =
            serde_json::json!({"type": "response.function_call_arguments.delta", "delta": args});
        s.observe(None, &ev.to_string());
        assert_eq!(s.usage().output, tollgate::tokens::count_text(model, args));
    }
}
