//! Decisions on Redis from one process, with the Redis floor side by side: 64 concurrent
//! tasks on a two-worker Tokio runtime, against a private `redis-server` the bench starts
//! on a free port (and kills at the end).
//!
//! Three workloads, each one decision per call:
//!
//! - `floor_evalsha`: a raw `EVALSHA` of a script that returns 1 (one key, no other
//!   argument), sent through redis-rs on one multiplexed `ConnectionManager`, as the
//!   limiter's own connection is. Nothing can beat this from one connection, unbatched.
//! - `one_dimension`: `try_acquire` on a limiter with a requests quota.
//! - `two_dimensions`: the same with a requests and a tokens quota.
//!
//! Limits are far above what a run can use, and every decision must admit: a refusal or
//! an error fails the bench rather than being measured.
//!
//! Criterion's time per iteration is wall time per decision at 64-way concurrency, so its
//! `elem/s` is decisions per second. Criterion has no percentiles, so before it runs the
//! bench drives each workload for 2 s, times every call, and prints decisions/s,
//! p50/p99/p99.9 and the ratio to the floor as a table.
//!
//! Run: `cargo bench -p tollgate --bench redis` (needs `redis-server` on the `PATH`).
//! `TOLLGATE_REDIS_LATENCY_ONLY=1` prints the table alone and skips criterion. Figures go
//! in docs/BENCHMARKS.md.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use redis::aio::ConnectionManager;
use tokio::runtime::Runtime;
use tollgate::{Cost, Limiter, Quota};

/// Concurrent tasks issuing decisions.
const TASKS: usize = 64;
/// Distinct keys the tasks spread over (task `i` uses key `i % KEYS`).
const KEYS: usize = 16;
/// A rate no run can exhaust, so every decision admits.
const RATE: u64 = 1_000_000_000;
/// How long each workload runs for the latency table.
const LATENCY_RUN: Duration = Duration::from_secs(2);
/// Untimed calls before each latency run (connection, script load, first batches).
const WARM_UP: Duration = Duration::from_millis(300);

/// The tests' private `redis-server` (a free port, killed when dropped).
#[path = "../tests/support/mod.rs"]
mod support;
use support::RedisServer;

/// One kind of call the tasks repeat.
#[derive(Clone)]
enum Workload {
    /// `EVALSHA <sha of "return 1"> 1 <key>` on a shared multiplexed connection.
    Floor {
        conn: ConnectionManager,
        sha: String,
    },
    /// `try_acquire(key, Cost::input(10))` on a limiter on Redis.
    Limiter(Limiter),
}

impl Workload {
    /// One call; `Err` describes anything but an admitted decision (or a reply of 1).
    async fn once(&mut self, key: &str) -> Result<(), String> {
        match self {
            Workload::Floor { conn, sha } => {
                let v: i64 = redis::cmd("EVALSHA")
                    .arg(sha.as_str())
                    .arg(1)
                    .arg(key)
                    .query_async(conn)
                    .await
                    .map_err(|e| format!("EVALSHA failed: {e}"))?;
                if v == 1 {
                    Ok(())
                } else {
                    Err(format!("EVALSHA returned {v}, not 1"))
                }
            }
            Workload::Limiter(l) => match l.try_acquire(key, Cost::input(10)).await {
                Ok(permit) => {
                    black_box(permit);
                    Ok(())
                }
                Err(e) => Err(format!("try_acquire failed: {e}")),
            },
        }
    }
}

struct Workloads {
    floor: Workload,
    one: Workload,
    two: Workload,
}

