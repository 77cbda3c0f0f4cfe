//! Counting what the run does, and showing it: a progress bar on a terminal, plain
//! periodic lines otherwise.

use std::collections::{BTreeMap, VecDeque};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How progress is shown while a batch runs.
///
/// ```
/// assert_eq!(tollgate_batch::Progress::default(), tollgate_batch::Progress::Auto);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Progress {
    /// A bar when stderr is a terminal, else a line every 10 seconds.
    #[default]
    Auto,
    /// Always the bar.
    Bar,
    /// A plain line on stderr at this interval.
    Lines(Duration),
    /// Nothing until the summary.
    Off,
}

/// Live counters shared by every task.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) total: AtomicU64,
    pub(crate) skipped: AtomicU64,
    pub(crate) succeeded: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) malformed: AtomicU64,
    pub(crate) sent: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) rate_limited: AtomicU64,
    pub(crate) server_errors: AtomicU64,
    pub(crate) transport_errors: AtomicU64,
    pub(crate) tokens_estimated: AtomicU64,
    pub(crate) prompt_tokens: AtomicU64,
    pub(crate) completion_tokens: AtomicU64,
    /// Requests sent and not answered yet: their estimated tokens by the order they
    /// were sent in.
    pub(crate) on_the_way: Mutex<BTreeMap<u64, u64>>,
    /// How many requests were sent: the order of the next one.
    pub(crate) sends: AtomicU64,
    /// Answers received and the time they took, in microseconds (for the ETA's last
    /// round trip).
    answers: AtomicU64,
    answer_micros: AtomicU64,
    /// Recent admitted requests (answered with anything but 429): (when answered,
    /// estimated tokens).
    window: Mutex<VecDeque<(Instant, u64)>>,
    /// Since when the shared Redis store is down, and whether the run waits for it
    /// (else it limits in this process alone); `None` while it is up.
    pub(crate) redis_down: Mutex<Option<RedisDown>>,
}

/// An outage of the shared store, as the progress line shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RedisDown {
    pub(crate) since: Instant,
    /// True: no request goes until Redis is back; false: this process limits alone.
    pub(crate) waiting: bool,
}

/// How long the rates shown average over.
const RATE_WINDOW: Duration = Duration::from_secs(10);
/// How long the "opening burst" test averages over: short, so the note goes as soon as
/// the run is paced.
const BURST_WINDOW: Duration = Duration::from_secs(2);

impl Counters {
    /// A request sent (retries included): counted in the summary, not yet in the rates.
    pub(crate) fn record_send(&self, tokens: u64) {
        self.sent.fetch_add(1, Relaxed);
        self.tokens_estimated.fetch_add(tokens, Relaxed);
    }

    /// An answer to a request sent `took` ago; admitted work (anything but a 429) counts
    /// in the rates.
    pub(crate) fn record_answer(&self, tokens: u64, took: Duration, admitted: bool) {
        self.answers.fetch_add(1, Relaxed);
        self.answer_micros
            .fetch_add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX), Relaxed);
        if !admitted {
            return;
        }
        let now = Instant::now();
        let mut w = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        w.push_back((now, tokens));
        while w
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
        {
            w.pop_front();
        }
    }

    /// Admitted requests and their tokens over the last `over`.
    fn admitted_over(&self, over: Duration) -> (u64, u64) {
        let now = Instant::now();
        let w = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        w.iter()
            .filter(|(t, _)| now.duration_since(*t) <= over)
            .fold((0, 0), |(r, t), (_, n)| (r + 1, t + n))
    }

    /// Admitted requests and tokens per minute at the rate of the last 10 seconds.
    pub(crate) fn per_minute(&self) -> (u64, u64) {
        let (r, t) = self.admitted_over(RATE_WINDOW);
        (r * 6, t * 6)
    }

    pub(crate) fn done(&self) -> u64 {
        self.succeeded.load(Relaxed) + self.failed.load(Relaxed) + self.skipped.load(Relaxed)
    }

    /// What is left to do, as [`eta`] reads it.
    pub(crate) fn work(&self) -> Option<Work> {
        let total = self.total.load(Relaxed);
        if total == 0 {
            return None;
        }
        let in_flight = self
            .on_the_way
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len() as u64;
        let sent = self.sent.load(Relaxed);
        let answers = self.answers.load(Relaxed);
        Some(Work {
            lines_left: total.saturating_sub(self.done()),
            in_flight,
            tokens_per_line: (sent > 0)
                .then(|| self.tokens_estimated.load(Relaxed) as f64 / sent as f64),
            round_trip: Duration::from_micros(
                self.answer_micros
                    .load(Relaxed)
                    .checked_div(answers)
                    .unwrap_or(0),
            ),
        })
    }
}

