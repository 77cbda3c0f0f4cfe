//! Retry with exponential backoff and full jitter on a 429, honouring the provider's
//! `retry-after` and rate-limit reset headers (OpenAI's cookbook: retry with random
//! exponential backoff). The "provider" here is a stand-in that answers 429 twice.
//!
//! Run: `cargo run -p tollgate --example retry_on_429`

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderMap, HeaderValue, StatusCode};
use tollgate::provider;
use tollgate::retry::{Attempt, Backoff, retry};

/// Stand-in for an HTTP call: 429 with OpenAI's headers twice, then 200.
fn fake_provider(calls: &AtomicU32) -> (StatusCode, HeaderMap) {
    let mut h = HeaderMap::new();
    h.insert(
        "x-ratelimit-limit-requests",
        HeaderValue::from_static("500"),
    );
    if calls.fetch_add(1, Ordering::SeqCst) < 2 {
        h.insert(
            "x-ratelimit-remaining-requests",
            HeaderValue::from_static("0"),
        );
        h.insert(
            "x-ratelimit-reset-requests",
            HeaderValue::from_static("120ms"),
        );
        h.insert("retry-after-ms", HeaderValue::from_static("150"));
        (StatusCode::TOO_MANY_REQUESTS, h)
    } else {
        h.insert(
            "x-ratelimit-remaining-requests",
            HeaderValue::from_static("499"),
        );
        (StatusCode::OK, h)
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let backoff = Backoff::builder()
        .base(Duration::from_millis(100))
        .cap(Duration::from_secs(10))
        .max_attempts(5)
        .build()?;
    let calls = AtomicU32::new(0);
    let t0 = Instant::now();
    let result = retry(&backoff, || async {
        let (status, headers) = fake_provider(&calls);
        let limits = provider::parse(&headers, SystemTime::now());
        println!(
            "{:>6.0?}: {status}, remaining requests {:?}",
            t0.elapsed(),
            limits.requests.as_ref().and_then(|b| b.remaining)
        );
        if status.is_success() {
            Attempt::Done(status)
        } else {
            // Wait what the provider asked (retry-after-ms), else back off with jitter.
            Attempt::for_status(
                status,
                std::io::Error::other(format!("HTTP {status}")),
                limits.wait_hint(),
            )
        }
    })
    .await?;
    println!(
        "succeeded with {result} after {} calls in {:.0?}",
        calls.load(Ordering::SeqCst),
        t0.elapsed()
    );
    Ok(())
}
