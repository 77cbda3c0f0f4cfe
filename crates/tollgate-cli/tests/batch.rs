//! End to end: `tollgate batch` against `tollgate sim`, each a real process.
//!
//! The scenarios run one at a time (a lock), because each measures timing against the
//! simulator's limits and two at once on a 2-core machine would disturb each other.

#[path = "../../tollgate/tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

/// A `tollgate sim` process, killed on drop.
struct SimProcess {
    child: Child,
    addr: String,
}

impl SimProcess {
    fn start(args: &[&str]) -> SimProcess {
        let mut child = Command::new(BIN)
            .args(["sim", "--port", "0"])
            .args(args)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tollgate sim");
        let stderr = child.stderr.take().expect("sim stderr");
        let mut lines = BufReader::new(stderr).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("tollgate sim exited before listening")
                .expect("read sim stderr");
            if let Some(rest) = line.split("listening on http://").nth(1) {
                break rest.split_whitespace().next().expect("address").to_owned();
            }
        };
        std::thread::spawn(move || lines.for_each(drop));
        SimProcess { child, addr }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn stats(&self) -> Value {
        let mut stream = TcpStream::connect(&self.addr).expect("connect to sim");
        write!(stream, "GET /stats HTTP/1.0\r\nHost: sim\r\n\r\n").expect("send");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read");
        let body = response.split("\r\n\r\n").nth(1).expect("body");
        serde_json::from_str(body).expect("stats JSON")
    }
}

impl Drop for SimProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn batch(input: &Path, output: &Path, url: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("batch")
        .arg(input)
        .arg("-o")
        .arg(output)
        .args(["--url", url, "--progress", "off"])
        .args(extra)
        .env("OPENAI_API_KEY", "sk-test")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// Runs `tollgate batch` with `--summary-json` and returns the summary too (null when the
/// run wrote none).
fn run_with_summary(
    input: &Path,
    output: &Path,
    url: &str,
    flags: &[&str],
) -> (ExitStatus, String, Value) {
    let summary = output.with_extension("summary.json");
    let path = summary.to_str().expect("utf-8 path");
    let mut flags = flags.to_vec();
    flags.extend(["--summary-json", path]);
    let (status, stderr) = run(batch(input, output, url, &flags));
    let parsed = std::fs::read(&summary)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null);
    (status, stderr, parsed)
}

fn run(mut cmd: Command) -> (ExitStatus, String) {
    let out = cmd.output().expect("run tollgate batch");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `n` chat requests of 75 to 150 tokens each, counted as the simulator counts them,
/// with `metadata.row` = their line number; plus the given malformed lines at the end.
fn write_input(path: &Path, n: usize, seed: u64, malformed: &[&[u8]]) {
    let mut rng = fastrand_lite(seed);
    let mut f = std::fs::File::create(path).expect("create input");
    for row in 1..=n {
        let words = 20 + rng() % 30;
        let text: Vec<&str> = (0..words)
            .map(|i| ["alpha", "beta", "gamma", "delta"][(i + rng()) % 4])
            .collect();
        let line = json!({
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": text.join(" ")}],
            "max_tokens": 48 + rng() % 48,
            "metadata": {"row": row},
        });
        writeln!(f, "{line}").expect("write");
    }
    for bad in malformed {
        f.write_all(bad).expect("write");
        f.write_all(b"\n").expect("write");
    }
}

/// `n` chat requests where line `row` repeats the request of line `row % distinct + 1`,
/// each with its own `metadata.row`: equal requests that resuming must tell apart.
fn write_repeating_input(path: &Path, n: usize, distinct: usize) {
    let mut f = std::fs::File::create(path).expect("create input");
    for row in 1..=n {
        let line = json!({
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": format!("question {}", row % distinct)}],
            "max_tokens": 64,
            "metadata": {"row": row},
        });
        writeln!(f, "{line}").expect("write");
    }
}

/// A tiny deterministic generator, so the workload is the same on every run.
fn fastrand_lite(seed: u64) -> impl FnMut() -> usize {
    let mut state = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    move || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) as usize
    }
}

