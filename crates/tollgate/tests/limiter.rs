//! Behaviour of the limiter as a user sees it: never over a limit, FIFO waits, refunds on
//! cancel and settle, concurrency slots freed, idle keys forgotten, clear errors.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use tollgate::{
    Accounting, Algorithm, Clock, ConfigError, Cost, Error, KeyError, Limiter, ManualClock, Quota,
    Usage,
};

fn manual(quotas: Vec<Quota>) -> (Limiter, ManualClock) {
    let clock = ManualClock::new();
    let mut b = Limiter::builder().clock(Clock::from(clock.clone()));
    for q in quotas {
        b = b.quota(q);
    }
    (b.build().unwrap(), clock)
}

/// Let spawned tasks run until they block.
async fn settle_tasks() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn ten_requests_per_minute_per_user() {
    let (limiter, clock) = manual(vec![Quota::requests(10).per_minute()]);
    for _ in 0..10 {
        limiter.try_acquire("alice", Cost::request()).await.unwrap();
    }
    let Err(Error::Limited(r)) = limiter.try_acquire("alice", Cost::request()).await else {
        panic!("the 11th request in a minute must be refused");
    };
    assert_eq!(r.quota().name(), "requests/60s");
    assert_eq!((r.limit(), r.remaining()), (10, 0));
    assert_eq!(r.retry_after(), Some(Duration::from_secs(6)));
    assert_eq!(r.reset(), Duration::from_secs(60));
    // Another user is untouched.
    limiter.try_acquire("bob", Cost::request()).await.unwrap();
    // Six seconds later one more request fits, and only one.
    clock.advance(Duration::from_secs(6));
    limiter.try_acquire("alice", Cost::request()).await.unwrap();
    assert!(limiter.try_acquire("alice", Cost::request()).await.is_err());
}

#[tokio::test]
async fn multi_dimension_decisions_are_all_or_nothing() {
    let (limiter, _clock) = manual(vec![
        Quota::requests(100).per_minute(),
        Quota::tokens(1_000).per_minute(),
    ]);
    limiter.try_acquire("u", Cost::input(900)).await.unwrap();
    let err = limiter
        .try_acquire("u", Cost::input(200))
        .await
        .unwrap_err();
    let Error::Limited(r) = err else { panic!() };
    assert_eq!(r.quota().name(), "tokens/60s");
    // The refused call took no request.
    let status = limiter.status("u").await.unwrap();
    assert_eq!(status[0].remaining, 99);
    assert_eq!(status[1].remaining, 100);
}

#[tokio::test]
async fn a_cost_over_capacity_fails_at_once_naming_the_quota() {
    let (limiter, _clock) = manual(vec![
        Quota::requests(10).per_minute(),
        Quota::tokens(100_000)
            .per_minute()
            .burndown(5.0)
            .named("bedrock-tpm"),
    ]);
    // 3,000 + 5 × 20,000 = 103,000 > 100,000: waiting would never help.
    let err = limiter
        .acquire("u", Cost::input(3_000).output(20_000))
        .await
        .unwrap_err();
    let Error::TooLarge(e) = &err else {
        panic!("{err:?}")
    };
    assert_eq!(
        (e.quota().name(), e.cost(), e.capacity()),
        ("bedrock-tpm", 103_000, 100_000)
    );
    assert!(err.to_string().contains("never be admitted"));
    // Absurd costs saturate into the same error, never overflow.
    let err = limiter
        .acquire("u", Cost::input(u64::MAX).output(u64::MAX))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::TooLarge(_)));
    let err = limiter
        .try_acquire("u", Cost::request().requests(u64::MAX))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::TooLarge(_)));
}

#[tokio::test]
async fn waiters_start_in_arrival_order() {
    let (limiter, clock) = manual(vec![Quota::requests(1).per_second()]);
    let limiter = Arc::new(limiter);
    limiter.try_acquire("k", Cost::request()).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..20u32 {
        let (limiter, tx) = (limiter.clone(), tx.clone());
        tokio::spawn(async move {
            let p = limiter.acquire("k", Cost::request()).await.unwrap();
            tx.send((i, p.waited())).unwrap();
        });
        settle_tasks().await; // task i has reserved before task i + 1 arrives
    }
    for step in 1..=20u32 {
        clock.advance(Duration::from_secs(1));
        settle_tasks().await;
        let (i, waited) = rx.try_recv().unwrap();
        assert_eq!(i + 1, step, "waiter {i} started at step {step}");
        assert_eq!(waited, Duration::from_secs(u64::from(step)));
        assert!(rx.try_recv().is_err(), "two starts in one second");
    }
}

