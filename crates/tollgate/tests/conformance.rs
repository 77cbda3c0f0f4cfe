//! One behavioural suite, run against every store: whatever a user relies on holds the
//! same in memory, on one Redis and on a Redis Cluster. Each Redis test starts its own
//! `redis-server` (three of them for the cluster).

mod support;

use std::time::{Duration, Instant};

use support::{RedisCluster, RedisServer};
use tollgate::{Accounting, Algorithm, Cost, Error, Limiter, Quota, Usage};

/// A limiter on one store, keeping its Redis server alive as long as the test runs.
struct Fixture {
    limiter: Limiter,
    _server: Option<RedisServer>,
    _cluster: Option<RedisCluster>,
}

#[derive(Clone, Copy)]
enum Store {
    Memory,
    Redis,
    Cluster,
}

async fn fixture(store: Store, quotas: Vec<Quota>) -> Fixture {
    match store {
        Store::Memory => {
            let mut b = Limiter::builder();
            for q in quotas {
                b = b.quota(q);
            }
            Fixture {
                limiter: b.build().expect("valid quotas"),
                _server: None,
                _cluster: None,
            }
        }
        Store::Redis => {
            let server = RedisServer::start();
            let mut b = Limiter::builder()
                .redis(server.url())
                .status_with_decisions(true);
            for q in quotas {
                b = b.quota(q);
            }
            Fixture {
                limiter: b.build().await.expect("Redis limiter builds"),
                _server: Some(server),
                _cluster: None,
            }
        }
        Store::Cluster => {
            let cluster = RedisCluster::start();
            let mut b = Limiter::builder()
                .redis_cluster(cluster.urls())
                .status_with_decisions(true);
            for q in quotas {
                b = b.quota(q);
            }
            Fixture {
                limiter: b.build().await.expect("Redis Cluster limiter builds"),
                _server: None,
                _cluster: Some(cluster),
            }
        }
    }
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Store::Memory).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Store::Redis).await;
                }
            )*
        }
        mod cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Store::Cluster).await;
                }
            )*
        }
    };
}

conformance!(
    admits_up_to_the_limit_then_says_when_to_retry,
    all_dimensions_or_nothing,
    too_large_fails_at_once_naming_the_quota,
    waiting_callers_start_in_arrival_order_spaced_by_the_rate,
    acquire_within_fails_without_sleeping,
    a_cancelled_waiter_gives_its_turn_back,
    settle_refunds_what_was_not_used_and_charges_overruns,
    status_consumes_nothing,
    keys_are_independent_and_shared_quotas_are_not,
    concurrency_slots_are_held_until_the_permit_goes,
    fixed_window_counts_per_window,
    sliding_window_weighs_the_previous_window,
    bad_keys_are_typed_errors,
    a_quota_the_call_does_not_charge_does_not_hold_it_back,
    a_late_settle_never_refunds_into_a_newer_state,
    a_permit_reports_what_its_decision_left,
    a_cancelled_permit_gives_everything_back,
    each_quota_holds_a_call_back_no_longer_than_it_allows,
    a_concurrency_quota_holds_a_call_back_no_longer_than_it_allows,
    a_spend_budget_is_charged_what_calls_cost,
);

/// A budget in money: the estimate at admission, corrected to the real cost on settle,
/// and a call that would overspend refused, naming the budget.
async fn a_spend_budget_is_charged_what_calls_cost(store: Store) {
    let f = fixture(
        store,
        vec![
            Quota::spend(10_000).per_day().named("dollars"),
            Quota::requests(100).per_minute(),
        ],
    )
    .await;
    let p = f
        .limiter
        .try_acquire("u", Cost::input(1_000).output(500).spend(7_500))
        .await
        .expect("within the budget");
    let Err(Error::Limited(r)) = f
        .limiter
        .try_acquire("u", Cost::input(1_000).spend(3_000))
        .await
    else {
        panic!("7,500 + 3,000 is over 10,000");
    };
    assert_eq!(r.quota().name(), "dollars");
    assert!(r.retry_after() > Some(Duration::from_secs(3_600)), "{r:?}");
    p.settle(Usage::new(1_000, 100).spend(3_500))
        .await
        .expect("settle");
    let status = f.limiter.status("u").await.expect("status");
    assert_eq!(status[0].remaining, 6_500);
    f.limiter
        .try_acquire("u", Cost::input(1_000).spend(3_000))
        .await
        .expect("fits once the real cost is known");
    let status = f.limiter.status("other").await.expect("status");
    assert_eq!(status[0].remaining, 10_000, "budgets are per key");
}

