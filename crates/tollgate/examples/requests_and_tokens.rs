//! A request limit and a token limit at once (the upstash handler with both
//! `request_ratelimit` and `token_ratelimit`). One all-or-nothing decision: a call that
//! fits the request limit but not the token limit takes nothing from either.
//!
//! Run: `cargo run -p tollgate --example requests_and_tokens`

use tollgate::{Cost, Error, Limiter, Quota, Usage};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let limiter = Limiter::builder()
        .quota(Quota::requests(10).per_minute())
        .quota(Quota::tokens(2_000).per_minute())
        .build()?;

    for (n, prompt) in [400u64, 700, 600, 500, 300].into_iter().enumerate() {
        match limiter
            .try_acquire("team-a", Cost::input(prompt).output(100))
            .await
        {
            Ok(permit) => {
                permit.settle(Usage::new(prompt, 100)).await?;
                println!("call {}: {prompt} + 100 tokens admitted", n + 1);
            }
            Err(Error::Limited(r)) => println!(
                "call {}: refused by `{}`, {} left, retry in {:.1?}",
                n + 1,
                r.quota(),
                r.remaining(),
                r.retry_after().unwrap_or_default()
            ),
            Err(e) => return Err(e.into()),
        }
    }
    for q in limiter.status("team-a").await? {
        println!("`{}`: {} of {} left", q.quota, q.remaining, q.limit);
    }
    Ok(())
}
