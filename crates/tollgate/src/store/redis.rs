//! The Redis store: limiter state shared by every process that points at one Redis.
//!
//! Every operation (reserve, cancel, settle, status, and the concurrency leases) is one
//! call of one Lua script (`redis.lua`), which reads the time from Redis itself, so
//! client clocks never matter. Concurrent calls from one process are coalesced: a single
//! task gathers whatever operations are waiting and sends them as one `EVALSHA` over a
//! multiplexed connection, with two such batches in flight, sent in the order they were
//! made (so operations reach Redis in the order they were issued). Each identity's states live
//! in one string; each call's Redis work is O(number of quotas), whatever the traffic.
//!
//! This module knows nothing of HTTP, never sleeps on behalf of a caller (the limiter
//! does), and never re-does the algorithms' decisions outside the script.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{ErrorKind, RedisError, ServerErrorKind, Value};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::memory::{MAX_RATE_QUOTAS, Part, RateQuota};
use crate::error::StoreUnavailable;
use crate::quota::{Accounting, Algorithm};

/// Operations sent in one script call at most.
const MAX_BATCH: usize = 64;
/// Script calls in flight at once on the connection: two keeps Redis busy while the next
/// batch fills (measured: batches of ~24 decisions against ~8 with four in flight).
const MAX_IN_FLIGHT: usize = 2;
/// On a cluster, batches are per slot (often one operation each): more in flight.
const MAX_IN_FLIGHT_CLUSTER: usize = 16;
/// Every number the script computes stays below 2^53; the store keeps capacity × period
/// (in the quota's time unit) below 2^43, leaving room for 1,024 periods of reservations.
const MAX_SPAN: u128 = 1 << 43;

/// What the limiter does when Redis cannot be reached.
///
/// ```
/// use tollgate::StorePolicy;
/// let open = StorePolicy::FailOpen { share: 0.25 }; // each process keeps 1/4 of every quota
/// assert_ne!(open, StorePolicy::FailClosed);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum StorePolicy {
    /// Refuse every call with [`crate::Error::Unavailable`] until Redis is back.
    #[default]
    FailClosed,
    /// Decide locally, in memory, with each quota's amount, burst and concurrency slots
    /// multiplied by `share` (at least one unit), until Redis is back. With `n` processes
    /// sharing an account, `share = 1/n` keeps the account within its limits during an
    /// outage, apart from the switch itself: the local buckets start full, so up to one
    /// more burst may pass in the moment Redis goes down. A call larger than the local
    /// share fails with [`crate::Error::Unavailable`].
    FailOpen {
        /// The fraction of each quota this process may use on its own, in `(0, 1]`.
        share: f64,
    },
}

/// How the script sees one rate quota.
#[derive(Debug, Clone)]
pub(crate) struct RemoteQuota {
    pub(crate) rate: RateQuota,
    pub(crate) shared: bool,
    /// Time unit in microseconds.
    unit_us: u64,
    /// Period in units.
    period: u64,
    /// Names this quota's record in an identity's string (48 bits, exact in a double).
    fp: u64,
}

/// Time units the script may count a quota's time in, finest first (µs).
const UNITS_US: [u64; 12] = [
    1,
    10,
    100,
    1_000,
    10_000,
    100_000,
    1_000_000,
    10_000_000,
    60_000_000,
    600_000_000,
    3_600_000_000,
    86_400_000_000,
];

/// Pick the finest time unit (1 µs, 10 µs, ... 1 s, 10 s, a minute, ten minutes, an hour,
/// a day) that divides the period and keeps capacity × period exact in the script's
/// doubles. A coarse unit only makes the quota stricter: the script sees the time as the
/// start of the current unit, so refills land at unit boundaries (a budget of millions of
/// micro-dollars a month counts in hours or days).
pub(crate) fn remote_quota(
    rate: &RateQuota,
    name: &str,
    shared: bool,
) -> Result<RemoteQuota, String> {
    let p = &rate.params;
    if !p.period_ns.is_multiple_of(1_000) {
        return Err(format!(
            "on Redis, periods are whole microseconds; {} ns is not",
            p.period_ns
        ));
    }
    let period_us = p.period_ns / 1_000;
    for unit in UNITS_US {
        if !period_us.is_multiple_of(unit) {
            continue;
        }
        let period = period_us / unit;
        let span = u128::from(p.capacity) * u128::from(period);
        if span < MAX_SPAN && u128::from(p.amount) < MAX_SPAN {
            let algo = match p.algorithm {
                Algorithm::Gcra => 1,
                Algorithm::FixedWindow => 2,
                Algorithm::SlidingWindow => 3,
            };
            let fp = fingerprint(&format!(
                "{name}|{shared}|{algo}|{}|{}|{}|{:?}|{}",
                p.amount, p.period_ns, p.capacity, rate.dimension, rate.burndown_milli
            ));
            return Ok(RemoteQuota {
                rate: rate.clone(),
                shared,
                unit_us: unit,
                period,
                fp,
            });
        }
    }
    Err(format!(
        "capacity {} over {} µs is too large to count exactly on Redis (capacity × period \
         in the coarsest unit that divides the period must stay below 2^43); use a shorter \
         period or a smaller burst",
        p.capacity, period_us
    ))
}

/// FNV-1a, 48 bits: a stable name for a quota's record across processes and versions.
fn fingerprint(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h & 0xffff_ffff_ffff
}

/// The script source for these quotas (the header defines `Q`).
fn script_source(quotas: &[RemoteQuota]) -> String {
    let mut s = String::from("local Q = {\n");
    for q in quotas {
        let p = &q.rate.params;
        let algo = match p.algorithm {
            Algorithm::Gcra => 1,
            Algorithm::FixedWindow => 2,
            Algorithm::SlidingWindow => 3,
        };
        // The longest the quota may hold a call back, µs (-1: no limit of its own).
        let mw = match q.rate.max_wait {
            u64::MAX => -1,
            ns => i64::try_from(ns / 1_000).unwrap_or(i64::MAX).min(1 << 52),
        };
        let _ = writeln!(
            s,
            "  {{algo = {algo}, A = {}, P = {}, cap = {}, u = {}, fp = {}, shared = {}, mw = {mw}}},",
            p.amount, q.period, p.capacity, q.unit_us, q.fp, q.shared
        );
    }
    s.push_str("}\n");
    s.push_str(include_str!("redis.lua"));
    s
}