fn read_lines(path: &Path) -> Vec<Value> {
    match std::fs::read_to_string(path) {
        Ok(text) => text
            .lines()
            .map(|l| serde_json::from_str(l).expect("every output line is JSON"))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// How many times each input line appears in the results (by `metadata.row` or
/// `custom_id`) and failures (by `line`) files together.
fn accounted(results: &Path, failures: &Path) -> HashMap<u64, u32> {
    let mut seen = HashMap::new();
    for r in read_lines(results) {
        let row = r
            .pointer("/2/row")
            .and_then(Value::as_u64)
            .or_else(|| {
                r["custom_id"]
                    .as_str()
                    .and_then(|id| id.strip_prefix("row-")?.parse().ok())
            })
            .expect("a result names its row");
        *seen.entry(row).or_insert(0) += 1;
    }
    for f in read_lines(failures) {
        *seen
            .entry(f["line"].as_u64().expect("a failure names its line"))
            .or_insert(0) += 1;
    }
    seen
}

fn assert_each_once(seen: &HashMap<u64, u32>, lines: u64) {
    for line in 1..=lines {
        assert_eq!(
            seen.get(&line),
            Some(&1),
            "line {line} must be in the output exactly once"
        );
    }
    assert_eq!(
        seen.len() as u64,
        lines,
        "no output line for a line that is not in the input"
    );
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

#[test]
fn at_the_simulators_limits_nothing_is_refused_and_every_line_is_accounted_for() {
    let _serial = serial();
    let dir = tmp();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    // About 600 × 112 tokens against 60,000 per minute: the burst, then a few seconds
    // at the refill rate, so the limit binds without making CI slow.
    write_input(
        &input,
        600,
        1,
        &[b"{not json", b"\xff\xfe", b"{\"model\": \"x\"}", b""],
    );
    let sim = SimProcess::start(&["--rpm", "6000", "--tpm", "60000", "--latency", "20ms"]);
    let started = Instant::now();
    let (status, stderr, summary) = run_with_summary(
        &input,
        &output,
        &sim.url("/v1/chat/completions"),
        &["--rpm", "6000", "--tpm", "60000"],
    );
    let elapsed = started.elapsed();
    assert!(status.success(), "batch failed: {stderr}");
    let stats = sim.stats();
    assert_eq!(
        stats["rate_limited"], 0,
        "the simulator refused a request: {stats}"
    );
    assert_eq!(stats["admitted"], 600, "{stats}");
    let failures = dir.path().join("out.failures.jsonl");
    assert_each_once(&accounted(&output, &failures), 604);
    let mut failed = read_lines(&failures);
    failed.sort_by_key(|f| f["line"].as_u64());
    let messages: Vec<&str> = failed
        .iter()
        .map(|f| f["error"]["message"].as_str().unwrap_or(""))
        .collect();
    assert!(
        messages[0].starts_with("line 601 is not valid JSON"),
        "{messages:?}"
    );
    assert_eq!(
        messages[1],
        "line 602 is not valid UTF-8 (invalid byte at offset 0)"
    );
    assert_eq!(messages[2], "line 603: the request has no `messages` field");
    assert_eq!(messages[3], "line 604 is empty");
    assert_eq!(
        (summary["succeeded"].as_u64(), summary["failed"].as_u64()),
        (Some(600), Some(4))
    );
    // The limits bound: the run cannot be faster than what they allow after the burst.
    let tokens = stats["tokens_admitted"].as_u64().expect("tokens");
    let ideal = Duration::from_secs_f64(tokens.saturating_sub(60_000) as f64 / 1_000.0);
    assert!(
        tokens > 60_000 && elapsed >= ideal,
        "{tokens} tokens in {elapsed:?}"
    );
    // Results carry the request, the response with usage, and the metadata.
    let first = &read_lines(&output)[0];
    assert!(
        first[1]["usage"]["completion_tokens"].as_u64().is_some(),
        "{first}"
    );
}

#[test]
fn a_run_killed_with_sigkill_resumes_and_writes_each_line_exactly_once() {
    let _serial = serial();
    kill_and_resume(false);
    kill_and_resume(true);
}

fn kill_and_resume(batch_api: bool) {
    let dir = tmp();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    if batch_api {
        // Batch API format: custom_id, method, url, body.
        let mut f = std::fs::File::create(&input).expect("create");
        for row in 1..=300u64 {
            let line = json!({"custom_id": format!("row-{row}"), "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 90}});
            writeln!(f, "{line}").expect("write");
        }
    } else {
        // Cookbook format, each request three times under different metadata.
        write_repeating_input(&input, 300, 100);
    }
    // 10 in flight of 200 ms each: about 6 s for the whole file.
    let sim = SimProcess::start(&["--rpm", "6000", "--tpm", "600000", "--latency", "200ms"]);
    let url = sim.url("/v1/chat/completions");
    let slow = ["--rpm", "6000", "--tpm", "600000", "--max-in-flight", "10"];
    let mut first = batch(&input, &output, &url, &slow).spawn().expect("spawn");
    std::thread::sleep(Duration::from_millis(1_200));
    first.kill().expect("kill -9");
    let _ = first.wait();
    let before = read_lines(&output).len();
    assert!(
        before > 0 && before < 300,
        "the kill landed mid-run: {before} lines done"
    );
    let (status, stderr) = run(batch(&input, &output, &url, &slow));
    assert!(status.success(), "rerun failed: {stderr}");
    let failures = dir.path().join("out.failures.jsonl");
    assert_each_once(&accounted(&output, &failures), 300);
    let results = read_lines(&output);
    assert!(results.iter().all(|r| if batch_api {
        r["response"]["status_code"] == 200 && r["error"].is_null()
    } else {
        r[1]["usage"]["total_tokens"].is_u64()
    }));
    // A third run has nothing left to do and sends nothing.
    let sent_before = sim.stats()["admitted"].as_u64();
    let (status, stderr) = run(batch(
        &input,
        &output,
        &url,
        &["--rpm", "6000", "--tpm", "600000"],
    ));
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("300 done before"), "{stderr}");
    assert_eq!(sim.stats()["admitted"].as_u64(), sent_before);
}

#[test]
fn ctrl_c_drains_in_flight_requests_and_a_rerun_finishes() {
    let _serial = serial();
    let dir = tmp();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    // Cookbook format, with each request ten times under different metadata.
    write_repeating_input(&input, 200, 20);
    let sim = SimProcess::start(&["--rpm", "3000", "--tpm", "1000000", "--latency", "300ms"]);
    let url = sim.url("/v1/chat/completions");
    let child = batch(
        &input,
        &output,
        &url,
        &["--rpm", "3000", "--tpm", "1000000", "--max-in-flight", "8"],
    )
    .spawn()
    .expect("spawn");
    std::thread::sleep(Duration::from_millis(1_500));
    let sigint = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill -INT");
    assert!(sigint.success());
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(130),
        "interrupted runs exit 130: {stderr}"
    );
    // Drained: every request the simulator admitted has its result line.
    let admitted = sim.stats()["admitted"].as_u64().expect("admitted");
    assert_eq!(read_lines(&output).len() as u64, admitted, "{stderr}");
    let (status, stderr) = run(batch(
        &input,
        &output,
        &url,
        &["--rpm", "3000", "--tpm", "1000000"],
    ));
    assert!(status.success(), "{stderr}");
    assert_each_once(
        &accounted(&output, &dir.path().join("out.failures.jsonl")),
        200,
    );
}

#[test]
fn faults_are_retried_and_refusals_go_to_the_failures_file() {
    let _serial = serial();
    let dir = tmp();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    write_input(&input, 150, 3, &[]);
    let sim = SimProcess::start(&[
        "--rpm",
        "100000",
        "--tpm",
        "10000000",
        "--latency",
        "10ms",
        "--error-rate",
        "0.2",
        "--drop-rate",
        "0.1",
        "--seed",
        "7",
        "--keys",
        "sk-test",
    ]);
    let url = sim.url("/v1/chat/completions");
    let (status, stderr, summary) = run_with_summary(
        &input,
        &output,
        &url,
        &["--rpm", "100000", "--tpm", "10000000"],
    );
    assert!(status.success(), "{stderr}");
    let stats = sim.stats();
    assert!(
        stats["errors_injected"].as_u64() > Some(0) && stats["dropped"].as_u64() > Some(0),
        "{stats}"
    );
    assert_eq!(
        summary["succeeded"], 150,
        "every line got through its faults: {summary}"
    );
    assert!(
        summary["retries"].as_u64() > Some(0) && summary["transport_errors"].as_u64() > Some(0),
        "{summary}"
    );
    assert_each_once(
        &accounted(&output, &dir.path().join("out.failures.jsonl")),
        150,
    );
}

#[test]
fn limits_are_learned_from_the_providers_headers() {
    let _serial = serial();
    let dir = tmp();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    write_input(&input, 620, 4, &[]);
    let sim = SimProcess::start(&["--rpm", "6000", "--tpm", "60000", "--latency", "20ms"]);
    let (status, stderr, summary) =
        run_with_summary(&input, &output, &sim.url("/v1/chat/completions"), &[]);
    assert!(status.success(), "{stderr}");
    assert_eq!(
        (summary["rpm"].as_u64(), summary["tpm"].as_u64()),
        (Some(6000), Some(60000)),
        "{summary}"
    );
    let stats = sim.stats();
    assert_eq!(stats["rate_limited"], 0, "{stats}");
    assert_each_once(
        &accounted(&output, &dir.path().join("out.failures.jsonl")),
        620,
    );
}

#[test]
fn two_batch_processes_sharing_redis_stay_inside_one_budget() {
    let _serial = serial();
    let redis = support::RedisServer::start();
    let dir = tmp();
    let sim = SimProcess::start(&["--rpm", "6000", "--tpm", "60000", "--latency", "20ms"]);
    let url = sim.url("/v1/chat/completions");
    let flags = ["--rpm", "6000", "--tpm", "60000", "--redis", &redis.url()];
    let mut children = Vec::new();
    let mut outputs = Vec::new();
    for i in 0..2u64 {
        let input: PathBuf = dir.path().join(format!("in{i}.jsonl"));
        let output = dir.path().join(format!("out{i}.jsonl"));
        write_input(&input, 300, 10 + i, &[]);
        children.push(batch(&input, &output, &url, &flags).spawn().expect("spawn"));
        outputs.push(output);
    }
    for child in children {
        let out = child.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stats = sim.stats();
    // Each process alone would take the whole burst: together they would be refused.
    assert_eq!(stats["rate_limited"], 0, "{stats}");
    assert_eq!(stats["admitted"], 600, "{stats}");
    assert!(
        stats["tokens_admitted"].as_u64() > Some(60_000),
        "the shared limit bound: {stats}"
    );
    for output in outputs {
        assert_eq!(read_lines(&output).len(), 300);
    }
}

#[test]
fn limits_set_too_high_are_lowered_to_the_providers_and_every_line_succeeds() {
    let _serial = serial();
    let dir = tmp();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    write_input(&input, 600, 5, &[]);
    let sim = SimProcess::start(&["--rpm", "6000", "--tpm", "60000", "--latency", "20ms"]);
    let started = Instant::now();
    // The flags claim twice the simulator's token limit.
    let (status, stderr, summary) = run_with_summary(
        &input,
        &output,
        &sim.url("/v1/chat/completions"),
        &["--rpm", "6000", "--tpm", "120000"],
    );
    let elapsed = started.elapsed();
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains("the provider reports a limit of 60000, below the 120000 of --tpm: using 60000 from now on"),
        "{stderr}"
    );
    assert_each_once(
        &accounted(&output, &dir.path().join("out.failures.jsonl")),
        600,
    );
    let stats = sim.stats();
    assert_eq!(summary["succeeded"], 600, "{summary}");
    assert_eq!(
        (&summary["rpm"], &summary["tpm"]),
        (&json!(6000), &json!(60000))
    );
    // The first answer's `x-ratelimit-limit-tokens` replaces the flag; only requests the
    // old limiter let through on the way can meet 429s (observed: 0 to 4). Trusting the
    // flag, pulled down by each answer's remaining tokens but refilling twice too fast
    // between answers, met about 75 and could send a line to the failures file after
    // `--max-attempts` refusals in a row.
    let refused = stats["rate_limited"].as_u64().expect("429s");
    assert!(refused < 30, "{refused} 429s for 600 requests: {stats}");
    // And no long pause: the run takes about the time the real limit allows.
    let tokens = stats["tokens_admitted"].as_u64().expect("tokens");
    let ideal = tokens.saturating_sub(60_000) as f64 / 1_000.0;
    assert!(
        elapsed.as_secs_f64() < ideal + 5.0,
        "{elapsed:?} against an ideal of {ideal:.1} s"
    );
}

/// `(tokens admitted, 429s)` the simulator has seen so far.
fn admitted_and_refused(sim: &SimProcess) -> (u64, u64) {
    let stats = sim.stats();
    (
        stats["tokens_admitted"].as_u64().expect("tokens"),
        stats["rate_limited"].as_u64().expect("429s"),
    )
}

/// The provider's bucket for the key is empty at start (an earlier run, another app):
/// the run's first request goes alone, its answer's headers pull the limiter down to
/// what is really left, and the run is paced from there, instead of bursting into 429s
/// (61 of them for this file before). Without looking first this fails.
#[test]
fn a_key_spent_before_the_run_starts_meets_at_most_a_few_429s() {
    let _serial = serial();
    let dir = tmp();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    write_input(&input, 150, 18, &[]);
    let sim = SimProcess::start(&[
        "--rpm",
        "6000",
        "--tpm",
        "60000",
        "--latency",
        "20ms",
        "--start-fill",
        "0",
    ]);
    let started = Instant::now();
    let (status, stderr) = run(batch(
        &input,
        &output,
        &sim.url("/v1/chat/completions"),
        &["--rpm", "6000", "--tpm", "60000"],
    ));
    let elapsed = started.elapsed();
    assert!(status.success(), "{stderr}");
    assert_each_once(
        &accounted(&output, &dir.path().join("out.failures.jsonl")),
        150,
    );
    let (tokens, refused) = admitted_and_refused(&sim);
    assert!(refused <= 4, "{refused} 429s: {}", sim.stats());
    // From an empty bucket every token waits for its refill: 1,000 a second.
    let ideal = tokens as f64 / 1_000.0;
    assert!(
        elapsed.as_secs_f64() < ideal * 1.05 + 3.0,
        "{elapsed:?} against the {ideal:.1} s the limits allow"
    );
}

/// Killed with SIGKILL three times while paced at the limit, and rerun each time: each
/// rerun starts with a full limiter while the provider's bucket is still drained, so it
/// looks first; each restart meets at most a few 429s (58 to 62 before), and every line
/// is written exactly once.
#[test]
fn each_restart_after_sigkill_looks_before_its_burst() {
    let _serial = serial();
    let dir = tmp();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    // About 400 × 112 tokens against 30,000 a minute: the burst, then about 30 s paced.
    write_input(&input, 400, 19, &[]);
    let sim = SimProcess::start(&["--rpm", "6000", "--tpm", "30000", "--latency", "20ms"]);
    let url = sim.url("/v1/chat/completions");
    let flags = ["--rpm", "6000", "--tpm", "30000"];
    let mut per_run = Vec::new();
    for kill in 0..4 {
        let (_, before) = admitted_and_refused(&sim);
        let mut child = batch(&input, &output, &url, &flags).spawn().expect("spawn");
        if kill < 3 {
            std::thread::sleep(Duration::from_secs(4));
            child.kill().expect("kill -9");
            let _ = child.wait();
        } else {
            let out = child.wait_with_output().expect("wait");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let (_, after) = admitted_and_refused(&sim);
        per_run.push(after - before);
    }
    // The first run starts on a full bucket; the three reruns on a drained one.
    assert!(
        per_run.iter().all(|&n| n <= 4),
        "429s per run: {per_run:?}: {}",
        sim.stats()
    );
    assert_each_once(
        &accounted(&output, &dir.path().join("out.failures.jsonl")),
        400,
    );
}

/// Sends `FLUSHALL` to a Redis server, as an operator (or a failover to an empty
/// replica) might.
fn flushall(port: u16) {
    let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect to redis");
    c.write_all(b"FLUSHALL\r\n").expect("send");
    let mut buf = [0u8; 5];
    c.read_exact(&mut buf).expect("read");
    assert_eq!(&buf, b"+OK\r\n");
}

/// Two processes share one budget through Redis; mid-run Redis restarts empty (or is
/// flushed, with no outage to notice), so the shared limiter is full again while the
/// provider's bucket is drained. Each process finds out (the outage, or a decision from a
/// state without the mark the last look left, or marked again since its turn was
/// reserved) and looks before going on: at most a few 429s after the state is lost (69
/// to 80 before), nothing lost or duplicated.
#[test]
fn a_shared_budget_redis_lost_is_looked_up_again() {
    let _serial = serial();
    for flush in [false, true] {
        let mut redis = support::RedisServer::start();
        let dir = tmp();
        let sim = SimProcess::start(&["--rpm", "6000", "--tpm", "30000", "--latency", "20ms"]);
        let url = sim.url("/v1/chat/completions");
        let flags = ["--rpm", "6000", "--tpm", "30000", "--redis", &redis.url()];
        let mut children = Vec::new();
        let mut files = Vec::new();
        for i in 0..2u64 {
            let input: PathBuf = dir.path().join(format!("in{i}.jsonl"));
            let output = dir.path().join(format!("out{i}.jsonl"));
            // 2 × 200 × 112 tokens against 30,000 a minute: about 30 s paced.
            write_input(&input, 200, 20 + i, &[]);
            children.push(batch(&input, &output, &url, &flags).spawn().expect("spawn"));
            files.push((output, dir.path().join(format!("out{i}.failures.jsonl"))));
        }
        std::thread::sleep(Duration::from_secs(8));
        let (_, before) = admitted_and_refused(&sim);
        if flush {
            flushall(redis.port);
        } else {
            redis.kill();
            std::thread::sleep(Duration::from_secs(1));
            redis.restart();
        }
        for child in children {
            let out = child.wait_with_output().expect("wait");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let (_, after) = admitted_and_refused(&sim);
        assert!(
            after - before <= 4,
            "flush {flush}: {} 429s after the state was lost: {}",
            after - before,
            sim.stats()
        );
        for (output, failures) in files {
            assert_each_once(&accounted(&output, &failures), 200);
        }
    }
}

/// What the simulator has been sent: API requests, admitted or refused.
fn sent(sim: &SimProcess) -> u64 {
    let s = sim.stats();
    s["requests"]
        .as_u64()
        .unwrap_or_else(|| panic!("no requests in {s}"))
}

/// A careless user's mistakes stop the run before a request is sent (and paid for):
/// another Batch API *input* file as `-o` (taken as finished work, it sent nothing and
/// was appended to), an output directory that does not exist (127 requests were sent
/// and paid for, then nothing written), absurd flags (`--timeout 0` failed every line,
/// `--jitter 1h` turned the token limit off). Each message says what is wrong, once.
#[test]
fn mistakes_stop_the_run_before_a_request_is_sent() {
    let _serial = serial();
    let dir = tmp();
    let input = dir.path().join("in.jsonl");
    write_input(&input, 10, 3, &[]);
    let sim = SimProcess::start(&["--latency", "1ms"]);
    let url = sim.url("/v1/chat/completions");

    let other = dir.path().join("other-batch-input.jsonl");
    let batch_input = "{\"custom_id\":\"a\",\"method\":\"POST\",\"url\":\"/v1/chat/completions\",\"body\":{\"model\":\"m\"}}\n";
    std::fs::write(&other, batch_input).expect("write");
    let (status, stderr) = run(batch(&input, &other, &url, &[]));
    assert!(!status.success());
    assert!(
        stderr.contains("other-batch-input.jsonl line 1 is not a line tollgate batch writes"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&other).expect("read"), batch_input);

    let nowhere = dir.path().join("missing-dir").join("out.jsonl");
    let (status, stderr) = run(batch(&input, &nowhere, &url, &[]));
    assert!(!status.success());
    assert!(stderr.contains("cannot write"), "{stderr}");
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "the cause once: {stderr}"
    );

    let out = dir.path().join("out.jsonl");
    for (flags, says) in [
        (&["--timeout", "0s"][..], "--timeout must be more than 0"),
        (&["--jitter", "1h"][..], "--jitter must be from 0 to 10s"),
    ] {
        let (status, stderr) = run(batch(&input, &out, &url, flags));
        assert!(!status.success(), "{flags:?}");
        assert!(stderr.contains(says), "{flags:?}: {stderr}");
    }
    let (status, stderr) = run(batch(&dir.path().join("nope.jsonl"), &out, &url, &[]));
    assert!(!status.success());
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "{stderr}"
    );
    assert_eq!(sent(&sim), 0, "nothing was sent for any of these");
}

/// The same command twice at once (a second terminal, a cron overlap) sent and paid for
/// 88 of 250 lines twice. The second run now exits at once naming the first, which
/// finishes every line once.
#[test]
fn the_same_command_twice_at_once_runs_once() {
    let _serial = serial();
    let dir = tmp();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    write_input(&input, 40, 4, &[]);
    // 40 requests, 4 at a time, each answered after 500 ms: about 5 s for the first run.
    let sim = SimProcess::start(&["--latency", "500ms"]);
    let url = sim.url("/v1/chat/completions");
    let first = batch(&input, &output, &url, &["--max-in-flight", "4"])
        .spawn()
        .expect("start the first run");
    let lock = dir.path().join("out.jsonl.lock");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&lock).is_ok_and(|t| t.contains("pid")) {
        assert!(
            Instant::now() < deadline,
            "the first run never took its lock"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    let (status, stderr) = run(batch(&input, &output, &url, &["--max-in-flight", "4"]));
    assert!(!status.success());
    assert!(
        stderr.contains("another tollgate batch is writing to")
            && stderr.contains(&format!("pid {}", first.id())),
        "{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "refused at once"
    );
    let out = first.wait_with_output().expect("the first run ends");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_each_once(
        &accounted(&output, &dir.path().join("out.failures.jsonl")),
        40,
    );
    assert_eq!(sent(&sim), 40, "no line was sent twice");
    // A later run takes the lock over and finds everything done.
    let (status, stderr) = run(batch(&input, &output, &url, &[]));
    assert!(status.success(), "{stderr}");
    assert_eq!(sent(&sim), 40);
}

/// A file saved with a byte order mark was refused at line 1 ("expected value at line 1
/// column 1"): the mark is skipped.
#[test]
fn a_byte_order_mark_is_skipped() {
    let _serial = serial();
    let dir = tmp();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    write_input(&input, 3, 5, &[]);
    let mut text = "\u{feff}".as_bytes().to_vec();
    text.extend(std::fs::read(&input).expect("read"));
    std::fs::write(&input, text).expect("write");
    let sim = SimProcess::start(&["--latency", "1ms"]);
    let (status, stderr, summary) =
        run_with_summary(&input, &output, &sim.url("/v1/chat/completions"), &[]);
    assert!(status.success(), "{stderr}");
    assert_eq!(summary["succeeded"], 3, "{summary}");
    assert_eq!(summary["failed"], 0, "{summary}");
}

/// Lines of `stderr` saying Redis went down, and saying it came back.
fn outage_lines(stderr: &str) -> (usize, usize) {
    let down = stderr.lines().filter(|l| l.contains(" is down (")).count();
    let back = stderr
        .lines()
        .filter(|l| l.contains(" is back after "))
        .count();
    (down, back)
}

/// Issue 20, finding 6: a Redis outage under a running batch (64 requests waiting) was
/// one warning per waiting request every 500 ms (720 lines in 25 s). Now: one line when it
/// starts, naming Redis and what to do, one when it ends with its duration; the run
/// finishes with every line once. Redis down at the start is said once too, and the run
/// waits for it.
#[test]
fn a_redis_outage_is_said_once_when_it_starts_and_once_when_it_ends() {
    let _serial = serial();
    let mut redis = support::RedisServer::start();
    let dir = tmp();
    let sim = SimProcess::start(&["--rpm", "6000", "--tpm", "30000", "--latency", "20ms"]);
    let url = sim.url("/v1/chat/completions");
    let flags = ["--rpm", "6000", "--tpm", "30000", "--redis", &redis.url()];
    let input = dir.path().join("in.jsonl");
    let output = dir.path().join("out.jsonl");
    // 400 × 112 tokens against 30,000 a minute: the burst, then about 30 s paced.
    write_input(&input, 400, 7, &[]);
    let child = batch(&input, &output, &url, &flags).spawn().expect("spawn");
    std::thread::sleep(Duration::from_secs(4));
    redis.kill();
    std::thread::sleep(Duration::from_secs(4));
    redis.restart();
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(outage_lines(&stderr), (1, 1), "{stderr}");
    assert!(
        !stderr.contains("fail_open"),
        "advice names a flag that does not exist: {stderr}"
    );
    assert_each_once(
        &accounted(&output, &dir.path().join("out.failures.jsonl")),
        400,
    );

    // Down at the start: one clear line, then the run waits and goes on.
    let output = dir.path().join("start.jsonl");
    write_input(&input, 50, 8, &[]);
    redis.kill();
    let flags = ["--rpm", "6000", "--tpm", "30000", "--redis", &redis.url()];
    let child = batch(&input, &output, &url, &flags).spawn().expect("spawn");
    std::thread::sleep(Duration::from_secs(3));
    redis.restart();
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(outage_lines(&stderr), (1, 1), "{stderr}");
    let down = stderr
        .lines()
        .find(|l| l.contains(" is down ("))
        .expect("a down line");
    assert!(down.contains(&redis.url()), "{down}");
    assert!(down.contains("--on-redis-down"), "{down}");
    assert_each_once(
        &accounted(&output, &dir.path().join("start.failures.jsonl")),
        50,
    );
}

/// `--on-redis-down fail`: Redis down at the start exits non-zero with one clear error
/// before anything is sent; Redis lost mid-run stops the run non-zero, and the lines not
/// answered are written nowhere (no failures), so a rerun sends them.
#[test]
fn on_redis_down_fail_stops_the_run_and_marks_nothing_unanswered() {
    let _serial = serial();
    let mut redis = support::RedisServer::start();
    let dir = tmp();
    let sim = SimProcess::start(&["--rpm", "6000", "--tpm", "30000", "--latency", "20ms"]);
    let url = sim.url("/v1/chat/completions");
    let redis_url = redis.url();
    let flags = [
        "--rpm",
        "6000",
        "--tpm",
        "30000",
        "--redis",
        &redis_url,
        "--on-redis-down",
        "fail",
    ];
    let input = dir.path().join("in.jsonl");
    let output = dir.path().join("out.jsonl");
    let failures = dir.path().join("out.failures.jsonl");
    write_input(&input, 400, 9, &[]);

    redis.kill();
    let (status, stderr) = run(batch(&input, &output, &url, &flags));
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("Redis at {redis_url} cannot be reached")),
        "{stderr}"
    );
    assert_eq!(admitted_and_refused(&sim), (0, 0), "{}", sim.stats());
    assert!(read_lines(&output).is_empty() && read_lines(&failures).is_empty());

    redis.restart();
    let child = batch(&input, &output, &url, &flags).spawn().expect("spawn");
    std::thread::sleep(Duration::from_secs(4));
    redis.kill();
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--on-redis-down fail stops the run"),
        "{stderr}"
    );
    let written = read_lines(&output).len();
    assert!(0 < written && written < 400, "{written} written: {stderr}");
    assert!(read_lines(&failures).is_empty(), "{stderr}");

    redis.restart();
    let (status, stderr) = run(batch(&input, &output, &url, &flags));
    assert!(status.success(), "{stderr}");
    assert_each_once(&accounted(&output, &failures), 400);
}

/// `--on-redis-down local`: Redis lost mid-run, never back: the run limits in this
/// process alone and finishes, every line once, the outage said once.
#[test]
fn on_redis_down_local_finishes_the_run() {
    let _serial = serial();
    let mut redis = support::RedisServer::start();
    let dir = tmp();
    let sim = SimProcess::start(&["--rpm", "6000", "--tpm", "30000", "--latency", "20ms"]);
    let url = sim.url("/v1/chat/completions");
    let redis_url = redis.url();
    let flags = [
        "--rpm",
        "6000",
        "--tpm",
        "30000",
        "--redis",
        &redis_url,
        "--on-redis-down",
        "local",
    ];
    let input = dir.path().join("in.jsonl");
    let output = dir.path().join("out.jsonl");
    write_input(&input, 300, 11, &[]);
    let child = batch(&input, &output, &url, &flags).spawn().expect("spawn");
    std::thread::sleep(Duration::from_secs(3));
    redis.kill();
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(outage_lines(&stderr), (1, 0), "{stderr}");
    assert!(
        stderr.contains("limiting in this process alone"),
        "{stderr}"
    );
    assert_each_once(
        &accounted(&output, &dir.path().join("out.failures.jsonl")),
        300,
    );
}

/// The exit status of a run stopped by a failure of the whole run.
const EXIT_RUN_FAILED: i32 = 3;

/// A wrong key stops the run at its first answer (exit 3), writes no line anywhere and
/// says which variable to check, without echoing the key; the rerun with the right key
/// sends every line. (Before: 100 lines in the failures file, exit 0, and the rerun did
/// nothing.)
#[test]
fn a_wrong_key_stops_the_run_marks_nothing_and_the_rerun_sends_every_line() {
    let _serial = serial();
    let dir = tmp();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    let failures = dir.path().join("out.failures.jsonl");
    write_input(&input, 100, 5, &[]);
    let sim = SimProcess::start(&["--keys", "sk-right-key-0001", "--latency", "5ms"]);
    let url = sim.url("/v1/chat/completions");
    // With the limits given, no probe: a burst of 64 goes out and every answer is a 401.
    for flags in [&[][..], &["--rpm", "100000", "--tpm", "10000000"][..]] {
        let summary_path = output.with_extension("summary.json");
        let mut cmd = batch(&input, &output, &url, flags);
        cmd.args(["--summary-json", summary_path.to_str().expect("utf-8")]);
        cmd.env("OPENAI_API_KEY", "sk-wrong-key-123456");
        let (status, stderr) = run(cmd);
        assert_eq!(status.code(), Some(EXIT_RUN_FAILED), "{stderr}");
        assert!(
            stderr.contains("refused the API key")
                && stderr.contains("HTTP 401")
                && stderr.contains("--api-key-env OPENAI_API_KEY")
                && stderr.contains("Incorrect API key provided: [redacted]"),
            "{stderr}"
        );
        assert!(
            !stderr.contains("wrong-key") && !stderr.contains("3456"),
            "the key is not echoed: {stderr}"
        );
        assert!(read_lines(&output).is_empty() && read_lines(&failures).is_empty());
        let summary: Value =
            serde_json::from_slice(&std::fs::read(&summary_path).expect("summary")).expect("json");
        assert_eq!(summary["run_failure"]["cause"], "auth", "{summary}");
        assert_eq!(summary["run_failure"]["status"], 401, "{summary}");
        assert_eq!(
            (summary["succeeded"].as_u64(), summary["failed"].as_u64()),
            (Some(0), Some(0))
        );
    }
    let mut cmd = batch(&input, &output, &url, &[]);
    cmd.env("OPENAI_API_KEY", "sk-right-key-0001");
    let (status, stderr) = run(cmd);
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains("100 succeeded") && stderr.contains("0 done before"),
        "{stderr}"
    );
    assert_each_once(&accounted(&output, &failures), 100);
    assert!(read_lines(&failures).is_empty());
}

