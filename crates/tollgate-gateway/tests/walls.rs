//! Limits no caller can walk around, tenants no caller can cross: each probe of an
//! attacker or a careless caller against a gateway in front of `tollgate sim` or a
//! scripted upstream that records what reached it, answered safely.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tollgate_gateway::config::hash_key;
use tollgate_gateway::{Config, Gateway};
use tollgate_sim::{Sim, SimConfig};

mod support;
use support::read_request;

/// What a scripted upstream saw: each request's head and body.
type Seen = Arc<Mutex<Vec<(String, String)>>>;

/// An upstream answering every request with `answer(head, body)` (a whole raw HTTP
/// response); returns its address and what it saw.
async fn scripted(answer: fn(&str, &str) -> String) -> (String, Seen) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address").to_string();
    let seen: Seen = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                while let Some((head, body)) = read_request(&mut sock).await {
                    let response = answer(&head, &body);
                    log.lock().expect("log").push((head, body));
                    if sock.write_all(response.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

fn respond(status: &str, headers: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{headers}\r\n{body}",
        body.len()
    )
}

fn ok_chat(_: &str, _: &str) -> String {
    respond(
        "200 OK",
        "",
        r#"{"choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":9,"completion_tokens":1}}"#,
    )
}

/// A gateway serving `src` (with `{upstream}` replaced by `addr`) for the test's life.
async fn gateway(src: &str) -> String {
    let gateway = Gateway::new(Config::parse(src).expect("config"))
        .await
        .expect("gateway");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(async move { gateway.serve(listener, std::future::pending()).await });
    url
}

/// Upstream `u` at `addr` with `upstream` lines, caller `a` (key `key-a`) in tier `t`
/// with `tier` lines, and `top` lines before both.
fn config(top: &str, addr: &str, upstream: &str, tier: &str) -> String {
    format!(
        "{top}\n[upstreams.u]\nkind = \"openai-compatible\"\nurl = \"http://{addr}\"\napi_key = \"sk-upstream-secret-0123456789\"\n{upstream}\n\n[tiers.t]\n{tier}\n\n[callers.a]\nkey_sha256 = \"{}\"\ntier = \"t\"\n",
        hash_key("key-a")
    )
}

async fn post(url: &str, path: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{url}{path}"))
        .bearer_auth("key-a")
        .json(body)
        .send()
        .await
        .expect("an answer")
}

/// Sends raw bytes; returns what came back until the gateway closed or 5 s passed.
async fn raw(url: &str, request: &[u8]) -> String {
    let host = url.trim_start_matches("http://");
    let mut sock = tokio::net::TcpStream::connect(host).await.expect("connect");
    sock.write_all(request).await.expect("send");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), sock.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"))
}

fn header<'r>(r: &'r reqwest::Response, name: &str) -> Option<&'r str> {
    r.headers().get(name).and_then(|v| v.to_str().ok())
}

async fn sim(output_tokens: u64) -> Sim {
    Sim::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        SimConfig {
            rpm: 1_000_000,
            tpm: 1_000_000_000,
            latency: Duration::from_millis(1),
            output_tokens,
            ..SimConfig::default()
        },
    )
    .await
    .expect("start the simulator")
}

fn chat_without_max(n: u64) -> Value {
    json!({"model": "gpt-4o", "n": n,
        "messages": [{"role": "user", "content": "Write as much as you can."}]})
}

