//! Where a limiter reads the time and how it sleeps until a reserved start.
//!
//! [`Clock::system`] (the default) is the monotonic clock of the operating system;
//! [`ManualClock`] is a clock a test moves by hand, so code built on tollgate can be
//! tested at the limit without waiting. Time inside the limiter is nanoseconds since the
//! clock's epoch. This module never decides anything; it only tells time.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// The clock a limiter runs on.
///
/// ```
/// use tollgate::{Clock, Limiter, ManualClock, Quota};
/// let manual = ManualClock::new();
/// let limiter = Limiter::builder()
///     .clock(Clock::from(manual.clone()))
///     .quota(Quota::requests(1).per_second())
///     .build()
///     .unwrap();
/// # let _ = limiter;
/// ```
#[derive(Clone)]
pub struct Clock(Inner);

#[derive(Clone)]
enum Inner {
    System(System),
    Manual(ManualClock),
}

/// The operating system's monotonic clock, from an origin.
#[derive(Clone, Copy, PartialEq, Eq)]
struct System {
    /// Where sleeps are measured from.
    origin: Instant,
    /// On Linux, the same clock (`CLOCK_MONOTONIC`, which `Instant` reads) in ns, read
    /// just before `origin`, so time read from it is never behind `origin.elapsed()`: a
    /// sleep until `origin + at` wakes at or after `at` here too.
    #[cfg(target_os = "linux")]
    origin_ns: u64,
}

impl System {
    fn new() -> System {
        #[cfg(target_os = "linux")]
        let origin_ns = monotonic_ns();
        System {
            origin: Instant::now(),
            #[cfg(target_os = "linux")]
            origin_ns,
        }
    }

    /// Nanoseconds since the origin. On Linux `CLOCK_MONOTONIC` is read straight from
    /// the vDSO, without `Instant`'s arithmetic (a checked subtraction of two
    /// timespecs, then a 128-bit conversion): a few nanoseconds of every decision.
    #[inline]
    fn now(&self) -> u64 {
        #[cfg(target_os = "linux")]
        return monotonic_ns().saturating_sub(self.origin_ns);
        #[cfg(not(target_os = "linux"))]
        return u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
    }
}

/// `CLOCK_MONOTONIC` in ns since an unspecified start (the machine's boot).
#[cfg(target_os = "linux")]
#[inline]
fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let secs = u64::try_from(t.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(t.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nanos)
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Inner::System(_) => f.write_str("Clock::System"),
            Inner::Manual(m) => write!(f, "Clock::Manual({:?})", m.now()),
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

impl Clock {
    /// The operating system's monotonic clock, with its epoch now.
    ///
    /// ```
    /// let clock = tollgate::Clock::system();
    /// # let _ = clock;
    /// ```
    pub fn system() -> Clock {
        Clock(Inner::System(System::new()))
    }

    /// Whether both tell the same time from the same epoch.
    pub(crate) fn same(&self, other: &Clock) -> bool {
        match (&self.0, &other.0) {
            (Inner::System(a), Inner::System(b)) => a == b,
            (Inner::Manual(a), Inner::Manual(b)) => Arc::ptr_eq(&a.0, &b.0),
            _ => false,
        }
    }

    /// Nanoseconds since the epoch.
    #[inline]
    pub(crate) fn now(&self) -> u64 {
        match &self.0 {
            Inner::System(system) => system.now(),
            Inner::Manual(m) => m.nanos(),
        }
    }

    /// Sleep until `at` (nanoseconds since the epoch). Cancel safe: dropping the future
    /// only stops the wait.
    pub(crate) async fn sleep_until(&self, at: u64) {
        match &self.0 {
            Inner::System(system) => {
                let now = self.now();
                if at > now {
                    let deadline = system.origin + Duration::from_nanos(at);
                    tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)).await;
                }
            }
            Inner::Manual(m) => {
                let mut rx = m.0.subscribe();
                // The sender lives as long as `m`, which we hold: wait_for cannot fail.
                let _ = rx.wait_for(|now| *now >= at).await;
            }
        }
    }
}

impl From<ManualClock> for Clock {
    fn from(m: ManualClock) -> Clock {
        Clock(Inner::Manual(m))
    }
}

/// A clock that only moves when told to; waiters wake when it passes their start.
///
/// ```
/// use std::time::Duration;
/// let clock = tollgate::ManualClock::new();
/// clock.advance(Duration::from_secs(2));
/// assert_eq!(clock.now(), Duration::from_secs(2));
/// ```
#[derive(Clone)]
pub struct ManualClock(Arc<watch::Sender<u64>>);

impl fmt::Debug for ManualClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ManualClock({:?})", self.now())
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        ManualClock::new()
    }
}

impl ManualClock {
    /// A clock at zero.
    ///
    /// ```
    /// assert_eq!(tollgate::ManualClock::new().now(), std::time::Duration::ZERO);
    /// ```
    pub fn new() -> ManualClock {
        ManualClock(Arc::new(watch::Sender::new(0)))
    }

    /// Move the clock forward by `by` (saturating), waking every waiter whose start has
    /// come.
    ///
    /// ```
    /// let clock = tollgate::ManualClock::new();
    /// clock.advance(std::time::Duration::from_millis(5));
    /// assert_eq!(clock.now().as_millis(), 5);
    /// ```
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.0.send_modify(|now| *now = now.saturating_add(by));
    }

    /// The time since the clock's epoch.
    ///
    /// ```
    /// assert_eq!(tollgate::ManualClock::new().now().as_nanos(), 0);
    /// ```
    pub fn now(&self) -> Duration {
        Duration::from_nanos(self.nanos())
    }

    fn nanos(&self) -> u64 {
        *self.0.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Time never runs backwards, and a sleep until `at` ends with the clock at `at` or
    /// later: a waiter never starts before its reserved start.
    #[tokio::test]
    async fn system_clock_is_monotonic_and_sleeps_never_end_early() {
        let clock = Clock::system();
        let mut last = clock.now();
        for step_us in [0, 1, 50, 999, 1_000, 1_001, 2_500] {
            let at = clock.now() + step_us * 1_000;
            clock.sleep_until(at).await;
            let now = clock.now();
            assert!(now >= at, "woke at {now} ns for a start at {at} ns");
            assert!(now >= last, "time went back from {last} to {now} ns");
            last = now;
        }
    }

    /// The clock's time agrees with the standard library's `Instant` (the clock tokio
    /// sleeps on) to well within a millisecond.
    #[test]
    fn system_clock_agrees_with_instant() {
        let clock = Clock::system();
        let Inner::System(system) = clock.0 else {
            panic!("a system clock");
        };
        for _ in 0..1_000 {
            let before = system.origin.elapsed().as_nanos();
            let now = u128::from(clock.now());
            let after = system.origin.elapsed().as_nanos();
            // Its origin is read just before `Instant`'s: never behind, barely ahead.
            assert!(now >= before, "{now} ns behind Instant's {before} ns");
            assert!(
                now <= after + 1_000_000,
                "{now} ns far ahead of Instant's {after} ns"
            );
        }
    }
}
