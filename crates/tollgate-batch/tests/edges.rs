//! The runner's edges: settings that cannot work are refused before anything is sent,
//! input it cannot resume is refused line by line, and provider answers it cannot wait
//! out stop the run cleanly. Each test drives [`tollgate_batch::run`] against a small
//! HTTP server that answers as the test says.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tollgate_batch::{BatchConfig, BatchError, Progress, Summary, run};

/// An HTTP server answering every request with `answer(n)` (`n` counts from 0):
/// a status line's code, extra header lines, and a body.
struct Provider {
    url: String,
    requests: Arc<AtomicU64>,
    /// When each request was read, in order.
    arrivals: Arc<Mutex<Vec<Instant>>>,
}

impl Provider {
    async fn start(answer: fn(u64) -> (u16, &'static str, String)) -> Provider {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a local port");
        let url = format!(
            "http://{}/v1/chat/completions",
            listener.local_addr().expect("address")
        );
        let requests = Arc::new(AtomicU64::new(0));
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let (counter, times) = (requests.clone(), arrivals.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let n = counter.fetch_add(1, Ordering::SeqCst);
                let times = times.clone();
                tokio::spawn(async move {
                    read_request(&mut stream).await;
                    times.lock().expect("arrivals").push(Instant::now());
                    let (status, headers, body) = answer(n);
                    let response = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n{headers}\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        });
        Provider {
            url,
            requests,
            arrivals,
        }
    }

    fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    fn arrivals(&self) -> Vec<Instant> {
        self.arrivals.lock().expect("arrivals").clone()
    }
}

/// Reads one request: its head, then `content-length` bytes of body.
async fn read_request(stream: &mut tokio::net::TcpStream) {
    let mut data = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let Ok(n) = stream.read(&mut chunk).await else {
            return;
        };
        if n == 0 {
            return;
        }
        data.extend_from_slice(&chunk[..n]);
        let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if data.len() >= end + 4 + length {
            return;
        }
    }
}

const OK: (u16, &str, &str) = (
    200,
    "",
    r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":3}}"#,
);

fn ok(_: u64) -> (u16, &'static str, String) {
    (OK.0, OK.1, OK.2.to_owned())
}

fn config(dir: &Path, url: &str) -> BatchConfig {
    let mut config = BatchConfig::new(dir.join("in.jsonl"), dir.join("out.jsonl"), url);
    config.progress = Progress::Off;
    config
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("an output line is JSON"))
        .collect()
}

fn chat(n: usize) -> String {
    (1..=n)
        .map(|i| format!(r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"line {i}"}}],"max_tokens":8}}"#) + "\n")
        .collect()
}

async fn run_to_end(config: BatchConfig) -> Result<Summary, BatchError> {
    tokio::time::timeout(
        Duration::from_secs(60),
        run(config, std::future::pending::<()>()),
    )
    .await
    .expect("the run ends by itself within 60 s")
}

#[tokio::test]
async fn settings_that_cannot_work_are_refused_before_anything_is_sent() {
    let provider = Provider::start(ok).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, chat(3)).expect("write input");
    let refused = |config: BatchConfig| async {
        match run_to_end(config).await {
            Err(BatchError::Config(message)) => message,
            other => panic!("expected a configuration error, got {other:?}"),
        }
    };

    for too_many in [10_001, usize::MAX] {
        let mut c = config(dir.path(), &provider.url);
        c.rpm = Some(600);
        c.max_in_flight = too_many;
        assert!(refused(c).await.contains("1 to 10000"));
    }
    for account in [String::new(), "a".repeat(1025)] {
        let mut c = config(dir.path(), &provider.url);
        c.rpm = Some(600);
        c.account = Some(account);
        assert!(
            refused(c)
                .await
                .contains("--account must be 1 to 1024 bytes")
        );
    }
    // The results file is the input, spelled another way.
    let mut c = config(dir.path(), &provider.url);
    c.rpm = Some(600);
    c.output = dir.path().join(".").join("in.jsonl");
    assert!(refused(c).await.contains("is the input file"));
    let mut c = config(dir.path(), &provider.url);
    c.rpm = Some(600);
    c.failures = Some(c.output.clone());
    assert!(
        refused(c)
            .await
            .contains("results and failures files are both")
    );

    assert_eq!(provider.requests(), 0, "nothing was sent");
    assert_eq!(
        std::fs::read_to_string(&input).expect("read input"),
        chat(3),
        "the input is untouched"
    );
    assert!(!dir.path().join("out.jsonl").exists());
}