/// Finding 1, spend: a request without `max_tokens` asking for 128 choices was admitted
/// as its prompt alone and spent 307 × a $0.001/day budget. Its worst case is now
/// reserved, capped to what the budget holds and written into the request: whatever the
/// caller sends, what the provider reports never exceeds the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_max_tokens_cannot_overspend_a_budget() {
    let sim = sim(5_000).await;
    let src = config(
        "[prices]\n\"gpt-4o\" = { input = 2.50, output = 10.00 }\n",
        &sim.addr().to_string(),
        "",
        "limits = { spend_per_day = 0.001 }",
    );
    let url = gateway(&src).await;
    let mut spent_micros = 0.0;
    let mut admitted = 0;
    for n in [128, 1, 3, 128, 1, 1, 2] {
        let r = post(&url, "/v1/chat/completions", &chat_without_max(n)).await;
        if r.status() == 200 {
            admitted += 1;
            let written: u64 = header(&r, "x-tollgate-max-output-tokens")
                .expect("the cap is said")
                .parse()
                .expect("a number");
            assert!(written >= 1);
            let v: Value = r.json().await.expect("json");
            let u = &v["usage"];
            let (input, output) = (
                u["prompt_tokens"].as_u64().expect("prompt"),
                u["completion_tokens"].as_u64().expect("completion"),
            );
            assert!(output <= written * n, "the cap holds at the provider");
            spent_micros += input as f64 * 2.5 + output as f64 * 10.0;
        } else {
            // Refused: over what is left (429), or not even one token per choice fits
            // the whole budget (413).
            assert!(matches!(r.status().as_u16(), 413 | 429), "{}", r.status());
        }
    }
    assert!(admitted >= 1, "the budget serves what fits");
    assert!(
        spent_micros <= 1_000.0,
        "spent {spent_micros} µ$ of a 1000 µ$ budget"
    );
}

/// Finding 1, tokens: a 100,000 tokens/min tier passed 512,008 tokens. A request without
/// `max_tokens` (chat or Responses) now counts its model's worst case, and the tokens a
/// caller's requests really used in the minute stay inside its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_max_tokens_stay_inside_a_token_limit() {
    let sim = sim(5_000).await;
    let src = config(
        "",
        &sim.addr().to_string(),
        "",
        "limits = { tokens_per_minute = 20000 }",
    );
    let url = gateway(&src).await;
    let started = Instant::now();
    let mut used = 0;
    for n in [128, 4, 1, 1, 1, 1] {
        let r = post(&url, "/v1/chat/completions", &chat_without_max(n)).await;
        if r.status() == 200 {
            let v: Value = r.json().await.expect("json");
            used += v["usage"]["total_tokens"].as_u64().expect("total");
        }
    }
    let responses = json!({"model": "gpt-4o", "input": "Write as much as you can."});
    for _ in 0..3 {
        let r = post(&url, "/v1/responses", &responses).await;
        if r.status() == 200 {
            let v: Value = r.json().await.expect("json");
            used += v["usage"]["total_tokens"].as_u64().expect("total");
        }
    }
    assert!(used > 0, "what fits is served");
    // The limit refills as the test runs: 20000 a minute.
    let refilled = 20_000.0 * started.elapsed().as_secs_f64() / 60.0;
    assert!(
        used as f64 <= 20_000.0 + refilled,
        "{used} tokens in a 20000 tokens/min tier (+{refilled:.0} refilled)"
    );
}

/// A request that declares its `max_tokens` is never rewritten, and one that declares
/// more than its caller's limit holds is refused naming what to change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_max_is_kept_and_refused_when_it_cannot_fit() {
    let (addr, seen) = scripted(ok_chat).await;
    let url = gateway(&config(
        "",
        &addr,
        "",
        "limits = { tokens_per_minute = 1000 }",
    ))
    .await;
    let mut body = chat_without_max(1);
    body["max_tokens"] = json!(100);
    let r = post(&url, "/v1/chat/completions", &body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-tollgate-max-output-tokens"), None);
    body["max_tokens"] = json!(5_000);
    let r = post(&url, "/v1/chat/completions", &body).await;
    assert_eq!(r.status(), 413);
    let text = r.text().await.expect("body");
    assert!(text.contains("max_tokens"), "{text}");
    let seen = seen.lock().expect("log");
    assert_eq!(seen.len(), 1);
    let sent: Value = serde_json::from_str(&seen[0].1).expect("json");
    assert_eq!(sent["max_tokens"], 100);
    assert!(sent.get("max_completion_tokens").is_none());
}

