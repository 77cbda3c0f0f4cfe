//! Credentials taken out of text the gateway passes on from an upstream.
//!
//! Providers echo credentials in error answers (OpenAI: "Incorrect API key provided:
//! sk-proj-****abcd"). An error answer from an upstream goes to a caller who must never
//! learn the account's key, or any part of it. This module only rewrites text; it never
//! decides what is passed on.

use std::borrow::Cow;

/// Prefixes of API keys and tokens in the field (OpenAI, Anthropic, Google, AWS, Groq,
/// xAI, generic `key-`/`token-` forms).
const KEY_PREFIXES: [&str; 12] = [
    "sk-", "sk_", "pk-", "pk_", "rk-", "sess-", "AIza", "AKIA", "ASIA", "gsk_", "xai-", "key-",
];

/// What a credential is replaced by.
pub(crate) const REDACTED: &str = "[redacted]";

/// The shortest run of a secret that is taken out when it appears on its own (masked
/// keys show their last four characters; four alone would take out too much).
const MIN_PART: usize = 8;

fn word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '*' | '.' | '~' | '+' | '/' | '=')
}

/// Whether a word looks like a credential: a known key prefix with something after it,
/// a masked key (`****`), or, in any case of letters, one of `secrets` (given in
/// lowercase, once, by the caller: nothing is allocated per secret per word), any run of
/// one at least [`MIN_PART`] long standing alone, or any run of [`MIN_RUN`] inside a
/// longer word.
fn is_credential<S: AsRef<str>>(word: &str, secrets: &[S]) -> bool {
    let core = word.trim_end_matches(['.', '/', '=']);
    if core.len() < 4 {
        return false;
    }
    if core.contains("***") {
        return true;
    }
    if KEY_PREFIXES.iter().any(|p| {
        core.len() >= p.len() + 4 && core.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes())
    }) {
        return true;
    }
    if secrets.is_empty() {
        return false;
    }
    let lower = core.to_ascii_lowercase();
    secrets.iter().any(|s| {
        let s = s.as_ref();
        if s.is_empty() {
            return false;
        }
        if lower.contains(s) || (lower.len() >= MIN_PART && s.contains(&lower)) {
            return true;
        }
        // A run of the secret inside a longer word.
        lower.len() >= MIN_RUN
            && s.len() >= MIN_RUN
            && s.as_bytes()
                .windows(MIN_RUN)
                .any(|w| std::str::from_utf8(w).is_ok_and(|w| lower.contains(w)))
    })
}

/// The shortest run of a secret found inside a longer word.
const MIN_RUN: usize = 12;

/// Whether `text` holds anything [`redact`] would take out: for header values, which are
/// dropped rather than rewritten.
pub(crate) fn leaks<S: AsRef<str>>(text: &str, secrets: &[S]) -> bool {
    words(text).any(|w| is_credential(w, secrets))
}

fn words(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !word_char(c))
        .filter(|w| !w.is_empty())
}