/// One quota's part of a reservation on Redis, kept for cancel and settle.
#[derive(Debug, Clone, Default)]
pub(crate) struct Snap {
    /// Whether this reservation charged the quota.
    pub(crate) charged: bool,
    snap: u64,
    /// Which lifetime of the state was charged (GCRA): refunds skip a newer one.
    stamp: u64,
    version: u64,
    prior: Vec<u8>,
}

/// A reservation on Redis: per quota (per-key first, then shared) what undoing it needs.
#[derive(Debug, Clone, Default)]
pub(crate) struct RemoteReserved {
    pub(crate) snaps: Vec<Snap>,
    /// Per quota, remaining units and µs until fully replenished right after the
    /// decision, when the store reports status with decisions (`None`: not covered by
    /// this reservation's part).
    pub(crate) status: Vec<Option<(u64, u64)>>,
}

impl RemoteReserved {
    /// Take in the quotas another phase of the same call reserved.
    pub(crate) fn merge(&mut self, other: RemoteReserved) {
        if self.snaps.is_empty() {
            *self = other;
            return;
        }
        for (a, b) in self.snaps.iter_mut().zip(other.snaps) {
            if b.charged {
                *a = b;
            }
        }
        if self.status.is_empty() {
            self.status = other.status;
        } else {
            for (a, b) in self.status.iter_mut().zip(other.status) {
                if b.is_some() {
                    *a = b;
                }
            }
        }
    }
}

/// A refusal from the script.
#[derive(Debug)]
pub(crate) struct RemoteRefusal {
    /// Index of the quota in the limiter's list.
    pub(crate) index: usize,
    pub(crate) retry_us: u64,
    pub(crate) remaining: u64,
    pub(crate) reset_us: u64,
}

/// A failed call to Redis, turned into the caller's error or a switch to the fallback.
pub(crate) type Outcome<T> = Result<T, StoreUnavailable>;

struct Job {
    letter: &'static str,
    keys: [Option<String>; 2],
    args: Vec<Arg>,
    reply: Option<oneshot::Sender<Outcome<Value>>>,
    /// Run on the reply when the caller went away before it arrived (its future was
    /// dropped mid-call): gives back what the operation took.
    orphan: Option<Orphan>,
}

/// Runs on the reply and the job's keys.
type Orphan = Box<dyn FnOnce(Value, &[Option<String>; 2]) + Send>;

/// What giving a reservation back needs besides the reservation and the identity's key:
/// the same for every call of one store, built once.
struct CancelCtx {
    skey: Option<String>,
    /// Per quota, whether it is shared.
    shared: Vec<bool>,
    /// On a cluster the identity's and the shared keys are cancelled separately.
    split: bool,
}

/// The cancel operations for reservation `r` of `charges` on the identity whose key is
/// `kkey` (`None` when the limiter has no per-key quota).
fn cancel_jobs(
    ctx: &CancelCtx,
    kkey: Option<&str>,
    charges: &[u64],
    r: &RemoteReserved,
) -> Vec<Job> {
    let mut part = 0;
    for (s, shared) in r.snaps.iter().zip(&ctx.shared) {
        if s.charged {
            part |= if *shared { 2 } else { 1 };
        }
    }
    let parts: &[i64] = match part {
        0 => &[],
        3 if ctx.split => &[1, 2],
        1 => &[1],
        2 => &[2],
        _ => &[3],
    };
    parts
        .iter()
        .map(|&part| {
            let mut args = vec![Arg::Int(part)];
            for (i, s) in r.snaps.iter().enumerate() {
                let units = if s.charged {
                    charges.get(i).copied().unwrap_or(0)
                } else {
                    0
                };
                args.push(int(units));
                args.push(int(s.snap));
                args.push(int(s.version));
                args.push(int(s.stamp));
                args.push(Arg::Bytes(s.prior.clone()));
            }
            Job {
                letter: "C",
                keys: [
                    kkey.filter(|_| part & 1 != 0).map(str::to_owned),
                    ctx.skey.clone().filter(|_| part & 2 != 0),
                ],
                args,
                reply: None,
                orphan: None,
            }
        })
        .collect()
}

/// How the script marks the reply of an operation that failed on its own.
const OP_ERROR: &[u8] = b"tollgate error: ";

/// A reserve reply: admitted (wait µs, reservation) or refused (quota position from 1,
/// retry µs, remaining, reset µs).
type Parsed = Result<(u64, RemoteReserved), (u64, u64, u64, u64)>;

/// Reads a reserve reply: one string of little-endian doubles, then the prior states'
/// bytes (see `op_reserve` in the script).
fn parse_reserved(v: &Value, quotas: usize, undo: bool, status: bool) -> Outcome<Parsed> {
    let Value::BulkString(bytes) = v else {
        return Err(malformed_reply());
    };
    let mut r = Doubles { bytes, at: 0 };
    if r.unsigned()? == 0 {
        return Ok(Err((
            r.unsigned()?,
            r.unsigned()?,
            r.unsigned()?,
            r.unsigned()?,
        )));
    }
    let wait = r.unsigned()?;
    let mut snaps = Vec::with_capacity(quotas);
    let mut prior_lens = [0u64; MAX_RATE_QUOTAS];
    for i in 0..quotas {
        let snap = r.signed()?;
        let stamp = r.unsigned()?;
        let (version, prior_len) = if undo {
            (r.unsigned()?, r.unsigned()?)
        } else {
            (0, 0)
        };
        if snap < 0 {
            snaps.push(Snap::default());
            continue;
        }
        *prior_lens.get_mut(i).ok_or_else(malformed_reply)? = prior_len;
        snaps.push(Snap {
            charged: true,
            snap: snap.unsigned_abs(),
            stamp,
            version,
            prior: Vec::new(),
        });
    }
    let mut after = Vec::new();
    if status {
        for _ in 0..quotas {
            let remaining = r.signed()?;
            let reset = r.unsigned()?;
            after.push((remaining >= 0).then_some((remaining.unsigned_abs(), reset)));
        }
    }
    for (snap, &len) in snaps
        .iter_mut()
        .zip(&prior_lens)
        .filter(|(_, len)| **len > 0)
    {
        let len = usize::try_from(len).map_err(|_| malformed_reply())?;
        let end = r.at.checked_add(len).ok_or_else(malformed_reply)?;
        snap.prior = bytes.get(r.at..end).ok_or_else(malformed_reply)?.to_vec();
        r.at = end;
    }
    Ok(Ok((
        wait,
        RemoteReserved {
            snaps,
            status: after,
        },
    )))
}