#[tokio::test]
async fn a_waiter_that_gives_up_hands_its_turn_back() {
    let (limiter, clock) = manual(vec![Quota::tokens(100).per_second()]);
    let limiter = Arc::new(limiter);
    limiter.try_acquire("k", Cost::input(100)).await.unwrap();
    // A waits for 100 tokens (1 s away), then gives up.
    let a = {
        let limiter = limiter.clone();
        tokio::spawn(async move { limiter.acquire("k", Cost::input(100)).await.map(|_| ()) })
    };
    settle_tasks().await;
    a.abort();
    assert!(a.await.unwrap_err().is_cancelled());
    // B arrives after: it gets A's turn (start at 1 s), not the one after it (2 s).
    let b = {
        let limiter = limiter.clone();
        tokio::spawn(async move {
            limiter
                .acquire("k", Cost::input(100))
                .await
                .unwrap()
                .waited()
        })
    };
    settle_tasks().await;
    clock.advance(Duration::from_secs(1));
    assert_eq!(b.await.unwrap(), Duration::from_secs(1));
}

#[tokio::test]
async fn a_cancelled_last_waiter_leaves_no_trace() {
    // 100 tokens per second. A waiter for 100 tokens (a full second away) gives up half
    // a second later: the 50 tokens refilled meanwhile are there for the next caller at
    // once, as if the waiter had never come.
    let (limiter, clock) = manual(vec![Quota::tokens(100).per_second()]);
    let limiter = Arc::new(limiter);
    limiter.try_acquire("k", Cost::input(100)).await.unwrap();
    let waiter = {
        let limiter = limiter.clone();
        tokio::spawn(async move { limiter.acquire("k", Cost::input(100)).await.map(|_| ()) })
    };
    settle_tasks().await;
    clock.advance(Duration::from_millis(500));
    waiter.abort();
    assert!(waiter.await.unwrap_err().is_cancelled());
    limiter.try_acquire("k", Cost::input(50)).await.unwrap();
}

#[tokio::test]
async fn a_key_waiting_on_its_own_limit_does_not_hold_up_other_keys() {
    // One request per minute per key, and an account-wide token budget. "x" has used its
    // request and waits a minute for the next; "y" must not wait behind it.
    let (limiter, clock) = manual(vec![
        Quota::requests(1).per_minute(),
        Quota::tokens(10_000).per_minute().shared().named("account"),
    ]);
    let limiter = Arc::new(limiter);
    limiter.try_acquire("x", Cost::input(100)).await.unwrap();
    let x = {
        let limiter = limiter.clone();
        tokio::spawn(async move {
            limiter
                .acquire("x", Cost::input(100))
                .await
                .map(|p| p.waited())
        })
    };
    settle_tasks().await;
    limiter.try_acquire("y", Cost::input(100)).await.unwrap();
    let s = limiter.status("y").await.unwrap();
    assert_eq!(
        s[1].remaining,
        10_000 - 200,
        "x's waiting call holds no account tokens yet"
    );
    clock.advance(Duration::from_secs(60));
    assert_eq!(x.await.unwrap().unwrap(), Duration::from_secs(60));
    // A minute later the earlier 200 tokens have refilled; x's call took its 100 now.
    assert_eq!(
        limiter.status("x").await.unwrap()[1].remaining,
        10_000 - 100
    );
}

#[tokio::test]
async fn a_waiter_that_gives_up_between_phases_leaves_the_account_untouched() {
    // x waits for its own quota, then the account is full past its deadline: the call
    // fails naming the account, and x's own reservation is handed back.
    let (limiter, clock) = manual(vec![
        Quota::requests(1).per_second(),
        Quota::tokens(1_000).per_minute().shared().named("account"),
    ]);
    let limiter = Arc::new(limiter);
    limiter.try_acquire("x", Cost::input(10)).await.unwrap();
    let x = {
        let limiter = limiter.clone();
        tokio::spawn(async move {
            limiter
                .acquire_within("x", Cost::input(500), Duration::from_secs(2))
                .await
                .map(|_| ())
        })
    };
    settle_tasks().await;
    limiter.try_acquire("y", Cost::input(990)).await.unwrap(); // the account is now full
    clock.advance(Duration::from_secs(1));
    settle_tasks().await;
    let Err(Error::Limited(r)) = x.await.unwrap() else {
        panic!("the account cannot take 500 tokens within the deadline");
    };
    assert_eq!(r.quota().name(), "account");
    // x's request reserved for 1 s was given back: x can make its next call now.
    limiter.try_acquire("x", Cost::input(0)).await.unwrap();
}