/// Finding 2: routes other than the estimated ones reached account-wide objects (files,
/// batches, stored completions) for free. They are refused unless the tier allows them,
/// and nothing reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_outside_the_allow_list_never_reach_the_upstream() {
    let (addr, seen) = scripted(ok_chat).await;
    let url = gateway(&config("", &addr, "", "")).await;
    let client = reqwest::Client::new();
    let get = |path: &str| {
        client
            .get(format!("{url}{path}"))
            .bearer_auth("key-a")
            .send()
    };
    assert_eq!(
        get("/v1/chat/completions").await.expect("answer").status(),
        405
    );
    assert_eq!(
        get("/v1/files/file-of-another-team/content")
            .await
            .expect("answer")
            .status(),
        403
    );
    let r = post(&url, "/v1/batches", &json!({"input_file_id": "file-1"})).await;
    assert_eq!(r.status(), 403);
    let r = client
        .delete(format!("{url}/v1/files/file-1"))
        .bearer_auth("key-a")
        .send()
        .await
        .expect("answer");
    assert_eq!(r.status(), 403);
    let r = post(&url, "/v1/messages/count_tokens", &json!({})).await;
    assert_eq!(r.status(), 403);
    assert!(
        seen.lock().expect("log").is_empty(),
        "nothing was forwarded"
    );
}

/// Finding 3: `OPTIONS *` was joined to the upstream's URL as `http://host:port*`, and
/// the account key went to port 80. A target that is not a path is a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_target_that_is_not_a_path_is_refused() {
    let (addr, seen) = scripted(ok_chat).await;
    let url = gateway(&config("", &addr, "", "allow_routes = [\"/\"]")).await;
    for method in ["OPTIONS", "POST", "GET"] {
        let request = format!(
            "{method} * HTTP/1.1\r\nhost: x\r\nauthorization: Bearer key-a\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        );
        let response = raw(&url, request.as_bytes()).await;
        assert_eq!(status_of(&response), 400, "{method} *: {response}");
    }
    assert!(seen.lock().expect("log").is_empty());
}

/// Finding 5: an upstream's error answer went to the caller as it was, the key it
/// echoed included, and its 401 read as the caller's own. The account's 401 is now a
/// 502 `upstream_auth_failed`, and every error answer passed on has credentials taken
/// out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_are_the_gateways_own_and_never_show_a_key() {
    fn unauthorized(_: &str, _: &str) -> String {
        respond(
            "401 Unauthorized",
            "",
            r#"{"error":{"message":"Incorrect API key provided: sk-upstream-secret-0123456789.","type":"invalid_request_error","code":"invalid_api_key"}}"#,
        )
    }
    fn bad_request(_: &str, _: &str) -> String {
        respond(
            "400 Bad Request",
            "",
            r#"{"error":{"message":"Invalid value for 'temperature' (key sk-proj-****6789).","type":"invalid_request_error","code":null}}"#,
        )
    }
    let mut body = chat_without_max(1);
    body["max_tokens"] = json!(10);
    let (addr, _) = scripted(unauthorized).await;
    let url = gateway(&config("", &addr, "", "")).await;
    let r = post(&url, "/v1/chat/completions", &body).await;
    assert_eq!(r.status(), 502);
    assert_eq!(header(&r, "x-tollgate-upstream-status"), Some("401"));
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"]["code"], "upstream_auth_failed");
    assert!(!v.to_string().contains("0123456789"), "{v}");

    let (addr, _) = scripted(bad_request).await;
    let url = gateway(&config("", &addr, "", "")).await;
    let r = post(&url, "/v1/chat/completions", &body).await;
    assert_eq!(
        r.status(),
        400,
        "the caller's own mistake, as the upstream judged it"
    );
    let text = r.text().await.expect("body");
    assert!(text.contains("Invalid value for 'temperature'"), "{text}");
    assert!(!text.contains("6789"), "{text}");
}

