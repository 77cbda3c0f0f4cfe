//! Reading the input file: one request per line, in the cookbook's format (a request
//! body, with an optional `metadata` field carried to the output) or the OpenAI Batch
//! API's (`custom_id`, `method`, `url`, `body`).

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use serde_json::{Map, Value};

/// Which input format a line is in; its output line uses the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// A request body per line; output `[request, response(, metadata)]`.
    Cookbook,
    /// The Batch API's `{"custom_id", "method", "url", "body"}`; output as the Batch API writes it.
    BatchApi,
}

/// One request to send.
#[derive(Debug, Clone)]
pub(crate) struct Job {
    /// 1-based line number in the input.
    pub(crate) line: u64,
    pub(crate) format: Format,
    /// The body to send.
    pub(crate) body: Value,
    pub(crate) metadata: Option<Value>,
    pub(crate) custom_id: Option<String>,
    /// The Batch API line's `url` (a path such as `/v1/chat/completions`).
    pub(crate) url: Option<String>,
    /// What identifies this line's output line when resuming.
    pub(crate) identity: u64,
}

/// A line that cannot be sent, with why.
#[derive(Debug, Clone)]
pub(crate) struct Malformed {
    pub(crate) line: u64,
    pub(crate) error: String,
    pub(crate) custom_id: Option<String>,
}

/// The deepest nesting of arrays and objects serde_json reads back (its recursion
/// limit), and so the deepest an output line may be: a line written deeper could not be
/// read on resume.
pub(crate) const MAX_DEPTH: usize = 127;

/// How deeply arrays and objects nest in `value` (a scalar is 0, `[]` is 1).
pub(crate) fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// FNV-1a, 64 bits: stable across runs and builds, which resuming needs.
pub(crate) fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The identity of a cookbook line: the hash of its request's and its metadata's
/// canonical JSON (keys sorted), the form in which both are written to the output; so
/// equal requests with different metadata are told apart.
pub(crate) fn request_identity(request: &Value, metadata: Option<&Value>) -> u64 {
    let metadata = metadata.map_or_else(|| "null".to_owned(), Value::to_string);
    fnv(format!("{request}\n{metadata}").as_bytes())
}

/// The identity of a Batch API line: the hash of its `custom_id`.
pub(crate) fn custom_id_identity(custom_id: &str) -> u64 {
    fnv(custom_id.as_bytes()) ^ 0x9e37_79b9_7f4a_7c15
}

/// The first line of each `custom_id` seen so far. The Batch API requires each request
/// to have its own; two lines sharing one could not be told apart on resume (a rerun
/// would skip one and send the other twice), so every later line with it is refused.
///
/// Kept as 64-bit hashes (8 bytes of key per Batch API line), as resume identifies
/// results.
#[derive(Debug, Default)]
pub(crate) struct CustomIds(HashMap<u64, u64>);

impl CustomIds {
    /// Passes `parsed` through, or refuses it when its `custom_id` was used by an
    /// earlier line. Malformed lines count as uses, so which line is refused depends
    /// on the input alone, the same in every run.
    pub(crate) fn check(&mut self, parsed: Result<Job, Malformed>) -> Result<Job, Malformed> {
        let (line, id) = match &parsed {
            Ok(job) => (job.line, job.custom_id.as_deref()),
            Err(bad) => (bad.line, bad.custom_id.as_deref()),
        };
        let Some(id) = id else {
            return parsed;
        };
        match self.0.entry(custom_id_identity(id)) {
            Entry::Vacant(first) => {
                first.insert(line);
                parsed
            }
            Entry::Occupied(first) => Err(Malformed {
                line,
                error: format!(
                    "line {line}: custom_id {id:?} is already used by line {}; give each request its own (the Batch API requires it)",
                    first.get()
                ),
                custom_id: Some(id.to_owned()),
            }),
        }
    }
}

