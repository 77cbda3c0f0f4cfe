//! Property tests of the three algorithms against slow, obviously correct reference
//! models, with injected time.

use proptest::prelude::*;

use super::{Params, State};
use crate::quota::Algorithm;

/// One admitted call as the reference model sees it.
#[derive(Debug, Clone)]
struct Event {
    start: u64,
    charged: u64,
    /// What the caller finally used (after settle or cancel).
    kept: u64,
    snap: u64,
    open: bool,
}

/// Checks what each algorithm promises over every interval between two starts.
fn check_bound(alg: Algorithm, p: &Params, events: &[Event]) -> Result<(), TestCaseError> {
    let mut ev: Vec<(u64, u64)> = events
        .iter()
        .filter(|e| e.kept > 0)
        .map(|e| (e.start, e.kept))
        .collect();
    ev.sort_unstable();
    // Aligned windows hold at most `amount` (fixed and sliding windows).
    if alg != Algorithm::Gcra {
        let mut i = 0;
        while i < ev.len() {
            let w = ev[i].0 / p.period_ns;
            let mut sum = 0u128;
            let mut j = i;
            while j < ev.len() && ev[j].0 / p.period_ns == w {
                sum += u128::from(ev[j].1);
                j += 1;
            }
            prop_assert!(
                sum <= u128::from(p.amount),
                "window {w} holds {sum} > {}",
                p.amount
            );
            i = j;
        }
    }
    if alg == Algorithm::FixedWindow {
        return Ok(());
    }
    // GCRA and sliding window: every interval [s_i, s_j] holds at most
    // capacity + amount × length / period.
    for i in 0..ev.len() {
        let mut sum = 0u128;
        for j in i..ev.len() {
            sum += u128::from(ev[j].1);
            let len = u128::from(ev[j].0 - ev[i].0);
            let lhs = sum * u128::from(p.period_ns);
            let rhs = u128::from(p.capacity) * u128::from(p.period_ns) + u128::from(p.amount) * len;
            prop_assert!(
                lhs <= rhs,
                "[{}, {}] admitted {sum} > {} + {} × {len} / {}",
                ev[i].0,
                ev[j].0,
                p.capacity,
                p.amount,
                p.period_ns
            );
        }
    }
    Ok(())
}

#[derive(Debug, Clone)]
enum Op {
    /// Advance time, then try to start a call now (no waiting).
    Try { dt: u64, cost: u64 },
    /// Advance time, then reserve the earliest start.
    Reserve { dt: u64, cost: u64 },
    /// Advance time, then settle an open call: keep `keep_pct`% of its charge.
    Settle { dt: u64, pick: usize, keep_pct: u64 },
    /// Advance time, then cancel an open call whose start is still in the future.
    Cancel { dt: u64, pick: usize },
}

fn op(max_cost: u64, max_dt: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..max_dt, 1..=max_cost).prop_map(|(dt, cost)| Op::Try { dt, cost }),
        3 => (0..max_dt, 1..=max_cost).prop_map(|(dt, cost)| Op::Reserve { dt, cost }),
        2 => (0..max_dt, any::<usize>(), 0..=100u64).prop_map(|(dt, pick, keep_pct)| Op::Settle { dt, pick, keep_pct }),
        1 => (0..max_dt, any::<usize>()).prop_map(|(dt, pick)| Op::Cancel { dt, pick }),
    ]
}

fn algorithm() -> impl Strategy<Value = Algorithm> {
    prop_oneof![
        Just(Algorithm::Gcra),
        Just(Algorithm::FixedWindow),
        Just(Algorithm::SlidingWindow)
    ]
}

/// (amount, period, capacity) with capacity == amount for window algorithms.
fn params(alg: Algorithm) -> impl Strategy<Value = Params> {
    (1..=50u64, 1..=1_000u64, 1..=60u64).prop_map(move |(amount, period_ns, cap)| Params {
        amount,
        period_ns,
        capacity: if alg == Algorithm::Gcra { cap } else { amount },
        algorithm: alg,
    })
}

