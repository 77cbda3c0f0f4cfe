//! Pacing an upstream account to limits the gateway learns from the account's own
//! answers, and accounts that are each caller's own (the caller's key passed through).
//!
//! An upstream with no limits in the configuration is paced to the limits its answers'
//! rate-limit headers report (`x-ratelimit-limit-*`, `anthropic-ratelimit-*-limit`): the
//! first request to an account goes alone ("looks"), the others wait for its answer, and
//! from then on every request takes its turn in a limiter holding those limits, pulled
//! down to what the headers say is left. An upstream that passes callers' keys through
//! paces each distinct key as its own account, keyed by a hash of the key.
//!
//! This module never forwards, authenticates or answers; it keeps, per account key, the
//! limits known and the limiter holding them, and decides nothing itself (the limiters
//! do).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http::HeaderMap;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tollgate::provider::RateLimitHeaders;
use tollgate::{Accounting, Limiter, Quota};

/// How long a request waits for the one looking at an account, at least: a first
/// answer that takes longer (a long generation, whose headers come with its end) lets
/// the others go unpaced rather than hold them all.
const LOOK_WAIT: Duration = Duration::from_secs(10);

/// The most account keys remembered. When full, keys idle for [`IDLE`] are forgotten,
/// then the least recently seen tenth: a flood of junk keys can only make real keys look
/// again, never go unpaced.
const MAX_KEYS: usize = 100_000;

/// A key unseen this long has nothing left to pace (learned limits are per minute).
const IDLE: Duration = Duration::from_secs(120);

/// How long a limiter that could not be built (Redis unreachable) is not tried again.
const RETRY_BUILD: Duration = Duration::from_secs(10);

/// Where learned limiters live: the store of the gateway's other limiters.
#[derive(Clone)]
pub(crate) struct Store {
    pub(crate) redis: Option<String>,
    pub(crate) prefix: String,
}

/// The limits an answer reports, per minute: requests, tokens, input and output tokens.
type Learned = [Option<u64>; 4];

/// What is known of one account key.
#[derive(Clone)]
enum Known {
    /// Nothing yet: the next request looks.
    Unknown,
    /// A request is looking: the others wait until this turns true.
    Looking(watch::Receiver<bool>),
    /// Limits learned, and the limiter holding them.
    Paced(Learned, Limiter),
    /// The upstream answered with success and no rate-limit headers: nothing to pace to.
    Unpaced,
}

struct Entry {
    known: Known,
    /// Woken when the look in progress ends, however it ends.
    woken: Option<watch::Sender<bool>>,
    /// An absorb is running for this key: answers arriving meanwhile skip theirs.
    absorbing: Arc<AtomicBool>,
    /// Counts the changes of `known`: a change decided on an older reading is dropped.
    version: u64,
    /// Last time a request used this key.
    seen: Instant,
}

impl Entry {
    fn new(now: Instant) -> Entry {
        Entry {
            known: Known::Unknown,
            woken: None,
            absorbing: Arc::default(),
            version: 0,
            seen: now,
        }
    }

    /// Sets `known`, and wakes whoever waits for a look to end.
    fn set(&mut self, known: Known) {
        self.known = known;
        self.version += 1;
        if let Some(tx) = self.woken.take() {
            let _ = tx.send(true);
        }
    }
}

/// One upstream account's pacing, for every key it is paced under.
pub(crate) struct Pace {
    /// The upstream's name, for quota names and the log.
    name: String,
    /// Limits from the configuration, per key (an upstream passing callers' keys
    /// through, with limits given); `None`: learned from the answers.
    configured: Option<Limiter>,
    store: Store,
    keys: Mutex<HashMap<String, Entry>>,
    /// Limiters of learned limits, shared by every key with the same limits.
    limiters: tokio::sync::Mutex<HashMap<Learned, Limiter>>,
    /// When building a limiter last failed.
    failed: Mutex<Option<Instant>>,
    /// Said once: the key table was full.
    full: AtomicBool,
}

/// What a request gets from [`Pace::turn`].
pub(crate) enum Turn {
    /// Take a turn in this limiter, under the account key.
    Limiter(Limiter),
    /// This request looks: it goes alone, and the others wait for its answer (or until
    /// the guard drops without one: then the next request looks).
    Look(Looking),
    /// Nothing to pace to.
    Free,
}