/// Finding 6: a 429 no wait can cure (`insufficient_quota`, request too large) was
/// retried 8 times while holding the caller's slot. It is answered at once, sent once;
/// a 429 that says how long to wait is retried within the caller's wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_429s_are_never_retried() {
    fn out_of_credit(_: &str, _: &str) -> String {
        respond(
            "429 Too Many Requests",
            "retry-after: 1\r\n",
            r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details.","type":"insufficient_quota","code":"insufficient_quota"}}"#,
        )
    }
    fn no_hint(_: &str, _: &str) -> String {
        respond(
            "429 Too Many Requests",
            "",
            r#"{"error":{"message":"Rate limit reached.","type":"requests","code":"rate_limit_exceeded"}}"#,
        )
    }
    let mut body = chat_without_max(1);
    body["max_tokens"] = json!(10);
    for answer in [out_of_credit as fn(&str, &str) -> String, no_hint] {
        let (addr, seen) = scripted(answer).await;
        let url = gateway(&config("", &addr, "", "max_wait = \"20s\"")).await;
        let started = Instant::now();
        let r = post(&url, "/v1/chat/completions", &body).await;
        assert_eq!(r.status(), 429);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "answered at once"
        );
        assert_eq!(seen.lock().expect("log").len(), 1, "sent once");
    }
}

/// A 429 with a wait the caller's max wait covers is retried after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_with_a_wait_is_retried() {
    fn busy_once(head: &str, _: &str) -> String {
        // The scripted upstream answers each connection's requests in turn; the
        // gateway's retry may reuse the connection or open another.
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let _ = head;
        if CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            respond(
                "429 Too Many Requests",
                "retry-after-ms: 100\r\n",
                r#"{"error":{"message":"Rate limit reached. Please try again in 100ms.","type":"requests","code":"rate_limit_exceeded"}}"#,
            )
        } else {
            ok_chat("", "")
        }
    }
    let mut body = chat_without_max(1);
    body["max_tokens"] = json!(10);
    let (addr, seen) = scripted(busy_once).await;
    let url = gateway(&config("", &addr, "", "max_wait = \"5s\"")).await;
    let r = post(&url, "/v1/chat/completions", &body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(seen.lock().expect("log").len(), 2);
}

/// Finding 7: `gpt-4o-2024-08-06`, `GPT-4o` and `openai/gpt-4o` walked past a `gpt-4o`
/// limit. Every spelling counts against it, and a strict gateway serves listed models
/// only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spelling_of_a_model_meets_its_limit() {
    let (addr, seen) = scripted(ok_chat).await;
    let url = gateway(&config(
        "strict_models = true",
        &addr,
        "models = [\"gpt-4o\", \"gpt-4o-mini\"]",
        "model_limits.\"gpt-4o\" = { requests_per_minute = 1 }",
    ))
    .await;
    let mut body = chat_without_max(1);
    body["max_tokens"] = json!(10);
    let r = post(&url, "/v1/chat/completions", &body).await;
    assert_eq!(r.status(), 200);
    for spelling in [
        "GPT-4o",
        "openai/gpt-4o",
        "gpt-4o-2024-08-06",
        "OpenAI/GPT-4O-2024-08-06",
    ] {
        body["model"] = json!(spelling);
        let r = post(&url, "/v1/chat/completions", &body).await;
        assert_eq!(r.status(), 429, "{spelling}");
    }
    body["model"] = json!("gpt-4o-mini");
    assert_eq!(
        post(&url, "/v1/chat/completions", &body).await.status(),
        200
    );
    body["model"] = json!("gpt-4.1");
    let r = post(&url, "/v1/chat/completions", &body).await;
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"]["code"], "model_not_found");
    assert_eq!(seen.lock().expect("log").len(), 2);
}