fn run(p: Params, ops: Vec<Op>) -> Result<Vec<Event>, TestCaseError> {
    let mut st = State::new();
    let mut now = 0u64;
    let mut events: Vec<Event> = Vec::new();
    let mut last_start = 0u64;
    for op in ops {
        match op {
            Op::Try { dt, cost } | Op::Reserve { dt, cost } => {
                now += dt;
                let cost = cost.min(p.capacity);
                let start = st.earliest(&p, now, cost);
                prop_assert!(start >= now, "a start lies in the past");
                // FIFO: no call starts before one reserved earlier.
                prop_assert!(start >= last_start, "start {start} before {last_start}");
                if matches!(op, Op::Try { .. }) && start != now {
                    continue;
                }
                // Every time after the earliest start fits as well.
                prop_assert_eq!(st.earliest(&p, start, cost), start);
                let snap = st.apply(&p, start, cost);
                last_start = start;
                events.push(Event {
                    start,
                    charged: cost,
                    kept: cost,
                    snap,
                    open: true,
                });
            }
            Op::Settle { dt, pick, keep_pct } => {
                now += dt;
                let open: Vec<usize> = (0..events.len())
                    .filter(|&i| events[i].open && events[i].start <= now)
                    .collect();
                if open.is_empty() {
                    continue;
                }
                let e = &mut events[open[pick % open.len()]];
                let keep = e.charged * keep_pct / 100;
                st.refund(&p, now, e.charged - keep, e.snap);
                e.kept = keep;
                e.open = false;
            }
            Op::Cancel { dt, pick } => {
                now += dt;
                let waiting: Vec<usize> = (0..events.len())
                    .filter(|&i| events[i].open && events[i].start > now)
                    .collect();
                if waiting.is_empty() {
                    continue;
                }
                let e = &mut events[waiting[pick % waiting.len()]];
                st.refund(&p, now, e.charged, e.snap);
                e.kept = 0;
                e.open = false;
            }
        }
    }
    Ok(events)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    /// Whatever mix of immediate calls, reservations, settles with refunds and cancels,
    /// no interval ever holds more than the algorithm's bound, and starts are FIFO.
    #[test]
    fn never_over_the_bound((alg, p) in algorithm().prop_flat_map(|a| (Just(a), params(a))),
                            ops in proptest::collection::vec(op(60, 400), 1..120)) {
        let events = run(p, ops)?;
        check_bound(alg, &p, &events)?;
    }

    /// GCRA without reservations decides exactly as a continuously refilled token bucket
    /// of the same capacity and rate (kept as exact rationals).
    #[test]
    fn gcra_matches_token_bucket(amount in 1..=1_000u64, period_ns in 1..=100_000u64,
                                 cap in 1..=2_000u64,
                                 ops in proptest::collection::vec((0..20_000u64, 1..=2_000u64), 1..300)) {
        let p = Params { amount, period_ns, capacity: cap, algorithm: Algorithm::Gcra };
        let mut st = State::new();
        // Reference: level × period, refilled by amount per ns, capped at capacity × period.
        let full = u128::from(cap) * u128::from(period_ns);
        let mut level = full;
        let mut now = 0u64;
        for (dt, cost) in ops {
            now += dt;
            level = (level + u128::from(amount) * u128::from(dt)).min(full);
            let cost = cost.min(cap);
            let want = u128::from(cost) * u128::from(period_ns);
            let reference = level >= want;
            let start = st.earliest(&p, now, cost);
            prop_assert_eq!(start == now, reference, "at {} cost {}", now, cost);
            let (remaining, _) = st.status(&p, now);
            prop_assert_eq!(u128::from(remaining), level / u128::from(period_ns));
            if reference {
                st.apply(&p, now, cost);
                level -= want;
            }
        }
    }

    /// Under saturating demand every algorithm admits at least 99.9 % of its rate over a
    /// long run (GCRA: exactly capacity + rate × time, less one call; fixed window when
    /// the call cost divides the amount). A sliding window fills each window to within
    /// one call of the amount (99.9 % once calls are at most 1/1000 of it).
    #[test]
    fn saturating_demand_uses_the_rate(alg in algorithm(), calls in 1..=100u64,
                                       cost in 1..=10u64, extra in 0..10u64) {
        let amount = calls * cost + if alg == Algorithm::Gcra { extra } else { 0 };
        let p = Params { amount, period_ns: 1_000, capacity: amount, algorithm: alg };
        let horizon = 2_000 * p.period_ns;
        let mut st = State::new();
        let mut admitted = 0u128;
        let mut now = 0;
        loop {
            let start = st.earliest(&p, now, cost);
            if start > horizon {
                break;
            }
            st.apply(&p, start, cost);
            admitted += u128::from(cost);
            now = start;
        }
        let windows = u128::from(horizon / p.period_ns);
        let rate_total = u128::from(p.amount) * windows;
        match alg {
            Algorithm::Gcra => {
                let ideal = u128::from(p.capacity) + rate_total;
                prop_assert!(admitted + u128::from(cost) > ideal && admitted <= ideal,
                    "admitted {admitted}, ideal {ideal}");
            }
            Algorithm::FixedWindow => {
                prop_assert!(admitted * 1000 >= rate_total * 999, "{admitted} < 99.9% of {rate_total}");
            }
            Algorithm::SlidingWindow => {
                // Each window fills to within one call of the amount.
                let floor = u128::from(p.amount - cost) * windows;
                prop_assert!(admitted >= floor, "{admitted} < {floor}");
            }
        }
    }
}