/// The Batch API requires each `custom_id` once; two lines sharing one could not be
/// told apart on resume, so the later one is refused, in every run alike.
#[tokio::test]
async fn a_repeated_custom_id_is_refused_and_a_rerun_sends_nothing_twice() {
    let provider = Provider::start(ok).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let line = |id: &str| {
        format!(
            r#"{{"custom_id":"{id}","method":"POST","url":"/v1/chat/completions","body":{{"model":"gpt-4o-mini","messages":[],"max_tokens":8}}}}"#
        ) + "\n"
    };
    let input = [line("a"), line("b"), line("a"), line("c")].concat();
    std::fs::write(dir.path().join("in.jsonl"), input).expect("write input");
    let mut c = config(dir.path(), &provider.url);
    (c.rpm, c.tpm) = (Some(6_000), Some(1_000_000));
    let first = run_to_end(c.clone()).await.expect("run");
    assert_eq!((first.succeeded, first.failed), (3, 1));
    let failures = lines(&dir.path().join("out.failures.jsonl"));
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0]["line"], 3);
    assert_eq!(failures[0]["custom_id"], "a");
    let message = failures[0]["error"]["message"].as_str().expect("message");
    assert!(message.contains("already used by line 1"), "{message}");

    let second = run_to_end(c).await.expect("rerun");
    assert_eq!((second.already_done, second.requests_sent), (4, 0));
    assert_eq!(provider.requests(), 3);
}

/// With only `--rpm` given, the requests that learn the token limit go through the
/// limiter too: at 1 request per minute, one is sent, not the three probes at once.
#[tokio::test]
async fn a_limit_given_holds_from_the_first_request_while_the_other_is_learned() {
    let provider = Provider::start(ok).await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("in.jsonl"), chat(3)).expect("write input");
    let mut c = config(dir.path(), &provider.url);
    c.rpm = Some(1);
    c.jitter = Duration::ZERO;
    let summary = run(c, tokio::time::sleep(Duration::from_secs(2)))
        .await
        .expect("run");
    assert_eq!(summary.requests_sent, 1, "{summary:?}");
    assert_eq!(provider.requests(), 1);
    assert!(summary.interrupted);
}

/// A 429 asking to wait a day is not waited out inside the run: the run stops at once,
/// says why and when to come back, and leaves the line for the rerun.
#[tokio::test]
async fn a_429_asking_for_a_day_stops_the_run_with_the_reason() {
    let provider = Provider::start(|_| {
        (
            429,
            "retry-after: 86400\r\n",
            r#"{"error":{"message":"Rate limit reached for requests per day (RPD)","code":"rate_limit_exceeded"}}"#.to_owned(),
        )
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("in.jsonl"), chat(2)).expect("write input");
    let mut c = config(dir.path(), &provider.url);
    (c.rpm, c.tpm) = (Some(6_000), Some(1_000_000));
    c.max_in_flight = 1;
    let summary = run_to_end(c).await.expect("run");
    let reason = summary.stopped_because.as_deref().expect("a reason");
    assert!(reason.contains("wait 24h0m"), "{reason}");
    assert!(reason.contains("run the same command again"), "{reason}");
    assert_eq!((summary.failed, summary.unfinished), (0, 2), "{summary:?}");
    assert!(summary.interrupted);
    assert_eq!(provider.requests(), 1);
    assert!(lines(&dir.path().join("out.failures.jsonl")).is_empty());
}

/// A 429 is retried after the wait the provider asks for (`retry-after-ms`), no sooner
/// and not after a fixed pause, and the line then succeeds.
#[tokio::test]
async fn a_429_is_retried_after_the_wait_it_asks_for() {
    let provider = Provider::start(|n| match n {
        1 => (
            429,
            "retry-after-ms: 700\r\n",
            r#"{"error":{"message":"Rate limit reached for requests per min (RPM)","code":"rate_limit_exceeded"}}"#.to_owned(),
        ),
        _ => ok(n),
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("in.jsonl"), chat(3)).expect("write input");
    let mut c = config(dir.path(), &provider.url);
    (c.rpm, c.tpm) = (Some(6_000), Some(1_000_000));
    c.max_in_flight = 1;
    let summary = run_to_end(c).await.expect("run");
    assert_eq!(
        (summary.succeeded, summary.rate_limited, summary.retries),
        (3, 1, 1),
        "{summary:?}"
    );
    let arrivals = provider.arrivals();
    assert_eq!(arrivals.len(), 4);
    let waited = arrivals[2] - arrivals[1];
    // The wait asked for, plus at most the 250 ms of jitter added to a hint (and
    // scheduling).
    assert!(
        waited >= Duration::from_millis(700) && waited < Duration::from_millis(1_500),
        "retried {waited:?} after the 429"
    );
    assert_eq!(lines(&dir.path().join("out.jsonl")).len(), 3);
}

/// A response nested as deep as serde_json reads is kept as text, so its result line
/// can still be read back, and the rerun finds the line done.
#[tokio::test]
async fn a_response_too_deep_to_read_back_is_kept_as_text() {
    let provider = Provider::start(|_| {
        let deep = format!("{}1{}", "[".repeat(126), "]".repeat(126));
        (200, "", format!(r#"{{"choices":{deep}}}"#))
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("in.jsonl"), chat(1)).expect("write input");
    let mut c = config(dir.path(), &provider.url);
    (c.rpm, c.tpm) = (Some(6_000), Some(1_000_000));
    assert_eq!(run_to_end(c.clone()).await.expect("run").succeeded, 1);
    let results = lines(&dir.path().join("out.jsonl"));
    assert!(
        results[0][1]
            .as_str()
            .is_some_and(|s| s.starts_with("{\"choices\":[["))
    );
    let rerun = run_to_end(c)
        .await
        .expect("the rerun reads the results file");
    assert_eq!((rerun.already_done, rerun.requests_sent), (1, 0));
}
