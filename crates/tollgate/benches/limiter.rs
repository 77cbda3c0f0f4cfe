//! Decision cost of the in-memory limiter, with governor side by side on the same quota
//! and the same clock kind (the operating system's monotonic clock: governor's
//! `MonotonicClock` reads it through `std::time::Instant`, tollgate's system clock on
//! Linux straight from the vDSO).
//!
//! Run: `cargo bench -p tollgate --bench limiter`. Figures go in docs/BENCHMARKS.md.
#![allow(missing_docs, clippy::unwrap_used)]

use std::future::Future;
use std::hint::black_box;
use std::num::NonZeroU32;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use governor::clock::MonotonicClock;
use governor::{Quota as GQuota, RateLimiter};
use tollgate::{Cost, Limiter, Quota};

/// A rate no benchmark run can exhaust, so every decision admits on both sides.
const RATE: u32 = 1_000_000_000;
const KEYS: usize = 10_000;

/// Poll a decision that completes without waiting (the in-memory store never awaits)
/// and say whether it admitted; the permit, if any, is dropped here. The future is
/// pinned where the caller makes it, so it is not moved before its one poll.
fn poll_once<T, E, F: Future<Output = Result<T, E>>>(fut: Pin<&mut F>) -> bool {
    match fut.poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v.is_ok(),
        Poll::Pending => panic!("the in-memory limiter never waits here"),
    }
}

macro_rules! admitted {
    ($fut:expr $(,)?) => {
        poll_once(pin!($fut))
    };
}

fn tollgate_requests() -> Limiter {
    Limiter::builder()
        .quota(Quota::requests(u64::from(RATE)).per_second())
        .build()
        .unwrap()
}

fn gquota() -> GQuota {
    GQuota::per_second(NonZeroU32::new(RATE).unwrap())
}

/// The keys callers pass. Each limiter stores its own copy (governor's map owns `String`
/// keys, as it must when keys come from requests), so neither compares against the
/// caller's own bytes.
fn keys() -> Vec<String> {
    (0..KEYS).map(|i| format!("user-{i}")).collect()
}

fn single_key(c: &mut Criterion) {
    let mut g = c.benchmark_group("single_key");
    let limiter = tollgate_requests();
    g.bench_function("tollgate", |b| {
        b.iter(|| {
            black_box(admitted!(
                limiter.try_acquire(black_box("user-42"), Cost::request()),
            ))
        })
    });
    let keyed = RateLimiter::dashmap_with_clock(gquota(), MonotonicClock);
    let key = String::from("user-42");
    g.bench_function("governor", |b| {
        b.iter(|| black_box(keyed.check_key(black_box(&key)).is_ok()))
    });
    let direct = RateLimiter::direct_with_clock(gquota(), MonotonicClock);
    g.bench_function("governor_direct", |b| {
        b.iter(|| black_box(direct.check().is_ok()))
    });
    g.finish();
}

fn keyed(c: &mut Criterion) {
    let mut g = c.benchmark_group("keyed");
    let keys = keys();
    let limiter = tollgate_requests();
    let mut i = 0;
    g.bench_function("tollgate", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(admitted!(limiter.try_acquire(&keys[i], Cost::request())))
        })
    });
    let gov = RateLimiter::dashmap_with_clock(gquota(), MonotonicClock);
    g.bench_function("governor", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(gov.check_key(&keys[i]).is_ok())
        })
    });
    let gov_fold = RateLimiter::dashmap_with_clock_and_hasher(
        gquota(),
        MonotonicClock,
        foldhash::fast::RandomState::default(),
    );
    g.bench_function("governor_foldhash", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(gov_fold.check_key(&keys[i]).is_ok())
        })
    });
    g.finish();
}

fn two_dimensions(c: &mut Criterion) {
    let mut g = c.benchmark_group("two_dimensions");
    let limiter = Limiter::builder()
        .quota(Quota::requests(u64::from(RATE)).per_second())
        .quota(Quota::tokens(u64::from(RATE) * 1_000).per_second())
        .build()
        .unwrap();
    let cost = Cost::input(300).output(200);
    g.bench_function("tollgate", |b| {
        b.iter(|| black_box(admitted!(limiter.try_acquire(black_box("user-42"), cost))))
    });
    g.finish();
}

/// Two threads deciding on one key at once; time per decision = wall time / decisions.
fn contended(c: &mut Criterion) {
    let mut g = c.benchmark_group("contended");
    let limiter = tollgate_requests();
    g.bench_function("tollgate", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, || {
                black_box(admitted!(limiter.try_acquire("user-42", Cost::request())));
            })
        })
    });
    let gov = RateLimiter::dashmap_with_clock(gquota(), MonotonicClock);
    let key = String::from("user-42");
    g.bench_function("governor", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, || {
                black_box(gov.check_key(&key).is_ok());
            })
        })
    });
    g.finish();
}

fn two_threads(iters: u64, op: impl Fn() + Sync) -> Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                for _ in 0..iters.div_ceil(2) {
                    op();
                }
            });
        }
    });
    start.elapsed()
}

criterion_group!(benches, single_key, keyed, two_dimensions, contended);
criterion_main!(benches);
