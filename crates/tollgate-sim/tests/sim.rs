//! The simulator as a provider: OpenAI's counting, 429s with its headers and body,
//! usage on every answer, streaming with a final usage chunk, Anthropic's format, stats.

use std::time::Duration;

use serde_json::{Value, json};
use tollgate_sim::{Sim, SimConfig};

async fn start(config: SimConfig) -> (Sim, reqwest::Client) {
    let sim = Sim::start("127.0.0.1:0".parse().expect("addr"), config)
        .await
        .expect("start sim");
    (sim, reqwest::Client::new())
}

fn config(rpm: u64, tpm: u64) -> SimConfig {
    SimConfig {
        rpm,
        tpm,
        latency: Duration::from_millis(1),
        ..SimConfig::default()
    }
}

async fn post(
    client: &reqwest::Client,
    sim: &Sim,
    path: &str,
    key: &str,
    body: Value,
) -> reqwest::Response {
    client
        .post(format!("http://{}{path}", sim.addr()))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .expect("send")
}

fn chat(max_tokens: u64) -> Value {
    json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hello world"}], "max_tokens": max_tokens})
}

#[tokio::test]
async fn counts_prompt_plus_max_tokens_and_refuses_with_openais_429() {
    // "hello world" chat = 9 prompt tokens; + max_tokens 91 = 100 per request.
    let (sim, client) = start(config(1_000, 250)).await;
    for left in [150, 50] {
        let r = post(&client, &sim, "/v1/chat/completions", "k1", chat(91)).await;
        assert_eq!(r.status(), 200);
        let h = r.headers();
        assert_eq!(h["x-ratelimit-limit-tokens"], "250");
        assert_eq!(h["x-ratelimit-remaining-tokens"], left.to_string().as_str());
        assert_eq!(h["x-ratelimit-limit-requests"], "1000");
        let body: Value = r.json().await.expect("json");
        assert_eq!(body["usage"]["prompt_tokens"], 9);
        assert_eq!(body["usage"]["completion_tokens"], 64);
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
    }
    let r = post(&client, &sim, "/v1/chat/completions", "k1", chat(91)).await;
    assert_eq!(r.status(), 429);
    let h = r.headers().clone();
    // 50 tokens missing at 250 per minute: 12 s.
    assert_eq!(h["retry-after"], "12");
    let ms: u64 = h["retry-after-ms"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("number");
    assert!(
        (11_900..=12_000).contains(&ms),
        "{ms} ms (less what refilled since)"
    );
    assert_eq!(h["x-ratelimit-remaining-tokens"], "50");
    let parsed = tollgate::provider::parse(&h, std::time::SystemTime::now());
    assert_eq!(parsed.wait_hint(), Some(Duration::from_millis(ms)));
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(body["error"]["type"], "tokens");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(
        message.contains("Limit 250, Used 200, Requested 100"),
        "{message}"
    );
    // Another key has its own buckets.
    assert_eq!(
        post(&client, &sim, "/v1/chat/completions", "k2", chat(91))
            .await
            .status(),
        200
    );
    // Larger than the limit: refused without a retry-after.
    let r = post(&client, &sim, "/v1/chat/completions", "k3", chat(500)).await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().get("retry-after").is_none());
    let body: Value = r.json().await.expect("json");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("Request too large"))
    );
    let stats = sim.stats();
    assert_eq!(
        (stats.admitted, stats.rate_limited, stats.tokens_admitted),
        (3, 2, 300)
    );
    assert_eq!(stats.max_tokens_per_minute, 200);
    sim.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn streams_end_with_a_usage_chunk_when_asked() {
    let (sim, client) = start(config(100, 100_000)).await;
    let mut body = chat(5);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = post(&client, &sim, "/v1/chat/completions", "k", body.clone()).await;
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    assert!(r.headers().contains_key("x-ratelimit-remaining-tokens"));
    let text = r.text().await.expect("text");
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.last(), Some(&"data: [DONE]"));
    let usage: Value =
        serde_json::from_str(events[events.len() - 2].trim_start_matches("data: ")).expect("json");
    assert_eq!(usage["usage"]["completion_tokens"], 5);
    let content: String = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e.trim_start_matches("data: ")).ok())
        .filter_map(|v| {
            v.pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(tollgate::tokens::count_text("gpt-4o", &content), 5);
    // Without include_usage, no usage chunk.
    body["stream_options"] = json!({"include_usage": false});
    let text = post(&client, &sim, "/v1/chat/completions", "k", body)
        .await
        .text()
        .await
        .expect("text");
    assert!(!text.contains("\"usage\""));
    sim.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn anthropic_messages_embeddings_and_completions_are_served() {
    let (sim, client) = start(config(100, 100_000)).await;
    let r = client
        .post(format!("http://{}/v1/messages", sim.addr()))
        .header("x-api-key", "k")
        .json(&json!({"model": "claude-x", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("anthropic-ratelimit-tokens-reset"));
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["usage"]["output_tokens"], 10);
    assert_eq!(body["stop_reason"], "max_tokens");
    let r = post(
        &client,
        &sim,
        "/v1/embeddings",
        "k",
        json!({"model": "e", "input": ["a", "b c"]}),
    )
    .await;
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["data"].as_array().map(Vec::len), Some(2));
    assert_eq!(body["usage"]["prompt_tokens"], 3);
    let r = post(
        &client,
        &sim,
        "/v1/completions",
        "k",
        json!({"model": "m", "prompt": "x"}),
    )
    .await;
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["usage"]["completion_tokens"], 16);
    // Bad input: 400 naming the field; unknown route: 404.
    let r = post(
        &client,
        &sim,
        "/v1/chat/completions",
        "k",
        json!({"model": "m"}),
    )
    .await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.expect("json");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("messages"))
    );
    assert_eq!(
        post(&client, &sim, "/v1/files", "k", json!({}))
            .await
            .status(),
        404
    );
    sim.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn faults_are_injected_at_the_configured_share() {
    let mut c = config(100_000, 10_000_000);
    c.error_rate = 0.3;
    c.drop_rate = 0.2;
    c.keys = vec!["good".into()];
    let (sim, client) = start(c).await;
    assert_eq!(
        post(&client, &sim, "/v1/chat/completions", "bad", chat(1))
            .await
            .status(),
        401
    );
    let (mut errors, mut dropped, mut ok) = (0, 0, 0);
    for _ in 0..200 {
        let r = post(&client, &sim, "/v1/chat/completions", "good", chat(1)).await;
        match r.status().as_u16() {
            500 | 503 => errors += 1,
            200 => match r.bytes().await {
                Ok(_) => ok += 1,
                Err(_) => dropped += 1,
            },
            s => panic!("unexpected status {s}"),
        }
    }
    assert!(
        (40..=80).contains(&errors),
        "{errors} errors of 200 at 30 %"
    );
    assert!(
        (15..=50).contains(&dropped),
        "{dropped} drops of ~140 at 20 %"
    );
    let stats = sim.stats();
    assert_eq!(
        (stats.errors_injected, stats.dropped, stats.invalid),
        (errors, dropped, 1)
    );
    assert_eq!(ok + dropped, stats.admitted);
    sim.shutdown().await.expect("shutdown");
}