/// Parses one input line (without its line terminator).
pub(crate) fn parse(line: u64, bytes: &[u8]) -> Result<Job, Malformed> {
    let malformed = |error: String| Malformed {
        line,
        error,
        custom_id: None,
    };
    let text = std::str::from_utf8(bytes).map_err(|e| {
        malformed(format!(
            "line {line} is not valid UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        ))
    })?;
    // A byte order mark (editors on Windows write one) is not part of the JSON: the
    // first line is read without it.
    let text = if line == 1 {
        text.strip_prefix('\u{feff}').unwrap_or(text)
    } else {
        text
    };
    if text.trim().is_empty() {
        return Err(malformed(format!("line {line} is empty")));
    }
    let value: Value = serde_json::from_str(text)
        .map_err(|e| malformed(format!("line {line} is not valid JSON: {e}")))?;
    let Value::Object(mut object) = value else {
        return Err(malformed(format!(
            "line {line} is not a JSON object (each line is one request body, or a Batch API request)"
        )));
    };
    if object.contains_key("custom_id") {
        return batch_api(line, object);
    }
    let metadata = object.remove("metadata");
    let body = Value::Object(object);
    // Its output line nests the request one level deeper.
    if depth(&body) >= MAX_DEPTH {
        return Err(malformed(format!(
            "line {line} nests arrays and objects {} levels deep; its output line could not be read back, so at most {} are accepted",
            depth(&body),
            MAX_DEPTH - 1
        )));
    }
    Ok(Job {
        line,
        format: Format::Cookbook,
        identity: request_identity(&body, metadata.as_ref()),
        body,
        metadata,
        custom_id: None,
        url: None,
    })
}

fn batch_api(line: u64, mut object: Map<String, Value>) -> Result<Job, Malformed> {
    let custom_id = match object.get("custom_id") {
        Some(Value::String(id)) if !id.is_empty() => id.clone(),
        _ => {
            return Err(Malformed {
                line,
                error: format!("line {line}: `custom_id` must be a non-empty string"),
                custom_id: None,
            });
        }
    };
    let malformed = |error: String| Malformed {
        line,
        error,
        custom_id: Some(custom_id.clone()),
    };
    if let Some(method) = object.get("method")
        && method.as_str() != Some("POST")
    {
        return Err(malformed(format!(
            "line {line}: `method` must be \"POST\", not {method}"
        )));
    }
    let url = match object.remove("url") {
        Some(Value::String(url)) if url.starts_with('/') => url,
        Some(other) => {
            return Err(malformed(format!(
                "line {line}: `url` must be a path such as \"/v1/chat/completions\", not {other}"
            )));
        }
        None => {
            return Err(malformed(format!(
                "line {line}: a Batch API request needs a `url`"
            )));
        }
    };
    let body = match object.remove("body") {
        Some(body @ Value::Object(_)) => body,
        _ => {
            return Err(malformed(format!(
                "line {line}: a Batch API request needs a `body` object"
            )));
        }
    };
    Ok(Job {
        line,
        format: Format::BatchApi,
        identity: custom_id_identity(&custom_id),
        body,
        metadata: None,
        custom_id: Some(custom_id),
        url: Some(url),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_formats_parse_and_metadata_is_set_apart() {
        let job =
            parse(1, br#"{"model":"m","messages":[],"metadata":{"row":1}}"#).expect("cookbook");
        assert_eq!(job.format, Format::Cookbook);
        assert_eq!(job.metadata, Some(serde_json::json!({"row": 1})));
        assert!(job.body.get("metadata").is_none());
        let job = parse(
            2,
            br#"{"custom_id":"a","method":"POST","url":"/v1/embeddings","body":{"input":"x"}}"#,
        )
        .expect("batch");
        assert_eq!(
            (job.format, job.custom_id.as_deref(), job.url.as_deref()),
            (Format::BatchApi, Some("a"), Some("/v1/embeddings"))
        );
    }

    #[test]
    fn a_byte_order_mark_before_the_first_line_is_skipped() {
        let job = parse(1, "\u{feff}{\"model\": \"m\"}".as_bytes()).expect("parsed");
        assert_eq!(job.line, 1);
        // Anywhere else it is a character inside the line, and the line is malformed.
        assert!(parse(2, "\u{feff}{}".as_bytes()).is_err());
    }

    #[test]
    fn bad_lines_say_which_line_and_why() {
        let err = |bytes: &[u8]| parse(7, bytes).expect_err("malformed").error;
        assert_eq!(
            err(b"\xff\xfe{}"),
            "line 7 is not valid UTF-8 (invalid byte at offset 0)"
        );
        assert!(err(b"{not json").starts_with("line 7 is not valid JSON"));
        assert!(err(b"[1,2]").contains("not a JSON object"));
        assert_eq!(err(b"  "), "line 7 is empty");
        assert!(err(br#"{"custom_id":"a","url":"/v1/x"}"#).contains("`body`"));
        assert!(
            err(br#"{"custom_id":"a","method":"GET","url":"/v1/x","body":{}}"#).contains("POST")
        );
        assert!(err(br#"{"custom_id":5}"#).contains("custom_id"));
    }

    /// A result line is the request printed back: read again on resume, it must give the
    /// same identity, or a finished line would be sent (and written) twice. Long floats
    /// such as sampled temperatures are where a parser that does not round-trip slips.
    #[test]
    fn identity_survives_writing_and_reading_back_long_floats() {
        let mut x: f64 = 0.091_443_385_120_928_87;
        for _ in 0..5_000 {
            let line = format!(r#"{{"model":"m","temperature":{x},"top_p":{}}}"#, x / 3.0);
            let job = parse(1, line.as_bytes()).expect("valid line");
            let written = serde_json::to_string(&job.body).expect("print");
            let read: Value = serde_json::from_str(&written).expect("read back");
            assert_eq!(
                request_identity(&read, None),
                job.identity,
                "{line} came back as {written}"
            );
            x = (x * 7.389_056_098_930_65 + 0.123_456_789).fract();
        }
    }

    #[test]
    fn identity_ignores_key_order_and_whitespace() {
        let a = parse(1, br#"{"b":1,"a":[1, 2]}"#).expect("a");
        let b = parse(2, br#"{ "a":[1,2], "b":1 }"#).expect("b");
        assert_eq!(a.identity, b.identity);
        assert_ne!(
            a.identity,
            parse(3, br#"{"a":[2,1],"b":1}"#).expect("c").identity
        );
    }

    /// serde_json reads at most `MAX_DEPTH` levels; a request at that depth cannot be
    /// written into an output line that resume reads back, so it is refused up front.
    #[test]
    fn requests_too_deep_to_read_back_are_refused() {
        let nested = |levels: usize| {
            format!(
                "{{\"model\":\"m\",\"x\":{}1{}}}",
                "[".repeat(levels - 1),
                "]".repeat(levels - 1)
            )
        };
        let deepest = nested(MAX_DEPTH - 1);
        let job = parse(1, deepest.as_bytes()).expect("126 levels fit");
        let written = serde_json::to_string(&serde_json::json!([job.body, {}])).expect("print");
        serde_json::from_str::<Value>(&written).expect("and read back");
        let err = parse(2, nested(MAX_DEPTH).as_bytes()).expect_err("127 levels do not");
        assert!(err.error.contains("127 levels deep"), "{}", err.error);
        assert!(
            serde_json::from_str::<Value>(&format!("[{}]", nested(MAX_DEPTH))).is_err(),
            "serde_json's limit is MAX_DEPTH"
        );
    }

    #[test]
    fn a_custom_id_used_twice_is_refused_on_its_later_lines() {
        let line = |id: &str, url: &str| {
            format!(r#"{{"custom_id":"{id}","method":"POST","url":"{url}","body":{{}}}}"#)
        };
        let mut ids = CustomIds::default();
        let mut check = |n: u64, text: String| ids.check(parse(n, text.as_bytes()));
        assert!(check(1, line("a", "/v1/x")).is_ok());
        assert!(check(2, line("b", "nowhere")).is_err(), "malformed");
        let again = check(3, line("a", "/v1/x")).expect_err("a again");
        assert_eq!(again.custom_id.as_deref(), Some("a"));
        assert!(
            again.error.contains("already used by line 1"),
            "{}",
            again.error
        );
        let after_malformed = check(4, line("b", "/v1/x")).expect_err("b again");
        assert!(
            after_malformed.error.contains("line 2"),
            "{}",
            after_malformed.error
        );
        assert!(
            check(5, r#"{"model":"m"}"#.to_owned()).is_ok(),
            "cookbook lines pass"
        );
        assert!(
            check(6, r#"{"model":"m"}"#.to_owned()).is_ok(),
            "even twice"
        );
    }
}