/// An account out of credit (429 insufficient_quota) stops the run, marks nothing and
/// says to add credit; a "Request too large" 429 stays one line's failure (the faults
/// tests cover that path).
#[test]
fn an_account_out_of_credit_stops_the_run_and_marks_nothing() {
    let _serial = serial();
    let dir = tmp();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    let failures = dir.path().join("out.failures.jsonl");
    write_input(&input, 100, 6, &[]);
    let sim = SimProcess::start(&["--out-of-credit", "--latency", "5ms"]);
    let url = sim.url("/v1/chat/completions");
    let (status, stderr, summary) = run_with_summary(
        &input,
        &output,
        &url,
        &["--rpm", "100000", "--tpm", "10000000"],
    );
    assert_eq!(status.code(), Some(EXIT_RUN_FAILED), "{stderr}");
    assert!(
        stderr.contains("out of credit")
            && stderr.contains("HTTP 429")
            && stderr.contains("exceeded your current quota")
            && stderr.contains("Add credit"),
        "{stderr}"
    );
    assert_eq!(summary["run_failure"]["cause"], "credit", "{summary}");
    assert!(read_lines(&output).is_empty() && read_lines(&failures).is_empty());
    // Nothing more is sent after the answers to the first burst.
    assert!(
        sim.stats()["requests"].as_u64() <= Some(64),
        "{}",
        sim.stats()
    );
}

