//! A decision for a key the limiter already holds allocates nothing on the heap.
//!
//! dhat counts every thread's allocations, so this test runs without libtest's harness
//! (`harness = false`): no other thread can allocate during the measurement.
#![allow(clippy::unwrap_used)]

use tollgate::{Cost, Limiter, Quota, Usage};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

fn main() {
    decisions_for_a_known_key_do_not_allocate();
    println!("test decisions_for_a_known_key_do_not_allocate ... ok");
}

fn decisions_for_a_known_key_do_not_allocate() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let limiter = Limiter::builder()
        .quota(Quota::requests(1_000_000).per_minute())
        .quota(Quota::tokens(1_000_000_000).per_minute().burndown(5.0))
        .quota(Quota::input_tokens(1_000_000_000).per_minute())
        .quota(Quota::output_tokens(1_000_000_000).per_minute())
        .quota(
            Quota::tokens(2_000_000_000)
                .per_minute()
                .shared()
                .named("account"),
        )
        .quota(Quota::concurrent(8))
        .build()
        .unwrap();
    let cost = Cost::input(3_000).output(2_000);
    rt.block_on(async {
        // First sight of the key allocates its entry.
        limiter.try_acquire("user-42", cost).await.unwrap();
        let before = dhat::HeapStats::get();
        for _ in 0..1_000 {
            let p = limiter.try_acquire("user-42", cost).await.unwrap();
            p.settle(Usage::new(3_000, 1_000)).await.unwrap();
            let p = limiter.acquire("user-42", cost).await.unwrap();
            drop(p);
        }
        let after = dhat::HeapStats::get();
        dhat::assert_eq!(after.total_blocks, before.total_blocks);
    });
}