#[tokio::test]
async fn a_key_queued_for_its_own_slot_holds_no_shared_slot() {
    let (limiter, _clock) = manual(vec![
        Quota::concurrent(1),
        Quota::concurrent(2).shared().named("account-slots"),
    ]);
    let limiter = Arc::new(limiter);
    let _held = limiter.try_acquire("x", Cost::request()).await.unwrap();
    // Two more calls for "x" queue for x's single slot.
    let mut queued = Vec::new();
    for _ in 0..2 {
        let limiter = limiter.clone();
        queued.push(tokio::spawn(async move {
            limiter.acquire("x", Cost::request()).await.map(|_| ())
        }));
    }
    settle_tasks().await;
    // "y" still gets the account's second slot.
    limiter.try_acquire("y", Cost::request()).await.unwrap();
    for q in queued {
        q.abort();
    }
}

#[tokio::test]
async fn acquire_within_fails_without_sleeping_when_the_start_is_too_late() {
    let (limiter, _clock) = manual(vec![Quota::requests(2).per_minute()]);
    limiter.try_acquire("k", Cost::request()).await.unwrap();
    limiter.try_acquire("k", Cost::request()).await.unwrap();
    // The manual clock never moves: if this slept, the test would hang.
    let err = limiter
        .acquire_within("k", Cost::request(), Duration::from_secs(29))
        .await
        .unwrap_err();
    assert_eq!(err.retry_after(), Some(Duration::from_secs(30)));
    // Nothing was reserved by the refusal: a 30 s budget gets the 30 s slot.
    let fut = limiter.acquire_within("k", Cost::request(), Duration::from_secs(30));
    tokio::pin!(fut);
    assert!(futures_poll_once(fut.as_mut()).await.is_none());
}

/// Poll a future once; `None` if it is pending.
async fn futures_poll_once<F: std::future::Future + Unpin>(mut fut: F) -> Option<F::Output> {
    std::future::poll_fn(|cx| match std::pin::Pin::new(&mut fut).poll(cx) {
        std::task::Poll::Ready(v) => std::task::Poll::Ready(Some(v)),
        std::task::Poll::Pending => std::task::Poll::Ready(None),
    })
    .await
}

#[tokio::test]
async fn settle_refunds_unused_tokens_and_charges_overruns() {
    let (limiter, _clock) = manual(vec![
        Quota::tokens(10_000).per_minute(),
        Quota::tokens(10_000)
            .per_minute()
            .accounting(Accounting::Estimate)
            .named("estimate"),
    ]);
    let p = limiter
        .acquire("u", Cost::input(1_000).output(4_000))
        .await
        .unwrap();
    p.settle(Usage::new(1_000, 500)).await.unwrap();
    let s = limiter.status("u").await.unwrap();
    assert_eq!(s[0].remaining, 8_500, "actual accounting refunds 3,500");
    assert_eq!(
        s[1].remaining, 5_000,
        "estimate accounting keeps the estimate"
    );
    let p = limiter
        .acquire("u", Cost::input(100).output(100))
        .await
        .unwrap();
    p.settle(Usage::new(100, 1_100)).await.unwrap();
    let s = limiter.status("u").await.unwrap();
    assert_eq!(s[0].remaining, 8_500 - 1_200, "an overrun is charged");
}