/// A per-user quota that rejects next to an account quota that paces: the user over
/// their own limit gets an answer at once, naming their quota, even from `acquire`;
/// callers under theirs queue for the account, up to the account's own wait.
async fn each_quota_holds_a_call_back_no_longer_than_it_allows(store: Store) {
    let f = fixture(
        store,
        vec![
            Quota::requests(1)
                .per_minute()
                .max_wait(Duration::ZERO)
                .named("user-rpm"),
            Quota::requests(5)
                .per_second()
                .burst(1)
                .shared()
                .max_wait(Duration::from_secs(1))
                .named("account-rps"),
        ],
    )
    .await;
    f.limiter
        .acquire("a", Cost::request())
        .await
        .expect("first");
    let p = f
        .limiter
        .acquire("b", Cost::request())
        .await
        .expect("b waits for the account");
    assert!(p.waited() >= Duration::from_millis(150), "{:?}", p.waited());
    let t = Instant::now();
    let Err(Error::Limited(r)) = f.limiter.acquire("a", Cost::request()).await else {
        panic!("a is over its own limit, which never waits");
    };
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(r.quota().name(), "user-rpm");
    assert!(r.retry_after() > Some(Duration::from_secs(55)), "{r:?}");
    // Eight new users at once: the account admits about 1 s of them (one per 200 ms)
    // and refuses the rest at once, naming itself.
    let t = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let l = f.limiter.clone();
        tasks.push(tokio::spawn(async move {
            let key = format!("new-{i}");
            l.acquire(&key, Cost::request())
                .await
                .map(|_| Instant::now())
                .map_err(|e| match e {
                    Error::Limited(r) => (r.quota().name().to_string(), Instant::now()),
                    other => panic!("{other}"),
                })
        }));
    }
    let (mut admitted, mut refused) = (0, 0);
    for task in tasks {
        match task.await.expect("task") {
            Ok(at) => {
                admitted += 1;
                assert!(at - t < Duration::from_millis(1_600), "{:?}", at - t);
            }
            Err((quota, at)) => {
                refused += 1;
                assert_eq!(quota, "account-rps");
                assert!(
                    at - t < Duration::from_millis(500),
                    "refused at once: {:?}",
                    at - t
                );
            }
        }
    }
    assert!((3..=6).contains(&admitted), "{admitted} admitted");
    assert_eq!(admitted + refused, 8);
}

async fn a_concurrency_quota_holds_a_call_back_no_longer_than_it_allows(store: Store) {
    let f = fixture(
        store,
        vec![
            Quota::concurrent(1)
                .max_wait(Duration::from_millis(100))
                .named("slots"),
            Quota::requests(100).per_second(),
        ],
    )
    .await;
    let _held = f
        .limiter
        .try_acquire("u", Cost::request())
        .await
        .expect("the slot");
    let t = Instant::now();
    let Err(Error::Limited(r)) = f.limiter.acquire("u", Cost::request()).await else {
        panic!("the slot stays held");
    };
    assert_eq!(r.quota().name(), "slots");
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(90) && waited < Duration::from_secs(2),
        "gave up after {waited:?}"
    );
}