impl Workloads {
    fn all(&self) -> [(&'static str, &Workload); 3] {
        [
            ("floor_evalsha", &self.floor),
            ("one_dimension", &self.one),
            ("two_dimensions", &self.two),
        ]
    }
}

async fn setup(url: &str) -> Workloads {
    let client = redis::Client::open(url).expect("a valid Redis URL");
    let mut conn = ConnectionManager::new(client)
        .await
        .expect("connect to the bench's redis-server");
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg("return 1")
        .query_async(&mut conn)
        .await
        .expect("SCRIPT LOAD the floor script");
    let one = Limiter::builder()
        .redis(url)
        .prefix("bench:one:")
        .quota(Quota::requests(RATE).per_second())
        .build()
        .await
        .expect("build the one-dimension limiter on Redis");
    let two = Limiter::builder()
        .redis(url)
        .prefix("bench:two:")
        .quota(Quota::requests(RATE).per_second())
        .quota(Quota::tokens(RATE).per_second())
        .build()
        .await
        .expect("build the two-dimension limiter on Redis");
    Workloads {
        floor: Workload::Floor { conn, sha },
        one: Workload::Limiter(one),
        two: Workload::Limiter(two),
    }
}

fn keys() -> Vec<String> {
    (0..KEYS).map(|i| format!("user-{i}")).collect()
}

/// Run `iters` calls split over [`TASKS`] tasks; the wall time from the first spawn to
/// the last task's end. Panics if any call failed.
async fn run_calls(w: &Workload, keys: &[String], iters: u64) -> Duration {
    let tasks = TASKS as u64;
    let start = Instant::now();
    let handles: Vec<_> = (0..TASKS)
        .map(|t| {
            let mut w = w.clone();
            let key = keys[t % keys.len()].clone();
            let n = iters / tasks + u64::from((t as u64) < iters % tasks);
            tokio::spawn(async move {
                for _ in 0..n {
                    w.once(&key).await?;
                }
                Ok::<(), String>(())
            })
        })
        .collect();
    let mut failure = None;
    for h in handles {
        if let Err(e) = h.await.expect("a bench task panicked") {
            failure.get_or_insert(e);
        }
    }
    let elapsed = start.elapsed();
    if let Some(e) = failure {
        panic!("a decision did not admit, so the bench would measure refusals: {e}");
    }
    elapsed
}

/// Run [`TASKS`] tasks calling until `run` has passed, timing every call. Returns the
/// latencies (sorted) and the wall time. Panics if any call failed.
async fn run_timed(w: &Workload, keys: &[String], run: Duration) -> (Vec<Duration>, Duration) {
    let start = Instant::now();
    let deadline = start + run;
    let handles: Vec<_> = (0..TASKS)
        .map(|t| {
            let mut w = w.clone();
            let key = keys[t % keys.len()].clone();
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(1 << 16);
                let mut errors = 0u64;
                let mut first = None;
                loop {
                    let t0 = Instant::now();
                    if t0 >= deadline {
                        break;
                    }
                    let r = w.once(&key).await;
                    lat.push(t0.elapsed());
                    if let Err(e) = r {
                        errors += 1;
                        first.get_or_insert(e);
                    }
                }
                (lat, errors, first)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    let mut first = None;
    for h in handles {
        let (lat, e, f) = h.await.expect("a latency task panicked");
        all.extend(lat);
        errors += e;
        if let Some(f) = f {
            first.get_or_insert(f);
        }
    }
    let elapsed = start.elapsed();
    if let Some(f) = first {
        panic!(
            "{errors} of {} decisions did not admit, so the bench would measure refusals; first: {f}",
            all.len()
        );
    }
    all.sort_unstable();
    (all, elapsed)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn micros(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

/// Drive each workload for [`LATENCY_RUN`] and print decisions/s and percentiles.
fn latency_table(rt: &Runtime, w: &Workloads, keys: &[String]) {
    println!();
    println!(
        "Redis, one process, {TASKS} concurrent tasks, {KEYS} keys, 2 Tokio workers, {} s per workload:",
        LATENCY_RUN.as_secs_f64()
    );
    println!();
    println!("| workload | decisions/s | p50 | p99 | p99.9 | vs. floor |");
    println!("|---|---:|---:|---:|---:|---:|");
    let mut floor_rate = None;
    for (name, work) in w.all() {
        let (lat, elapsed) = rt.block_on(async {
            run_timed(work, keys, WARM_UP).await;
            run_timed(work, keys, LATENCY_RUN).await
        });
        let rate = lat.len() as f64 / elapsed.as_secs_f64();
        let floor = *floor_rate.get_or_insert(rate);
        println!(
            "| {name} | {:.0} | {} | {} | {} | {:.2}× |",
            rate,
            micros(percentile(&lat, 0.50)),
            micros(percentile(&lat, 0.99)),
            micros(percentile(&lat, 0.999)),
            rate / floor,
        );
    }
    println!();
}

fn redis_group(c: &mut Criterion, rt: &Runtime, w: &Workloads, keys: &[String]) {
    let mut g = c.benchmark_group("redis");
    g.throughput(Throughput::Elements(1));
    for (name, work) in w.all() {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| rt.block_on(run_calls(work, keys, iters)));
        });
    }
    g.finish();
}

fn main() {
    let latency_only = std::env::var("TOLLGATE_REDIS_LATENCY_ONLY").is_ok_and(|v| v == "1");
    let args: Vec<String> = std::env::args().collect();
    // `cargo test --benches` runs this without `--bench`: criterion then runs each
    // function once as a test, and the 6 s latency table is skipped.
    let benchmarking =
        args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--test" || a == "--list");

    let server = RedisServer::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build the Tokio runtime");
    let url = server.url();
    let workloads = rt.block_on(setup(&url));
    let keys = keys();

    if latency_only || benchmarking {
        latency_table(&rt, &workloads, &keys);
    }
    if !latency_only {
        let mut c = Criterion::default().configure_from_args();
        redis_group(&mut c, &rt, &workloads, &keys);
        c.final_summary();
    }

    drop(workloads);
    drop(rt);
    drop(server);
}
