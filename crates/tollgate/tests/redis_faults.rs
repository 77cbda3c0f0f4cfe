//! The Redis store when things go wrong: Redis killed and restarted mid-run, and
//! clients whose clocks disagree by minutes.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::RedisServer;
use tollgate::{Cost, Error, Limiter, ManualClock, Quota, StorePolicy};

/// What one limiter saw at each moment of the run.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Seen {
    Admitted,
    Limited,
    Unavailable,
}

/// Call `try_acquire` every 2 ms until `stop`, recording (ms since `t0`, outcome).
async fn hammer(l: Limiter, t0: Instant, stop: Arc<AtomicBool>) -> Vec<(u64, Seen)> {
    let mut out = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let call = l.try_acquire("tenant", Cost::request());
        let r = tokio::time::timeout(Duration::from_secs(2), call)
            .await
            .expect("no call may hang while Redis is down");
        let seen = match r {
            Ok(_) => Seen::Admitted,
            Err(Error::Limited(_)) => Seen::Limited,
            Err(Error::Unavailable(e)) => {
                assert!(e.to_string().contains("unavailable"), "{e}");
                Seen::Unavailable
            }
            Err(e) => panic!("unexpected error: {e}"),
        };
        let at = u64::try_from(t0.elapsed().as_millis()).expect("fits");
        out.push((at, seen));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_mid_run() {
    let mut server = RedisServer::start();
    let quota = || Quota::requests(100).per_second().burst(10);
    let closed = Limiter::builder()
        .redis(server.url())
        .prefix("closed:")
        .timeout(Duration::from_millis(100))
        .quota(quota())
        .build()
        .await
        .expect("fail-closed limiter");
    let open = Limiter::builder()
        .redis(server.url())
        .prefix("open:")
        .timeout(Duration::from_millis(100))
        .policy(StorePolicy::FailOpen { share: 0.5 })
        .quota(quota())
        .build()
        .await
        .expect("fail-open limiter");
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let a = tokio::spawn(hammer(closed.clone(), t0, stop.clone()));
    let b = tokio::spawn(hammer(open.clone(), t0, stop.clone()));

    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed = u64::try_from(t0.elapsed().as_millis()).expect("fits");
    server.kill();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let restarted = u64::try_from(t0.elapsed().as_millis()).expect("fits");
    server.restart();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    stop.store(true, Ordering::Relaxed);
    let a = a.await.expect("no panic in the fail-closed task");
    let b = b.await.expect("no panic in the fail-open task");

    // While down (after the first failed call, until the restart): fail-closed gives the
    // typed error, never an admission.
    let first_down = a
        .iter()
        .find(|(at, s)| *at >= killed && *s == Seen::Unavailable)
        .map(|(at, _)| *at)
        .expect("fail-closed reported the outage");
    assert!(
        first_down < killed + 200,
        "noticed after {} ms",
        first_down - killed
    );
    let admitted_while_down = a
        .iter()
        .filter(|(at, s)| *at > first_down && *at < restarted && *s == Seen::Admitted)
        .count();
    assert_eq!(
        admitted_while_down, 0,
        "fail-closed admitted while Redis was down"
    );

    // Fail-open kept admitting, at its share: 5 burst + 50/s.
    let down_ms = restarted - killed;
    let local: usize = b
        .iter()
        .filter(|(at, s)| *at >= killed && *at < restarted && *s == Seen::Admitted)
        .count();
    let allowed = 5.0 + 50.0 * (down_ms as f64 + 200.0) / 1000.0;
    assert!(
        local as f64 <= allowed,
        "{local} admitted locally, share allows {allowed}"
    );
    assert!(
        local as f64 >= 0.6 * 50.0 * down_ms as f64 / 1000.0,
        "only {local} admitted locally"
    );

    // Both back on Redis within 1 s of its return.
    let back = |log: &[(u64, Seen)]| {
        log.iter()
            .filter(|(at, s)| *at >= restarted && *s != Seen::Unavailable)
            .map(|(at, _)| *at)
            .next()
            .expect("calls succeed again after the restart")
    };
    let a_back = back(&a) - restarted;
    assert!(a_back <= 1_000, "fail-closed back after {a_back} ms");
    assert_eq!(closed.redis_up(), Some(true));
    assert_eq!(open.redis_up(), Some(true));
    assert!(closed.store_switches() >= 2 && open.store_switches() >= 2);
    let after: Vec<_> = a
        .iter()
        .filter(|(at, _)| *at >= restarted + 1_000)
        .collect();
    assert!(
        after.iter().all(|(_, s)| *s != Seen::Unavailable),
        "still unavailable after 1 s"
    );
    // On Redis again, the full rate applies to the fail-closed limiter: 100/s.
    let rate_after = after.iter().filter(|(_, s)| *s == Seen::Admitted).count();
    assert!(rate_after >= 30, "{rate_after} admitted in the last 500 ms");
    println!(
        "fault: outage noticed after {} ms; fail-open admitted {local} locally in {down_ms} ms \
         (share allows {allowed:.0}); fail-closed back {a_back} ms after the restart",
        first_down - killed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_build_reports_an_unreachable_redis() {
    let server = RedisServer::start();
    let url = server.url();
    drop(server);
    let t = Instant::now();
    let err = Limiter::builder()
        .redis(url)
        .timeout(Duration::from_millis(200))
        .quota(Quota::requests(1).per_second())
        .build()
        .await
        .expect_err("nothing listens there");
    assert!(matches!(err, Error::Unavailable(_)), "{err}");
    assert!(t.elapsed() < Duration::from_secs(2));
    let bad = Limiter::builder()
        .redis("not a url")
        .quota(Quota::requests(1).per_second())
        .build()
        .await
        .expect_err("a bad URL");
    assert!(matches!(bad, Error::Config(_)), "{bad}");
    let brace = Limiter::builder()
        .redis("redis://127.0.0.1:1")
        .prefix("a{b}")
        .quota(Quota::requests(1).per_second())
        .build()
        .await
        .expect_err("braces in the prefix");
    assert!(brace.to_string().contains("brace"), "{brace}");
}

/// Two limiters whose local clocks disagree by minutes (one frozen at zero, one hours
/// ahead) enforce one limit exactly: decisions run on Redis's clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skewed_client_clocks_share_one_exact_limit() {
    let server = RedisServer::start();
    let behind = ManualClock::new();
    let ahead = ManualClock::new();
    ahead.advance(Duration::from_secs(3 * 3600 + 7 * 60));
    let build = |clock: ManualClock| {
        Limiter::builder()
            .redis(server.url())
            .clock(clock.into())
            .quota(Quota::requests(10).per_minute().named("rpm"))
            .quota(Quota::requests(5).per_second().burst(5).named("rps"))
            .build()
    };
    let a = build(behind.clone()).await.expect("limiter a");
    let b = build(ahead.clone()).await.expect("limiter b");
    let mut admitted = 0;
    for i in 0..20 {
        let l = if i % 2 == 0 { &a } else { &b };
        if l.try_acquire("shared-user", Cost::request()).await.is_ok() {
            admitted += 1;
        }
        // Skew them further apart as they go.
        ahead.advance(Duration::from_secs(60));
    }
    assert_eq!(
        admitted, 5,
        "the per-second burst binds first, across both clients"
    );
    // Real time passes (on Redis's clock): 400 ms refills 2 of the per-second quota.
    tokio::time::sleep(Duration::from_millis(420)).await;
    let mut more = 0;
    for i in 0..10 {
        let l = if i % 2 == 0 { &b } else { &a };
        if l.try_acquire("shared-user", Cost::request()).await.is_ok() {
            more += 1;
        }
    }
    assert_eq!(more, 2, "exactly what 420 ms of Redis time refilled");
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let mut rest = 0;
    for i in 0..10 {
        let l = if i % 2 == 0 { &a } else { &b };
        if l.try_acquire("shared-user", Cost::request()).await.is_ok() {
            rest += 1;
        }
    }
    assert_eq!(rest, 3, "the per-minute quota caps the total at 10");
    let s = a.status("shared-user").await.expect("status");
    assert_eq!(s[0].remaining, 0);
}

/// Failing open, a call larger than this process's share (but within the real quota) is
/// not "too large" (that would say it can never fit): it is unavailable until Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_share_too_small_is_unavailable_not_too_large() {
    let mut server = RedisServer::start();
    let limiter = Limiter::builder()
        .redis(server.url())
        .timeout(Duration::from_millis(100))
        .policy(StorePolicy::FailOpen { share: 0.25 })
        .quota(Quota::tokens(100).per_minute())
        .build()
        .await
        .expect("limiter");
    limiter
        .try_acquire("u", Cost::input(50))
        .await
        .expect("on Redis");
    server.kill();
    let mut last = None;
    for _ in 0..3 {
        last = Some(limiter.try_acquire("u", Cost::input(50)).await);
    }
    match last.expect("called") {
        Err(Error::Unavailable(e)) => assert!(e.to_string().contains("share"), "{e}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    // Within the share, calls go on locally.
    limiter
        .try_acquire("u", Cost::input(20))
        .await
        .expect("within the local share");
    assert!(matches!(
        limiter.try_acquire("u", Cost::input(101)).await,
        Err(Error::TooLarge(_))
    ));
}
