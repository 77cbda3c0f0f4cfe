//! The gateway's metrics, rendered in Prometheus's text format at `GET /metrics`.
//!
//! A small registry of its own, per gateway (so two gateways in one process, as in the
//! tests, count apart): counters and histograms keyed by name and label values, which
//! come only from the configuration (caller, tier, upstream and quota names) and status
//! codes, never from a request's content. It never blocks for long: one short lock per
//! update, and no allocation once a series exists.
//!
//! ```
//! let m = tollgate_gateway::metrics::Metrics::default();
//! m.count("tollgate_admitted_total", &[("caller", "a")], 1);
//! m.observe("tollgate_wait_seconds", &[], 0.2);
//! let text = m.render();
//! assert!(text.contains("tollgate_admitted_total{caller=\"a\"} 1"));
//! assert!(text.contains("tollgate_wait_seconds_bucket{le=\"0.25\"} 1"));
//! ```

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Upper bounds of the histogram buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0,
];

/// What each metric means, for `# HELP` lines.
const HELP: &[(&str, &str, &str)] = &[
    (
        "tollgate_admitted_total",
        "counter",
        "Requests admitted by every limit, by caller and upstream.",
    ),
    (
        "tollgate_rejected_total",
        "counter",
        "Requests refused by the gateway, by caller and the quota that refused.",
    ),
    (
        "tollgate_wait_seconds",
        "histogram",
        "Time admitted requests waited for room.",
    ),
    (
        "tollgate_tokens_total",
        "counter",
        "Tokens charged after settling, by caller, upstream and kind (input, output).",
    ),
    (
        "tollgate_spend_micro_usd_total",
        "counter",
        "What settled requests cost at the models' prices, in micro-dollars, by caller and upstream.",
    ),
    (
        "tollgate_upstream_responses_total",
        "counter",
        "Upstream answers, by upstream and status code (0: no answer).",
    ),
    (
        "tollgate_upstream_seconds",
        "histogram",
        "Time from sending to an upstream to its response headers.",
    ),
    (
        "tollgate_upstream_retries_total",
        "counter",
        "Upstream 429s and 5xx retried within the caller's max wait.",
    ),
    (
        "tollgate_client_disconnects_total",
        "counter",
        "Streams whose client went away before the end.",
    ),
    (
        "tollgate_connections_open",
        "gauge",
        "Client connections open now.",
    ),
    (
        "tollgate_connections_refused_total",
        "counter",
        "Client connections closed at once because max_connections were open.",
    ),
    (
        "tollgate_connections_idle_closed_total",
        "counter",
        "Client connections closed after idle_timeout with no request in flight.",
    ),
];