fn malformed_reply() -> StoreUnavailable {
    StoreUnavailable::new("malformed reply from the script")
}

/// Little-endian doubles read in turn; each is an integer the script computed exactly,
/// truncated as Redis truncates a Lua number it replies with.
struct Doubles<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Doubles<'_> {
    fn signed(&mut self) -> Outcome<i64> {
        let raw = self
            .bytes
            .get(self.at..self.at + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .ok_or_else(malformed_reply)?;
        self.at += 8;
        // `as` truncates toward zero and saturates, as Redis's reply conversion does.
        Ok(f64::from_le_bytes(raw) as i64)
    }

    fn unsigned(&mut self) -> Outcome<u64> {
        self.signed().map(|n| u64::try_from(n).unwrap_or(0))
    }
}

enum Arg {
    Int(i64),
    Bytes(Vec<u8>),
}

/// A number for the script: exact below 2^53; larger ones (absurd usage figures) are
/// clamped there, which only ever over-counts.
fn int(n: u64) -> Arg {
    const EXACT: u64 = (1 << 53) - 1;
    Arg::Int(i64::try_from(n.min(EXACT)).unwrap_or(0))
}

/// Counters of what the store has been through, for logs and metrics.
#[derive(Debug, Default)]
struct Health {
    up: AtomicBool,
    switches: AtomicU64,
}

/// A connection to one Redis (multiplexed, reconnecting) or to a Redis Cluster.
enum Conn {
    Single(ConnectionManager),
    Cluster {
        client: Box<ClusterClient>,
        /// Connected on first use, so a cluster that is down at start is an outage
        /// like any other rather than a build failure.
        conn: tokio::sync::Mutex<Option<ClusterConnection>>,
    },
}

/// A clone of the live connection for one call.
enum Live {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    async fn live(&self) -> Result<Live, RedisError> {
        match self {
            Conn::Single(m) => Ok(Live::Single(m.clone())),
            Conn::Cluster { client, conn } => {
                let mut guard = conn.lock().await;
                if let Some(c) = guard.as_ref() {
                    return Ok(Live::Cluster(c.clone()));
                }
                let c = client.get_async_connection().await?;
                *guard = Some(c.clone());
                Ok(Live::Cluster(c))
            }
        }
    }
}

impl Live {
    async fn invoke(&mut self, inv: &redis::ScriptInvocation<'_>) -> Result<Value, RedisError> {
        match self {
            Live::Single(c) => inv.invoke_async(c).await,
            Live::Cluster(c) => inv.invoke_async(c).await,
        }
    }
}

struct Shared {
    client_label: String,
    /// A key the probe writes to (a no-op write), so a read-only replica counts as down.
    probe_key: String,
    /// On a cluster, each batch first claims a one-minute id key on its slot, so a batch
    /// the client re-sends after a lost reply is refused instead of applied twice.
    dedupe: Option<(String, u64, AtomicU64)>,
    script: redis::Script,
    conn: Conn,
    timeout: Duration,
    health: Health,
    /// Wakes the probe when a call fails.
    probe: tokio::sync::Notify,
}

/// Connection, batching and failure handling for one limiter on Redis.
pub(crate) struct RedisStore {
    /// On a cluster, an identity's keys and the shared keys live on different slots, so
    /// no script call touches both.
    cluster: bool,
    quotas: Vec<RemoteQuota>,
    key_count: usize,
    prefix: String,
    tx: mpsc::UnboundedSender<Job>,
    shared: Arc<Shared>,
    leases: Mutex<std::collections::HashMap<u64, (String, String, u64)>>,
    lease_ids: AtomicU64,
    lease_salt: u64,
    pub(crate) lease_us: u64,
    /// Whether reserve replies carry every covered quota's status after the decision.
    status: bool,
    cancel: Arc<CancelCtx>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("redis", &self.shared.client_label)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// How to reach Redis.
pub(crate) enum Target {
    Url(String),
    Client(Box<redis::Client>),
    Manager(ConnectionManager),
    /// Seed nodes of a Redis Cluster.
    Cluster(Vec<String>),
}

/// A store's settings.
pub(crate) struct Settings {
    pub(crate) target: Target,
    pub(crate) prefix: String,
    pub(crate) timeout: Duration,
    pub(crate) lease: Duration,
    /// Whether each decision also reports every quota's status.
    pub(crate) status: bool,
}

fn is_outage(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.kind(),
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ReadOnly
            ) | ErrorKind::Io
                | ErrorKind::ClusterConnectionNotFound
        )
}

