//! Split input/output token limits (GCP Vertex AI: 4,000,000 input and 128,000 output
//! tokens per minute, 360 requests per minute), as LLMRateLimiter's split mode. Output is
//! estimated up front and settled with the actual count.
//!
//! Run: `cargo run -p tollgate --example split_input_output`

use tollgate::{Cost, Limiter, Quota, Usage};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let limiter = Limiter::builder()
        .quota(Quota::input_tokens(4_000_000).per_minute())
        .quota(Quota::output_tokens(128_000).per_minute())
        .quota(Quota::requests(360).per_minute())
        .build()?;

    // Estimate 2,048 output tokens (the max_tokens we ask for) ...
    let permit = limiter
        .acquire("gemini-1.5-pro", Cost::input(5_000).output(2_048))
        .await?;
    print_status(&limiter, "after acquire").await?;
    // ... the model wrote 612: settle refunds the other 1,436 output tokens.
    permit.settle(Usage::new(5_000, 612)).await?;
    print_status(&limiter, "after settle").await?;
    Ok(())
}

async fn print_status(limiter: &Limiter, when: &str) -> Result<(), tollgate::Error> {
    println!("-- {when}");
    for q in limiter.status("gemini-1.5-pro").await? {
        println!(
            "{:>22}: {:>9} of {:>9} left",
            q.quota.to_string(),
            q.remaining,
            q.limit
        );
    }
    Ok(())
}