/// Finding 8: every body-read error was a 413, and `Expect: 100-continue` with an
/// oversized length got `100 Continue`. A declared length over the limit is a 413 before
/// any body is asked for; a body that breaks off is a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_errors_say_what_happened() {
    let (addr, seen) = scripted(ok_chat).await;
    let url = gateway(&config("max_body_bytes = 1000", &addr, "", "")).await;
    let head = "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer key-a\r\ncontent-type: application/json\r\n";
    let expect = format!("{head}expect: 100-continue\r\ncontent-length: 5000000\r\n\r\n");
    let response = raw(&url, expect.as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(!response.contains("100 Continue"), "{response}");
    let bad_chunk = format!(
        "{head}transfer-encoding: chunked\r\nconnection: close\r\n\r\nzz\r\n{{}}\r\n0\r\n\r\n"
    );
    let response = raw(&url, bad_chunk.as_bytes()).await;
    assert_eq!(status_of(&response), 400, "{response}");
    // A body shorter than its length, then the sending half closed.
    let host = url.trim_start_matches("http://");
    let mut sock = tokio::net::TcpStream::connect(host).await.expect("connect");
    let short = format!("{head}content-length: 100\r\n\r\n{{\"model\":");
    sock.write_all(short.as_bytes()).await.expect("send");
    sock.shutdown().await.expect("half-close");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), sock.read_to_end(&mut out)).await;
    let response = String::from_utf8_lossy(&out);
    assert_eq!(status_of(&response), 400, "{response}");
    assert!(response.contains("body_incomplete"), "{response}");
    assert!(seen.lock().expect("log").is_empty());
}

/// Finding 4: an authenticated caller could trickle a body forever, outside its
/// concurrency limit. A body that has not arrived within `body_timeout` is a 408.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_is_cut_off_at_the_body_timeout() {
    let (addr, seen) = scripted(ok_chat).await;
    let url = gateway(&config("body_timeout = \"500ms\"", &addr, "", "")).await;
    let host = url.trim_start_matches("http://");
    let mut sock = tokio::net::TcpStream::connect(host).await.expect("connect");
    let head = "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer key-a\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n";
    sock.write_all(head.as_bytes()).await.expect("send");
    let started = Instant::now();
    let trickle = async {
        loop {
            if sock.write_all(b" ").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(900), trickle).await;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf))
        .await
        .expect("an answer")
        .expect("read");
    let response = String::from_utf8_lossy(&buf[..n]);
    assert_eq!(status_of(&response), 408, "{response}");
    assert!(response.contains("body_timeout"), "{response}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(seen.lock().expect("log").is_empty());
}

/// Finding 10: `BEARER key` and `Bearer<TAB>key` are legal spellings of the scheme.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_read_as_http_spells_it() {
    let (addr, _) = scripted(ok_chat).await;
    let url = gateway(&config("", &addr, "", "")).await;
    let body = r#"{"model":"gpt-4o","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#;
    for auth in [
        "BEARER key-a",
        "Bearer\tkey-a",
        "bearer   key-a ",
        "Bearer key-a",
    ] {
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: {auth}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let response = raw(&url, request.as_bytes()).await;
        assert_eq!(status_of(&response), 200, "{auth:?}: {response}");
    }
    for auth in ["Basic key-a", "Bearerkey-a", "Bearer "] {
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: {auth}\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}"
        );
        assert_eq!(
            status_of(&raw(&url, request.as_bytes()).await),
            401,
            "{auth:?}"
        );
    }
}

/// Finding 11: a 15 MB body was read and tokenised for a caller already over its limit.
/// A caller whose limit has nothing left is refused from its headers alone: the body is
/// never sent here, and the 429 still comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_caller_is_refused_before_its_body_is_read() {
    let (addr, _) = scripted(ok_chat).await;
    let url = gateway(&config(
        "",
        &addr,
        "",
        "limits = { requests_per_minute = 3 }",
    ))
    .await;
    let mut body = chat_without_max(1);
    body["max_tokens"] = json!(10);
    for _ in 0..3 {
        assert_eq!(
            post(&url, "/v1/chat/completions", &body).await.status(),
            200
        );
    }
    let host = url.trim_start_matches("http://");
    let mut sock = tokio::net::TcpStream::connect(host).await.expect("connect");
    let head = "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer key-a\r\ncontent-type: application/json\r\ncontent-length: 15000000\r\n\r\n";
    sock.write_all(head.as_bytes()).await.expect("send");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf))
        .await
        .expect("refused without the body")
        .expect("read");
    let response = String::from_utf8_lossy(&buf[..n]);
    assert_eq!(status_of(&response), 429, "{response}");
    // The wait until one request is back (20 s at 3 a minute), not until all three are.
    let wait: u64 = response
        .lines()
        .find_map(|l| l.strip_prefix("retry-after-ms: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no retry-after-ms in {response}"));
    assert!((15_000..=20_000).contains(&wait), "{wait} ms");
}