#[derive(Default)]
struct Histogram {
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// Counters and histograms of one gateway, each series keyed by `name`, a NUL, and its
/// labels as rendered.
#[derive(Default)]
pub struct Metrics {
    counters: Mutex<HashMap<String, u64>>,
    gauges: Mutex<HashMap<String, i64>>,
    histograms: Mutex<HashMap<String, Histogram>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

thread_local! {
    /// Where a series' key is built, reused so an update allocates nothing.
    static KEY: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Run `f` on the series key of `name` with `pairs`.
fn with_key<R>(name: &str, pairs: &[(&str, &str)], f: impl FnOnce(&str) -> R) -> R {
    KEY.with(|k| {
        let mut k = k.borrow_mut();
        k.clear();
        k.push_str(name);
        k.push('\0');
        for (i, (label, v)) in pairs.iter().enumerate() {
            if i > 0 {
                k.push(',');
            }
            k.push_str(label);
            k.push_str("=\"");
            for c in v.chars() {
                match c {
                    '\\' => k.push_str("\\\\"),
                    '"' => k.push_str("\\\""),
                    '\n' => k.push_str("\\n"),
                    c => k.push(c),
                }
            }
            k.push('"');
        }
        f(&k)
    })
}

/// A series key's name and labels.
fn split(key: &str) -> (&str, &str) {
    key.split_once('\0').unwrap_or((key, ""))
}

/// Add `by` to the value under `key`, which starts at `by` (no allocation when it exists).
fn add<N: std::ops::AddAssign + Copy>(map: &Mutex<HashMap<String, N>>, key: &str, by: N) {
    let mut map = lock(map);
    match map.get_mut(key) {
        Some(v) => *v += by,
        None => {
            map.insert(key.to_string(), by);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Metrics {
    /// Add `by` to a counter.
    ///
    /// ```
    /// let m = tollgate_gateway::metrics::Metrics::default();
    /// m.count("tollgate_upstream_responses_total", &[("upstream", "sim"), ("status", "200")], 2);
    /// assert_eq!(m.counter("tollgate_upstream_responses_total", &[("upstream", "sim"), ("status", "200")]), 2);
    /// ```
    pub fn count(&self, name: &str, pairs: &[(&str, &str)], by: u64) {
        with_key(name, pairs, |key| add(&self.counters, key, by));
    }

    /// A counter's value (0 when never counted).
    ///
    /// ```
    /// let m = tollgate_gateway::metrics::Metrics::default();
    /// assert_eq!(m.counter("x", &[]), 0);
    /// ```
    pub fn counter(&self, name: &str, pairs: &[(&str, &str)]) -> u64 {
        with_key(name, pairs, |key| {
            lock(&self.counters).get(key).copied().unwrap_or(0)
        })
    }

    /// Add `by` (negative: subtract) to a gauge.
    ///
    /// ```
    /// let m = tollgate_gateway::metrics::Metrics::default();
    /// m.add_gauge("tollgate_connections_open", &[], 2);
    /// m.add_gauge("tollgate_connections_open", &[], -1);
    /// assert_eq!(m.gauge("tollgate_connections_open", &[]), 1);
    /// assert!(m.render().contains("tollgate_connections_open 1"));
    /// ```
    pub fn add_gauge(&self, name: &str, pairs: &[(&str, &str)], by: i64) {
        with_key(name, pairs, |key| add(&self.gauges, key, by));
    }

    /// A gauge's value (0 when never set).
    ///
    /// ```
    /// let m = tollgate_gateway::metrics::Metrics::default();
    /// assert_eq!(m.gauge("x", &[]), 0);
    /// ```
    pub fn gauge(&self, name: &str, pairs: &[(&str, &str)]) -> i64 {
        with_key(name, pairs, |key| {
            lock(&self.gauges).get(key).copied().unwrap_or(0)
        })
    }

    /// Record one observation (seconds) in a histogram.
    ///
    /// ```
    /// let m = tollgate_gateway::metrics::Metrics::default();
    /// m.observe("tollgate_upstream_seconds", &[("upstream", "sim")], 0.05);
    /// ```
    pub fn observe(&self, name: &str, pairs: &[(&str, &str)], seconds: f64) {
        with_key(name, pairs, |key| {
            let mut histograms = lock(&self.histograms);
            if !histograms.contains_key(key) {
                histograms.insert(key.to_string(), Histogram::default());
            }
            if let Some(h) = histograms.get_mut(key) {
                for (i, le) in BUCKETS.iter().enumerate() {
                    if seconds <= *le {
                        h.buckets[i] += 1;
                    }
                }
                h.count += 1;
                h.sum += seconds;
            }
        });
    }

    /// Everything, in Prometheus's text exposition format.
    ///
    /// ```
    /// let m = tollgate_gateway::metrics::Metrics::default();
    /// assert!(m.render().contains("# TYPE tollgate_admitted_total counter"));
    /// ```
    pub fn render(&self) -> String {
        let mut counters: Vec<(&str, &str, i128)> = Vec::new();
        let mut histograms: Vec<(&str, &str, &Histogram)> = Vec::new();
        let (c, g, h) = (
            lock(&self.counters),
            lock(&self.gauges),
            lock(&self.histograms),
        );
        for (k, v) in c.iter() {
            let (n, l) = split(k);
            counters.push((n, l, i128::from(*v)));
        }
        for (k, v) in g.iter() {
            let (n, l) = split(k);
            counters.push((n, l, i128::from(*v)));
        }
        for (k, v) in h.iter() {
            let (n, l) = split(k);
            histograms.push((n, l, v));
        }
        counters.sort_unstable_by_key(|&(n, l, _)| (n, l));
        histograms.sort_unstable_by_key(|&(n, l, _)| (n, l));
        let mut out = String::new();
        for (name, kind, help) in HELP {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for &(n, l, v) in counters.iter().filter(|(n, _, _)| n == name) {
                if l.is_empty() {
                    let _ = writeln!(out, "{n} {v}");
                } else {
                    let _ = writeln!(out, "{n}{{{l}}} {v}");
                }
            }
            for &(n, l, h) in histograms.iter().filter(|(n, _, _)| n == name) {
                let sep = if l.is_empty() { "" } else { "," };
                for (le, c) in BUCKETS.iter().zip(h.buckets) {
                    let _ = writeln!(out, "{n}_bucket{{{l}{sep}le=\"{le}\"}} {c}");
                }
                let _ = writeln!(out, "{n}_bucket{{{l}{sep}le=\"+Inf\"}} {}", h.count);
                let braces = if l.is_empty() {
                    String::new()
                } else {
                    format!("{{{l}}}")
                };
                let _ = writeln!(out, "{n}_sum{braces} {}", h.sum);
                let _ = writeln!(out, "{n}_count{braces} {}", h.count);
            }
        }
        out
    }
}