#[test]
fn refund_of_a_cancelled_middle_reservation_does_not_double_book() {
    // Burst 1, one unit per second: A now, B at 1 s, C at 2 s; B gives up. A newcomer
    // must not start at 2 s beside C.
    let p = Params {
        amount: 1,
        period_ns: 1_000_000_000,
        capacity: 1,
        algorithm: Algorithm::Gcra,
    };
    let mut st = State::new();
    let a = st.earliest(&p, 0, 1);
    st.apply(&p, a, 1);
    let b = st.earliest(&p, 0, 1);
    let b_snap = st.apply(&p, b, 1);
    let c = st.earliest(&p, 0, 1);
    st.apply(&p, c, 1);
    assert_eq!((a, b, c), (0, 1_000_000_000, 2_000_000_000));
    st.refund(&p, 500_000_000, 1, b_snap);
    assert_eq!(st.earliest(&p, 500_000_000, 1), 3_000_000_000);
}

#[test]
fn refund_right_after_the_call_returns_everything() {
    // 100 tokens per 100 s, capacity 100: a call estimated at 100 that used 10 leaves 90.
    let p = Params {
        amount: 100,
        period_ns: 100,
        capacity: 100,
        algorithm: Algorithm::Gcra,
    };
    let mut st = State::new();
    let snap = st.apply(&p, 0, 100);
    assert_eq!(st.status(&p, 0).0, 0);
    st.refund(&p, 0, 90, snap);
    assert_eq!(st.status(&p, 0).0, 90);
}

#[test]
fn sliding_window_weighs_the_previous_window() {
    // 10 per 1000 ns; 10 used in window 0. At 250 ns into window 1, 7.5 still weigh.
    let p = Params {
        amount: 10,
        period_ns: 1_000,
        capacity: 10,
        algorithm: Algorithm::SlidingWindow,
    };
    let mut st = State::new();
    st.apply(&p, 0, 10);
    assert_eq!(st.status(&p, 1_250).0, 2);
    // 3 more fit once the previous window weighs at most 7: at 300 ns into window 1.
    assert_eq!(st.earliest(&p, 1_250, 3), 1_300);
}

#[test]
fn fixed_window_resets_at_the_boundary() {
    let p = Params {
        amount: 10,
        period_ns: 1_000,
        capacity: 10,
        algorithm: Algorithm::FixedWindow,
    };
    let mut st = State::new();
    st.apply(&p, 999, 10);
    assert_eq!(st.earliest(&p, 999, 1), 1_000);
    assert_eq!(st.status(&p, 999), (0, 1));
}