impl RedisStore {
    /// Connect (lazily: a Redis that is down at start is reported by the first call, or
    /// by [`RedisStore::ping`]) and start the batching, probing and lease-renewing tasks.
    /// Must run inside a Tokio runtime.
    pub(crate) fn new(
        settings: Settings,
        key_rates: &[(RateQuota, Arc<str>)],
        shared_rates: &[(RateQuota, Arc<str>)],
    ) -> Result<RedisStore, String> {
        if settings.prefix.contains(['{', '}']) {
            return Err(format!(
                "the key prefix {:?} contains a brace; braces are reserved for Redis Cluster hash tags",
                settings.prefix
            ));
        }
        let mut quotas = Vec::with_capacity(key_rates.len() + shared_rates.len());
        for (rate, name) in key_rates {
            quotas
                .push(remote_quota(rate, name, false).map_err(|e| format!("quota `{name}`: {e}"))?);
        }
        for (rate, name) in shared_rates {
            quotas
                .push(remote_quota(rate, name, true).map_err(|e| format!("quota `{name}`: {e}"))?);
        }
        debug_assert!(quotas.len() <= MAX_RATE_QUOTAS);
        let timeout = settings.timeout;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(100))
            .set_number_of_retries(2);
        let cluster = matches!(settings.target, Target::Cluster(_));
        let single = |m| Conn::Single(m);
        let (conn, label) = match settings.target {
            Target::Manager(m) => (single(m), "a connection manager".to_string()),
            Target::Client(c) => {
                let label = redact(&c.get_connection_info().addr().to_string());
                let m = ConnectionManager::new_lazy_with_config(*c, config)
                    .map_err(|e| e.to_string())?;
                (single(m), label)
            }
            Target::Url(url) => {
                let client = redis::Client::open(url.as_str())
                    .map_err(|e| format!("bad Redis URL {:?}: {e}", redact(&url)))?;
                let m = ConnectionManager::new_lazy_with_config(client, config)
                    .map_err(|e| e.to_string())?;
                (single(m), redact(&url))
            }
            Target::Cluster(nodes) => {
                if nodes.is_empty() {
                    return Err("a Redis Cluster needs at least one seed node URL".into());
                }
                let label = nodes
                    .iter()
                    .map(|n| redact(n))
                    .collect::<Vec<_>>()
                    .join(",");
                let client = ClusterClient::builder(nodes.iter().map(String::as_str))
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .retries(2)
                    .min_retry_wait(10)
                    .max_retry_wait(100)
                    .build()
                    .map_err(|e| format!("bad Redis Cluster nodes {label:?}: {e}"))?;
                (
                    Conn::Cluster {
                        client: Box::new(client),
                        conn: tokio::sync::Mutex::new(None),
                    },
                    label,
                )
            }
        };
        let shared = Arc::new(Shared {
            client_label: label,
            probe_key: format!("{}probe", settings.prefix),
            dedupe: cluster.then(|| {
                (
                    settings.prefix.clone(),
                    fastrand::u64(..),
                    AtomicU64::new(0),
                )
            }),
            script: redis::Script::new(&script_source(&quotas)),
            conn,
            timeout,
            health: Health {
                up: AtomicBool::new(true),
                ..Health::default()
            },
            probe: tokio::sync::Notify::new(),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let cancel = Arc::new(CancelCtx {
            skey: (quotas.len() > key_rates.len()).then(|| shared_name(&settings.prefix, "s")),
            shared: quotas.iter().map(|q| q.shared).collect(),
            split: cluster,
        });
        tokio::spawn(batcher(rx, Arc::downgrade(&shared), cluster));
        tokio::spawn(prober(Arc::downgrade(&shared)));
        Ok(RedisStore {
            cluster,
            key_count: key_rates.len(),
            quotas,
            prefix: settings.prefix,
            tx,
            shared,
            leases: Mutex::new(std::collections::HashMap::new()),
            lease_ids: AtomicU64::new(0),
            lease_salt: fastrand::u64(..),
            lease_us: u64::try_from(settings.lease.as_micros()).unwrap_or(u64::MAX),
            status: settings.status,
            cancel,
        })
    }

    /// Start renewing held leases in the background (needs an `Arc` of the limiter's
    /// inner state, which owns this store).
    pub(crate) fn renew_leases_with<F>(&self, renew: F)
    where
        F: Fn() -> Option<()> + Send + 'static,
    {
        let period = Duration::from_micros(self.lease_us / 3).max(Duration::from_millis(10));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if renew().is_none() {
                    return;
                }
            }
        });
    }

    /// Mark Redis down (a failed start-up ping): calls follow the policy and the probe
    /// brings the store back.
    pub(crate) fn mark_down(&self, why: &str) {
        mark(&self.shared, false, why);
    }

    /// Whether Redis answered the last call.
    pub(crate) fn is_up(&self) -> bool {
        self.shared.health.up.load(Ordering::Acquire)
    }

    /// How many times the store switched between Redis and its fallback.
    pub(crate) fn switches(&self) -> u64 {
        self.shared.health.switches.load(Ordering::Relaxed)
    }

    pub(crate) fn quotas(&self) -> &[RemoteQuota] {
        &self.quotas
    }

    pub(crate) fn two_phase(&self) -> bool {
        self.key_count > 0 && self.key_count < self.quotas.len()
    }

    fn has_shared(&self) -> bool {
        self.key_count < self.quotas.len()
    }

    /// An identity's key: `{prefix}{kind}{<key>}`, with `%` and `}` escaped so the whole key
    /// is the Redis Cluster hash tag and every key of one identity shares a slot.
    pub(crate) fn key_name(&self, kind: &str, key: &str) -> String {
        let mut s = String::with_capacity(self.prefix.len() + key.len() + 4);
        s.push_str(&self.prefix);
        s.push_str(kind);
        s.push('{');
        for ch in key.chars() {
            match ch {
                '%' => s.push_str("%25"),
                '}' => s.push_str("%7D"),
                c => s.push(c),
            }
        }
        s.push('}');
        s
    }

    fn keys(&self, key: &str, part: i64) -> [Option<String>; 2] {
        let k = (part & 1 != 0 && self.key_count > 0).then(|| self.key_name("k", key));
        let s = self.cancel.skey.clone().filter(|_| part & 2 != 0);
        [k, s]
    }

    fn send(&self, job: Job) {
        // The batcher lives as long as the store's sender; a send fails only while the
        // runtime shuts down, when the reply channel reports the failure.
        let _ = self.tx.send(job);
    }

    async fn call(
        &self,
        letter: &'static str,
        keys: [Option<String>; 2],
        args: Vec<Arg>,
        orphan: Option<Orphan>,
    ) -> Outcome<Value> {
        if !self.is_up() {
            return Err(StoreUnavailable::new(
                "Redis is down; waiting for it to return",
            ));
        }
        let (tx, rx) = oneshot::channel();
        self.send(Job {
            letter,
            keys,
            args,
            reply: Some(tx),
            orphan,
        });
        // Queueing counts too: a call waits at most two timeouts in all.
        match tokio::time::timeout(self.shared.timeout * 2, rx).await {
            // The script marks an operation that failed on its own with a string.
            Ok(Ok(Ok(Value::BulkString(e)))) if e.starts_with(OP_ERROR) => {
                Err(StoreUnavailable::new(&format!(
                    "Redis refused this operation ({})",
                    String::from_utf8_lossy(&e)
                )))
            }
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(StoreUnavailable::new("the Redis batcher stopped")),
            Err(_) => {
                mark(&self.shared, false, "calls queued past the timeout");
                Err(StoreUnavailable::new(&format!(
                    "no answer from Redis within {:?}",
                    self.shared.timeout * 2
                )))
            }
        }
    }

    /// Reserve `charges` (one per quota, per-key first) for `key` if the start is at most
    /// `max_wait_us` away (`None`: any wait). Returns the wait in µs from Redis's now.
    /// With `undo`, the reply carries what an exact cancel needs (callers that may give
    /// the reservation back: waiters).
    pub(crate) async fn reserve(
        &self,
        key: &str,
        charges: &[u64],
        part: Part,
        max_wait_us: Option<u64>,
        undo: bool,
    ) -> Outcome<Result<(u64, RemoteReserved), RemoteRefusal>> {
        let part = part_code(part);
        if let &[first, second] = self.parts(part) {
            // A cluster: the identity's quotas, then the shared ones; a refusal of the
            // second gives the first back (reserve-then-refund, never over a limit).
            let (w1, r1) = match self
                .reserve_part(key, charges, first, max_wait_us, true)
                .await?
            {
                Ok(x) => x,
                Err(refusal) => return Ok(Err(refusal)),
            };
            // Given back if the second part refuses, fails, or the caller goes away.
            let mut first = GiveBack {
                store: self,
                key,
                charges,
                reserved: Some(r1),
            };
            let second = self
                .reserve_part(key, charges, second, max_wait_us, undo)
                .await;
            return match second {
                Ok(Ok((w2, r2))) => {
                    let mut r1 = first.reserved.take().unwrap_or_default();
                    r1.merge(r2);
                    Ok(Ok((w1.max(w2), r1)))
                }
                Ok(Err(refusal)) => Ok(Err(refusal)),
                Err(e) => Err(e),
            };
        }
        self.reserve_part(key, charges, part, max_wait_us, undo)
            .await
    }

    /// The script calls an operation on `part` takes: one, or on a cluster, one per
    /// group of keys (the identity's, the shared ones).
    fn parts(&self, part: i64) -> &'static [i64] {
        match part {
            3 if self.cluster && self.key_count > 0 && self.has_shared() => &[1, 2],
            1 => &[1],
            2 => &[2],
            _ => &[3],
        }
    }

    async fn reserve_part(
        &self,
        key: &str,
        charges: &[u64],
        part: i64,
        max_wait_us: Option<u64>,
        undo: bool,
    ) -> Outcome<Result<(u64, RemoteReserved), RemoteRefusal>> {
        let mut args = Vec::with_capacity(3 + charges.len());
        args.push(Arg::Int(part));
        args.push(max_wait_us.map_or(Arg::Int(-1), int));
        let status = self.status;
        args.push(Arg::Int(i64::from(undo) | (i64::from(status) << 1)));
        args.extend(charges.iter().map(|&c| int(c)));
        // If the caller goes away mid-call, the reservation is given back when it lands.
        // (Nothing here allocates but the box: the keys come with the job.)
        let (ctx, tx) = (self.cancel.clone(), self.tx.clone());
        let n = self.quotas.len();
        let mut owned = [0; MAX_RATE_QUOTAS];
        owned[..n].copy_from_slice(&charges[..n]);
        let orphan: Orphan = Box::new(move |v, keys| {
            if let Ok(Ok((_, r))) = parse_reserved(&v, n, undo, status) {
                for job in cancel_jobs(&ctx, keys[0].as_deref(), &owned[..n], &r) {
                    let _ = tx.send(job);
                }
            }
        });
        let v = self
            .call("R", self.keys(key, part), args, Some(orphan))
            .await?;
        match parse_reserved(&v, n, undo, status)? {
            Ok(admitted) => Ok(Ok(admitted)),
            Err((bind, retry_us, remaining, reset_us)) => {
                let bind = usize::try_from(bind).unwrap_or(1).saturating_sub(1);
                let index = self
                    .quotas
                    .get(bind)
                    .map(|q| q.rate.index)
                    .ok_or_else(|| StoreUnavailable::new("the script named no quota"))?;
                Ok(Err(RemoteRefusal {
                    index,
                    retry_us,
                    remaining,
                    reset_us,
                }))
            }
        }
    }

    /// Give a waiter's reservation back (fire and forget: a lost cancel only
    /// over-counts).
    pub(crate) fn cancel(&self, key: &str, charges: &[u64], r: &RemoteReserved) {
        if !self.is_up() {
            return;
        }
        let kkey = (self.key_count > 0).then(|| self.key_name("k", key));
        for job in cancel_jobs(&self.cancel, kkey.as_deref(), charges, r) {
            self.send(job);
        }
    }

    /// Refund (or charge) the difference between estimate and usage in every quota that
    /// charges actual usage.
    pub(crate) async fn settle(
        &self,
        key: &str,
        deltas: &[(u64, u64)],
        r: &RemoteReserved,
    ) -> Outcome<()> {
        if deltas.iter().all(|d| *d == (0, 0)) {
            return Ok(());
        }
        for &part in self.parts(3) {
            let mut args = Vec::with_capacity(1 + 3 * self.quotas.len());
            args.push(Arg::Int(part));
            for (i, (refund, extra)) in deltas.iter().enumerate() {
                let snap = r.snaps.get(i).filter(|s| s.charged);
                // Nothing to refund on a quota this call did not charge.
                args.push(int(if snap.is_some() { *refund } else { 0 }));
                args.push(int(*extra));
                args.push(int(snap.map_or(0, |s| s.snap)));
                args.push(int(snap.map_or(0, |s| s.stamp)));
            }
            self.call("S", self.keys(key, part), args, None).await?;
        }
        Ok(())
    }

    /// Per quota (per-key first): units remaining and µs until fully replenished.
    pub(crate) async fn status(&self, key: &str) -> Outcome<Vec<(usize, u64, u64)>> {
        let mut out = Vec::with_capacity(self.quotas.len());
        for &part in self.parts(3) {
            let v = self
                .call("T", self.keys(key, part), vec![Arg::Int(part)], None)
                .await?;
            let v = as_array(&v)?;
            for (i, q) in self.quotas.iter().enumerate() {
                let remaining = signed(v, 2 * i)?;
                if remaining >= 0 {
                    let reset = num(v, 2 * i + 1)?;
                    out.push((q.rate.index, remaining.unsigned_abs(), reset));
                }
            }
        }
        if out.len() != self.quotas.len() {
            return Err(StoreUnavailable::new("malformed status reply"));
        }
        Ok(out)
    }

    /// The lease set of concurrency quota `quota` (by name) for `key` (`None`: shared).
    /// Each quota has its own set, so limiters with different concurrency quotas under
    /// one prefix never count each other's slots; limiters sharing a quota share its set.
    fn lease_set(&self, key: Option<&str>, quota: &str) -> String {
        let fp = fingerprint(quota);
        match key {
            Some(k) => self.key_name(&format!("c{fp:012x}"), k),
            None => shared_name(&self.prefix, &format!("sc{fp:012x}")),
        }
    }

    /// Take one of `limit` slots of concurrency quota `quota` for `key` (`None`: the
    /// shared slots) as a lease. Returns the lease, or `None` when every slot is held.
    pub(crate) async fn lease(
        &self,
        key: Option<&str>,
        quota: &str,
        limit: u64,
    ) -> Outcome<Option<Lease>> {
        let zkey = self.lease_set(key, quota);
        let n = self.lease_ids.fetch_add(1, Ordering::Relaxed);
        let id = format!("{:016x}{n:x}", self.lease_salt);
        let args = vec![
            int(limit),
            int(self.lease_us),
            Arg::Bytes(id.clone().into_bytes()),
        ];
        let release = |zkey: String, id: String| Job {
            letter: "D",
            keys: [Some(zkey), None],
            args: vec![Arg::Bytes(id.into_bytes())],
            reply: None,
            orphan: None,
        };
        // If the caller goes away mid-call, a lease taken meanwhile is released.
        let (tx, z, i) = (self.tx.clone(), zkey.clone(), id.clone());
        let orphan: Orphan = Box::new(move |v, _| {
            if let Value::Array(a) = v
                && num(&a, 0).is_ok_and(|ok| ok == 1)
            {
                let _ = tx.send(release(z, i));
            }
        });
        let v = match self
            .call("L", [Some(zkey.clone()), None], args, Some(orphan))
            .await
        {
            Ok(v) => v,
            Err(e) => {
                // The lease may have been taken before the failure: give it back (it
                // expires by itself if this is lost too).
                self.send(release(zkey, id));
                return Err(e);
            }
        };
        let read = as_array(&v).and_then(|v| Ok((num(v, 0)?, num(v, 1)?)));
        let (taken, held_now) = match read {
            Ok(r) => r,
            Err(e) => {
                // Unreadable: whatever was taken is given back, never leaked.
                self.send(release(zkey, id));
                return Err(e);
            }
        };
        if taken == 0 {
            return Ok(None);
        }
        if let Ok(mut held) = self.leases.lock() {
            held.insert(n, (zkey, id, limit));
        }
        Ok(Some(Lease(n, held_now)))
    }

    /// Free slots of concurrency quota `quota` for `key` (`None`: the shared slots) now.
    pub(crate) async fn free_slots(
        &self,
        key: Option<&str>,
        quota: &str,
        limit: u64,
    ) -> Outcome<u64> {
        let zkey = self.lease_set(key, quota);
        let v = self.call("F", [Some(zkey), None], Vec::new(), None).await?;
        let used = match v {
            Value::Int(n) => u64::try_from(n).unwrap_or(0),
            _ => return Err(StoreUnavailable::new("malformed slots reply")),
        };
        Ok(limit.saturating_sub(used))
    }

    /// Give a slot back (fire and forget: a lost release expires with its lease).
    pub(crate) fn release(&self, lease: &Lease) {
        let held = self.leases.lock().ok().and_then(|mut m| m.remove(&lease.0));
        if let Some((zkey, id, _)) = held {
            self.send(Job {
                letter: "D",
                keys: [Some(zkey), None],
                args: vec![Arg::Bytes(id.into_bytes())],
                reply: None,
                orphan: None,
            });
        }
    }

    /// Renew every held lease (called periodically).
    pub(crate) fn renew_all(&self) {
        if !self.is_up() {
            return;
        }
        let held: Vec<(String, String, u64)> = match self.leases.lock() {
            Ok(m) => m.values().cloned().collect(),
            Err(_) => return,
        };
        for (zkey, id, limit) in held {
            self.send(Job {
                letter: "N",
                keys: [Some(zkey), None],
                args: vec![int(self.lease_us), int(limit), Arg::Bytes(id.into_bytes())],
                reply: None,
                orphan: None,
            });
        }
    }

    /// Ask Redis for its time: `Ok` when it answers within the timeout.
    pub(crate) async fn ping(&self) -> Outcome<()> {
        ping(&self.shared).await
    }

    /// Estimate and actual charges per quota, in script order.
    pub(crate) fn charges(&self, cost: &crate::Cost) -> [u64; MAX_RATE_QUOTAS] {
        let mut out = [0; MAX_RATE_QUOTAS];
        for (o, q) in out.iter_mut().zip(&self.quotas) {
            *o = q.rate.charge(cost);
        }
        out
    }

    /// `(refund, extra)` per quota for a call admitted at `cost` that used `actual`.
    pub(crate) fn deltas(
        &self,
        cost: &crate::Cost,
        actual: &crate::Cost,
    ) -> [(u64, u64); MAX_RATE_QUOTAS] {
        let mut out = [(0, 0); MAX_RATE_QUOTAS];
        for (o, q) in out.iter_mut().zip(&self.quotas) {
            if q.rate.accounting == Accounting::Actual {
                let (est, act) = (q.rate.charge(cost), q.rate.charge(actual));
                *o = (est.saturating_sub(act), act.saturating_sub(est));
            }
        }
        out
    }
}

