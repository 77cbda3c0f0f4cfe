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
use std::time::Duration;

use http::HeaderMap;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tollgate::provider::RateLimitHeaders;
use tollgate::{Accounting, Limiter, Quota};

/// How long a request waits for the one looking at an account, at least: a first
/// answer that takes longer (a long generation) lets the others go unpaced rather than
/// hold them all.
const LOOK_WAIT: Duration = Duration::from_secs(10);

/// The most account keys remembered; further keys go unpaced (and a warning says so).
const MAX_KEYS: usize = 100_000;

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
    /// The upstream reports no limits: nothing to pace to.
    Unpaced,
}

struct Entry {
    known: Known,
    /// Set when this key's answers were seen to be looked at: woken when learned.
    woken: Option<watch::Sender<bool>>,
    /// An absorb is running for this key: answers arriving meanwhile skip theirs.
    absorbing: Arc<AtomicBool>,
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
    /// Said once: the key table is full.
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
            e.known = Known::Unknown;
            if let Some(tx) = e.woken.take() {
                let _ = tx.send(true);
            }
        }
    }
}

/// The account key of a caller whose own key is passed through: a hash of its
/// credentials (`Authorization`, `x-api-key`, `api-key`), never the key itself.
///
/// Two callers with the same key are one account; no key at all is one account too.
pub(crate) fn caller_account(headers: &HeaderMap) -> String {
    let mut hash = Sha256::new();
    for name in ["authorization", "x-api-key", "api-key"] {
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
            full: AtomicBool::new(false),
        }
    }

    fn keys(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The limiter a request under account `key` takes its turn in, once it may: while
    /// another request looks at the account, this waits for its answer (at most
    /// `wait`, and at least [`LOOK_WAIT`]).
    pub(crate) async fn turn(self: &Arc<Self>, key: &str, wait: Duration) -> Turn {
        if let Some(l) = &self.configured {
            return Turn::Limiter(l.clone());
        }
        let deadline = tokio::time::Instant::now() + wait.max(LOOK_WAIT);
        loop {
            let known = {
                let mut keys = self.keys();
                if !keys.contains_key(key) && keys.len() >= MAX_KEYS {
                    if !self.full.swap(true, Ordering::Relaxed) {
                        tracing::warn!(upstream = %self.name, "{MAX_KEYS} account keys are paced already: further keys go unpaced");
                    }
                    return Turn::Free;
                }
                let entry = keys.entry(key.to_string()).or_insert_with(|| Entry {
                    known: Known::Unknown,
                    woken: None,
                    absorbing: Arc::default(),
                });
                if matches!(entry.known, Known::Unknown) {
                    let (tx, rx) = watch::channel(false);
                    entry.known = Known::Looking(rx);
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

    /// Takes in an answer's rate-limit headers for account `key`, `age` after its
    /// request was sent: learns the limits they report (a key not yet paced, or limits
    /// that changed) and wakes whoever waits for them, or pulls the limiter down to what
    /// they say is left (off the request's path).
    pub(crate) async fn observe(&self, key: &str, seen: &RateLimitHeaders, age: Duration) {
        let learned: Learned = [
            seen.requests,
            seen.tokens,
            seen.input_tokens,
            seen.output_tokens,
        ]
        .map(|b| b.and_then(|b| b.limit).filter(|&n| n > 0));
        let (known, absorbing) = {
            let keys = self.keys();
            let Some(e) = keys.get(key) else { return };
            (e.known.clone(), e.absorbing.clone())
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
        // Learn: limits reported for the first time, or changed, or none at all.
        let next = if learned == [None; 4] {
            if !matches!(known, Known::Looking(_)) {
                return;
            }
            tracing::info!(upstream = %self.name, "the upstream reports no rate limits: requests to it are not paced");
            Known::Unpaced
        } else {
            match self.limiter_for(learned).await {
                Ok(limiter) => {
                    if let Err(e) = limiter.absorb(key, seen, age).await {
                        tracing::warn!(upstream = %self.name, error = %e, "could not absorb the upstream's rate-limit headers");
                    }
                    tracing::info!(upstream = %self.name, requests_per_minute = ?learned[0], tokens_per_minute = ?learned[1], input_tokens_per_minute = ?learned[2], output_tokens_per_minute = ?learned[3], "limits learned from the upstream's rate-limit headers: pacing to them");
                    Known::Paced(learned, limiter)
                }
                Err(e) => {
                    tracing::warn!(upstream = %self.name, error = %e, "cannot pace to the limits the upstream reports");
                    Known::Unpaced
                }
            }
        };
        let mut keys = self.keys();
        if let Some(e) = keys.get_mut(key) {
            e.known = next;
            if let Some(tx) = e.woken.take() {
                let _ = tx.send(true);
            }
        }
    }

    /// The limiter holding `learned` (built once per set of limits).
    async fn limiter_for(&self, learned: Learned) -> Result<Limiter, tollgate::Error> {
        let mut limiters = self.limiters.lock().await;
        if let Some(l) = limiters.get(&learned) {
            return Ok(l.clone());
        }
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
        limiters.insert(learned, limiter.clone());
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
        let pace = Arc::new(Pace::new(
            "u",
            None,
            Store {
                redis: None,
                prefix: "t:".into(),
            },
        ));
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
        pace.observe("acct", &seen, Duration::ZERO).await;
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
    async fn a_look_without_an_answer_passes_to_the_next_request_and_no_headers_means_unpaced() {
        let pace = Arc::new(Pace::new(
            "u",
            None,
            Store {
                redis: None,
                prefix: "t:".into(),
            },
        ));
        let Turn::Look(looking) = pace.turn("acct", Duration::ZERO).await else {
            panic!("the first request looks");
        };
        drop(looking);
        let Turn::Look(_looking) = pace.turn("acct", Duration::ZERO).await else {
            panic!("the next request looks when the first got no answer");
        };
        let none = RateLimitHeaders::parse(&HeaderMap::new(), std::time::SystemTime::now());
        pace.observe("acct", &none, Duration::ZERO).await;
        assert!(matches!(
            pace.turn("acct", Duration::ZERO).await,
            Turn::Free
        ));
    }
}
