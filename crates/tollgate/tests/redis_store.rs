//! What the Redis store keeps, and for how long: O(1) state per identity, idle keys that
//! expire, concurrency leases that are renewed while held and freed when their process
//! dies, and recovery from a flushed script cache or a flushed database.

mod support;

use std::time::{Duration, Instant};

use support::RedisServer;
use tollgate::redis::AsyncCommands;
use tollgate::{Cost, Error, Limiter, Quota};

async fn conn(server: &RedisServer) -> tollgate::redis::aio::MultiplexedConnection {
    tollgate::redis::Client::open(server.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_per_identity_is_constant_whatever_the_traffic() {
    let server = RedisServer::start();
    let limiter = Limiter::builder()
        .redis(server.url())
        .prefix("o1:")
        .quota(Quota::requests(1_000_000).per_minute())
        .quota(Quota::tokens(100_000_000).per_minute())
        .build()
        .await
        .expect("limiter");
    let mut c = conn(&server).await;
    limiter
        .try_acquire("alice", Cost::input(10))
        .await
        .expect("first");
    let key = "o1:k{alice}";
    let len: usize = c.strlen(key).await.expect("strlen");
    let size = |c: &mut tollgate::redis::aio::MultiplexedConnection| {
        let mut c = c.clone();
        async move {
            let v: Option<u64> = tollgate::redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(key)
                .query_async(&mut c)
                .await
                .expect("memory usage");
            v.expect("the key exists")
        }
    };
    let before = size(&mut c).await;
    for _ in 0..10_000 {
        limiter
            .try_acquire("alice", Cost::input(10))
            .await
            .expect("within the limits");
    }
    let after = size(&mut c).await;
    let len_after: usize = c.strlen(key).await.expect("strlen");
    assert_eq!((len, len_after), (112, 112), "one 56-byte record per quota");
    assert_eq!(
        before, after,
        "10,000 calls later the identity takes the same memory"
    );
    let keys: Vec<String> = c.keys("o1:*").await.expect("keys");
    assert_eq!(keys, vec![key.to_string()], "one key per identity");
    println!("state per identity with two quotas: {after} bytes (MEMORY USAGE)");
}

/// Mid-deploy, two versions of an application share a prefix with different quotas: the
/// quotas they have in common are one budget, and neither erases the other's records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_configurations_share_common_quotas_and_keep_each_others() {
    let server = RedisServer::start();
    let old = Limiter::builder()
        .redis(server.url())
        .quota(Quota::requests(4).per_minute())
        .build()
        .await
        .expect("old");
    let new = Limiter::builder()
        .redis(server.url())
        .quota(Quota::requests(4).per_minute())
        .quota(Quota::tokens(1_000).per_minute())
        .build()
        .await
        .expect("new");
    new.try_acquire("u", Cost::input(600)).await.expect("new 1");
    old.try_acquire("u", Cost::input(600)).await.expect("old 1");
    old.try_acquire("u", Cost::input(600)).await.expect("old 2");
    // The tokens record survived the old version's writes: 400 tokens left.
    let err = new
        .try_acquire("u", Cost::input(600))
        .await
        .expect_err("tokens");
    assert!(err.to_string().contains("tokens"), "{err}");
    new.try_acquire("u", Cost::input(400)).await.expect("new 2");
    // Requests are one budget: 4 in all.
    assert!(old.try_acquire("u", Cost::input(1)).await.is_err());
    assert_eq!(old.status("u").await.expect("status")[0].remaining, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_identities_expire() {
    let server = RedisServer::start();
    let limiter = Limiter::builder()
        .redis(server.url())
        .prefix("exp:")
        .quota(Quota::requests(10).per(Duration::from_millis(100)))
        .build()
        .await
        .expect("limiter");
    let mut c = conn(&server).await;
    limiter
        .try_acquire("bob", Cost::request())
        .await
        .expect("first");
    let ttl: i64 = c.pttl("exp:k{bob}").await.expect("pttl");
    assert!(ttl > 0 && ttl <= 1_200, "expires once idle: {ttl} ms");
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    let exists: bool = c.exists("exp:k{bob}").await.expect("exists");
    assert!(!exists, "an idle identity leaves nothing behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_slots_are_renewed_and_a_dead_process_frees_them() {
    let server = RedisServer::start();
    let build = || {
        Limiter::builder()
            .redis(server.url())
            .lease(Duration::from_millis(300))
            .quota(Quota::concurrent(1))
            .build()
    };
    let a = build().await.expect("limiter a");
    let b = build().await.expect("limiter b");
    let permit = a.try_acquire("u", Cost::request()).await.expect("the slot");
    // Held for three lease times: renewed, so nobody else gets it.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let Err(Error::Limited(_)) = b.try_acquire("u", Cost::request()).await else {
        panic!("a held slot must stay held while its permit lives");
    };
    // Released on drop: free at once.
    drop(permit);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let p = b
        .try_acquire("u", Cost::request())
        .await
        .expect("released slot");
    drop(p);
    tokio::time::sleep(Duration::from_millis(50)).await;
    // A process that dies holding a slot: it neither releases nor renews it.
    let permit = a
        .try_acquire("u", Cost::request())
        .await
        .expect("the slot again");
    std::mem::forget(permit);
    drop(a);
    let t = Instant::now();
    let p = b
        .acquire_within("u", Cost::request(), Duration::from_secs(3))
        .await
        .expect("the dead process's slot frees when its lease ends");
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(150),
        "freed after {waited:?}"
    );
    assert!(
        waited <= Duration::from_millis(900),
        "freed after {waited:?}"
    );
    let s = b.status("u").await.expect("status");
    assert_eq!(s[0].remaining, 0);
    drop(p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushed_scripts_and_data_are_recovered() {
    let server = RedisServer::start();
    let limiter = Limiter::builder()
        .redis(server.url())
        .quota(Quota::requests(2).per_minute())
        .build()
        .await
        .expect("limiter");
    let mut c = conn(&server).await;
    limiter.try_acquire("u", Cost::request()).await.expect("1");
    let _: () = tollgate::redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut c)
        .await
        .expect("script flush");
    limiter
        .try_acquire("u", Cost::request())
        .await
        .expect("2, after NOSCRIPT reload");
    assert!(
        limiter.try_acquire("u", Cost::request()).await.is_err(),
        "state survived"
    );
    let _: () = tollgate::redis::cmd("FLUSHALL")
        .query_async(&mut c)
        .await
        .expect("flushall");
    // The state is gone: counting restarts from a full quota (documented).
    limiter
        .try_acquire("u", Cost::request())
        .await
        .expect("fresh after FLUSHALL");
    assert_eq!(limiter.redis_up(), Some(true));
}

/// A quota whose capacity × period is too large to count in microseconds is counted in
/// coarser units (here 1 ms); it must still never exceed burst + rate × length and still
/// use its whole rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coarse_time_units_stay_exact() {
    let server = RedisServer::start();
    let rate_per_s = 100_000u64;
    let limiter = Limiter::builder()
        .redis(server.url())
        .quota(Quota::tokens(rate_per_s * 3600).per_hour().burst(1_000_000))
        .build()
        .await
        .expect("limiter");
    // Drain the burst.
    while limiter.try_acquire("u", Cost::input(100_000)).await.is_ok() {}
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let l = limiter.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while t0.elapsed() < Duration::from_millis(1_500) {
                l.acquire("u", Cost::input(2_000)).await.expect("waits");
                got.push(t0.elapsed());
            }
            got
        }));
    }
    let mut at: Vec<Duration> = Vec::new();
    for t in tasks {
        at.extend(t.await.expect("task"));
    }
    at.sort();
    let n = at.len();
    // Bound over every interval, with 5 ms of observation slack (at most a few calls of
    // refill, plus whatever the drain left).
    for i in 0..n {
        for j in i..n {
            let len = (at[j] - at[i]).as_secs_f64() + 0.005;
            let admitted = 2_000 * (j - i + 1) as u64;
            let allowed = 100_000.0 + rate_per_s as f64 * len;
            assert!(admitted as f64 <= allowed, "{admitted} in {len:.4} s");
        }
    }
    let span = (at[n - 1] - at[0]).as_secs_f64();
    let used = 2_000.0 * (n - 1) as f64;
    let utilization = used / (rate_per_s as f64 * span);
    assert!(
        utilization >= 0.99,
        "utilization {utilization:.4} over {span:.3} s"
    );
}