/// What is left of a run, for [`eta`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Work {
    /// Lines not finished, in flight included.
    pub(crate) lines_left: u64,
    /// Of those, requests sent and not answered yet (admitted: they need no more budget).
    pub(crate) in_flight: u64,
    /// The estimated tokens of a line (the average of the requests sent so far).
    pub(crate) tokens_per_line: Option<f64>,
    /// How long an answer takes (the average so far).
    pub(crate) round_trip: Duration,
}

/// When the run should end, from what is left and the limits: the lines still to be
/// admitted need their tokens at `tpm` and their requests at `rpm` (the larger of the two
/// binds), then one round trip for the last answers. Never the average so far, which
/// counts the opening burst (a minute's worth at once) as if it went on. With no limit,
/// the rate admitted over the last 10 seconds (`recent_rpm`) stands in; `None` when
/// nothing says.
pub(crate) fn eta(
    work: Work,
    rpm: Option<u64>,
    tpm: Option<u64>,
    recent_rpm: u64,
) -> Option<Duration> {
    if work.lines_left == 0 {
        return Some(Duration::ZERO);
    }
    let to_admit = work.lines_left.saturating_sub(work.in_flight) as f64;
    let mut bounds = Vec::new();
    if let Some(rpm) = rpm.filter(|&r| r > 0) {
        bounds.push(to_admit / rpm as f64);
    }
    if let (Some(tpm), Some(per_line)) = (tpm.filter(|&t| t > 0), work.tokens_per_line) {
        bounds.push(to_admit * per_line / tpm as f64);
    }
    if rpm.is_none() && tpm.is_none() && recent_rpm > 0 {
        bounds.push(to_admit / recent_rpm as f64);
    }
    let minutes = bounds.into_iter().reduce(f64::max);
    let minutes = minutes?;
    Some(Duration::from_secs_f64(minutes * 60.0) + work.round_trip)
}

/// An ETA as the line shows it.
fn eta_text(eta: Option<Duration>) -> String {
    match eta {
        Some(d) => format!("eta {}s", d.as_secs_f64().ceil() as u64),
        None => "eta ?".to_owned(),
    }
}

fn limit(v: Option<u64>) -> String {
    v.map_or_else(|| "?".to_owned(), |v| v.to_string())
}

/// Said while the run spends the limits' opening fill (a minute's worth may go at once,
/// as at the provider): admitted faster than the limits refill over the last 2 seconds.
const OPENING_BURST: &str = " | opening burst: the limits start full";

/// Said once the run is paced while the 10-second rate still counts the burst (and so
/// reads above the limit).
const PACED_NOW: &str = " | paced now: the 10 s rates still count the opening burst";

/// [`OPENING_BURST`] when it applies, else nothing. `recent` is what was admitted over
/// [`BURST_WINDOW`] (requests, tokens): over a limit by more than half and two requests'
/// worth (so a paced run's uneven spacing never reads as a burst).
fn burst_note(
    recent: (u64, u64),
    shown: (u64, u64),
    rpm: Option<u64>,
    tpm: Option<u64>,
) -> &'static str {
    let shown_over = rpm.is_some_and(|l| shown.0 > l) || tpm.is_some_and(|l| shown.1 > l);
    let (r, t) = recent;
    let window = BURST_WINDOW.as_secs_f64() / 60.0;
    let per_request = if r > 0 { t as f64 / r as f64 } else { 0.0 };
    let over = |admitted: f64, limit: Option<u64>, unit: f64| {
        limit.is_some_and(|l| admitted > l as f64 * window * 1.5 + 2.0 * unit)
    };
    if over(r as f64, rpm, 1.0) || over(t as f64, tpm, per_request) {
        OPENING_BURST
    } else if shown_over {
        PACED_NOW
    } else {
        ""
    }
}

/// What the line says about the shared store: nothing while it is up.
fn redis_note(down: Option<RedisDown>) -> String {
    match down {
        None => String::new(),
        Some(d) => {
            let secs = d.since.elapsed().as_secs();
            if d.waiting {
                format!(" | waiting for Redis (down {secs}s)")
            } else {
                format!(" | Redis down {secs}s: limiting in this process")
            }
        }
    }
}