async fn a_cancelled_permit_gives_everything_back(store: Store) {
    let f = fixture(
        store,
        vec![
            Quota::requests(2).per_minute(),
            Quota::tokens(1_000).per_minute(),
            Quota::requests(3).per_minute().shared().named("account"),
            Quota::concurrent(1),
        ],
    )
    .await;
    let left = |s: Vec<tollgate::QuotaStatus>| s.iter().map(|s| s.remaining).collect::<Vec<_>>();
    let p = f
        .limiter
        .try_acquire("u", Cost::input(600))
        .await
        .expect("admitted");
    assert_eq!(
        left(f.limiter.status("u").await.expect("status")),
        vec![1, 400, 2, 0]
    );
    p.cancel();
    // Redis gives back without waiting for the answer: wait until it has landed.
    let t = Instant::now();
    loop {
        let now = left(f.limiter.status("u").await.expect("status"));
        if now == vec![2, 1_000, 3, 1] {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "not given back: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A waiting call's permit too, with another key charged in between.
    let p = f
        .limiter
        .acquire_within("u", Cost::input(600), Duration::from_secs(1))
        .await
        .expect("admitted");
    let other = f
        .limiter
        .try_acquire("v", Cost::input(100))
        .await
        .expect("v has its own");
    p.cancel();
    drop(other);
    let t = Instant::now();
    loop {
        let u = left(f.limiter.status("u").await.expect("status"));
        // The account keeps v's request only.
        if u == vec![2, 1_000, 2, 1] {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "not given back: {u:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Everything u had is usable again, and no more.
    let a = f
        .limiter
        .try_acquire("u", Cost::input(1_000))
        .await
        .expect("u's tokens");
    drop(a);
    f.limiter
        .try_acquire("u", Cost::request())
        .await
        .expect("u's second request");
    let Err(Error::Limited(r)) = f.limiter.try_acquire("w", Cost::request()).await else {
        panic!("the account's 3 are spent: v's, and u's two");
    };
    assert_eq!(r.quota().name(), "account");
}

async fn a_permit_reports_what_its_decision_left(store: Store) {
    let f = fixture(
        store,
        vec![
            Quota::requests(5).per_minute(),
            Quota::tokens(1_000).per_minute(),
            Quota::requests(8).per_minute().shared().named("account"),
            Quota::concurrent(3),
        ],
    )
    .await;
    let same = |a: &[tollgate::QuotaStatus], b: &[tollgate::QuotaStatus]| {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert_eq!(
                (&x.quota, x.limit, x.remaining),
                (&y.quota, y.limit, y.remaining)
            );
            assert!(
                x.reset.abs_diff(y.reset) < Duration::from_millis(50),
                "{x:?} vs {y:?}"
            );
        }
    };
    let first = f
        .limiter
        .try_acquire("u", Cost::input(300))
        .await
        .expect("first");
    let s = first.status().await.expect("status");
    let names: Vec<(u64, u64)> = s.iter().map(|s| (s.limit, s.remaining)).collect();
    assert_eq!(names, vec![(5, 4), (1_000, 700), (8, 7), (3, 2)]);
    same(&s, &f.limiter.status("u").await.expect("status"));
    // A waiting call (per-key, then shared quotas: two phases on Redis).
    let second = f
        .limiter
        .acquire_within("u", Cost::input(100), Duration::from_secs(1))
        .await
        .expect("second");
    let s = second.status().await.expect("status");
    let names: Vec<(u64, u64)> = s.iter().map(|s| (s.limit, s.remaining)).collect();
    assert_eq!(names, vec![(5, 3), (1_000, 600), (8, 6), (3, 1)]);
    same(&s, &f.limiter.status("u").await.expect("status"));
    assert!(s[1].reset > Duration::from_secs(23) && s[1].reset <= Duration::from_secs(24));
}

async fn admits_up_to_the_limit_then_says_when_to_retry(store: Store) {
    let f = fixture(store, vec![Quota::requests(3).per_minute().named("rpm")]).await;
    for _ in 0..3 {
        f.limiter
            .try_acquire("u", Cost::request())
            .await
            .expect("within the limit");
    }
    let Err(Error::Limited(r)) = f.limiter.try_acquire("u", Cost::request()).await else {
        panic!("the fourth call in a minute must be refused");
    };
    assert_eq!(r.quota().name(), "rpm");
    assert_eq!((r.limit(), r.remaining()), (3, 0));
    let retry = r.retry_after().expect("a rate quota says when");
    assert!(
        retry > Duration::from_secs(19) && retry <= Duration::from_secs(20),
        "{retry:?}"
    );
    assert!(r.reset() > Duration::from_secs(59), "{:?}", r.reset());
}

async fn all_dimensions_or_nothing(store: Store) {
    let f = fixture(
        store,
        vec![
            Quota::requests(10).per_minute(),
            Quota::tokens(1_000).per_minute(),
        ],
    )
    .await;
    f.limiter
        .try_acquire("u", Cost::input(900))
        .await
        .expect("fits");
    let err = f
        .limiter
        .try_acquire("u", Cost::input(200))
        .await
        .expect_err("tokens are short");
    assert_eq!(err.retry_after().map(|d| d > Duration::ZERO), Some(true));
    let status = f.limiter.status("u").await.expect("status");
    assert_eq!(status[0].remaining, 9, "the refused call took no request");
    assert_eq!(status[1].remaining, 100);
}

async fn too_large_fails_at_once_naming_the_quota(store: Store) {
    let f = fixture(store, vec![Quota::tokens(1_000).per_minute().named("tpm")]).await;
    let t = Instant::now();
    let Err(Error::TooLarge(e)) = f.limiter.acquire("u", Cost::input(1_001)).await else {
        panic!("a cost above the capacity can never fit");
    };
    assert!(t.elapsed() < Duration::from_secs(1));
    assert_eq!(
        (e.quota().name(), e.cost(), e.capacity()),
        ("tpm", 1_001, 1_000)
    );
}

async fn waiting_callers_start_in_arrival_order_spaced_by_the_rate(store: Store) {
    let f = fixture(store, vec![Quota::requests(20).per_second().burst(1)]).await;
    let t = Instant::now();
    let mut starts = Vec::new();
    for _ in 0..4 {
        let p = f
            .limiter
            .acquire("u", Cost::request())
            .await
            .expect("waits");
        starts.push((t.elapsed(), p.waited()));
    }
    // 50 ms apart: the fourth starts no earlier than 150 ms after the first.
    assert!(starts[3].0 >= Duration::from_millis(148), "{starts:?}");
    assert!(starts[3].0 < Duration::from_millis(1_000), "{starts:?}");
    let mut handles = Vec::new();
    for i in 0..5u32 {
        let l = f.limiter.clone();
        handles.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(u64::from(i) * 5)).await;
            let _p = l.acquire("v", Cost::request()).await.expect("waits");
            (i, Instant::now())
        }));
    }
    let mut done = Vec::new();
    for h in handles {
        done.push(h.await.expect("task"));
    }
    done.sort_by_key(|(_, at)| *at);
    let order: Vec<u32> = done.iter().map(|(i, _)| *i).collect();
    assert_eq!(order, vec![0, 1, 2, 3, 4], "FIFO by arrival");
}