/// The right to look at one account key, held by the request that goes alone.
pub(crate) struct Looking {
    pace: Arc<Pace>,
    key: String,
}

impl Drop for Looking {
    fn drop(&mut self) {
        // No answer was learned from (the request failed, or the caller left): the next
        // request looks.
        let mut keys = self.pace.keys();
        if let Some(e) = keys.get_mut(&self.key)
            && matches!(e.known, Known::Looking(_))
        {
            e.set(Known::Unknown);
        }
    }
}

/// The headers that name a caller's own account: its credentials, and the organization
/// and project it bills. Passed through when the caller's key is, and hashed into its
/// account key.
pub(crate) const OWN_ACCOUNT_HEADERS: [&str; 5] = [
    "authorization",
    "x-api-key",
    "api-key",
    "openai-organization",
    "openai-project",
];

/// The account key of a caller whose own key is passed through: a hash of its
/// credentials (`Authorization`, `x-api-key`, `api-key`) and of the organization and
/// project it names (providers limit each apart), never the key itself.
///
/// Two callers with the same key are one account; no key at all is one account too.
pub(crate) fn caller_account(headers: &HeaderMap) -> String {
    let mut hash = Sha256::new();
    for name in OWN_ACCOUNT_HEADERS {
        for v in headers.get_all(name) {
            hash.update(name.as_bytes());
            hash.update(b"\0");
            hash.update(v.as_bytes());
            hash.update(b"\0");
        }
    }
    let digest = hash.finalize();
    let mut out = String::from("key-");
    for b in &digest[..16] {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

impl Pace {
    /// Pacing for upstream `name`: to `configured` (per-key quotas) when given, else to
    /// limits learned from its answers, on `store`.
    pub(crate) fn new(name: &str, configured: Option<Limiter>, store: Store) -> Pace {
        Pace {
            name: name.to_string(),
            configured,
            store,
            keys: Mutex::new(HashMap::new()),
            limiters: tokio::sync::Mutex::new(HashMap::new()),
            failed: Mutex::new(None),
            full: AtomicBool::new(false),
        }
    }

    fn keys(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The key a request to `model` is paced under, for an account named `account`
    /// (`account`, or a caller's [`caller_account`]): learned limits are per model, as
    /// providers report them (gpt-4o's and gpt-4o-mini's are not one budget); configured
    /// ones are the account's whole.
    pub(crate) fn key(&self, account: &str, model: &str) -> String {
        if self.configured.is_some() {
            return account.to_string();
        }
        if model.len() <= 256 && !model.contains(['\n', '\r']) {
            format!("{account}|{model}")
        } else {
            let digest = Sha256::digest(model.as_bytes());
            let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
            format!("{account}|model-{hex}")
        }
    }

    /// The entry of `key`, made when missing; when the table is full, forgets idle keys,
    /// then the least recently seen tenth, first.
    fn entry<'a>(&self, keys: &'a mut HashMap<String, Entry>, key: &str) -> &'a mut Entry {
        let now = Instant::now();
        if !keys.contains_key(key) && keys.len() >= MAX_KEYS {
            keys.retain(|_, e| now.duration_since(e.seen) < IDLE);
            if keys.len() >= MAX_KEYS {
                if !self.full.swap(true, Ordering::Relaxed) {
                    tracing::warn!(upstream = %self.name, "{MAX_KEYS} account keys seen within {IDLE:?}: the least recently seen are forgotten (they look again when they come back)");
                }
                let mut seen: Vec<Instant> = keys.values().map(|e| e.seen).collect();
                seen.sort_unstable();
                let cut = seen[MAX_KEYS / 10];
                keys.retain(|_, e| e.seen > cut);
            }
        }
        let e = keys
            .entry(key.to_string())
            .or_insert_with(|| Entry::new(now));
        e.seen = now;
        e
    }

    /// The limiter a request under account `key` takes its turn in, once it may: while
    /// another request looks at the account, this waits for its answer (at most
    /// `wait`, and at least [`LOOK_WAIT`]: learning is not a limit, and a tier that
    /// rejects waits for it too).
    pub(crate) async fn turn(self: &Arc<Self>, key: &str, wait: Duration) -> Turn {
        if let Some(l) = &self.configured {
            return Turn::Limiter(l.clone());
        }
        let deadline = tokio::time::Instant::now() + wait.max(LOOK_WAIT);
        loop {
            let known = {
                let mut keys = self.keys();
                let entry = self.entry(&mut keys, key);
                if matches!(entry.known, Known::Unknown) {
                    let (tx, rx) = watch::channel(false);
                    entry.set(Known::Looking(rx));
                    entry.woken = Some(tx);
                    return Turn::Look(Looking {
                        pace: self.clone(),
                        key: key.to_string(),
                    });
                }
                entry.known.clone()
            };
            match known {
                Known::Paced(_, l) => return Turn::Limiter(l),
                Known::Unpaced | Known::Unknown => return Turn::Free,
                Known::Looking(mut rx) => {
                    let woke = tokio::time::timeout_at(deadline, rx.wait_for(|w| *w)).await;
                    if !matches!(woke, Ok(Ok(_))) {
                        return Turn::Free;
                    }
                }
            }
        }
    }

    /// The limiter a retry under account `key` takes its turn in, without waiting for a
    /// look.
    pub(crate) fn limiter(&self, key: &str) -> Option<Limiter> {
        if let Some(l) = &self.configured {
            return Some(l.clone());
        }
        match self.keys().get(key).map(|e| &e.known) {
            Some(Known::Paced(_, l)) => Some(l.clone()),
            _ => None,
        }
    }

    /// Takes in an answer of `status` for account `key`, with its rate-limit headers,
    /// `age` after its request was sent. Learns the limits the headers report (a key not
    /// yet paced, or limits that changed) and wakes whoever waits for them; or pulls the
    /// limiter down to what they say is left (off the request's path). A look answered
    /// with neither headers nor success (a 5xx from a load balancer, a 401) learned
    /// nothing: the next request looks; a key the upstream refused (401, 403) is
    /// forgotten.
    pub(crate) async fn observe(
        &self,
        key: &str,
        status: http::StatusCode,
        seen: &RateLimitHeaders,
        age: Duration,
    ) {
        let learned: Learned = [
            seen.requests,
            seen.tokens,
            seen.input_tokens,
            seen.output_tokens,
        ]
        .map(|b| b.and_then(|b| b.limit).filter(|&n| n > 0));
        let refused = matches!(status.as_u16(), 401 | 403);
        let (known, version, absorbing) = {
            let mut keys = self.keys();
            if refused && self.configured.is_none() {
                // Nothing to keep for a key the upstream does not take.
                if let Some(mut e) = keys.remove(key) {
                    e.set(Known::Unknown);
                }
                return;
            }
            let e = self.entry(&mut keys, key);
            (e.known.clone(), e.version, e.absorbing.clone())
        };
        let current = match (&self.configured, &known) {
            (Some(l), _) => Some(l.clone()),
            (None, Known::Paced(had, l)) if *had == learned || learned == [None; 4] => {
                Some(l.clone())
            }
            _ => None,
        };
        if let Some(limiter) = current {
            if seen.is_empty() || absorbing.swap(true, Ordering::Acquire) {
                return;
            }
            let (key, seen, name) = (key.to_string(), *seen, self.name.clone());
            tokio::spawn(async move {
                if let Err(e) = limiter.absorb(&key, &seen, age).await {
                    tracing::warn!(upstream = %name, error = %e, "could not absorb the upstream's rate-limit headers");
                }
                absorbing.store(false, Ordering::Release);
            });
            return;
        }
        let next = if learned == [None; 4] {
            match (&known, status.is_success()) {
                // A success without rate-limit headers: this upstream does not send them.
                (Known::Looking(_), true) => {
                    tracing::info!(upstream = %self.name, "the upstream reports no rate limits: requests to it are not paced");
                    Known::Unpaced
                }
                // An error without them told nothing: the next request looks.
                (Known::Looking(_), false) => Known::Unknown,
                _ => return,
            }
        } else {
            match self.limiter_for(learned).await {
                Some(limiter) => {
                    if let Err(e) = limiter.absorb(key, seen, age).await {
                        tracing::warn!(upstream = %self.name, error = %e, "could not absorb the upstream's rate-limit headers");
                    }
                    tracing::info!(upstream = %self.name, requests_per_minute = ?learned[0], tokens_per_minute = ?learned[1], input_tokens_per_minute = ?learned[2], output_tokens_per_minute = ?learned[3], "limits learned from the upstream's rate-limit headers: pacing to them");
                    Known::Paced(learned, limiter)
                }
                // Not built (Redis unreachable): unpaced for now, learned again later.
                None if matches!(known, Known::Looking(_)) => Known::Unknown,
                None => return,
            }
        };
        let mut keys = self.keys();
        if let Some(e) = keys.get_mut(key)
            && e.version == version
        {
            // Only over what this was decided on: a later answer's decision stands.
            e.set(next);
        }
    }

    /// The limiter holding `learned` (built once per set of limits); `None` when it
    /// cannot be built (not tried again for [`RETRY_BUILD`]).
    async fn limiter_for(&self, learned: Learned) -> Option<Limiter> {
        let mut limiters = self.limiters.lock().await;
        if let Some(l) = limiters.get(&learned) {
            return Some(l.clone());
        }
        let failed = *self.failed.lock().unwrap_or_else(PoisonError::into_inner);
        if failed.is_some_and(|at| at.elapsed() < RETRY_BUILD) {
            return None;
        }
        match self.build(learned).await {
            Ok(limiter) => {
                limiters.insert(learned, limiter.clone());
                Some(limiter)
            }
            Err(e) => {
                tracing::warn!(upstream = %self.name, error = %e, "cannot pace to the limits the upstream reports (tried again in {RETRY_BUILD:?})");
                *self.failed.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
                None
            }
        }
    }

    async fn build(&self, learned: Learned) -> Result<Limiter, tollgate::Error> {
        let name = |what: &str| format!("upstream.{}.learned.{what}_per_minute", self.name);
        // Each a minute, its burst a little less than its limit (see SEND_ALLOWANCE).
        let minute = |q: Quota, what: &str| {
            let burst = crate::paced_burst(q.amount(), Duration::from_secs(60));
            q.per_minute().burst(burst).named(name(what))
        };
        let mut b = Limiter::builder();
        let [requests, tokens, input, output] = learned;
        if let Some(n) = requests {
            b = b.quota(minute(Quota::requests(n), "requests"));
        }
        // Counted as the provider counts them at admission: the estimate.
        if let Some(n) = tokens {
            let q = minute(Quota::tokens(n), "tokens");
            b = b.quota(q.accounting(Accounting::Estimate));
        }
        if let Some(n) = input {
            let q = minute(Quota::input_tokens(n), "input_tokens");
            b = b.quota(q.accounting(Accounting::Estimate));
        }
        if let Some(n) = output {
            b = b.quota(minute(Quota::output_tokens(n), "output_tokens"));
        }
        let limiter = match &self.store.redis {
            None => b.build()?,
            Some(url) => {
                b.redis(url.clone())
                    .prefix(self.store.prefix.clone())
                    .status_with_decisions(true)
                    .build()
                    .await?
            }
        };
        Ok(limiter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate::Cost;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.insert(*n, v.parse().expect("header value"));
        }
        h
    }

    /// Pacing to learned limits, in memory.
    fn learning() -> Arc<Pace> {
        Arc::new(Pace::new(
            "u",
            None,
            Store {
                redis: None,
                prefix: "t:".into(),
            },
        ))
    }

    #[test]
    fn a_callers_account_is_a_hash_of_its_key_never_the_key() {
        let a = caller_account(&headers(&[("authorization", "Bearer sk-secret-a")]));
        let b = caller_account(&headers(&[("authorization", "Bearer sk-secret-b")]));
        let x = caller_account(&headers(&[("x-api-key", "sk-secret-a")]));
        assert_ne!(a, b);
        assert_ne!(a, x, "a key in another header is another credential");
        assert!(!a.contains("secret"));
        assert_eq!(a.len(), 4 + 32);
        assert!(a.len() <= tollgate::MAX_KEY_LEN);
        assert_eq!(
            a,
            caller_account(&headers(&[("authorization", "Bearer sk-secret-a")]))
        );
    }

    #[tokio::test]
    async fn the_first_request_looks_and_the_others_are_paced_to_what_it_learned() {
        let pace = learning();
        let Turn::Look(looking) = pace.turn("acct", Duration::ZERO).await else {
            panic!("the first request looks");
        };
        let waiter = {
            let pace = pace.clone();
            tokio::spawn(async move { pace.turn("acct", Duration::ZERO).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "the others wait for the look");
        // The answer: 3 requests a minute, 1 left.
        let seen = RateLimitHeaders::parse(
            &headers(&[
                ("x-ratelimit-limit-requests", "3"),
                ("x-ratelimit-remaining-requests", "1"),
            ]),
            std::time::SystemTime::now(),
        );
        pace.observe("acct", http::StatusCode::OK, &seen, Duration::ZERO)
            .await;
        drop(looking);
        let Turn::Limiter(limiter) = waiter.await.expect("task") else {
            panic!("paced once learned");
        };
        // What the headers said was left, and no more.
        assert!(limiter.try_acquire("acct", Cost::request()).await.is_ok());
        assert!(limiter.try_acquire("acct", Cost::request()).await.is_err());
        // Another key is another account, and looks for itself.
        assert!(matches!(
            pace.turn("other", Duration::ZERO).await,
            Turn::Look(_)
        ));
    }

    #[tokio::test]
    async fn configured_limits_per_key_are_pulled_down_to_what_each_keys_headers_say() {
        let configured = Limiter::builder()
            .quota(Quota::requests(10).per_minute())
            .build()
            .expect("limiter");
        let pace = Arc::new(Pace::new(
            "u",
            Some(configured.clone()),
            Store {
                redis: None,
                prefix: "t:".into(),
            },
        ));
        assert!(matches!(
            pace.turn("key-a", Duration::ZERO).await,
            Turn::Limiter(_)
        ));
        let seen = RateLimitHeaders::parse(
            &headers(&[
                ("x-ratelimit-limit-requests", "10"),
                ("x-ratelimit-remaining-requests", "2"),
            ]),
            std::time::SystemTime::now(),
        );
        pace.observe("key-a", http::StatusCode::OK, &seen, Duration::ZERO)
            .await;
        // Absorbed off the request's path.
        for _ in 0..100 {
            if configured.status("key-a").await.expect("status")[0].remaining == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            configured.status("key-a").await.expect("status")[0].remaining,
            2
        );
        assert_eq!(
            configured.status("key-b").await.expect("status")[0].remaining,
            10
        );
    }

    #[tokio::test]
    async fn a_look_without_an_answer_passes_to_the_next_request_and_no_headers_means_unpaced() {
        let pace = learning();
        let Turn::Look(looking) = pace.turn("acct", Duration::ZERO).await else {
            panic!("the first request looks");
        };
        drop(looking);
        let Turn::Look(_looking) = pace.turn("acct", Duration::ZERO).await else {
            panic!("the next request looks when the first got no answer");
        };
        // A 503 from a load balancer, without rate-limit headers, told nothing either.
        let none = RateLimitHeaders::parse(&HeaderMap::new(), std::time::SystemTime::now());
        pace.observe(
            "acct",
            http::StatusCode::SERVICE_UNAVAILABLE,
            &none,
            Duration::ZERO,
        )
        .await;
        let Turn::Look(_looking) = pace.turn("acct", Duration::ZERO).await else {
            panic!("a look answered with an error and no headers passes to the next request");
        };
        pace.observe("acct", http::StatusCode::OK, &none, Duration::ZERO)
            .await;
        assert!(matches!(
            pace.turn("acct", Duration::ZERO).await,
            Turn::Free
        ));
    }

    #[test]
    fn learned_limits_are_per_model_and_configured_ones_per_account() {
        let store = Store {
            redis: None,
            prefix: "t:".into(),
        };
        let learned = Pace::new("u", None, store.clone());
        assert_ne!(
            learned.key("account", "gpt-4o"),
            learned.key("account", "gpt-4o-mini")
        );
        let long = "m".repeat(5_000);
        assert!(learned.key("account", &long).len() < 100);
        let configured = Limiter::builder()
            .quota(Quota::requests(10).per_minute())
            .build()
            .expect("limiter");
        let whole = Pace::new("u", Some(configured), store);
        assert_eq!(
            whole.key("key-1", "gpt-4o"),
            whole.key("key-1", "gpt-4o-mini")
        );
    }

    #[tokio::test]
    async fn a_flood_of_keys_makes_old_ones_look_again_never_unpaced() {
        let pace = learning();
        {
            let mut keys = pace.keys();
            for i in 0..MAX_KEYS {
                pace.entry(&mut keys, &format!("junk-{i}"));
            }
        }
        // A new key still gets a look (and so, pacing), and the table stays bounded.
        assert!(matches!(
            pace.turn("real", Duration::ZERO).await,
            Turn::Look(_)
        ));
        assert!(pace.keys().len() <= MAX_KEYS);
    }
}
