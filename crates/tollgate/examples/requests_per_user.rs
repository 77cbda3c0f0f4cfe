//! 10 requests per minute per user: the upstash handler's `FixedWindow(10, 60)` request
//! limit, checked before each call. The 11th request in the minute is refused with the
//! limit, what remains, when the window resets and when to retry.
//!
//! Run: `cargo run -p tollgate --example requests_per_user`

use tollgate::{Algorithm, Cost, Error, Limiter, Quota};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // FixedWindow(10, 60) exactly as upstash counts it. Drop `.algorithm(...)` for the
    // default GCRA, which spreads the same 10 per minute without a window-edge double burst.
    let limiter = Limiter::builder()
        .quota(
            Quota::requests(10)
                .per_minute()
                .algorithm(Algorithm::FixedWindow),
        )
        .build()?;

    for user in ["alice", "bob"] {
        let calls = if user == "alice" { 12 } else { 3 };
        for n in 1..=calls {
            match limiter.try_acquire(user, Cost::request()).await {
                Ok(_permit) => println!("{user} request {n:>2}: allowed"),
                Err(Error::Limited(r)) => println!(
                    "{user} request {n:>2}: refused by `{}` (limit {}, remaining {}, resets in {:.0?}, retry in {:.0?})",
                    r.quota(),
                    r.limit(),
                    r.remaining(),
                    r.reset(),
                    r.retry_after().unwrap_or_default()
                ),
                Err(e) => return Err(e.into()),
            }
        }
    }
    // What upstash's `limit()` reports, without consuming anything.
    for q in limiter.status("alice").await? {
        println!(
            "alice: {} of {} left in `{}`, resets in {:.0?}",
            q.remaining, q.limit, q.quota, q.reset
        );
    }
    Ok(())
}
