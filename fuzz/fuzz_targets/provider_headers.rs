//! Provider rate-limit header parsing never panics on any header values, and what it
//! reads is within its documented bounds.
#![no_main]

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

const NAMES: [&str; 16] = [
    "x-ratelimit-limit-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
    "retry-after",
    "retry-after-ms",
    "anthropic-ratelimit-requests-limit",
    "anthropic-ratelimit-requests-remaining",
    "anthropic-ratelimit-requests-reset",
    "anthropic-ratelimit-tokens-remaining",
    "anthropic-ratelimit-input-tokens-reset",
    "anthropic-ratelimit-output-tokens-limit",
    "x-ms-region",
    "x-ratelimit-remaining-requests-day",
];

fuzz_target!(|data: &[u8]| {
    let mut headers = HeaderMap::new();
    // Each header: one byte picks the name, one the length, then the value's bytes.
    let mut rest = data;
    while rest.len() >= 2 {
        let name = NAMES[rest[0] as usize % NAMES.len()];
        let len = (rest[1] as usize).min(rest.len() - 2);
        let value = &rest[2..2 + len];
        rest = &rest[2 + len..];
        if let Ok(v) = HeaderValue::from_bytes(value) {
            headers.append(HeaderName::from_static(name), v);
        }
        if let Ok(s) = std::str::from_utf8(value) {
            if let Some(d) = tollgate::provider::parse_duration(s) {
                // What it reads, it writes back the same (to the millisecond).
                let again = tollgate::provider::format_duration(d);
                let back = tollgate::provider::parse_duration(&again).expect("reads its own format");
                assert!(back >= d && back - d < Duration::from_millis(1), "{s} -> {again}");
            }
        }
    }
    let parsed = tollgate::provider::RateLimitHeaders::parse(&headers, SystemTime::UNIX_EPOCH);
    if let Some(w) = parsed.wait_hint() {
        assert!(w <= tollgate::provider::MAX_WAIT, "a wait past the cap: {w:?}");
    }
    for b in parsed.budgets() {
        let _ = (b.is_empty(), b.is_exhausted());
    }
});
