//! The gateway against an upstream that records the request lines it receives and
//! answers as each test says: one spelling per route (an escaped path is limited as the
//! route it names, a path cannot climb out of the upstream's base), a caller that leaves
//! before a whole answer still pays what was generated, and a stream the upstream broke
//! off does not reach the caller as a finished one.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tollgate_gateway::config::hash_key;
use tollgate_gateway::{Config, Gateway};

mod support;
use support::read_request;

#[derive(Clone, Copy)]
enum Answer {
    /// A chat completion reporting `output` completion tokens, after `delay_ms`.
    Json { delay_ms: u64, output: u64 },
    /// One streamed event, then the connection dropped mid-body.
    BrokenStream,
    /// A JSON answer whose body stops short of its `content-length`.
    TruncatedBody,
    /// 500, every time.
    ServerError,
}

/// An upstream on a local port; returns its address and the heads of the requests it
/// saw (request line and headers).
async fn upstream(answer: Answer) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address").to_string();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let Some((line, _body)) = read_request(&mut sock).await else {
                    return;
                };
                log.lock().expect("log").push(line);
                let response = match answer {
                    Answer::Json { delay_ms, output } => {
                        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                        let body = json!({"choices": [{"message": {"content": "hi"}}],
                            "usage": {"prompt_tokens": 10, "completion_tokens": output}})
                        .to_string();
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        )
                    }
                    Answer::ServerError => {
                        let body = r#"{"error":{"message":"overloaded","type":"server_error"}}"#;
                        format!(
                            "HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        )
                    }
                    Answer::TruncatedBody => {
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\nconnection: close\r\n\r\n{\"choices\":".to_owned()
                    }
                    Answer::BrokenStream => {
                        let event = "data: {\"choices\":[{\"delta\":{\"content\":\"par\"}}]}\n\n";
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{event}\r\n",
                            event.len()
                        )
                    }
                };
                let _ = sock.write_all(response.as_bytes()).await;
                // A broken stream: the closing chunk never comes.
                tokio::time::sleep(Duration::from_millis(50)).await;
            });
        }
    });
    (addr, seen)
}

/// The request lines of the heads an upstream saw.
fn request_lines(seen: &Mutex<Vec<String>>) -> Vec<String> {
    let heads = seen.lock().expect("log");
    heads
        .iter()
        .map(|h| h.lines().next().unwrap_or_default().to_owned())
        .collect()
}

/// A gateway's config: upstream `u` at `base` (an address with an optional path) with
/// `upstream` lines of its own, caller `a` (key `key-a`) in tier `t` with `tier` lines.
fn config(base: &str, upstream: &str, tier: &str) -> String {
    format!(
        "[upstreams.u]\nkind = \"openai\"\nurl = \"http://{base}\"\napi_key = \"sk-upstream\"\n{upstream}\n\n[tiers.t]\n{tier}\n\n[callers.a]\nkey_sha256 = \"{}\"\ntier = \"t\"\n",
        hash_key("key-a")
    )
}

/// The serving task of a gateway.
type Serving = tokio::task::JoinHandle<Result<(), tollgate_gateway::GatewayError>>;

