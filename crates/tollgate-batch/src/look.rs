//! Looking before the burst: the provider's view of the budget, before tollgate's own.
//!
//! A limiter starts full, and a shared one on Redis is full again after Redis restarts
//! empty, while the provider's bucket for the key may be half spent (an earlier run, a
//! killed one, another app on the same key). So at the start of every run, after every
//! outage of the shared store, and whenever the store is found to have lost its state,
//! one request goes alone ([`Look`]) and the rate-limit headers of its answer are
//! absorbed into the limiter before any other request is sent.
//!
//! [`alive_quota`] is how a lost state is found: a mark each look leaves in the shared
//! state, which every decision reports; a decision that reports it missing came from a
//! state that was wiped (Redis restarted empty, flushed, failed over).
//!
//! This module never decides admission; it only says when a request must wait for the
//! one looking, and when the limiter's state cannot be trusted.

use std::time::Duration;

use tokio::sync::watch;
use tollgate::provider::RateLimitHeaders;
use tollgate::{Cost, Quota, QuotaStatus};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct State {
    /// A look is wanted: the next request to take its turn looks.
    wanted: bool,
    /// A request is looking: every other waits.
    looking: bool,
    /// Counts the looks completed: a permit taken before the last one completed was
    /// granted from a state the look has since corrected, and is taken again.
    epoch: u64,
}

/// Who looks, and who waits for the look. Cheap to share behind an `Arc`.
pub(crate) struct Look {
    state: watch::Sender<State>,
}

/// What [`Look::turn`] gives a request.
pub(crate) enum Turn {
    /// This request looks: it goes alone; [`Looking::done`] when its answer is in.
    Look(Looking),
    /// Nobody looks: go, and check [`Look::still`] with this epoch once admitted.
    Go(u64),
    /// The run is stopping.
    Stop,
}

/// The right to look, held by the one request that goes alone. Dropped without
/// [`Looking::done`] (the request failed before any answer came), the look is wanted
/// again, and the next request looks.
pub(crate) struct Looking {
    state: watch::Sender<State>,
    done: bool,
}

impl Looking {
    /// The answer is in and its headers were absorbed: the others may go.
    pub(crate) fn done(mut self) {
        self.done = true;
    }
}

impl Drop for Looking {
    fn drop(&mut self) {
        let done = self.done;
        self.state.send_modify(|s| {
            s.looking = false;
            if done {
                s.epoch += 1;
            } else {
                s.wanted = true;
            }
        });
    }
}

impl Look {
    /// A look is wanted from the start: every run, fresh or resumed, looks first.
    pub(crate) fn new() -> Look {
        let (state, _) = watch::channel(State {
            wanted: true,
            ..State::default()
        });
        Look { state }
    }

    /// Asks for a look before the next request (the shared store was unavailable, or
    /// has lost its state); true when none was wanted or under way already (so the
    /// caller says so once).
    pub(crate) fn want(&self) -> bool {
        self.state.send_if_modified(|s| {
            let changed = !s.wanted && !s.looking;
            s.wanted |= !s.looking;
            changed
        })
    }

    /// Waits while another request looks; then this one looks when a look is wanted,
    /// or goes.
    pub(crate) async fn turn(&self, stop: &mut watch::Receiver<bool>) -> Turn {
        let mut rx = self.state.subscribe();
        loop {
            tokio::select! {
                r = rx.wait_for(|s| !s.looking) => if r.is_err() { return Turn::Stop },
                _ = stop.wait_for(|s| *s) => return Turn::Stop,
            }
            let mut became = false;
            self.state.send_if_modified(|s| {
                if s.wanted && !s.looking {
                    (s.wanted, s.looking, became) = (false, true, true);
                }
                became
            });
            if became {
                return Turn::Look(Looking {
                    state: self.state.clone(),
                    done: false,
                });
            }
            let s = *self.state.borrow();
            if !s.looking && !s.wanted {
                return Turn::Go(s.epoch);
            }
        }
    }

    /// Whether a permit taken after [`Turn::Go`]`(epoch)` may be used: no look was
    /// wanted, started or completed since.
    pub(crate) fn still(&self, epoch: u64) -> bool {
        let s = *self.state.borrow();
        !s.wanted && !s.looking && s.epoch == epoch
    }
}

/// `seen` with one unit less left in each budget that says what is left.
pub(crate) fn one_less(seen: &RateLimitHeaders) -> RateLimitHeaders {
    let mut less = *seen;
    for budget in [
        &mut less.requests,
        &mut less.tokens,
        &mut less.input_tokens,
        &mut less.output_tokens,
    ]
    .into_iter()
    .flatten()
    {
        if let Some(left) = budget.remaining.as_mut() {
            *left = left.saturating_sub(1);
        }
    }
    less
}

/// The name of the quota that marks a shared state as alive (see [`alive`]).
pub(crate) const ALIVE: &str = "alive";

/// A quota no request spends (it limits spend, and a batch's requests cost none) of one
/// unit a year, added to a limiter on Redis, where every decision reports it. After a
/// look it is marked: spent, which only a year refills, and which a second mark cannot
/// change (it is refused). Found unmarked, the state holding it is gone: Redis restarted
/// empty, was flushed, or failed over to an empty replica, with every budget in it,
/// while the provider's are as spent as before. Found marked at another time than when a
/// waiting request's turn was reserved, the state was lost and set again from the
/// provider's headers since: the reservation is not in it.
///
/// (A mirror of this process's own admissions cannot tell: processes sharing a budget
/// each admit a share of it, and their own debt drains faster than it builds.)
pub(crate) fn alive_quota() -> Quota {
    Quota::spend(1)
        .per(Duration::from_secs(365 * 86_400))
        .named(ALIVE)
}