/// Every word of `s` that looks like a credential replaced by `[redacted]`.
fn redact_str<S: AsRef<str>>(s: &str, secrets: &[S]) -> Option<String> {
    if !leaks(s, secrets) {
        return None;
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while !rest.is_empty() {
        let start = rest.find(word_char).unwrap_or(rest.len());
        out.push_str(&rest[..start]);
        rest = &rest[start..];
        let end = rest.find(|c: char| !word_char(c)).unwrap_or(rest.len());
        let word = &rest[..end];
        if is_credential(word, secrets) {
            // Sentence punctuation after it stays.
            let core = word.trim_end_matches(['.', '/', '=']);
            out.push_str(REDACTED);
            out.push_str(&word[core.len()..]);
        } else {
            out.push_str(word);
        }
        rest = &rest[end..];
    }
    Some(out)
}

/// Redact every string (and key) of a JSON value; whether anything changed.
fn redact_json<S: AsRef<str>>(v: &mut serde_json::Value, secrets: &[S]) -> bool {
    use serde_json::Value;
    match v {
        Value::String(s) => match redact_str(s, secrets) {
            Some(r) => {
                *s = r;
                true
            }
            None => false,
        },
        Value::Array(items) => items
            .iter_mut()
            .fold(false, |changed, i| redact_json(i, secrets) | changed),
        Value::Object(map) => {
            let mut changed = false;
            let old = std::mem::take(map);
            for (k, mut item) in old {
                changed |= redact_json(&mut item, secrets);
                let k = match redact_str(&k, secrets) {
                    Some(r) => {
                        changed = true;
                        r
                    }
                    None => k,
                };
                map.insert(k, item);
            }
            changed
        }
        _ => false,
    }
}

/// `text` with every word that looks like a credential (see [`is_credential`])
/// replaced by `[redacted]`. A JSON body is read as JSON, so a key written with escapes
/// (`sk\u002d...`) is seen as the key it is; other text is read as text (lossily when
/// it is not UTF-8).
pub(crate) fn redact<'a, S: AsRef<str>>(text: &'a [u8], secrets: &[S]) -> Cow<'a, [u8]> {
    if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(text) {
        if !redact_json(&mut v, secrets) {
            return Cow::Borrowed(text);
        }
        if let Ok(out) = serde_json::to_vec(&v) {
            return Cow::Owned(out);
        }
    }
    let s = String::from_utf8_lossy(text);
    match redact_str(&s, secrets) {
        Some(out) => Cow::Owned(out.into_bytes()),
        None if matches!(s, Cow::Owned(_)) => Cow::Owned(s.into_owned().into_bytes()),
        None => Cow::Borrowed(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(text: &str, secrets: &[&str]) -> String {
        String::from_utf8(redact(text.as_bytes(), secrets).into_owned()).expect("utf-8")
    }

    #[test]
    fn echoed_and_masked_keys_are_taken_out() {
        let openai = r#"{"error":{"message":"Incorrect API key provided: sk-proj-********************************abcd. You can find your API key at https://platform.openai.com/account/api-keys.","type":"invalid_request_error","code":"invalid_api_key"}}"#;
        let out = r(openai, &[]);
        assert!(!out.contains("abcd"), "{out}");
        assert!(
            out.contains("Incorrect API key provided: [redacted]."),
            "{out}"
        );
        assert!(
            out.contains("https://platform.openai.com/account/api-keys"),
            "{out}"
        );
        let secret = "upstream-secret-0123456789";
        let out = r(
            &format!("bad key {secret} and its tail secret-0123456789"),
            &[secret],
        );
        assert_eq!(out, "bad key [redacted] and its tail [redacted]");
        assert_eq!(
            r("Bearer sk-ant-api03-xyz123 rejected", &[]),
            "Bearer [redacted] rejected"
        );
    }

    #[test]
    fn a_key_in_another_case_escaped_or_inside_a_word_is_taken_out() {
        // Secrets are given in lowercase; the text may hold any case.
        let secret = "sk-upstream-secret-0123456789abcdef";
        assert_eq!(
            r("key SK-UPSTREAM-SECRET-0123456789ABCDEF", &[secret]),
            "key [redacted]"
        );
        let escaped =
            r#"{"error":{"message":"bad key sk\u002dupstream\u002dSECRET\u002d0123456789abcdef"}}"#;
        let out = r(escaped, &[secret]);
        assert!(!out.to_lowercase().contains("0123456789"), "{out}");
        assert!(out.contains("[redacted]"), "{out}");
        let embedded = r("xupstream-SECRET-0123456789abcdefx", &[secret]);
        assert_eq!(embedded, "[redacted]");
        assert!(leaks(
            "Bearer sk-upstream-SECRET-0123456789abcdef",
            &[secret]
        ));
        assert!(leaks("realm=\"upstream-SECRET-0123\"", &[secret]));
        assert!(!leaks("application/json", &[secret]));
    }

    #[test]
    fn ordinary_error_text_is_left_alone() {
        let text = r#"{"error":{"message":"The model `gpt-4o-2024-08-06` does not exist","type":"invalid_request_error","param":"model","code":"model_not_found"}}"#;
        assert!(matches!(
            redact(text.as_bytes(), &["sk-secret-value"]),
            Cow::Borrowed(_)
        ));
        // A short run of the secret is not enough to take out an ordinary word.
        assert_eq!(r("the key", &["the-key-is-long"]), "the key");
    }
}