/// Serves `src` until `shutdown`; returns its URL, the gateway and the serving task.
async fn start(
    src: &str,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> (String, Gateway, Serving) {
    let gateway = Gateway::new(Config::parse(src).expect("config"))
        .await
        .expect("gateway");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let g = gateway.clone();
    let serving = tokio::spawn(async move { g.serve(listener, shutdown).await });
    (url, gateway, serving)
}

/// A gateway in front of `base` with tier lines `tier`, serving for the test's life.
async fn gateway(base: &str, tier: &str) -> String {
    start(&config(base, "", tier), std::future::pending())
        .await
        .0
}

/// POSTs `body` to `path` as caller `a`.
async fn post(url: &str, path: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{url}{path}"))
        .bearer_auth("key-a")
        .json(body)
        .send()
        .await
        .expect("an answer")
}

/// Sends a raw request line (reqwest would clean the path itself); returns the status.
async fn raw_get(url: &str, target: &str) -> u16 {
    let host = url.trim_start_matches("http://");
    let mut sock = tokio::net::TcpStream::connect(host).await.expect("connect");
    let request = format!(
        "GET {target} HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer key-a\r\nconnection: close\r\n\r\n"
    );
    sock.write_all(request.as_bytes()).await.expect("send");
    let mut out = Vec::new();
    let _ = sock.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line")
}

fn chat(max_tokens: u64, stream: bool) -> Value {
    json!({"model": "gpt-4o", "max_tokens": max_tokens, "stream": stream,
        "messages": [{"role": "user", "content": "hi"}]})
}

async fn remaining(url: &str, quota: &str) -> u64 {
    let usage: Value = reqwest::Client::new()
        .get(format!("{url}/v1/usage"))
        .bearer_auth("key-a")
        .send()
        .await
        .expect("usage")
        .json()
        .await
        .expect("usage JSON");
    usage["quotas"]
        .as_array()
        .and_then(|qs| qs.iter().find(|q| q["name"] == quota))
        .and_then(|q| q["remaining"].as_u64())
        .unwrap_or_else(|| panic!("no quota {quota} in {usage}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_escaped_path_is_limited_as_the_route_it_names() {
    let (addr, seen) = upstream(Answer::Json {
        delay_ms: 0,
        output: 5,
    })
    .await;
    let url = gateway(
        &addr,
        "limits = { tokens_per_minute = 1000 }\nmodel_limits.\"gpt-4o\" = { requests_per_minute = 1 }",
    )
    .await;
    let status = |path: &'static str, max_tokens: u64| {
        let url = url.clone();
        async move { post(&url, path, &chat(max_tokens, false)).await.status() }
    };
    // Over the token limit however it is spelled.
    assert_eq!(status("/v1/chat/completions", 100_000).await, 413);
    assert_eq!(status("/v1/chat/completion%73", 100_000).await, 413);
    // Within it: the model's one request a minute holds for both spellings.
    assert_eq!(status("/v1/chat/completion%73", 10).await, 200);
    assert_eq!(status("/v1/chat/completions", 10).await, 429);
    assert_eq!(status("/v1/chat/completion%73", 10).await, 429);
    let seen = request_lines(&seen);
    assert_eq!(seen, ["POST /v1/chat/completions HTTP/1.1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_cannot_climb_out_of_the_upstreams_base() {
    let (addr, seen) = upstream(Answer::Json {
        delay_ms: 0,
        output: 1,
    })
    .await;
    let url = gateway(
        &format!("{addr}/tenant-a"),
        "allow_routes = [\"GET /v1/files\"]",
    )
    .await;
    for target in [
        "/%2e%2e/admin/keys",
        "/v1/../../admin",
        "/v1/%2E%2E/%2e%2e/admin",
        "/v1/a%2F..%2Fb",
    ] {
        assert_eq!(raw_get(&url, target).await, 400, "{target}");
    }
    assert_eq!(raw_get(&url, "/v1/files").await, 200);
    let seen = request_lines(&seen);
    assert_eq!(seen, ["GET /tenant-a/v1/files HTTP/1.1"]);
}

/// OpenAI's Assistants route ends in `/messages` but is not Anthropic's Messages API: it
/// is passed through as an OpenAI route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openai_route_ending_in_messages_is_not_taken_for_anthropic() {
    let (addr, seen) = upstream(Answer::Json {
        delay_ms: 0,
        output: 1,
    })
    .await;
    let url = gateway(&addr, "allow_routes = [\"/v1/threads\"]").await;
    let message = json!({"role": "user", "content": "hi"});
    let status = post(&url, "/v1/threads/thread_1/messages", &message)
        .await
        .status();
    assert_eq!(status, 200);
    let seen = request_lines(&seen);
    assert_eq!(seen, ["POST /v1/threads/thread_1/messages HTTP/1.1"]);
}

/// A whole answer is generated and billed whether or not the caller waits for it: a
/// caller that leaves first is charged what the upstream reports, not the prompt only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_leaves_before_a_whole_answer_pays_what_was_generated() {
    let (addr, seen) = upstream(Answer::Json {
        delay_ms: 400,
        output: 900,
    })
    .await;
    // The account's limits are given: with none, the first request would look at the
    // upstream alone and the next ones, waiting for it, would leave before being sent.
    let src = config(
        &addr,
        "limits = { requests_per_minute = 1000 }",
        "limits = { tokens_per_day = 100000 }",
    );
    let (url, _gateway, _serving) = start(&src, std::future::pending()).await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(150))
        .build()
        .expect("client");
    for _ in 0..3 {
        let gone = impatient
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth("key-a")
            .json(&chat(900, false))
            .send()
            .await;
        assert!(gone.is_err(), "the caller gave up first");
    }
    // Each answer lands 400 ms after its request; then the settlement.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let used = 100_000 - remaining(&url, "tier.t.tokens_per_day").await;
        if used >= 3 * 910 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "3 answers of 10 + 900 tokens were generated; {used} charged"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen.lock().expect("log").len(), 3);
}