/// A provider that refuses connections stops the run after --give-up-after (not after
/// every line has used its attempts), with nothing marked; --give-up-after 0 is refused.
#[test]
fn an_unreachable_provider_stops_the_run_after_the_bound_and_marks_nothing() {
    let _serial = serial();
    let dir = tmp();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    let failures = dir.path().join("out.failures.jsonl");
    write_input(&input, 50, 7, &[]);
    // A port nobody listens on.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
    let started = Instant::now();
    let (status, stderr, summary) = run_with_summary(
        &input,
        &output,
        &url,
        &["--give-up-after", "2s", "--max-attempts", "2"],
    );
    let took = started.elapsed();
    assert_eq!(status.code(), Some(EXIT_RUN_FAILED), "{stderr}");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(20),
        "{took:?}"
    );
    assert!(
        stderr.contains("unreachable") && stderr.contains("Is the URL right"),
        "{stderr}"
    );
    assert_eq!(summary["run_failure"]["cause"], "unreachable", "{summary}");
    assert!(read_lines(&output).is_empty() && read_lines(&failures).is_empty());

    let (status, stderr) = run(batch(&input, &output, &url, &["--give-up-after", "0s"]));
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("must be more than 0"), "{stderr}");
}

/// --retry-failures sends again the lines that failed for a reason that may have
/// passed (here 5xx), moves them to the results, and leaves the others (a malformed
/// line) in the failures file; without the flag a rerun sends nothing.
#[test]
fn retry_failures_resends_retryable_failures_and_counts_them() {
    let _serial = serial();
    let dir = tmp();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    let failures = dir.path().join("out.failures.jsonl");
    write_input(&input, 40, 8, &[b"{not json"]);
    let flags = [
        "--rpm",
        "100000",
        "--tpm",
        "10000000",
        "--max-attempts",
        "1",
    ];
    {
        let broken = SimProcess::start(&["--error-rate", "1", "--latency", "5ms"]);
        let (status, stderr, summary) =
            run_with_summary(&input, &output, &broken.url("/v1/chat/completions"), &flags);
        assert!(status.success(), "{stderr}");
        assert_eq!(summary["failed"], 41, "{summary}");
    }
    let sim = SimProcess::start(&["--latency", "5ms"]);
    let url = sim.url("/v1/chat/completions");
    let (status, stderr, summary) = run_with_summary(&input, &output, &url, &flags);
    assert!(status.success(), "{stderr}");
    assert_eq!(
        summary["already_done"], 41,
        "without the flag nothing is sent: {summary}"
    );
    assert_eq!(sim.stats()["requests"], 0);

    let mut with_retry = flags.to_vec();
    with_retry.push("--retry-failures");
    let (status, stderr, summary) = run_with_summary(&input, &output, &url, &with_retry);
    assert!(status.success(), "{stderr}");
    assert_eq!(summary["retried_failures"], 40, "{summary}");
    assert_eq!(summary["succeeded"], 40, "{summary}");
    assert_eq!(summary["failed"], 0, "{summary}");
    assert_eq!(
        summary["already_done"], 1,
        "the malformed line stays done: {summary}"
    );
    assert_eq!(summary["unfinished"], 0, "{summary}");
    assert!(stderr.contains("took 40 lines back"), "{stderr}");
    assert_each_once(&accounted(&output, &failures), 41);
    let left = read_lines(&failures);
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["error"]["code"], "malformed_line");
    // Once more: nothing left to retry, nothing sent.
    let before = sim.stats()["requests"].clone();
    let (status, stderr, summary) = run_with_summary(&input, &output, &url, &with_retry);
    assert!(status.success(), "{stderr}");
    assert_eq!(
        (
            summary["retried_failures"].as_u64(),
            summary["already_done"].as_u64()
        ),
        (Some(0), Some(41))
    );
    assert_eq!(sim.stats()["requests"], before);
}

