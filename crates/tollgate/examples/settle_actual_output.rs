//! Acquire with the output estimate (max_tokens), call the model, settle with the actual
//! output (LLMRateLimiter's `acquire` then `adjust(record_id, actual_output)`). Tokens the
//! call did not use go back to the budget, so the calls after it wait less. Run twice on
//! the same workload: once dropping each permit (the estimate stands), once settling.
//!
//! Run: `cargo run -p tollgate --example settle_actual_output`

use std::time::{Duration, Instant};

use tollgate::{Cost, Limiter, Quota, Usage};

async fn run(settle: bool) -> Result<Duration, Box<dyn std::error::Error>> {
    // 6,000 tokens per second, at most 6,000 at once.
    let limiter = Limiter::builder()
        .quota(Quota::tokens(6_000).per_second())
        .build()?;
    let t0 = Instant::now();
    for call in 0..12u64 {
        // 500 prompt tokens, up to 1,500 completion tokens (max_tokens): 2,000 estimated.
        let permit = limiter
            .acquire("gpt-4o", Cost::input(500).output(1_500))
            .await?;
        let waited = permit.waited();
        tokio::time::sleep(Duration::from_millis(10)).await; // the model call
        let output = 100 + 20 * call; // what the response's usage says
        if settle {
            permit.settle(Usage::new(500, output)).await?;
        }
        println!("  call {call:>2}: waited {waited:>8.1?}, used 500 + {output} tokens");
    }
    Ok(t0.elapsed())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("without settle (each call keeps its 2,000-token estimate):");
    let estimate = run(false).await?;
    println!("with settle (each call is charged what it used):");
    let actual = run(true).await?;
    println!("12 calls: {estimate:.2?} charging estimates, {actual:.2?} charging actual usage");
    Ok(())
}
