//! Token limits per user, as the upstash handler offers them: checked before each LLM
//! call and charged after it with the prompt tokens only, or with prompt + completion
//! tokens (`include_output_tokens=True`).
//!
//! Run: `cargo run -p tollgate --example token_limits`

use tollgate::{Cost, Error, Limiter, Quota, Usage};

/// Stand-in for a model call: reports the usage a provider would.
async fn call_model(prompt_tokens: u64) -> Usage {
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    Usage::new(prompt_tokens, 180)
}

async fn run(title: &str, limiter: &Limiter) -> Result<(), Box<dyn std::error::Error>> {
    println!("-- {title}");
    let prompt = "Summarise the meeting notes below in three bullet points. ".repeat(20);
    // Offline count of the prompt, per-message overhead included.
    let messages = [tollgate::tokens::Message::new("user", &prompt)];
    let prompt_tokens = tollgate::tokens::count_chat("gpt-4o-mini", &messages);
    for n in 1..=6 {
        match limiter
            .try_acquire("user-42", Cost::input(prompt_tokens))
            .await
        {
            Ok(permit) => {
                let usage = call_model(prompt_tokens).await;
                permit.settle(usage).await?; // charge what the call actually used
                let left = &limiter.status("user-42").await?[0];
                println!(
                    "call {n}: {prompt_tokens} prompt + {} completion tokens; {} left",
                    usage.output, left.remaining
                );
            }
            Err(Error::Limited(r)) => {
                println!(
                    "call {n}: refused, {} tokens left; retry in {:.1?}",
                    r.remaining(),
                    r.retry_after().unwrap_or_default()
                );
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Prompt tokens only: an input-token quota ignores completion tokens.
    let prompt_only = Limiter::builder()
        .quota(Quota::input_tokens(1_000).per_minute())
        .build()?;
    run("prompt tokens only", &prompt_only).await?;

    // Prompt + completion: a combined token quota, charged with actual usage on settle.
    let prompt_and_completion = Limiter::builder()
        .quota(Quota::tokens(1_000).per_minute())
        .build()?;
    run("prompt + completion tokens", &prompt_and_completion).await?;
    Ok(())
}
