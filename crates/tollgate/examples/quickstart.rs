//! tollgate's main job on the embedded in-memory store, offline: 200 calls from 8 users
//! race for one provider account (50 requests and 5,000 tokens per second, shared) while
//! each user also has their own 2,000 tokens per second and 4 calls in flight. Calls wait
//! their turn (FIFO), settle with actual usage, and the run checks that no window ever
//! held more than the account's limits allow.
//!
//! Run: `cargo run -p tollgate --example quickstart`

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tollgate::{Cost, Limiter, Quota, Usage};

const USERS: usize = 8;
const CALLS: usize = 200;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let limiter = Limiter::builder()
        .quota(Quota::tokens(2_000).per_second().named("user-tps"))
        .quota(
            Quota::requests(50)
                .per_second()
                .burst(10)
                .shared()
                .named("account-rps"),
        )
        .quota(
            Quota::tokens(5_000)
                .per_second()
                .burst(1_000)
                .shared()
                .named("account-tps"),
        )
        .quota(Quota::concurrent(4).named("user-in-flight"))
        .build()?;
    let prompt = "Translate to French: the limiter keeps every call inside its budget.";
    let prompt_tokens = tollgate::tokens::count_chat(
        "gpt-4o-mini",
        &[tollgate::tokens::Message::new("user", prompt)],
    );
    let log = Arc::new(Mutex::new(Vec::<(Duration, u64)>::new()));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for n in 0..CALLS {
        let (limiter, log) = (limiter.clone(), log.clone());
        tasks.push(tokio::spawn(async move {
            let user = format!("user-{}", n % USERS);
            // Estimate: the prompt plus max_tokens = 60.
            let permit = limiter
                .acquire(&user, Cost::input(prompt_tokens).output(60))
                .await?;
            let started = t0.elapsed();
            tokio::time::sleep(Duration::from_millis(40)).await; // the model call
            let output = 20 + (n as u64 * 7) % 40; // what the model wrote
            permit.settle(Usage::new(prompt_tokens, output)).await?;
            log.lock()
                .expect("log")
                .push((started, prompt_tokens + output));
            Ok::<_, tollgate::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let elapsed = t0.elapsed();
    let mut log = log.lock().expect("log").clone();
    log.sort();
    // Account limits: 10 requests at once, then 50 per second; 1,000 tokens at once,
    // then 5,000 per second. Check every window between two starts.
    let mut worst_requests: f64 = 0.0;
    let mut worst_tokens: f64 = 0.0;
    for i in 0..log.len() {
        let mut tokens = 0;
        for (j, (t, used)) in log.iter().enumerate().skip(i) {
            tokens += used;
            let secs = (*t - log[i].0).as_secs_f64();
            worst_requests = worst_requests.max((j - i + 1) as f64 / (10.0 + 50.0 * secs));
            worst_tokens = worst_tokens.max(tokens as f64 / (1_000.0 + 5_000.0 * secs));
        }
    }
    let tokens: u64 = log.iter().map(|e| e.1).sum();
    let secs = elapsed.as_secs_f64();
    println!(
        "{CALLS} calls from {USERS} users in {elapsed:.2?}: {:.1} requests/s (limit: a burst of 10, then 50/s), {:.0} tokens/s used",
        CALLS as f64 / secs,
        tokens as f64 / secs
    );
    println!(
        "fullest window vs. the account's request limit: {:.1} % (never above 100)",
        worst_requests * 100.0
    );
    println!(
        "fullest window vs. the account's token limit:   {:.1} % (never above 100)",
        worst_tokens * 100.0
    );
    for q in limiter.status("user-0").await? {
        println!("user-0 `{}`: {} of {} left", q.quota, q.remaining, q.limit);
    }
    assert!(
        worst_requests <= 1.0 && worst_tokens <= 1.0,
        "a limit was exceeded"
    );
    Ok(())
}