/// Finding 12: a caller's `x-ratelimit-*` headers showed the shared account's remaining
/// budget, that is, other callers' traffic. They show the caller's own limits, and the
/// account's only with `expose_account_limits`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_headers_show_its_own_limits_only() {
    let (addr, _) = scripted(ok_chat).await;
    let mut body = chat_without_max(1);
    body["max_tokens"] = json!(10);
    for (top, want) in [("", "99"), ("expose_account_limits = true", "9")] {
        let url = gateway(&config(
            top,
            &addr,
            "limits = { requests_per_minute = 10 }",
            "limits = { requests_per_minute = 100 }",
        ))
        .await;
        let r = post(&url, "/v1/chat/completions", &body).await;
        assert_eq!(r.status(), 200);
        assert_eq!(
            header(&r, "x-ratelimit-remaining-requests"),
            Some(want),
            "{top}"
        );
    }
}

/// A small seeded generator: the same sequence of requests on every run.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

/// For each kind of token and spend limit: no sequence of requests (declared maxima or
/// none, many choices or one, chat or Responses, long prompts or short) makes what the
/// provider reports exceed the caller's limit, beyond what the limit refilled while the
/// sequence ran (the simulator honours `max_tokens`, so no request overruns its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_sequence_of_requests_exceeds_a_token_or_spend_limit() {
    #[derive(Clone, Copy)]
    enum Counts {
        Total,
        Output,
        Spend,
    }
    let kinds = [
        ("tokens_per_minute = 20000", Counts::Total, 20_000.0, 60.0),
        ("tokens_per_day = 20000", Counts::Total, 20_000.0, 86_400.0),
        (
            "output_tokens_per_minute = 4000",
            Counts::Output,
            4_000.0,
            60.0,
        ),
        ("spend_per_day = 0.05", Counts::Spend, 50_000.0, 86_400.0),
        (
            "spend_per_month = 0.05",
            Counts::Spend,
            50_000.0,
            30.0 * 86_400.0,
        ),
    ];
    let sim = sim(3_000).await;
    for (seed, (limit_line, counts, limit, period)) in kinds.into_iter().enumerate() {
        let url = gateway(&config(
            "[prices]\n\"*\" = { input = 2.50, output = 10.00 }\n",
            &sim.addr().to_string(),
            "",
            &format!("limits = {{ {limit_line} }}"),
        ))
        .await;
        let mut rng = Lcg(seed as u64 + 7);
        let started = Instant::now();
        let mut used = 0.0;
        let mut served = 0;
        for _ in 0..30 {
            let words = 1 + rng.below(400);
            let prompt = vec!["tokens"; words as usize].join(" ");
            let responses = rng.below(4) == 0;
            let mut body = if responses {
                json!({"model": "gpt-4o", "input": prompt})
            } else {
                let n = [1, 1, 2, 8, 128][rng.below(5) as usize];
                json!({"model": "gpt-4o", "n": n,
                    "messages": [{"role": "user", "content": prompt}]})
            };
            if rng.below(2) == 0 {
                let field = if responses {
                    "max_output_tokens"
                } else {
                    "max_tokens"
                };
                body[field] = json!(1 + rng.below(2_000));
            }
            let path = if responses {
                "/v1/responses"
            } else {
                "/v1/chat/completions"
            };
            let r = post(&url, path, &body).await;
            let status = r.status().as_u16();
            assert!(matches!(status, 200 | 413 | 429), "{status}");
            if status != 200 {
                continue;
            }
            served += 1;
            let v: Value = r.json().await.expect("json");
            let u = &v["usage"];
            let (input, output) = if responses {
                (u["input_tokens"].as_u64(), u["output_tokens"].as_u64())
            } else {
                (u["prompt_tokens"].as_u64(), u["completion_tokens"].as_u64())
            };
            let (input, output) = (input.expect("input") as f64, output.expect("output") as f64);
            used += match counts {
                Counts::Total => input + output,
                Counts::Output => output,
                Counts::Spend => input * 2.5 + output * 10.0,
            };
        }
        let refilled = limit * started.elapsed().as_secs_f64() / period;
        assert!(served > 0, "{limit_line}: what fits is served");
        assert!(
            used <= limit + refilled,
            "{limit_line}: used {used} of {limit} (+{refilled:.0} refilled)"
        );
    }
}