/// A key can start part spent, as one an earlier run or another app used: its first
/// request sees the bucket's real level, and an empty one refuses at once, with the time
/// until the request fits.
#[tokio::test]
async fn a_key_can_start_spent() {
    // "hello world" chat = 9 prompt tokens; + max_tokens 91 = 100 per request.
    let (sim, client) = start(SimConfig {
        start_fill: 0.5,
        ..config(60, 1_000)
    })
    .await;
    let r = post(&client, &sim, "/v1/chat/completions", "k1", chat(91)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ratelimit-remaining-tokens"], "400");
    assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "29");
    let (empty, client) = start(SimConfig {
        start_fill: 0.0,
        ..config(60, 6_000)
    })
    .await;
    let r = post(&client, &empty, "/v1/chat/completions", "k1", chat(91)).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["x-ratelimit-remaining-tokens"], "0");
    // 100 tokens at 6,000 a minute: one second.
    let wait: u64 = r.headers()["retry-after-ms"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("ms");
    assert!((900..=1_000).contains(&wait), "{wait}");
    for bad in [-0.1, 1.5, f64::NAN] {
        let e = SimConfig {
            start_fill: bad,
            ..SimConfig::default()
        };
        assert!(e.check().is_err(), "{bad}");
    }
}

/// Paths the real API does not serve are 404, as there: a client whose base URL ends in
/// `/v1` and which adds `/v1` again must fail here too, not be served by a suffix match.
#[tokio::test]
async fn only_the_real_paths_are_served() {
    let (sim, client) = start(config(1_000, 100_000)).await;
    for path in [
        "/v1/v1/chat/completions",
        "/v1/chat/completions/",
        "/v1/foo/chat/completions",
        "/v1/v1/messages",
        "/v1/files",
    ] {
        let r = post(&client, &sim, path, "k1", chat(5)).await;
        assert_eq!(r.status(), 404, "{path}");
        let body: Value = r.json().await.expect("json");
        assert_eq!(body["error"]["code"], "unknown_url", "{path}");
    }
    let r = post(&client, &sim, "/v1/chat/completions", "k1", chat(5)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(sim.stats().requests, 1, "404s are not API requests");
}

/// The Responses API: a `response` with its usage, `max_output_tokens` honoured and
/// counted at admission, and its event stream ending in `response.completed`.
#[tokio::test]
async fn the_responses_api_is_served_in_its_own_shape() {
    let (sim, client) = start(config(1_000, 100_000)).await;
    let body = json!({"model": "gpt-4o", "input": "hello there", "max_output_tokens": 3});
    let r = post(&client, &sim, "/v1/responses", "k1", body.clone()).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["object"], "response");
    assert_eq!(v["status"], "completed");
    assert_eq!(v["usage"]["output_tokens"], 3);
    assert_eq!(v["output"][0]["content"][0]["type"], "output_text");
    assert_eq!(v["incomplete_details"]["reason"], "max_output_tokens");
    let mut stream = body;
    stream["stream"] = json!(true);
    let r = post(&client, &sim, "/v1/responses", "k1", stream).await;
    let text = r.text().await.expect("events");
    assert!(text.starts_with("event: response.created"), "{text}");
    assert_eq!(text.matches("event: response.output_text.delta").count(), 3);
    let last = text.trim_end().lines().last().expect("a last line");
    let done: Value = serde_json::from_str(last.trim_start_matches("data: ")).expect("json");
    assert_eq!(done["type"], "response.completed");
    assert_eq!(done["response"]["usage"]["output_tokens"], 3);
}