#[tokio::test]
async fn a_dropped_permit_keeps_the_estimate_and_frees_its_slot() {
    let (limiter, _clock) = manual(vec![
        Quota::tokens(1_000).per_minute(),
        Quota::concurrent(2),
    ]);
    let a = limiter.try_acquire("u", Cost::input(100)).await.unwrap();
    let b = limiter.try_acquire("u", Cost::input(100)).await.unwrap();
    let Err(Error::Limited(r)) = limiter.try_acquire("u", Cost::input(100)).await else {
        panic!("two slots are taken");
    };
    assert_eq!(r.quota().name(), "concurrency");
    assert_eq!(r.retry_after(), None);
    drop(a);
    b.settle(Usage::new(10, 0)).await.unwrap();
    let s = limiter.status("u").await.unwrap();
    assert_eq!(s[0].remaining, 1_000 - 100 - 10);
    assert_eq!(s[1].remaining, 2);
    // A refused call took no token.
    limiter.try_acquire("u", Cost::input(100)).await.unwrap();
}

#[tokio::test]
async fn concurrency_waiters_are_served_in_order_and_time_out() {
    let (limiter, clock) = manual(vec![Quota::concurrent(1)]);
    let limiter = Arc::new(limiter);
    let held = limiter.try_acquire("u", Cost::request()).await.unwrap();
    let l2 = limiter.clone();
    let waiter = tokio::spawn(async move {
        l2.acquire_within("u", Cost::request(), Duration::from_secs(5))
            .await
            .map(|p| p.waited())
    });
    settle_tasks().await;
    clock.advance(Duration::from_secs(6));
    let err = waiter.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Limited(_)));
    let l3 = limiter.clone();
    let waiter = tokio::spawn(async move { l3.acquire("u", Cost::request()).await.is_ok() });
    settle_tasks().await;
    drop(held);
    assert!(waiter.await.unwrap());
}

#[tokio::test]
async fn shared_quotas_bind_all_keys_together() {
    let (limiter, _clock) = manual(vec![
        Quota::requests(3).per_minute(),
        Quota::requests(4).per_minute().shared().named("account"),
    ]);
    for key in ["a", "a", "a", "b"] {
        limiter.try_acquire(key, Cost::request()).await.unwrap();
    }
    let Err(Error::Limited(r)) = limiter.try_acquire("c", Cost::request()).await else {
        panic!("the account's 4 requests are used");
    };
    assert_eq!(r.quota().name(), "account");
    let Err(Error::Limited(r)) = limiter.try_acquire("a", Cost::request()).await else {
        panic!()
    };
    // Both bind for "a"; the refusal names one that refused.
    assert!(["account", "requests/60s"].contains(&r.quota().name()));
}

#[tokio::test]
async fn idle_keys_are_forgotten() {
    let (limiter, clock) = manual(vec![Quota::requests(5).per_second()]);
    for round in 0..20u32 {
        for i in 0..10_000u32 {
            let key = format!("user-{round}-{i}");
            limiter.try_acquire(&key, Cost::request()).await.unwrap();
        }
        clock.advance(Duration::from_secs(1));
    }
    // 200,000 distinct keys went through; only about the last rounds' stay.
    let tracked = limiter.tracked_keys();
    assert!(tracked <= 40_000, "{tracked} keys held");
}