async fn acquire_within_fails_without_sleeping(store: Store) {
    let f = fixture(store, vec![Quota::requests(1).per_minute()]).await;
    f.limiter
        .try_acquire("u", Cost::request())
        .await
        .expect("first");
    let t = Instant::now();
    let err = f
        .limiter
        .acquire_within("u", Cost::request(), Duration::from_secs(5))
        .await
        .expect_err("the next slot is a minute away");
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    assert!(err.retry_after() > Some(Duration::from_secs(55)));
}

async fn a_cancelled_waiter_gives_its_turn_back(store: Store) {
    let f = fixture(store, vec![Quota::requests(2).per_second().burst(1)]).await;
    f.limiter
        .try_acquire("u", Cost::request())
        .await
        .expect("first");
    // A waiter reserves the next slot (500 ms out), then gives up.
    let waiting = f.limiter.acquire("u", Cost::request());
    let gave_up = tokio::time::timeout(Duration::from_millis(50), waiting).await;
    assert!(gave_up.is_err(), "it was still waiting");
    tokio::time::sleep(Duration::from_millis(50)).await; // the cancel reaches the store
    let t = Instant::now();
    let p = f
        .limiter
        .acquire("u", Cost::request())
        .await
        .expect("the freed slot");
    // Without the refund this caller would start ~1 s after the first.
    assert!(
        t.elapsed() < Duration::from_millis(600),
        "{:?} {:?}",
        t.elapsed(),
        p.waited()
    );
}