/// A reservation given back when dropped unless taken.
struct GiveBack<'a> {
    store: &'a RedisStore,
    key: &'a str,
    charges: &'a [u64],
    reserved: Option<RemoteReserved>,
}

impl Drop for GiveBack<'_> {
    fn drop(&mut self) {
        if let Some(r) = self.reserved.take() {
            self.store.cancel(self.key, self.charges, &r);
        }
    }
}

/// A held concurrency lease, renewed in the background until released: its id, and how
/// many slots were held (this one included) when it was taken.
#[derive(Debug)]
pub(crate) struct Lease(u64, pub(crate) u64);

fn part_code(part: Part) -> i64 {
    match part {
        Part::Key => 1,
        Part::Shared => 2,
        Part::All => 3,
    }
}

fn as_array(v: &Value) -> Outcome<&[Value]> {
    match v {
        Value::Array(a) => Ok(a),
        _ => Err(malformed_reply()),
    }
}

fn num(v: &[Value], i: usize) -> Outcome<u64> {
    signed(v, i).map(|n| u64::try_from(n).unwrap_or(0))
}

fn signed(v: &[Value], i: usize) -> Outcome<i64> {
    match v.get(i) {
        Some(Value::Int(n)) => Ok(*n),
        _ => Err(StoreUnavailable::new("malformed number in a script reply")),
    }
}