/// A budget too large for second units (a month of micro-dollars) counts in days on
/// Redis: it still charges, refunds, refuses and reports exactly, and never sees more
/// time pass than has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_monthly_budget_counts_in_days_and_stays_exact() {
    let server = RedisServer::start();
    let budget = 100_000_000_000; // $100,000 in micro-dollars
    let limiter = Limiter::builder()
        .redis(server.url())
        .quota(Quota::spend(budget).per(Duration::from_secs(30 * 86_400)))
        .build()
        .await
        .expect("a month of micro-dollars fits on Redis");
    let p = limiter
        .try_acquire("team", Cost::input(1).spend(60_000_000_000))
        .await
        .expect("within the budget");
    let Err(Error::Limited(r)) = limiter
        .try_acquire("team", Cost::input(1).spend(50_000_000_000))
        .await
    else {
        panic!("60 + 50 is over 100 thousand dollars");
    };
    // The month refills $3,333 a day: $10,000 more takes three days or more.
    assert!(
        r.retry_after() >= Some(Duration::from_secs(2 * 86_400)),
        "{r:?}"
    );
    p.settle(tollgate::Usage::new(1, 0).spend(20_000_000_000))
        .await
        .expect("settle");
    // Counted in days, the budget sees time as the start of the current day and charges
    // a call at the end of it: what is left lags by at most one day's refill ($3,333),
    // never more than is really left.
    let left = limiter.status("team").await.expect("status")[0].remaining;
    assert!(
        (80_000_000_000 - 3_333_333_334..=80_000_000_000).contains(&left),
        "{left} left after $20,000"
    );
    limiter
        .try_acquire("team", Cost::input(1).spend(50_000_000_000))
        .await
        .expect("fits once the real cost is known");
}