/// From the second probe: Azure serves the deployment its path names, whatever the
/// body's `model` says, so the deployment is the model limits and prices see; a path
/// that only ends like a route is not one; an old `MMDD` snapshot is its model; a body
/// that names its model twice goes upstream as the gateway read it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_limited_is_the_model_served() {
    let (addr, seen) = scripted(ok_chat).await;
    let src = format!(
        "[upstreams.az]\nkind = \"azure\"\nurl = \"http://{addr}/openai\"\napi_key = \"az-key-0123456789\"\nmodels = [\"gpt-4o\", \"gpt-4o-mini\"]\n\n[tiers.t]\nmodel_limits.\"gpt-4o\" = {{ requests_per_minute = 1 }}\n\n[callers.a]\nkey_sha256 = \"{}\"\ntier = \"t\"\n",
        hash_key("key-a")
    );
    let url = gateway(&src).await;
    let mut body = chat_without_max(1);
    body["max_tokens"] = json!(10);
    body["model"] = json!("gpt-4o-mini");
    let azure = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21";
    assert_eq!(post(&url, azure, &body).await.status(), 200);
    assert_eq!(
        post(&url, azure, &body).await.status(),
        429,
        "the deployment's limit, whatever the body says"
    );
    let old = "/openai/deployments/gpt-4o-0613/chat/completions?api-version=2024-10-21";
    assert_eq!(post(&url, old, &body).await.status(), 429);
    let r = post(&url, "/v1/files/file-1/chat/completions", &body).await;
    assert_eq!(r.status(), 403, "not a route, only its end");
    // The same key twice: read last-wins here, and sent once, as read.
    let twice = r#"{"model":"gpt-4o","model":"gpt-4o-mini","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#;
    let r = reqwest::Client::new()
        .post(format!(
            "{url}/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
        ))
        .bearer_auth("key-a")
        .header("content-type", "application/json")
        .body(twice)
        .send()
        .await
        .expect("answer");
    assert_eq!(r.status(), 200);
    {
        let seen = seen.lock().expect("log");
        assert_eq!(seen.len(), 2);
        let last = &seen[1].1;
        assert_eq!(last.matches("\"model\"").count(), 1, "{last}");
    }
    // Lowercase methods are other methods (RFC 9110): never matched as `GET`.
    let request = "get /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer key-a\r\nconnection: close\r\n\r\n";
    let response = raw(&url, request.as_bytes()).await;
    assert_ne!(status_of(&response), 200, "{response}");
}