/// The key of the shared (account-wide) quotas' states, or of their `kind` of record.
fn shared_name(prefix: &str, kind: &str) -> String {
    format!("{prefix}{kind}{{shared}}")
}

/// Hide the password of a Redis URL.
pub(crate) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

fn mark(shared: &Shared, up: bool, why: &str) {
    if shared.health.up.swap(up, Ordering::AcqRel) != up {
        shared.health.switches.fetch_add(1, Ordering::Relaxed);
        if up {
            tracing::warn!(redis = %shared.client_label, "Redis is back; deciding on Redis again");
        } else {
            tracing::error!(redis = %shared.client_label, error = why, "Redis is unavailable; following the store policy");
            shared.probe.notify_one();
        }
    }
}

async fn ping(shared: &Shared) -> Outcome<()> {
    // The script itself, with one no-op write: proves Redis answers, has (or reloads) the
    // script, and accepts writes (a replica left read-only by a failover does not).
    let mut inv = shared.script.prepare_invoke();
    inv.key(shared.probe_key.as_str());
    let mut op = b"F".to_vec();
    op.extend_from_slice(&1f64.to_le_bytes());
    op.extend_from_slice(&0f64.to_le_bytes());
    inv.arg(op);
    let call = async {
        let mut conn = shared.conn.live().await?;
        conn.invoke(&inv).await
    };
    match tokio::time::timeout(shared.timeout, call).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(StoreUnavailable::new(&e.to_string())),
        Err(_) => Err(StoreUnavailable::new("Redis did not answer in time")),
    }
}