/// What marking [`alive_quota`] costs.
pub(crate) fn mark_alive() -> Cost {
    Cost::request().requests(0).spend(1)
}

/// How far two readings of one mark may disagree on when it was made (the round trips
/// to Redis, a timer firing late on a loaded machine) and still be the same mark.
const SAME_MARK: Duration = Duration::from_secs(5);

/// Whether a status (of a limiter with [`alive_quota`]) shows a state without the mark.
pub(crate) fn lost(status: &[QuotaStatus]) -> bool {
    status
        .iter()
        .any(|s| s.quota.name() == ALIVE && s.remaining >= s.limit)
}

/// Whether `now` shows the same mark as `held`, read `between` earlier: the mark was
/// made once, so the time until it refills has shrunk by `between`, give or take
/// [`SAME_MARK`].
pub(crate) fn same_mark(held: &[QuotaStatus], now: &[QuotaStatus], between: Duration) -> bool {
    let reset = |status: &[QuotaStatus]| {
        status
            .iter()
            .find(|s| s.quota.name() == ALIVE)
            .map(|s| s.reset)
    };
    match (reset(held), reset(now)) {
        (Some(held), Some(now)) => {
            let expected = held.saturating_sub(between);
            expected.abs_diff(now) <= SAME_MARK
        }
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_state_without_the_mark_a_look_left_is_lost() {
        let clock = tollgate::ManualClock::new();
        let limiter = tollgate::Limiter::builder()
            .quota(Quota::requests(60).per_minute())
            .quota(alive_quota())
            .clock(tollgate::Clock::from(clock.clone()))
            .build()
            .expect("limiter");
        // Never marked (or marked, then wiped with the rest of the state): lost.
        let p = limiter
            .try_acquire("acct", Cost::request())
            .await
            .expect("admitted");
        assert!(lost(&p.status().await.expect("status")));
        drop(p);
        limiter
            .try_acquire("acct", mark_alive())
            .await
            .expect("marked");
        let held = limiter.status("acct").await.expect("status");
        assert!(!lost(&held));
        // A second mark is refused and changes nothing.
        assert!(limiter.try_acquire("acct", mark_alive()).await.is_err());
        clock.advance(Duration::from_secs(5));
        let now = limiter.status("acct").await.expect("status");
        assert!(same_mark(&held, &now, Duration::from_secs(5)));
        // The mark costs no request (the one request taken has refilled), and requests
        // cost no mark.
        assert_eq!((now[0].remaining, now[1].remaining), (60, 0));
        // Another account's state says nothing of this one.
        let other = limiter
            .try_acquire("other", Cost::request())
            .await
            .expect("admitted");
        assert!(lost(&other.status().await.expect("status")));
        // Lost, then marked again by a later look: not the same mark.
        let wiped = tollgate::Limiter::builder()
            .quota(Quota::requests(60).per_minute())
            .quota(alive_quota())
            .clock(tollgate::Clock::from(clock.clone()))
            .build()
            .expect("limiter");
        clock.advance(Duration::from_secs(3));
        wiped
            .try_acquire("acct", mark_alive())
            .await
            .expect("marked");
        let again = wiped.status("acct").await.expect("status");
        assert!(!same_mark(&held, &again, Duration::from_secs(8)));
        assert!(same_mark(&now, &now, Duration::ZERO));
    }

    #[test]
    fn one_less_takes_a_unit_from_each_budget_that_says_what_is_left() {
        let mut h = http::HeaderMap::new();
        h.insert("x-ratelimit-remaining-tokens", "10".parse().expect("value"));
        h.insert(
            "x-ratelimit-remaining-requests",
            "0".parse().expect("value"),
        );
        h.insert("x-ratelimit-limit-requests", "60".parse().expect("value"));
        let seen = RateLimitHeaders::parse(&h, std::time::SystemTime::now());
        let less = one_less(&seen);
        assert_eq!(less.tokens.and_then(|b| b.remaining), Some(9));
        assert_eq!(less.requests.and_then(|b| b.remaining), Some(0));
        assert_eq!(less.requests.and_then(|b| b.limit), Some(60));
        assert!(less.input_tokens.is_none());
    }

    #[tokio::test]
    async fn one_request_looks_and_the_others_wait_for_it() {
        let look = std::sync::Arc::new(Look::new());
        let (_stop_tx, mut stop) = watch::channel(false);
        let Turn::Look(looking) = look.turn(&mut stop).await else {
            panic!("the first request of a run looks");
        };
        // Another request waits while the look is out.
        let waiter = {
            let look = look.clone();
            let mut stop = stop.clone();
            tokio::spawn(async move {
                match look.turn(&mut stop).await {
                    Turn::Go(epoch) => Some(epoch),
                    _ => None,
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "nobody goes while a request looks");
        looking.done();
        assert_eq!(waiter.await.expect("task"), Some(1));
        assert!(look.still(1));
        // A look wanted (the store came back) invalidates permits taken before it.
        assert!(look.want(), "the first to ask says so");
        assert!(!look.want(), "asked once");
        assert!(!look.still(1));
        let Turn::Look(looking) = look.turn(&mut stop).await else {
            panic!("a wanted look is taken by the next request");
        };
        // Dropped without an answer: wanted again, and the next request looks.
        drop(looking);
        assert!(matches!(look.turn(&mut stop).await, Turn::Look(_)));
    }
}