/// From the second probe: the key left through an answer's headers, a redirect's
/// `Location`, and bodies that spell it in capitals or with JSON escapes. Headers that
/// carry it are dropped, redirects are a 502 of the gateway's own, and bodies are read
/// as JSON before they are redacted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_leaves_through_no_header_redirect_or_spelling() {
    fn leaky(_: &str, body: &str) -> String {
        if body.contains("\"redirect\"") {
            "HTTP/1.1 302 Found\r\nlocation: http://internal-llm.corp:9000/v1/x?key=sk-upstream-secret-0123456789\r\ncontent-length: 0\r\n\r\n".to_owned()
        } else if body.contains("\"fine\"") {
            respond(
                "200 OK",
                "x-echo-key: sk-upstream-secret-0123456789\r\nx-request-id: req-1\r\n",
                r#"{"choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":9,"completion_tokens":1}}"#,
            )
        } else {
            respond(
                "400 Bad Request",
                "www-authenticate: Bearer realm=\"sk-upstream-secret-0123456789\"\r\nx-request-id: req-2\r\n",
                r#"{"error":{"message":"bad key SK-UPSTREAM-SECRET-0123456789 or sk\u002dupstream\u002dsecret\u002d0123456789"}}"#,
            )
        }
    }
    let (addr, _) = scripted(leaky).await;
    let url = gateway(&config("", &addr, "", "")).await;
    let ask = |user: &str| {
        let mut body = chat_without_max(1);
        body["max_tokens"] = json!(10);
        body["user"] = json!(user);
        body
    };
    let r = post(&url, "/v1/chat/completions", &ask("fine")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-echo-key"), None);
    assert_eq!(
        header(&r, "x-request-id"),
        Some("req-1"),
        "other headers pass"
    );
    let r = post(&url, "/v1/chat/completions", &ask("redirect")).await;
    assert_eq!(r.status(), 502);
    assert_eq!(header(&r, "location"), None);
    let text = r.text().await.expect("body");
    assert!(
        text.contains("upstream_redirect") && !text.contains("internal-llm"),
        "{text}"
    );
    let r = post(&url, "/v1/chat/completions", &ask("error")).await;
    assert_eq!(r.status(), 400);
    assert_eq!(header(&r, "www-authenticate"), None);
    let text = r.text().await.expect("body");
    assert!(!text.to_lowercase().contains("0123456789"), "{text}");
}

/// From the second probe: input the estimate did not count (a 40,000-word tool
/// description, twenty images, a conversation kept at the provider) went past a
/// caller's token and spend limits as "18 tokens". It is counted, or refused when no one
/// can count it; a caller without token or spend limits is not held back by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_the_estimate_misses_still_meets_the_limits() {
    let (addr, seen) = scripted(ok_chat).await;
    let url = gateway(&config("", &addr, "", "limits = { tokens_per_day = 2000 }")).await;
    let long = "word ".repeat(40_000);
    let mut tools = chat_without_max(1);
    tools["max_tokens"] = json!(10);
    tools["tools"] = json!([{"type": "function", "function": {"name": "f", "description": long}}]);
    let r = post(&url, "/v1/chat/completions", &tools).await;
    assert_eq!(
        r.status(),
        413,
        "a tool description over the whole day's tokens"
    );
    let mut images = chat_without_max(1);
    images["max_tokens"] = json!(10);
    let parts: Vec<Value> = (0..20)
        .map(|_| json!({"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "high"}}))
        .collect();
    images["messages"] = json!([{"role": "user", "content": parts}]);
    assert_eq!(
        post(&url, "/v1/chat/completions", &images).await.status(),
        413
    );
    let kept = json!({"model": "gpt-4o", "max_output_tokens": 10,
        "previous_response_id": "resp_abc", "input": "go on"});
    let r = post(&url, "/v1/responses", &kept).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"]["code"], "input_not_estimable");
    assert!(seen.lock().expect("log").is_empty(), "nothing was sent");
    // Without token or spend limits, nothing to bound: forwarded as it is.
    let (addr, seen) = scripted(ok_chat).await;
    let url = gateway(&config(
        "",
        &addr,
        "",
        "limits = { requests_per_minute = 10 }",
    ))
    .await;
    assert_eq!(
        post(&url, "/v1/chat/completions", &tools).await.status(),
        200
    );
    assert_eq!(post(&url, "/v1/responses", &kept).await.status(), 200);
    assert_eq!(seen.lock().expect("log").len(), 2);
}