/// While Redis is marked down, ping it every 50 ms and mark it up when it answers.
async fn prober(shared: std::sync::Weak<Shared>) {
    loop {
        let Some(s) = shared.upgrade() else { return };
        if s.health.up.load(Ordering::Acquire) {
            // Re-check periodically in case a notification raced the load above.
            let _ = tokio::time::timeout(Duration::from_millis(500), s.probe.notified()).await;
            continue;
        }
        if ping(&s).await.is_ok() {
            mark(&s, true, "");
        } else {
            drop(s);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Gather waiting operations into script calls, a few in flight at a time. On a
/// cluster, one call per hash slot (a script may only touch keys of one slot).
async fn batcher(
    mut rx: mpsc::UnboundedReceiver<Job>,
    shared: std::sync::Weak<Shared>,
    cluster: bool,
) {
    let in_flight = Arc::new(Semaphore::new(if cluster {
        MAX_IN_FLIGHT_CLUSTER
    } else {
        MAX_IN_FLIGHT
    }));
    let mut jobs = Vec::with_capacity(MAX_BATCH);
    loop {
        // A free slot first, then everything that queued meanwhile: while calls are in
        // flight, waiting operations pile up and go in one larger batch.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        if rx.recv_many(&mut jobs, MAX_BATCH).await == 0 {
            return;
        }
        let Some(s) = shared.upgrade() else { return };
        let batch = std::mem::replace(&mut jobs, Vec::with_capacity(MAX_BATCH));
        if !cluster {
            send_in_order(async move {
                run_batch(&s, batch, permit).await;
            })
            .await;
            continue;
        }
        let mut by_slot: Vec<(u16, Vec<Job>)> = Vec::new();
        for job in batch {
            let slot = job.keys[0]
                .as_deref()
                .or(job.keys[1].as_deref())
                .map_or(0, |k| key_slot(k.as_bytes()));
            match by_slot.iter_mut().find(|(s, _)| *s == slot) {
                Some((_, g)) => g.push(job),
                None => by_slot.push((slot, vec![job])),
            }
        }
        // The first group uses the slot already taken; the others take their own.
        let mut permit = Some(permit);
        for (_, group) in by_slot {
            let p = match permit.take() {
                Some(p) => p,
                None => match in_flight.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let s = s.clone();
            send_in_order(async move {
                run_batch(&s, group, p).await;
            })
            .await;
        }
    }
}

/// Run a batch's script call on its own task, after polling it once here: that first
/// poll queues the call on the connection, so calls reach Redis in the order the
/// batches were made, and so do the operations in them (a slot given back by a dropped
/// permit is free for the very next call). Spawned tasks alone may start in any order.
///
/// The call opts out of Tokio's cooperative budget, which could otherwise make that
/// first poll return before queuing anything.
async fn send_in_order(call: impl Future<Output = ()> + Send + 'static) {
    let mut call = Box::pin(tokio::task::unconstrained(call));
    let pending = std::future::poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx).is_pending())).await;
    if pending {
        tokio::spawn(call);
    }
}

