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
    /// Recent sends: (when, estimated tokens).
    window: Mutex<VecDeque<(Instant, u64)>>,
}

impl Counters {
    pub(crate) fn record_send(&self, tokens: u64) {
        self.sent.fetch_add(1, Relaxed);
        self.tokens_estimated.fetch_add(tokens, Relaxed);
        let now = Instant::now();
        let mut w = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        w.push_back((now, tokens));
        while w
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(10))
        {
            w.pop_front();
        }
    }

    /// Requests and tokens per minute at the rate of the last 10 seconds (the initial
    /// burst shows for 10 seconds, then the paced rate).
    pub(crate) fn per_minute(&self) -> (u64, u64) {
        let now = Instant::now();
        let w = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        let (r, t) = w
            .iter()
            .filter(|(t, _)| now.duration_since(*t) <= Duration::from_secs(10))
            .fold((0, 0), |(r, t), (_, n)| (r + 1, t + n));
        (r * 6, t * 6)
    }

    pub(crate) fn done(&self) -> u64 {
        self.succeeded.load(Relaxed) + self.failed.load(Relaxed) + self.skipped.load(Relaxed)
    }
}

fn limit(v: Option<u64>) -> String {
    v.map_or_else(|| "?".to_owned(), |v| v.to_string())
}

/// Said while a rate reads above its limit in the first minute: the limits start full
/// (as the provider's do), and a minute's worth may go at once.
const OPENING_BURST: &str = " | opening burst: the limits start full";

/// [`OPENING_BURST`] when it applies, else nothing.
fn burst_note(
    (r, t): (u64, u64),
    rpm: Option<u64>,
    tpm: Option<u64>,
    started: Instant,
) -> &'static str {
    let over = rpm.is_some_and(|l| r > l) || tpm.is_some_and(|l| t > l);
    if over && started.elapsed() < Duration::from_secs(60) {
        OPENING_BURST
    } else {
        ""
    }
}

/// One status line: done / total, rates against the limits, retries, 429s and an ETA.
pub(crate) fn line(c: &Counters, rpm: Option<u64>, tpm: Option<u64>, started: Instant) -> String {
    let (r, t) = c.per_minute();
    let total = c.total.load(Relaxed);
    let this_run = c.succeeded.load(Relaxed) + c.failed.load(Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let eta = match total.checked_sub(c.done()) {
        Some(left) if total > 0 && this_run > 0 && elapsed > 0.0 => {
            let secs = left as f64 * elapsed / this_run as f64;
            format!("eta {}s", secs.ceil() as u64)
        }
        _ => "eta ?".to_owned(),
    };
    format!(
        "{}/{} lines ({} failed) | {r}/{} requests/min | {t}/{} tokens/min | {} retries | {} 429s | {eta}{}",
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
        burst_note((r, t), rpm, tpm, started),
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
    let started = Instant::now();
    match mode {
        Progress::Off | Progress::Auto => {
            let _ = stop.wait_for(|s| *s).await;
        }
        Progress::Lines(every) => loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                () = tokio::time::sleep(every) => {
                    let (rpm, tpm) = limits();
                    eprintln!("tollgate batch: {}", line(counters, rpm, tpm, started));
                }
            }
        },
        Progress::Bar => {
            let bar = indicatif::ProgressBar::new(0);
            let style =
                indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} eta {eta} | {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            bar.set_style(style);
            loop {
                let (rpm, tpm) = limits();
                let (r, t) = counters.per_minute();
                // This run's lines only, so the ETA is this run's pace after a resume.
                let skipped = counters.skipped.load(Relaxed);
                let this_run = counters.done() - skipped;
                let total = counters.total.load(Relaxed).saturating_sub(skipped);
                bar.set_length(total.max(this_run));
                bar.set_position(this_run);
                bar.set_message(format!(
                    "{r}/{} rpm {t}/{} tpm | {} retries {} 429s {} failed{}",
                    limit(rpm),
                    limit(tpm),
                    counters.retries.load(Relaxed),
                    counters.rate_limited.load(Relaxed),
                    counters.failed.load(Relaxed),
                    burst_note((r, t), rpm, tpm, started),
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

    /// A minute's worth sent in the first seconds reads above the limit as a rate: the
    /// line says it is the opening burst, and says nothing once the run is paced.
    #[test]
    fn a_rate_above_the_limit_in_the_first_minute_is_called_the_opening_burst() {
        let c = Counters::default();
        for _ in 0..150 {
            c.record_send(100);
        }
        // 150 in 10 s reads as 900 requests and 90,000 tokens a minute.
        let now = Instant::now();
        let opening = line(&c, Some(600), Some(100_000), now);
        assert!(opening.contains("900/600 requests/min"), "{opening}");
        assert!(opening.ends_with(OPENING_BURST), "{opening}");
        let within = line(&c, Some(1_000), Some(100_000), now);
        assert!(!within.contains("burst"), "{within}");
        let a_minute_ago = now
            .checked_sub(Duration::from_secs(61))
            .expect("the monotonic clock has run for a minute");
        let paced = line(&c, Some(600), Some(100_000), a_minute_ago);
        assert!(!paced.contains("burst"), "{paced}");
    }
}