/// A stream the upstream broke off mid-way ends in an error for the caller, not in a
/// clean end of body it would take for a finished answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_the_upstream_broke_off_is_an_error_for_the_caller() {
    let (addr, _seen) = upstream(Answer::BrokenStream).await;
    let url = gateway(&addr, "").await;
    let response = post(&url, "/v1/chat/completions", &chat(10, true)).await;
    assert_eq!(response.status(), 200);
    let body = response.text().await;
    assert!(body.is_err(), "the caller saw a clean end: {body:?}");
}

/// Shutdown waits for every request to be settled, not only answered: a caller that left
/// before its whole answer is still charged before `serve` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_the_settlements_of_the_requests_in_flight() {
    let (addr, _seen) = upstream(Answer::Json {
        delay_ms: 400,
        output: 900,
    })
    .await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (url, gateway, serving) = start(&config(&addr, "", ""), async {
        stopped.await.ok();
    })
    .await;
    let gone = reqwest::Client::builder()
        .timeout(Duration::from_millis(100))
        .build()
        .expect("client")
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth("key-a")
        .json(&chat(900, false))
        .send()
        .await;
    assert!(gone.is_err(), "the caller left before its answer");
    let _ = stop.send(());
    serving.await.expect("join").expect("serve");
    let output = gateway.metrics().counter(
        "tollgate_tokens_total",
        &[("caller", "a"), ("upstream", "u"), ("kind", "output")],
    );
    assert_eq!(output, 900, "settled before serve returned");
}

/// The gateway's key reaches each kind of upstream in the header that upstream reads,
/// and the caller's own key never leaves the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_upstream_gets_the_gateways_key_in_its_own_header_and_never_the_callers() {
    for (kind, path, body, key_header) in [
        (
            "openai",
            "/v1/chat/completions",
            chat(10, false),
            "authorization: Bearer sk-upstream",
        ),
        (
            "azure",
            "/openai/deployments/d/chat/completions?api-version=2024-10-21",
            chat(10, false),
            "api-key: sk-upstream",
        ),
        (
            "anthropic",
            "/v1/messages",
            json!({"model": "claude", "max_tokens": 10,
                "messages": [{"role": "user", "content": "hi"}]}),
            "x-api-key: sk-upstream",
        ),
    ] {
        let (addr, seen) = upstream(Answer::Json {
            delay_ms: 0,
            output: 1,
        })
        .await;
        let src = format!(
            "[upstreams.u]\nkind = \"{kind}\"\nurl = \"http://{addr}\"\napi_key = \"sk-upstream\"\n\n[tiers.t]\n\n[callers.a]\nkey_sha256 = \"{}\"\ntier = \"t\"\n",
            hash_key("key-a")
        );
        let (url, _gateway, _serving) = start(&src, std::future::pending()).await;
        let response = post(&url, path, &body).await;
        assert_eq!(response.status(), 200, "{kind}");
        let head = seen.lock().expect("log")[0].to_lowercase();
        assert!(
            head.starts_with(&format!("post {path} http/1.1\r\n").to_lowercase()),
            "{kind}: {head}"
        );
        let lines: Vec<&str> = head.lines().collect();
        assert!(
            lines.contains(&key_header.to_lowercase().as_str()),
            "{kind}: {head}"
        );
        assert!(
            lines.contains(&format!("host: {addr}").as_str()),
            "{kind}: the upstream's own host: {head}"
        );
        assert!(
            lines.contains(&"content-type: application/json"),
            "{kind}: {head}"
        );
        assert!(!head.contains("key-a"), "{kind}: the caller's key: {head}");
    }
}