#[tokio::test]
async fn bad_input_is_a_typed_error() {
    let (limiter, _clock) = manual(vec![Quota::requests(5).per_second()]);
    assert_eq!(
        limiter.try_acquire("", Cost::request()).await.unwrap_err(),
        Error::InvalidKey(KeyError::Empty)
    );
    let long = "k".repeat(tollgate::MAX_KEY_LEN + 1);
    assert!(matches!(
        limiter.acquire(&long, Cost::request()).await,
        Err(Error::InvalidKey(KeyError::TooLong(_)))
    ));
    assert!(limiter.status("").await.is_err());

    let build = |q: Quota| Limiter::builder().quota(q).build().unwrap_err();
    assert!(matches!(
        build(Quota::requests(0).per_minute()),
        ConfigError::ZeroAmount { .. }
    ));
    assert!(matches!(
        build(Quota::requests(1)),
        ConfigError::MissingPeriod { .. }
    ));
    assert!(matches!(
        build(Quota::requests(1).per(Duration::ZERO)),
        ConfigError::BadPeriod { .. }
    ));
    assert!(matches!(
        build(Quota::requests(1).per(Duration::MAX)),
        ConfigError::BadPeriod { .. }
    ));
    assert!(matches!(
        build(Quota::requests(1).per_second().burst(0)),
        ConfigError::BadBurst { .. }
    ));
    assert!(matches!(
        build(Quota::requests(10).per_second().burst_multiplier(f64::NAN)),
        ConfigError::BadBurst { .. }
    ));
    assert!(matches!(
        build(Quota::requests(10).per_second().burst_multiplier(0.01)),
        ConfigError::BadBurst { .. }
    ));
    assert!(matches!(
        build(Quota::tokens(10).per_second().burndown(-1.0)),
        ConfigError::BadBurndown { .. }
    ));
    assert!(matches!(
        build(Quota::requests(10).per_second().burndown(2.0)),
        ConfigError::BurndownNotForDimension { .. }
    ));
    assert!(matches!(
        build(
            Quota::requests(10)
                .per_second()
                .algorithm(Algorithm::FixedWindow)
                .burst(3)
        ),
        ConfigError::BurstNotSupported { .. }
    ));
    assert!(matches!(
        build(Quota::concurrent(2).per_second()),
        ConfigError::NotForConcurrency { .. }
    ));
    assert!(matches!(
        build(Quota::tokens(u64::MAX).per(Duration::from_secs(u64::MAX / 1_000_000_000))),
        ConfigError::Overflow { .. }
    ));
    assert_eq!(
        Limiter::builder().build().unwrap_err(),
        ConfigError::NoQuotas
    );
    let dup = Limiter::builder()
        .quota(Quota::requests(1).per_second())
        .quota(Quota::requests(2).per_second())
        .build()
        .unwrap_err();
    assert!(matches!(dup, ConfigError::DuplicateName { .. }));
    assert!(dup.to_string().contains(".named("));
}

#[derive(Debug, Clone)]
struct Step {
    dt_ms: u64,
    key: usize,
    input: u64,
    output: u64,
    used_pct: u64,
    /// Settle the pending call at this position (modulo), if any ...
    settle: Option<usize>,
    /// ... or call it off (`Permit::cancel`): it never happened.
    cancel: bool,
}

fn step() -> impl Strategy<Value = Step> {
    (
        0..400u64,
        0..3usize,
        1..2_000u64,
        0..2_000u64,
        0..=100u64,
        proptest::option::of(any::<usize>()),
        proptest::bool::weighted(0.2),
    )
        .prop_map(
            |(dt_ms, key, input, output, used_pct, settle, cancel)| Step {
                dt_ms,
                key,
                input,
                output,
                used_pct,
                settle,
                cancel,
            },
        )
}