/// An unset or empty key variable named with --api-key-env is an error before anything
/// is sent or created; the default OPENAI_API_KEY may be unset only for a URL on this
/// machine (a simulator), with a warning.
#[test]
fn an_unset_key_variable_is_an_error_before_anything_starts() {
    let _serial = serial();
    let dir = tmp();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    write_input(&input, 5, 9, &[]);
    let sim = SimProcess::start(&["--latency", "5ms"]);
    let url = sim.url("/v1/chat/completions");
    for value in [None, Some(""), Some("  ")] {
        let mut cmd = batch(
            &input,
            &output,
            &url,
            &["--api-key-env", "TOLLGATE_TEST_KEY"],
        );
        match value {
            None => cmd.env_remove("TOLLGATE_TEST_KEY"),
            Some(v) => cmd.env("TOLLGATE_TEST_KEY", v),
        };
        let (status, stderr) = run(cmd);
        assert!(!status.success(), "{stderr}");
        assert!(
            stderr.contains("TOLLGATE_TEST_KEY") && stderr.contains("unset or empty"),
            "{stderr}"
        );
    }
    // The default variable unset, to a provider: an error too.
    let mut cmd = batch(
        &input,
        &output,
        "https://api.openai.com/v1/chat/completions",
        &[],
    );
    cmd.env_remove("OPENAI_API_KEY");
    let (status, stderr) = run(cmd);
    assert!(
        !status.success() && stderr.contains("OPENAI_API_KEY"),
        "{stderr}"
    );
    assert_eq!(sim.stats()["requests"], 0, "nothing was sent");
    assert!(!output.exists(), "nothing was created");
    // To the simulator on this machine: a warning, and the run goes.
    let mut cmd = batch(&input, &output, &url, &[]);
    cmd.env_remove("OPENAI_API_KEY");
    let (status, stderr) = run(cmd);
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: OPENAI_API_KEY is unset"),
        "{stderr}"
    );
    assert_eq!(read_lines(&output).len(), 5);
}
