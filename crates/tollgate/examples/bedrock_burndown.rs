//! AWS Bedrock's burndown rate: output tokens count 5× toward tokens per minute, so a call
//! with 3,000 input and 1,000 output tokens takes 3,000 + 5 × 1,000 = 8,000 tokens.
//!
//! Run: `cargo run -p tollgate --example bedrock_burndown`

use tollgate::{Cost, Error, Limiter, Quota};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let tpm = Quota::tokens(100_000).per_minute().burndown(5.0);
    let cost = Cost::input(3_000).output(1_000);
    println!(
        "one call takes {} of the 100,000 tokens per minute",
        tpm.charge(&cost)
    );
    let limiter = Limiter::builder()
        .quota(tpm)
        .quota(Quota::requests(100).per_minute())
        .build()?;

    let mut admitted = 0;
    loop {
        match limiter.try_acquire("claude-sonnet", cost).await {
            Ok(_permit) => admitted += 1,
            Err(Error::Limited(r)) => {
                println!(
                    "{admitted} calls admitted; the next is refused by `{}` with {} tokens left (retry in {:.1?})",
                    r.quota(),
                    r.remaining(),
                    r.retry_after().unwrap_or_default()
                );
                break;
            }
            Err(e) => return Err(e.into()),
        }
    }
    // A call that can never fit (3,000 + 5 × 20,000 > 100,000) fails at once.
    match limiter
        .acquire("claude-sonnet", Cost::input(3_000).output(20_000))
        .await
    {
        Err(e @ Error::TooLarge(_)) => println!("too large: {e}"),
        other => return Err(format!("expected a too-large error, got {other:?}").into()),
    }
    Ok(())
}