/// The Redis Cluster hash slot of a key: CRC16 (XMODEM) of its hash tag, mod 16384.
fn key_slot(key: &[u8]) -> u16 {
    let tag = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    let mut crc: u16 = 0;
    for &b in tag {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16_384
}

/// Send one batch; `slot` (its in-flight permit) is freed as soon as Redis answers, so
/// the next batch goes out while this one's replies are handed out.
async fn run_batch(shared: &Shared, batch: Vec<Job>, slot: tokio::sync::OwnedSemaphorePermit) {
    let mut inv = shared.script.prepare_invoke();
    let mut nkeys = 0usize;
    if let Some((prefix, salt, ids)) = &shared.dedupe {
        let first = batch
            .first()
            .and_then(|j| j.keys[0].as_deref().or(j.keys[1].as_deref()))
            .unwrap_or("{}");
        let tag = first
            .find('{')
            .and_then(|open| {
                let rest = &first[open..];
                rest.find('}').map(|close| &rest[..=close])
            })
            .unwrap_or("{}");
        let id = ids.fetch_add(1, Ordering::Relaxed);
        inv.key(format!("{prefix}b{tag}:{salt:x}.{id:x}"));
        nkeys += 1;
        let mut op = b"!".to_vec();
        op.extend_from_slice(&1f64.to_le_bytes());
        inv.arg(op);
    }
    let mut op = Vec::with_capacity(128);
    let mut tail = Vec::new();
    for job in &batch {
        // One argument per operation: its letter, its numbers as little-endian doubles
        // (every one below 2^53, so exact), then its byte strings.
        op.clear();
        tail.clear();
        op.extend_from_slice(job.letter.as_bytes());
        for k in &job.keys {
            let index = match k {
                Some(k) => {
                    nkeys += 1;
                    inv.key(k.as_str());
                    nkeys
                }
                None => 0,
            };
            op.extend_from_slice(&(index as f64).to_le_bytes());
        }
        for a in &job.args {
            match a {
                Arg::Int(n) => op.extend_from_slice(&(*n as f64).to_le_bytes()),
                Arg::Bytes(b) => {
                    op.extend_from_slice(&(b.len() as f64).to_le_bytes());
                    tail.extend_from_slice(b);
                }
            }
        }
        op.extend_from_slice(&tail);
        inv.arg(op.as_slice());
    }
    let call = async {
        let mut conn = shared.conn.live().await?;
        conn.invoke(&inv).await
    };
    let answer = tokio::time::timeout(shared.timeout, call).await;
    drop(slot);
    let result = match answer {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            if is_outage(&e) {
                mark(shared, false, &e.to_string());
            } else {
                tracing::error!(error = %e, "the tollgate script failed");
            }
            Err(StoreUnavailable::new(&e.to_string()))
        }
        Err(_) => {
            mark(shared, false, "timed out");
            Err(StoreUnavailable::new(&format!(
                "Redis did not answer within {:?}",
                shared.timeout
            )))
        }
    };
    match result {
        Ok(Value::Array(replies)) if replies.len() == batch.len() => {
            for (job, v) in batch.into_iter().zip(replies) {
                if let Some(tx) = job.reply
                    && let Err(Ok(v)) = tx.send(Ok(v))
                    && let Some(orphan) = job.orphan
                {
                    orphan(v, &job.keys);
                }
            }
        }
        Ok(_) => {
            for job in batch {
                if let Some(tx) = job.reply {
                    let _ = tx.send(Err(StoreUnavailable::new("malformed batch reply")));
                }
            }
        }
        Err(e) => {
            for job in batch {
                if let Some(tx) = job.reply {
                    let _ = tx.send(Err(e.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algo::Params;
    use crate::quota::Dimension;

    fn rate(amount: u64, period_ns: u64, capacity: u64) -> RateQuota {
        RateQuota {
            index: 0,
            params: Params {
                amount,
                period_ns,
                capacity,
                algorithm: Algorithm::Gcra,
            },
            dimension: Dimension::Requests,
            burndown_milli: 1000,
            accounting: Accounting::Estimate,
            settle_slot: None,
            max_wait: u64::MAX,
        }
    }

    fn packed(numbers: &[f64], tail: &[u8]) -> Value {
        let mut bytes: Vec<u8> = numbers.iter().flat_map(|n| n.to_le_bytes()).collect();
        bytes.extend_from_slice(tail);
        Value::BulkString(bytes)
    }

    #[test]
    fn reserve_replies_are_read_whole_and_bad_ones_are_errors_not_panics() {
        // Admitted after 250 µs, with undo and status, over two quotas: the first charged
        // (its prior state is 3 bytes), the second not.
        let reply = packed(
            &[
                1.0, 250.0, 7.0, 9.0, 11.0, 3.0, -1.0, 0.0, 0.0, 0.0, 5.0, 60.0, -1.0, -1.0,
            ],
            b"abc",
        );
        let (wait, reserved) = parse_reserved(&reply, 2, true, true)
            .expect("well formed")
            .expect("admitted");
        assert_eq!(wait, 250);
        let s = &reserved.snaps;
        assert!(s[0].charged && !s[1].charged);
        assert_eq!((s[0].snap, s[0].stamp, s[0].version), (7, 9, 11));
        assert_eq!(s[0].prior, b"abc");
        assert_eq!(reserved.status, vec![Some((5, 60)), None]);
        // Refused by quota 2: retry in 1.5 ms (truncated as Redis would), 0 left.
        let refused = parse_reserved(
            &packed(&[0.0, 2.0, 1500.9, 0.0, 4000.0], b""),
            2,
            false,
            false,
        );
        assert_eq!(
            refused.expect("well formed").err(),
            Some((2, 1500, 0, 4000))
        );
        // Cut short anywhere, or naming more prior bytes than it holds: an error.
        let Value::BulkString(whole) = reply else {
            unreachable!()
        };
        for cut in 0..whole.len() {
            let short = Value::BulkString(whole[..cut].to_vec());
            assert!(
                parse_reserved(&short, 2, true, true).is_err(),
                "cut at {cut}"
            );
        }
        assert!(parse_reserved(&Value::Int(1), 2, false, false).is_err());
    }

    #[test]
    fn units_are_as_fine_as_exactness_allows() {
        let minute = 60_000_000_000;
        assert_eq!(
            remote_quota(&rate(500, minute, 500), "r", false).map(|q| q.unit_us),
            Ok(1)
        );
        // 150 M tokens per minute: 1.5e8 × 6e7 µs is past 2^43, so a coarser unit.
        let q = remote_quota(&rate(150_000_000, minute, 150_000_000), "t", false);
        assert!(q.as_ref().is_ok_and(|q| q.unit_us > 1
            && u128::from(q.rate.params.capacity) * u128::from(q.period) < MAX_SPAN));
        assert!(
            remote_quota(&rate(1, 1_500, 1), "x", false)
                .is_err_and(|e| e.contains("whole microseconds"))
        );
        // $100,000 a month in micro-dollars counts in days; $10,000 a day in ten minutes.
        let month = 30 * 86_400_000_000_000;
        let q = remote_quota(&rate(100_000_000_000, month, 100_000_000_000), "s", false);
        assert_eq!(q.map(|q| q.unit_us), Ok(86_400_000_000));
        let day = 86_400_000_000_000;
        let q = remote_quota(&rate(10_000_000_000, day, 10_000_000_000), "s", false);
        assert_eq!(q.map(|q| q.unit_us), Ok(600_000_000));
        assert!(
            remote_quota(&rate(u64::MAX / 2, month, u64::MAX / 2), "s", false)
                .is_err_and(|e| e.contains("too large"))
        );
    }

    #[test]
    fn slots_follow_the_hash_tag() {
        // Reference values from the Redis Cluster specification (CRC16 XMODEM of "123456789" is 0x31C3).
        assert_eq!(key_slot(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"p:k{user}"), key_slot(b"p:c{user}"));
        assert_eq!(key_slot(b"p:k{user}"), key_slot(b"user"));
        assert_eq!(key_slot(b"a{}b"), key_slot(b"a{}b"));
    }

    #[test]
    fn keys_escape_braces_so_one_identity_is_one_slot() {
        assert_eq!(
            redact("redis://user:pw@host:6379/0"),
            "redis://***@host:6379/0"
        );
        assert_eq!(redact("redis://host:6379"), "redis://host:6379");
        assert_eq!(fingerprint("a"), fingerprint("a"));
        assert_ne!(fingerprint("a"), fingerprint("b"));
    }
}