fn assert_bound(events: &[(u64, u64)], burst: u128, rate_per_s: u128) {
    let mut events = events.to_vec();
    events.sort_unstable();
    for i in 0..events.len() {
        let mut sum = 0u128;
        for e in &events[i..] {
            sum += u128::from(e.1);
            let len_ns = u128::from(e.0 - events[i].0);
            assert!(
                sum * 1_000_000_000 <= burst * 1_000_000_000 + rate_per_s * len_ns,
                "{sum} tokens in {len_ns} ns over burst {burst} rate {rate_per_s}/s"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Through the whole limiter: with per-key and shared token quotas, settles that
    /// refund part of each estimate and cancels that give a call back whole (at any
    /// later time, in any order) never let any key, or all keys together, exceed
    /// burst + rate × length in any interval, counting what the calls actually used at
    /// their start (a cancelled call used nothing).
    #[test]
    fn settled_usage_never_exceeds_the_bound(steps in proptest::collection::vec(step(), 1..150)) {
        const KEYS: [&str; 3] = ["key-0", "key-1", "key-2"];
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let (limiter, clock) = manual(vec![
                Quota::tokens(6_000).per_second().burst(4_000),
                Quota::tokens(9_000).per_second().shared().named("account"),
            ]);
            let mut per_key: Vec<Vec<(u64, u64)>> = vec![Vec::new(); 3];
            let mut all: Vec<(u64, u64)> = Vec::new();
            let mut pending = Vec::new();
            let mut now = 0u64;
            for s in steps {
                clock.advance(Duration::from_millis(s.dt_ms));
                now += s.dt_ms * 1_000_000;
                let cost = Cost::input(s.input).output(s.output);
                if let Ok(p) = limiter.try_acquire(KEYS[s.key], cost).await {
                    let used = Usage::new(s.input * s.used_pct / 100, s.output * s.used_pct / 100);
                    per_key[s.key].push((now, used.input + used.output));
                    all.push((now, used.input + used.output));
                    pending.push((p, used, s.key, per_key[s.key].len() - 1, all.len() - 1));
                }
                if let (Some(i), false) = (s.settle, pending.is_empty()) {
                    let (p, used, key, at_key, at_all) = pending.swap_remove(i % pending.len());
                    if s.cancel {
                        p.cancel();
                        per_key[key][at_key].1 = 0;
                        all[at_all].1 = 0;
                    } else {
                        p.settle(used).await.unwrap();
                    }
                }
            }
            for (p, used, ..) in pending {
                p.settle(used).await.unwrap();
            }
            for events in &per_key {
                assert_bound(events, 4_000, 6_000);
            }
            assert_bound(&all, 9_000, 9_000);
        });
    }
}

#[tokio::test]
async fn provider_headers_pull_the_view_down_but_never_up() {
    let (limiter, _clock) = manual(vec![
        Quota::requests(60).per_minute(),
        Quota::tokens(6_000).per_minute(),
    ]);
    let headers = |requests: &str, tokens: &str| {
        let mut h = http::HeaderMap::new();
        h.insert(
            "x-ratelimit-remaining-requests",
            requests.parse().expect("value"),
        );
        h.insert(
            "x-ratelimit-remaining-tokens",
            tokens.parse().expect("value"),
        );
        tollgate::provider::parse(&h, std::time::SystemTime::now())
    };
    // The provider has less left than the limiter thinks: another app uses the key.
    let charged = limiter
        .absorb("acct", &headers("50", "1000"), Duration::ZERO)
        .await
        .expect("absorb");
    assert_eq!(charged, vec![10, 5_000]);
    let status = limiter.status("acct").await.expect("status");
    assert_eq!((status[0].remaining, status[1].remaining), (50, 1_000));
    // Headers two seconds old: what refilled since (2 requests, 200 tokens) is allowed for.
    let charged = limiter
        .absorb("acct", &headers("45", "900"), Duration::from_secs(2))
        .await
        .expect("absorb");
    assert_eq!(charged, vec![3, 0]);
    // More left at the provider than here: nothing is given back.
    let charged = limiter
        .absorb("acct", &headers("60", "6000"), Duration::ZERO)
        .await
        .expect("absorb");
    assert_eq!(charged, vec![0, 0]);
    assert_eq!(
        limiter.status("acct").await.expect("status")[0].remaining,
        47
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_absorbed_at_once_charge_the_excess_once() {
    let (limiter, _clock) = manual(vec![Quota::tokens(90_000).per_minute()]);
    let mut h = http::HeaderMap::new();
    h.insert(
        "x-ratelimit-remaining-tokens",
        "30000".parse().expect("value"),
    );
    let seen = tollgate::provider::parse(&h, std::time::SystemTime::now());
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let limiter = limiter.clone();
            tokio::spawn(async move { limiter.absorb("acct", &seen, Duration::ZERO).await })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("join").expect("absorb")[0];
    }
    assert_eq!(total, 60_000, "one excess, charged once");
    assert_eq!(
        limiter.status("acct").await.expect("status")[0].remaining,
        30_000
    );
}

/// Tiers of users with their own per-user limits spend one account-wide budget.
#[tokio::test]
async fn limiters_sharing_an_account_spend_one_budget() {
    let account = || {
        [
            Quota::tokens(1_000)
                .per_minute()
                .shared()
                .named("account-tpm"),
            Quota::concurrent(2).shared().named("account-slots"),
        ]
    };
    let mut free = Limiter::builder().quota(Quota::tokens(300).per_minute());
    // The account's quotas sit at other positions in pro than in free.
    let mut pro = Limiter::builder()
        .quota(Quota::tokens(900).per_minute())
        .quota(Quota::requests(1_000).per_minute());
    for q in account() {
        free = free.quota(q.clone());
        pro = pro.quota(q);
    }
    let free = free.build().unwrap();
    let pro = pro.share_with(&free).build().unwrap();
    let a = free.try_acquire("alice", Cost::input(300)).await.unwrap();
    let b = pro.try_acquire("bob", Cost::input(600)).await.unwrap();
    // Both account slots are held, one by each tier.
    let Err(Error::Limited(r)) = pro.try_acquire("carol", Cost::input(1)).await else {
        panic!("the shared slots are full");
    };
    assert_eq!(r.quota().name(), "account-slots");
    drop((a, b));
    // 900 of the account's 1,000 tokens are spent: bob's own 300 left cannot be used.
    let Err(Error::Limited(r)) = pro.try_acquire("bob", Cost::input(200)).await else {
        panic!("the account is nearly spent");
    };
    assert_eq!(r.quota().name(), "account-tpm");
    pro.try_acquire("bob", Cost::input(100)).await.unwrap();
    assert_eq!(free.status("alice").await.unwrap()[1].remaining, 0);
}

#[test]
fn sharing_needs_the_same_shared_quotas() {
    let one = Limiter::builder()
        .quota(Quota::requests(10).per_minute().shared())
        .build()
        .unwrap();
    let err = Limiter::builder()
        .quota(Quota::requests(20).per_minute().shared())
        .share_with(&one)
        .build()
        .unwrap_err();
    assert!(
        err.to_string().contains("the shared quotas differ"),
        "{err}"
    );
    let err = Limiter::builder()
        .quota(Quota::requests(10).per_minute())
        .share_with(&one)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("no shared quota"), "{err}");
}

/// Tiers × accounts: each limiter shares its users' states with the limiters of the same
/// tier and its account's states with the limiters of the same account.
#[tokio::test]
async fn tiers_times_accounts_share_both_ways() {
    let user = || Quota::requests(3).per_minute().named("user-rpm");
    let acct = |n: u64, name: &str| Quota::requests(n).per_minute().shared().named(name);
    let free_a = Limiter::builder()
        .quota(user())
        .quota(acct(4, "a"))
        .build()
        .unwrap();
    let free_b = Limiter::builder()
        .quota(user())
        .quota(acct(100, "b"))
        .share_keys_with(&free_a)
        .build()
        .unwrap();
    let pro_a = Limiter::builder()
        .quota(Quota::requests(100).per_minute().named("user-rpm"))
        .quota(acct(4, "a"))
        .share_with(&free_a)
        .build()
        .unwrap();
    // Alice (free) spends her 3 across both accounts.
    free_a.try_acquire("alice", Cost::request()).await.unwrap();
    free_b.try_acquire("alice", Cost::request()).await.unwrap();
    free_b.try_acquire("alice", Cost::request()).await.unwrap();
    let Err(Error::Limited(r)) = free_a.try_acquire("alice", Cost::request()).await else {
        panic!("alice's own limit holds across accounts");
    };
    assert_eq!(r.quota().name(), "user-rpm");
    // Account a has 4: alice took 1, bob (pro) takes 3, then it is spent for everyone.
    for _ in 0..3 {
        pro_a.try_acquire("bob", Cost::request()).await.unwrap();
    }
    let Err(Error::Limited(r)) = pro_a.try_acquire("bob", Cost::request()).await else {
        panic!("account a is spent");
    };
    assert_eq!(r.quota().name(), "a");
    let Err(Error::Limited(r)) = free_a.try_acquire("carol", Cost::request()).await else {
        panic!("account a is spent for the free tier too");
    };
    assert_eq!(r.quota().name(), "a");
    free_b.try_acquire("carol", Cost::request()).await.unwrap();
}

/// Callers racing on one key never see a quota with room refuse them: the time a
/// decision uses is read in the order decisions are made. (Read before the lock, a call
/// overtaken by one that read the clock later found that call's start after its own now,
/// and `try_acquire` refused it with "retry after 0.000s".)
#[test]
fn racing_callers_are_never_refused_by_a_quota_with_room() {
    let limiter = Limiter::builder()
        .quota(Quota::requests(1_000_000_000).per_minute())
        .quota(Quota::tokens(1_000_000_000_000).per_minute().shared())
        .build()
        .unwrap();
    let refused: u64 = std::thread::scope(|s| {
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let l = &limiter;
                s.spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .build()
                        .unwrap();
                    rt.block_on(async {
                        let mut refused = 0;
                        for _ in 0..200_000 {
                            if l.try_acquire("k", Cost::input(24)).await.is_err() {
                                refused += 1;
                            }
                        }
                        refused
                    })
                })
            })
            .collect();
        tasks.into_iter().map(|t| t.join().unwrap()).sum()
    });
    assert_eq!(refused, 0, "refused with room to spare");
}