async fn settle_refunds_what_was_not_used_and_charges_overruns(store: Store) {
    // Per day, so the few tokens that refill while the test runs do not show.
    let f = fixture(
        store,
        vec![
            Quota::tokens(10_000)
                .per_day()
                .accounting(Accounting::Actual),
            Quota::tokens(10_000)
                .per_day()
                .accounting(Accounting::Estimate)
                .named("estimate"),
        ],
    )
    .await;
    let p = f
        .limiter
        .acquire("u", Cost::input(1_000).output(4_000))
        .await
        .expect("fits");
    assert_eq!(
        f.limiter.status("u").await.expect("status")[0].remaining,
        5_000
    );
    p.settle(Usage::new(1_000, 500)).await.expect("settle");
    let s = f.limiter.status("u").await.expect("status");
    assert_eq!(
        s[0].remaining, 8_500,
        "actual accounting refunds the unused 3,500"
    );
    assert_eq!(
        s[1].remaining, 5_000,
        "estimate accounting keeps the estimate"
    );
    let p = f
        .limiter
        .acquire("u", Cost::input(100))
        .await
        .expect("fits");
    p.settle(Usage::new(100, 400)).await.expect("settle");
    let s = f.limiter.status("u").await.expect("status");
    assert_eq!(
        s[0].remaining, 8_000,
        "the 400 over the estimate are charged"
    );
}

async fn status_consumes_nothing(store: Store) {
    let f = fixture(store, vec![Quota::requests(2).per_minute()]).await;
    for _ in 0..5 {
        let s = f.limiter.status("u").await.expect("status");
        assert_eq!(
            (s[0].limit, s[0].remaining, s[0].reset),
            (2, 2, Duration::ZERO)
        );
    }
    f.limiter
        .try_acquire("u", Cost::request())
        .await
        .expect("first");
    let s = f.limiter.status("u").await.expect("status");
    assert_eq!(s[0].remaining, 1);
    assert!(s[0].reset > Duration::from_secs(29) && s[0].reset <= Duration::from_secs(30));
}

async fn keys_are_independent_and_shared_quotas_are_not(store: Store) {
    let f = fixture(
        store,
        vec![
            Quota::requests(2).per_minute(),
            Quota::requests(3).per_minute().shared().named("account"),
        ],
    )
    .await;
    f.limiter
        .try_acquire("a", Cost::request())
        .await
        .expect("a1");
    f.limiter
        .try_acquire("a", Cost::request())
        .await
        .expect("a2");
    assert!(
        f.limiter.try_acquire("a", Cost::request()).await.is_err(),
        "a's own limit"
    );
    f.limiter
        .try_acquire("b", Cost::request())
        .await
        .expect("b has its own");
    let Err(Error::Limited(r)) = f.limiter.try_acquire("c", Cost::request()).await else {
        panic!("the account allows 3 in all");
    };
    assert_eq!(r.quota().name(), "account");
}