/// On a cluster, concurrent calls for many identities (spread over every node) and one
/// account-wide quota: each batch goes to its own slot, and the shared quota, reserved
/// after each identity's own, admits exactly its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_many_identities_one_shared_budget() {
    let cluster = support::RedisCluster::start();
    let limiter = Limiter::builder()
        .redis_cluster(cluster.urls())
        .quota(Quota::requests(3).per_minute())
        .quota(Quota::requests(100).per_minute().shared().named("account"))
        .build()
        .await
        .expect("limiter");
    let mut tasks = Vec::new();
    for t in 0..64 {
        let l = limiter.clone();
        tasks.push(tokio::spawn(async move {
            let mut ok = 0;
            for i in 0..10 {
                let key = format!("user-{}", (t * 10 + i) % 80);
                if l.try_acquire(&key, Cost::request()).await.is_ok() {
                    ok += 1;
                }
            }
            ok
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        admitted += t.await.expect("task");
    }
    assert_eq!(
        admitted, 100,
        "the account quota binds exactly across the cluster"
    );
    // Calls the account refused gave their identity's reservation back (the give-backs
    // are sent without waiting for a reply, so let them land first). A give-back never
    // returns units that later calls of the same identity may have been admitted on, so
    // when an identity's refused calls are given back out of order, a few units stay
    // charged until they refill: never fewer than admitted, a few more at most.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut charged = 0;
    for k in 0..80 {
        let s = limiter.status(&format!("user-{k}")).await.expect("status");
        charged += 3 - s[0].remaining;
    }
    assert!(
        charged >= 100,
        "every admitted call is charged to its identity"
    );
    // Without give-backs every identity would hold its 3 (240 in all): most of the 140
    // reservations the account refused must have come back.
    assert!(
        charged <= 160,
        "refused calls were given back: {charged} charged for 100 admitted"
    );
    println!("cluster: {charged} charged to identities for 100 admitted (240 without give-backs)");
    let s = limiter.status("anyone").await.expect("status");
    assert_eq!(s[1].remaining, 0);
}

/// `rediss://` (TLS) and `unix://` URLs reach the same store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_unix_socket_urls() {
    let (_server, tls, unix) = RedisServer::start_tls_and_unix();
    let build = |url: String| {
        Limiter::builder()
            .redis(url)
            .quota(Quota::requests(3).per_minute())
            .build()
    };
    let over_tls = build(tls).await.expect("limiter over TLS");
    let over_unix = build(unix).await.expect("limiter over a unix socket");
    over_tls
        .try_acquire("u", Cost::request())
        .await
        .expect("1 over TLS");
    over_unix
        .try_acquire("u", Cost::request())
        .await
        .expect("2 over the socket");
    over_tls
        .try_acquire("u", Cost::request())
        .await
        .expect("3 over TLS");
    assert!(
        over_unix.try_acquire("u", Cost::request()).await.is_err(),
        "one budget"
    );
}

/// Redis restarts empty while a permit holds a concurrency slot: the next renewal takes
/// the slot again, so another process still cannot exceed the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_lost_in_a_restart_is_taken_again() {
    let mut server = RedisServer::start();
    let build = || {
        Limiter::builder()
            .redis(server.url())
            .timeout(Duration::from_millis(100))
            .lease(Duration::from_millis(300))
            .quota(Quota::concurrent(1))
            .build()
    };
    let a = build().await.expect("limiter a");
    let b = build().await.expect("limiter b");
    let permit = a.try_acquire("u", Cost::request()).await.expect("the slot");
    server.kill();
    server.restart();
    // Both notice the restart and return; a's next renewal (every 100 ms) takes the slot
    // again. Until then b may get it (a's call then runs over the limit, and Redis logs
    // it); from then on b is refused.
    let t = Instant::now();
    let mut refused_in_a_row = 0;
    while refused_in_a_row < 5 {
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "the slot was not taken again"
        );
        match b.try_acquire("u", Cost::request()).await {
            Err(Error::Limited(_)) => refused_in_a_row += 1,
            _ => refused_in_a_row = 0,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("slot held again {:?} after the restart", t.elapsed());
    drop(permit);
    tokio::time::sleep(Duration::from_millis(50)).await;
    b.try_acquire("u", Cost::request()).await.expect("released");
}

/// A foreign key of another type under the prefix fails the calls that touch it, with a
/// clear error, and nobody else's: the other operations of the same batch go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_key_fails_only_its_own_calls() {
    let server = RedisServer::start();
    let limiter = Limiter::builder()
        .redis(server.url())
        .quota(Quota::requests(1_000).per_minute())
        .build()
        .await
        .expect("limiter");
    let mut c = conn(&server).await;
    let _: () = c
        .hset("tollgate:k{squatter}", "f", "v")
        .await
        .expect("hset");
    let mut tasks = Vec::new();
    for i in 0..32 {
        let l = limiter.clone();
        tasks.push(tokio::spawn(async move {
            let key = if i % 8 == 0 {
                "squatter".to_string()
            } else {
                format!("user-{i}")
            };
            (
                i % 8 == 0,
                l.try_acquire(&key, Cost::request()).await.map(|_| ()),
            )
        }));
    }
    for t in tasks {
        let (squatter, r) = t.await.expect("task");
        if squatter {
            let Err(Error::Unavailable(e)) = r else {
                panic!("the foreign key's calls fail: {r:?}");
            };
            assert!(e.to_string().contains("WRONGTYPE"), "{e}");
        } else {
            r.expect("everyone else is decided as usual");
        }
    }
    assert_eq!(
        limiter.redis_up(),
        Some(true),
        "a refused operation is not an outage"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_reports_its_status_without_another_round_trip() {
    let server = RedisServer::start();
    let build = |prefix: &'static str, with: bool| {
        Limiter::builder()
            .redis(server.url())
            .prefix(prefix)
            .status_with_decisions(with)
            .quota(Quota::requests(10).per_minute())
            .build()
    };
    let reporting = build("s1:", true).await.expect("builds");
    let permit = reporting
        .try_acquire("u", Cost::request())
        .await
        .expect("admitted");
    // Another call lands before the first permit reads its status: the permit still
    // says what its own decision left, so it did not ask Redis again.
    drop(reporting.try_acquire("u", Cost::request()).await);
    let status = permit.status().await.expect("status");
    assert_eq!((status[0].limit, status[0].remaining), (10, 9));
    assert_eq!(reporting.status("u").await.expect("status")[0].remaining, 8);

    // Without the option the permit asks Redis, and sees the later call too.
    let asking = build("s2:", false).await.expect("builds");
    let permit = asking
        .try_acquire("u", Cost::request())
        .await
        .expect("admitted");
    drop(asking.try_acquire("u", Cost::request()).await);
    assert_eq!(permit.status().await.expect("status")[0].remaining, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_concurrency_quota_counts_only_its_own_slots() {
    let server = RedisServer::start();
    let build = |quotas: Vec<Quota>| {
        let mut b = Limiter::builder().redis(server.url()).prefix("cc:");
        for q in quotas {
            b = b.quota(q);
        }
        b.build()
    };
    // A caller's slots over every model, and its slots on one model: two quotas, one
    // caller, one prefix.
    let overall = build(vec![Quota::concurrent(3).named("caller.concurrency")])
        .await
        .expect("builds");
    let one_model = build(vec![
        Quota::concurrent(1).named("caller.gpt-4o.concurrency"),
    ])
    .await
    .expect("builds");
    let held: Vec<_> = [
        overall.try_acquire("u", Cost::request()).await,
        overall.try_acquire("u", Cost::request()).await,
    ]
    .into_iter()
    .map(|p| p.expect("two of three"))
    .collect();
    // The model's one slot is free whatever the caller holds elsewhere ...
    let model = one_model
        .try_acquire("u", Cost::request())
        .await
        .expect("the model's own slot");
    assert!(one_model.try_acquire("u", Cost::request()).await.is_err());
    // ... and holding it takes none of the caller's three.
    assert_eq!(overall.status("u").await.expect("status")[0].remaining, 1);
    let third = overall
        .try_acquire("u", Cost::request())
        .await
        .expect("the third overall slot");
    assert!(overall.try_acquire("u", Cost::request()).await.is_err());
    // Another limiter with the same quota shares its slots.
    let same = build(vec![Quota::concurrent(3).named("caller.concurrency")])
        .await
        .expect("builds");
    assert!(same.try_acquire("u", Cost::request()).await.is_err());
    drop((held, model, third));
}

/// Operations reach Redis in the order the process issued them: a slot given back by a
/// dropped permit is free for the very next call, and a cancelled reservation's capacity
/// for the next caller, even while other script calls are in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_reach_redis_in_the_order_they_were_issued() {
    let server = RedisServer::start();
    let limiter = Limiter::builder()
        .redis(server.url())
        .quota(Quota::concurrent(1))
        .quota(Quota::requests(1).per_minute().named("one a minute"))
        .build()
        .await
        .expect("limiter");
    // Background traffic on other keys keeps script calls in flight, so each of the
    // calls below may go out in a batch of its own.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Stops the traffic however this test ends (a failed assertion included).
    struct Stop(std::sync::Arc<std::sync::atomic::AtomicBool>);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let _stop_on_exit = Stop(stop.clone());
    let mut noise = Vec::new();
    for t in 0..8 {
        let (l, stop) = (limiter.clone(), stop.clone());
        noise.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                l.try_acquire(&format!("noise-{t}-{n}"), Cost::request())
                    .await
                    .expect("the noise is admitted");
            }
        }));
    }
    for i in 0..300 {
        let key = format!("user-{i}");
        let p = limiter
            .try_acquire(&key, Cost::request())
            .await
            .expect("the first call of a key");
        // The slot: given back when the permit goes.
        p.cancel();
        let p = limiter
            .try_acquire(&key, Cost::request())
            .await
            .unwrap_or_else(|e| panic!("round {i}: the cancelled call gave everything back: {e}"));
        drop(p);
        let Err(Error::Limited(r)) = limiter.try_acquire(&key, Cost::request()).await else {
            panic!("round {i}: one request a minute is spent");
        };
        assert_eq!(
            r.quota().name(),
            "one a minute",
            "round {i}: the slot was free"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for n in noise {
        n.await.expect("noise task");
    }
}

/// A call whose caller goes away while its reservation is on its way to Redis (the
/// future dropped after sending, before the reply) gives the reservation back when the
/// reply lands, in the identity's quotas and in the shared ones alike. (One at a time:
/// several abandoned at once may be given back out of order, and the refund rule then
/// keeps part of them counted until it refills; see docs/LIMITS.md.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_whose_caller_went_away_mid_call_is_given_back() {
    let server = RedisServer::start();
    let limiter = Limiter::builder()
        .redis(server.url())
        .quota(Quota::requests(1_000).per_day())
        .quota(Quota::tokens(100_000).per_day().shared())
        .build()
        .await
        .expect("limiter");
    // Per day: what refills during the test is far below one request.
    for round in 0..20 {
        // One poll sends the reservation; then the caller goes away. On a loaded machine
        // the first poll may also end the call: the store marked down for a moment (the
        // call fails at once), or the polling thread preempted between sending and
        // looking for the reply, which had landed by then (a permit). Either way this
        // round has not tested a call abandoned mid-flight yet: give back, try again.
        let mut sent = false;
        for _ in 0..100 {
            let call = limiter.try_acquire("u", Cost::input(100));
            tokio::pin!(call);
            let outcome = std::future::poll_fn(|cx| {
                std::task::Poll::Ready(match call.as_mut().poll(cx) {
                    std::task::Poll::Pending => None,
                    std::task::Poll::Ready(r) => Some(r),
                })
            })
            .await;
            match outcome {
                None => {
                    sent = true;
                    break;
                }
                Some(Ok(permit)) => {
                    permit.cancel();
                    wait_until_all_given_back(&limiter, round).await;
                }
                Some(Err(Error::Unavailable(_))) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Some(Err(other)) => panic!("round {round}: the call failed at once: {other}"),
            }
        }
        assert!(
            sent,
            "round {round}: no call was ever still in flight after one poll"
        );
        wait_until_all_given_back(&limiter, round).await;
    }
}

/// Wait (at most 10 s) until identity `u` has its whole 1,000 requests and the shared
/// 100,000 tokens again.
async fn wait_until_all_given_back(limiter: &Limiter, round: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Option<Vec<u64>> = limiter
            .status("u")
            .await
            .ok()
            .map(|status| status.iter().map(|s| s.remaining).collect());
        if left.as_deref() == Some(&[1_000, 100_000]) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "round {round}: the reservation is still held: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