/// An `https://` upstream is spoken to over TLS, naming the upstream's host (SNI), never
/// in plain text: here the "upstream" reads the first bytes and hangs up, so the caller
/// gets a 502 after the gateway tried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_gets_a_tls_handshake_for_its_host() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    let hello = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.expect("a connection");
        let mut buf = vec![0u8; 4096];
        let n = sock.read(&mut buf).await.expect("read");
        buf.truncate(n);
        buf
    });
    let src = format!(
        "[upstreams.u]\nkind = \"openai\"\nurl = \"https://localhost:{port}\"\napi_key = \"sk-upstream\"\n\n[tiers.t]\nmax_wait = \"0s\"\n\n[callers.a]\nkey_sha256 = \"{}\"\ntier = \"t\"\n",
        hash_key("key-a")
    );
    let (url, _gateway, _serving) = start(&src, std::future::pending()).await;
    let response = post(&url, "/v1/chat/completions", &chat(10, false)).await;
    assert_eq!(response.status(), 502);
    let first = hello.await.expect("join");
    // A TLS record of type handshake (22), then a ClientHello (1) naming the host.
    assert_eq!(first.first(), Some(&22), "not TLS: {first:?}");
    assert_eq!(first.get(5), Some(&1), "not a ClientHello: {first:?}");
    assert!(
        first.windows(9).any(|w| w == b"localhost"),
        "the host is named (SNI)"
    );
    assert!(
        !first.windows(11).any(|w| w == b"sk-upstream"),
        "the key never goes out in plain text"
    );
}

/// An upstream that cannot be reached is a 502 naming the upstream by its configured
/// name, never by its address (which may be an internal host).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_is_a_502_that_does_not_reveal_its_address() {
    // A port nothing listens on: bound, then closed.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("address");
    // Retries end within the tier's max_wait: keep it short.
    let url = gateway(&closed.to_string(), "max_wait = \"1s\"").await;
    let response = post(&url, "/v1/chat/completions", &chat(10, false)).await;
    assert_eq!(response.status(), 502);
    let body = response.text().await.expect("body");
    assert!(
        body.contains("The upstream `u` could not be reached."),
        "{body}"
    );
    assert!(!body.contains(&closed.port().to_string()), "{body}");
}

/// An answer whose body breaks off is a 502 that still carries the caller's own limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_breaks_off_is_a_502_with_the_callers_limits() {
    let (addr, _seen) = upstream(Answer::TruncatedBody).await;
    let url = gateway(&addr, "limits = { requests_per_minute = 100 }").await;
    let response = post(&url, "/v1/chat/completions", &chat(10, false)).await;
    assert_eq!(response.status(), 502);
    let limit = response
        .headers()
        .get("x-ratelimit-limit-requests")
        .and_then(|v| v.to_str().ok());
    assert_eq!(limit, Some("100"));
}

/// A retry is one more request at the provider: during an outage, retries take their
/// turn in the account's requests quota, so the account never sees more than its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_take_their_turn_in_the_accounts_quota() {
    let (addr, seen) = upstream(Answer::ServerError).await;
    let src = config(
        &addr,
        "limits = { requests_per_minute = 2 }",
        "max_wait = \"4s\"",
    );
    let (url, _gateway, _serving) = start(&src, std::future::pending()).await;
    let response = post(&url, "/v1/chat/completions", &chat(10, false)).await;
    assert_eq!(response.status(), 502, "the gateway's own answer");
    let upstream_status = response
        .headers()
        .get("x-tollgate-upstream-status")
        .and_then(|v| v.to_str().ok());
    assert_eq!(upstream_status, Some("500"));
    let body = response.text().await.expect("body");
    assert!(
        body.contains("The upstream `u` failed with HTTP 500 after 2 attempts."),
        "{body}"
    );
    // The request and one retry fill the account's 2 a minute; the next retry's turn
    // would come 30 s later, past the 4 s the tier waits.
    assert_eq!(seen.lock().expect("log").len(), 2);
}