async fn concurrency_slots_are_held_until_the_permit_goes(store: Store) {
    let f = fixture(
        store,
        vec![Quota::concurrent(1), Quota::requests(100).per_second()],
    )
    .await;
    let p = f
        .limiter
        .try_acquire("u", Cost::request())
        .await
        .expect("one slot");
    let Err(Error::Limited(r)) = f.limiter.try_acquire("u", Cost::request()).await else {
        panic!("the slot is held");
    };
    assert_eq!(
        r.retry_after(),
        None,
        "a slot frees when a call ends, not at a time"
    );
    f.limiter
        .try_acquire("other", Cost::request())
        .await
        .expect("per-key slots");
    let l = f.limiter.clone();
    let waiter = tokio::spawn(async move {
        l.acquire_within("u", Cost::request(), Duration::from_secs(5))
            .await
            .map(|_| ())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(p);
    waiter
        .await
        .expect("task")
        .expect("the slot passed on when the permit dropped");
}

async fn fixed_window_counts_per_window(store: Store) {
    let f = fixture(
        store,
        vec![
            Quota::requests(3)
                .per(Duration::from_millis(400))
                .algorithm(Algorithm::FixedWindow),
        ],
    )
    .await;
    // Wait for a fresh window so all three fit in one.
    let r = loop {
        match f.limiter.try_acquire("probe", Cost::request()).await {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    tokio::time::sleep(r.retry_after().expect("when the window ends")).await;
    for _ in 0..3 {
        f.limiter
            .try_acquire("u", Cost::request())
            .await
            .expect("within the window");
    }
    let r = f
        .limiter
        .try_acquire("u", Cost::request())
        .await
        .expect_err("window full");
    let retry = r.retry_after().expect("the next window");
    assert!(retry <= Duration::from_millis(400), "{retry:?}");
    tokio::time::sleep(retry).await;
    f.limiter
        .try_acquire("u", Cost::request())
        .await
        .expect("a new window");
}

async fn sliding_window_weighs_the_previous_window(store: Store) {
    let f = fixture(
        store,
        vec![
            Quota::requests(10)
                .per(Duration::from_secs(60))
                .algorithm(Algorithm::SlidingWindow),
        ],
    )
    .await;
    for _ in 0..10 {
        f.limiter
            .try_acquire("u", Cost::request())
            .await
            .expect("within");
    }
    let r = f
        .limiter
        .try_acquire("u", Cost::request())
        .await
        .expect_err("full");
    assert!(r.retry_after() > Some(Duration::ZERO));
    let s = f.limiter.status("u").await.expect("status");
    assert_eq!(s[0].remaining, 0);
}

async fn bad_keys_are_typed_errors(store: Store) {
    let f = fixture(store, vec![Quota::requests(1).per_second()]).await;
    assert!(matches!(
        f.limiter.try_acquire("", Cost::request()).await,
        Err(Error::InvalidKey(_))
    ));
    let long = "x".repeat(tollgate::MAX_KEY_LEN + 1);
    assert!(matches!(
        f.limiter.status(&long).await,
        Err(Error::InvalidKey(_))
    ));
    // Braces and percent signs are ordinary key characters.
    f.limiter
        .try_acquire("}{%7D", Cost::request())
        .await
        .expect("any bytes");
    f.limiter
        .try_acquire("%7D{", Cost::request())
        .await
        .expect("a different key");
}

async fn a_quota_the_call_does_not_charge_does_not_hold_it_back(store: Store) {
    let f = fixture(
        store,
        vec![
            Quota::requests(100).per_minute(),
            Quota::tokens(1_000).per_minute(),
        ],
    )
    .await;
    f.limiter
        .try_acquire("u", Cost::input(1_000))
        .await
        .expect("all the tokens");
    assert!(f.limiter.try_acquire("u", Cost::input(10)).await.is_err());
    // A call that costs no tokens is limited by requests only.
    f.limiter
        .try_acquire("u", Cost::request())
        .await
        .expect("no tokens asked, none needed");
    let t = Instant::now();
    f.limiter
        .acquire("u", Cost::request())
        .await
        .expect("no wait behind the tokens");
    assert!(t.elapsed() < Duration::from_millis(500));
}

async fn a_late_settle_never_refunds_into_a_newer_state(store: Store) {
    let f = fixture(
        store,
        vec![
            Quota::tokens(1_000)
                .per_second()
                .accounting(Accounting::Actual),
        ],
    )
    .await;
    let early = f
        .limiter
        .acquire("u", Cost::input(500))
        .await
        .expect("fits");
    // Long enough for an idle state to be forgotten (Redis expires it 1 s after it refills).
    tokio::time::sleep(Duration::from_millis(1_800)).await;
    let _late = f
        .limiter
        .acquire("u", Cost::input(1_000))
        .await
        .expect("a full bucket");
    // The early call used nothing: its 500 must not come out of the newer charge.
    early.settle(Usage::new(0, 0)).await.expect("settle");
    let left = f.limiter.status("u").await.expect("status")[0].remaining;
    assert!(
        left < 300,
        "{left} left: the early call's refund landed on the later charge"
    );
}
