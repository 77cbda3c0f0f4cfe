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

/// Whether a word looks like a credential: one of `secrets` or a run of one at least
/// [`MIN_PART`] long, a known key prefix with something after it, or a masked key
/// (`****`).
fn is_credential(word: &str, secrets: &[&str]) -> bool {
    let core = word.trim_end_matches(['.', '/', '=']);
    if core.len() < 4 {
        return false;
    }
    if core.contains("***") {
        return true;
    }
    if KEY_PREFIXES
        .iter()
        .any(|p| core.starts_with(p) && core.len() >= p.len() + 4)
    {
        return true;
    }
    secrets
        .iter()
        .any(|s| !s.is_empty() && (s.contains(core) && core.len() >= MIN_PART || core.contains(s)))
}

/// `text` with every word that looks like a credential (see [`is_credential`])
/// replaced by `[redacted]`. Text that is not UTF-8 is read lossily.
pub(crate) fn redact<'a>(text: &'a [u8], secrets: &[&str]) -> Cow<'a, [u8]> {
    let s = String::from_utf8_lossy(text);
    let mut out = String::with_capacity(s.len());
    let mut changed = matches!(s, Cow::Owned(_));
    let mut rest: &str = &s;
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
            changed = true;
        } else {
            out.push_str(word);
        }
        rest = &rest[end..];
    }
    if changed {
        Cow::Owned(out.into_bytes())
    } else {
        Cow::Borrowed(text)
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