/// One status line: done / total, admitted rates against the limits, retries, 429s, an
/// ETA, and whether the run waits for Redis.
pub(crate) fn line(c: &Counters, rpm: Option<u64>, tpm: Option<u64>) -> String {
    let (r, t) = c.per_minute();
    let total = c.total.load(Relaxed);
    let eta = eta_text(c.work().and_then(|w| eta(w, rpm, tpm, r)));
    let down = *c.redis_down.lock().unwrap_or_else(PoisonError::into_inner);
    format!(
        "{}/{} lines ({} failed) | {r}/{} requests/min | {t}/{} tokens/min admitted | {} retries | {} 429s | {eta}{}{}",
        c.done(),
        if total == 0 {
            "?".to_owned()
        } else {
            total.to_string()
        },
        c.failed.load(Relaxed),
        limit(rpm),
        limit(tpm),
        c.retries.load(Relaxed),
        c.rate_limited.load(Relaxed),
        burst_note(c.admitted_over(BURST_WINDOW), (r, t), rpm, tpm),
        redis_note(down),
    )
}

/// Shows progress until `stop` is set; returns when it is.
pub(crate) async fn show(
    mode: Progress,
    counters: &Counters,
    limits: &Mutex<(Option<u64>, Option<u64>)>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mode = match mode {
        Progress::Auto if std::io::stderr().is_terminal() => Progress::Bar,
        Progress::Auto => Progress::Lines(Duration::from_secs(10)),
        other => other,
    };
    let limits = || *limits.lock().unwrap_or_else(PoisonError::into_inner);
    match mode {
        Progress::Off | Progress::Auto => {
            let _ = stop.wait_for(|s| *s).await;
        }
        Progress::Lines(every) => loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                () = tokio::time::sleep(every) => {
                    let (rpm, tpm) = limits();
                    eprintln!("tollgate batch: {}", line(counters, rpm, tpm));
                }
            }
        },
        Progress::Bar => {
            let bar = indicatif::ProgressBar::new(0);
            let style = indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            bar.set_style(style);
            loop {
                let (rpm, tpm) = limits();
                let (r, t) = counters.per_minute();
                // This run's lines only.
                let skipped = counters.skipped.load(Relaxed);
                let this_run = counters.done() - skipped;
                let total = counters.total.load(Relaxed).saturating_sub(skipped);
                bar.set_length(total.max(this_run));
                bar.set_position(this_run);
                // The ETA from what is left and the limits (see [`eta`]), not the bar's
                // own, which extrapolates the average so far.
                let eta = eta_text(counters.work().and_then(|w| eta(w, rpm, tpm, r)));
                let down = *counters
                    .redis_down
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                bar.set_message(format!(
                    "{eta} | {r}/{} rpm {t}/{} tpm admitted | {} retries {} 429s {} failed{}{}",
                    limit(rpm),
                    limit(tpm),
                    counters.retries.load(Relaxed),
                    counters.rate_limited.load(Relaxed),
                    counters.failed.load(Relaxed),
                    burst_note(counters.admitted_over(BURST_WINDOW), (r, t), rpm, tpm),
                    redis_note(down),
                ));
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => break,
                    () = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn work(lines_left: u64, in_flight: u64, tokens_per_line: f64) -> Work {
        Work {
            lines_left,
            in_flight,
            tokens_per_line: Some(tokens_per_line),
            round_trip: Duration::from_millis(50),
        }
    }

    fn secs(d: Option<Duration>) -> f64 {
        d.expect("an ETA").as_secs_f64()
    }

    /// The probe of issue 20: at 10,000 tokens a minute, 42 s of work left (70 lines of
    /// 100 tokens) read "eta 3s" (the average so far, burst included). From what is left
    /// over the limit it is 42 s and the round trip.
    #[test]
    fn at_10000_tpm_42_seconds_of_work_left_reads_42_seconds_not_3() {
        let e = secs(eta(work(70, 0, 100.0), None, Some(10_000), 150_000));
        assert!((42.0..43.0).contains(&e), "{e}");
    }

    /// The bar's probe: "129/400 eta 0s" with about 90 s left. 271 lines of 55 tokens at
    /// 10,000 a minute are 89.4 s, whatever went in the opening burst.
    #[test]
    fn the_bars_probe_129_of_400_reads_about_90_seconds() {
        let e = secs(eta(work(271, 0, 55.0), Some(500), Some(10_000), 0));
        assert!((89.0..91.0).contains(&e), "{e}");
    }

    /// The binding limit is the slower of the two: requests here.
    #[test]
    fn the_larger_of_requests_and_tokens_binds() {
        // 120 requests at 60 a minute: 2 minutes; their tokens at 1,000,000: nothing.
        let e = secs(eta(work(120, 0, 10.0), Some(60), Some(1_000_000), 0));
        assert!((120.0..121.0).contains(&e), "{e}");
        // The same at 10 tokens a minute each of 10 tokens: 120 minutes.
        let e = secs(eta(work(120, 0, 10.0), Some(60), Some(10), 0));
        assert!((7200.0..7201.0).contains(&e), "{e}");
    }

    /// Requests in flight were admitted: they need no budget, only their answers' time.
    #[test]
    fn requests_in_flight_count_their_round_trip_not_the_budget() {
        let e = secs(eta(work(10, 10, 100.0), Some(60), Some(1_000), 0));
        assert!((0.05..0.06).contains(&e), "{e}");
        let e = secs(eta(work(20, 10, 100.0), Some(60), Some(1_000), 0));
        assert!((60.0..60.1).contains(&e), "{e}");
    }

    /// Without limits, the recent admitted rate stands in; with nothing to go on, no ETA;
    /// nothing left is zero.
    #[test]
    fn without_limits_the_recent_rate_stands_in() {
        let e = secs(eta(work(600, 0, 100.0), None, None, 600));
        assert!((60.0..60.1).contains(&e), "{e}");
        assert_eq!(eta(work(600, 0, 100.0), None, None, 0), None);
        let unknown_tokens = Work {
            tokens_per_line: None,
            ..work(600, 0, 0.0)
        };
        assert_eq!(eta(unknown_tokens, None, Some(1_000), 0), None);
        assert_eq!(eta(work(0, 0, 1.0), None, None, 0), Some(Duration::ZERO));
    }

    /// The counters' own ETA: from the lines left and the tokens sent so far, however fast
    /// the first ones went.
    #[test]
    fn the_line_shows_the_eta_of_what_is_left() {
        let c = Counters::default();
        c.total.store(400, Relaxed);
        for _ in 0..129 {
            c.record_send(55);
            c.record_answer(55, Duration::ZERO, true);
        }
        c.succeeded.store(129, Relaxed);
        let l = line(&c, Some(500), Some(10_000));
        assert!(l.contains("eta 90s"), "{l}");
    }

    /// 429s do not count as admitted work in the rates; they are shown apart.
    #[test]
    fn rates_count_admitted_work_and_429s_apart() {
        let c = Counters::default();
        for _ in 0..10 {
            c.record_send(100);
            c.record_answer(100, Duration::ZERO, true);
        }
        for _ in 0..5 {
            c.record_send(100);
            c.record_answer(100, Duration::ZERO, false);
        }
        c.rate_limited.store(5, Relaxed);
        let l = line(&c, Some(600), Some(100_000));
        assert!(l.contains("60/600 requests/min"), "{l}");
        assert!(l.contains("6000/100000 tokens/min admitted"), "{l}");
        assert!(l.contains("5 429s"), "{l}");
    }

    /// A minute's worth admitted in the last seconds is the opening burst; a paced run
    /// (here 10 a second at 600 a minute) is not, from its first paced seconds.
    #[test]
    fn the_opening_burst_note_shows_only_while_admitted_faster_than_the_limits() {
        let c = Counters::default();
        for _ in 0..150 {
            c.record_answer(100, Duration::ZERO, true);
        }
        let opening = line(&c, Some(600), Some(100_000));
        assert!(opening.contains("900/600 requests/min"), "{opening}");
        assert!(opening.contains(OPENING_BURST), "{opening}");
        let within = line(&c, Some(10_000), Some(1_000_000));
        assert!(!within.contains("burst"), "{within}");
        // Paced: 20 admitted in the last 2 s at 600 a minute (10 a second).
        let paced = burst_note((20, 2_000), (600, 60_000), Some(600), Some(100_000));
        assert_eq!(paced, "");
        assert_eq!(burst_note((22, 2_200), (600, 60_000), Some(600), None), "");
        assert_eq!(
            burst_note((40, 4_000), (600, 60_000), Some(600), None),
            OPENING_BURST
        );
        // Paced, while the 10 s rate still holds the burst: said so, not "burst".
        assert_eq!(
            burst_note((20, 2_000), (1_100, 110_000), Some(600), None),
            PACED_NOW
        );
    }

    /// While Redis is down the line says the run waits for it (or limits alone).
    #[test]
    fn the_line_says_when_the_run_waits_for_redis() {
        let c = Counters::default();
        let up = line(&c, Some(600), None);
        assert!(!up.contains("Redis"), "{up}");
        let since = Instant::now()
            .checked_sub(Duration::from_secs(12))
            .expect("the monotonic clock has run 12 s");
        *c.redis_down.lock().expect("not poisoned") = Some(RedisDown {
            since,
            waiting: true,
        });
        let waiting = line(&c, Some(600), None);
        assert!(
            waiting.ends_with(" | waiting for Redis (down 12s)"),
            "{waiting}"
        );
        *c.redis_down.lock().expect("not poisoned") = Some(RedisDown {
            since,
            waiting: false,
        });
        let local = line(&c, Some(600), None);
        assert!(
            local.ends_with(" | Redis down 12s: limiting in this process"),
            "{local}"
        );
    }
}
