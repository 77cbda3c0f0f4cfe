//! The gateway against `tollgate sim` as its upstream, over real sockets: per-caller
//! limits, isolation between callers, exact headers, streamed usage charged, a client
//! that disconnects mid-stream freeing its slot, FIFO queueing in wait mode.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tollgate_gateway::config::hash_key;
use tollgate_gateway::{Config, Gateway};
use tollgate_sim::{Sim, SimConfig};

struct Setup {
    sim: Sim,
    gateway: Gateway,
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    http: reqwest::Client,
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// A simulator with generous limits and a gateway in front of it, with callers `a`, `b`
/// (keys `key-a`, `key-b`) in the tier configured by `tiers`.
async fn setup(sim: SimConfig, tiers: &str) -> Setup {
    let sim = Sim::start(SocketAddr::from(([127, 0, 0, 1], 0)), sim)
        .await
        .expect("start the simulator");
    let src = format!(
        "[upstreams.sim]\nkind = \"sim\"\nurl = \"http://{}\"\napi_key = \"upstream-secret\"\nmodels = [\"gpt-4o-mini\", \"text-embedding-3-small\"]\n\n{tiers}\n\n[callers.a]\nkey_sha256 = \"{}\"\ntier = \"t\"\n[callers.b]\nkey_sha256 = \"{}\"\ntier = \"t\"\n",
        sim.addr(),
        hash_key("key-a"),
        hash_key("key-b"),
    );
    let config = Config::parse(&src).expect("a valid config");
    let gateway = Gateway::new(config).await.expect("build the gateway");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let g = gateway.clone();
    tokio::spawn(async move {
        g.serve(listener, async {
            stopped.await.ok();
        })
        .await
        .expect("serve");
    });
    Setup {
        sim,
        gateway,
        url,
        stop: Some(stop),
        http: reqwest::Client::new(),
    }
}

fn fast_sim() -> SimConfig {
    SimConfig {
        rpm: 1_000_000,
        tpm: 100_000_000,
        latency: Duration::from_millis(1),
        output_tokens: 20,
        ..SimConfig::default()
    }
}

fn chat(stream: bool) -> Value {
    json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Say hello to the gateway."}],
        "max_tokens": 50,
        "stream": stream,
    })
}

impl Setup {
    async fn post(&self, key: &str, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.url))
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .expect("the gateway answers")
    }

    /// `GET path` as the caller with `key`, read as JSON.
    async fn get_json(&self, key: &str, path: &str) -> Value {
        self.http
            .get(format!("{}{path}", self.url))
            .bearer_auth(key)
            .send()
            .await
            .expect("the gateway answers")
            .json()
            .await
            .expect("a JSON answer")
    }

    async fn usage(&self, key: &str) -> Value {
        self.get_json(key, "/v1/usage").await
    }
}

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_caller_has_its_own_limit_and_the_429_names_it() {
    let s = setup(
        fast_sim(),
        "[tiers.t]\nlimits = { requests_per_minute = 2, tokens_per_minute = 100000 }",
    )
    .await;
    let r = s.post("key-a", "/v1/chat/completions", &chat(false)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), "2");
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "1");
    assert_eq!(header(&r, "x-ratelimit-limit-tokens"), "100000");
    let body: Value = r.json().await.expect("json");
    assert!(body["usage"]["completion_tokens"].as_u64().is_some());
    assert_eq!(
        s.post("key-a", "/v1/chat/completions", &chat(false))
            .await
            .status(),
        200
    );
    let r = s.post("key-a", "/v1/chat/completions", &chat(false)).await;
    assert_eq!(r.status(), 429);
    let retry: u64 = header(&r, "retry-after").parse().expect("seconds");
    assert!(
        (25..=31).contains(&retry),
        "retry-after {retry}: the real time until a request fits"
    );
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "0");
    let err: Value = r.json().await.expect("json");
    assert_eq!(err["error"]["code"], "rate_limit_exceeded");
    assert_eq!(err["error"]["type"], "requests");
    let msg = err["error"]["message"].as_str().expect("message");
    assert!(msg.contains("tier.t.requests_per_minute"), "{msg}");
    // Caller b is untouched by a's exhaustion.
    assert_eq!(
        s.post("key-b", "/v1/chat/completions", &chat(false))
            .await
            .status(),
        200
    );
    // The rejected call reached nobody and was charged nothing.
    assert_eq!(s.sim.stats().requests, 3);
    let m = s.gateway.metrics();
    assert_eq!(
        m.counter(
            "tollgate_rejected_total",
            &[("caller", "a"), ("quota", "tier.t.requests_per_minute")]
        ),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_keys_are_refused_and_the_upstream_key_never_leaks() {
    let s = setup(fast_sim(), "[tiers.t]").await;
    let r = s.post("nope", "/v1/chat/completions", &chat(false)).await;
    assert_eq!(r.status(), 401);
    let r = s
        .http
        .post(format!("{}/v1/chat/completions", s.url))
        .json(&chat(false))
        .send()
        .await
        .expect("answer");
    assert_eq!(r.status(), 401);
    let r = s.post("key-a", "/v1/chat/completions", &chat(false)).await;
    assert_eq!(r.status(), 200);
    let text = format!("{:?}{}", r.headers().clone(), r.text().await.expect("body"));
    assert!(!text.contains("upstream-secret"));
    let models = s.get_json("key-b", "/v1/models").await;
    assert_eq!(models["data"][0]["id"], "gpt-4o-mini");
    let health = s
        .http
        .get(format!("{}/healthz", s.url))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);
    let metrics = s
        .http
        .get(format!("{}/metrics", s.url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("tollgate_admitted_total{caller=\"a\",upstream=\"sim\"} 1"),
        "{metrics}"
    );
}

/// Reads a whole SSE body and returns its `data:` payloads.
async fn sse_data(r: reqwest::Response) -> Vec<String> {
    let text = r.text().await.expect("stream");
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_usage_is_charged_and_only_shown_to_who_asked() {
    let limit = 1_000_000u64;
    let s = setup(
        fast_sim(),
        &format!("[tiers.t]\nlimits = {{ tokens_per_day = {limit} }}"),
    )
    .await;
    // Caller a asks for usage: sees it, and is charged exactly that.
    let mut body = chat(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = s.post("key-a", "/v1/chat/completions", &body).await;
    assert_eq!(r.status(), 200);
    assert!(header(&r, "content-type").starts_with("text/event-stream"));
    assert_eq!(header(&r, "x-ratelimit-limit-tokens"), limit.to_string());
    let data = sse_data(r).await;
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let usage_chunk: Value = serde_json::from_str(&data[data.len() - 2]).expect("usage chunk");
    let used = usage_chunk["usage"]["prompt_tokens"]
        .as_u64()
        .expect("prompt")
        + usage_chunk["usage"]["completion_tokens"]
            .as_u64()
            .expect("completion");
    let remaining = |u: &Value| u["quotas"][0]["remaining"].as_u64().expect("remaining");
    let left = remaining(&s.usage("key-a").await);
    // A day's tokens refill at about 12 a second.
    assert!(
        left >= limit - used && left <= limit - used + 50,
        "charged {} for a stream that used {used}",
        limit - left
    );
    // Caller b does not ask: the gateway asks for usage and keeps the chunk from b.
    let r = s.post("key-b", "/v1/chat/completions", &chat(true)).await;
    let data = sse_data(r).await;
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    for d in &data[..data.len() - 1] {
        let v: Value = serde_json::from_str(d).expect("chunk");
        assert!(v["usage"].is_null(), "b did not ask for usage: {d}");
    }
    let left_b = remaining(&s.usage("key-b").await);
    assert!(
        limit - left_b >= used.saturating_sub(50) && limit - left_b <= used + 50,
        "b charged {} for the same stream as a ({used})",
        limit - left_b
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_mid_stream_frees_its_slot_and_pays_what_was_generated() {
    let sim = SimConfig {
        token_latency: Duration::from_millis(20),
        output_tokens: 200,
        ..fast_sim()
    };
    let s = setup(
        sim,
        "[tiers.t]\nlimits = { concurrency = 1, tokens_per_day = 1000000 }",
    )
    .await;
    let mut body = chat(true);
    body["max_tokens"] = json!(200);
    let mut r = s.post("key-a", "/v1/chat/completions", &body).await;
    assert_eq!(r.status(), 200);
    let first = r.chunk().await.expect("read").expect("a first chunk");
    assert!(!first.is_empty());
    // While the stream runs, the caller's one slot is taken.
    let busy = s.post("key-a", "/v1/chat/completions", &chat(false)).await;
    assert_eq!(busy.status(), 429);
    let err: Value = busy.json().await.expect("json");
    assert!(
        err["error"]["message"]
            .as_str()
            .expect("msg")
            .contains("tier.t.concurrency")
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(r);
    // The slot comes back as soon as the gateway sees the client gone.
    let t = Instant::now();
    loop {
        let again = s.post("key-a", "/v1/chat/completions", &chat(false)).await;
        if again.status() == 200 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "the slot was never freed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        s.gateway
            .metrics()
            .counter("tollgate_client_disconnects_total", &[("caller", "a")]),
        1
    );
    // Charged the prompt and what was streamed (about 15 of 200 tokens), not the estimate.
    let u = s.usage("key-a").await;
    let charged = 1_000_000 - u["quotas"][0]["remaining"].as_u64().expect("remaining");
    assert!(charged < 150, "charged {charged}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_callers_are_served_in_arrival_order() {
    let sim = SimConfig {
        latency: Duration::from_millis(150),
        ..fast_sim()
    };
    let s = setup(
        sim,
        "[tiers.t]\non_limit = \"wait\"\nmax_wait = \"10s\"\nlimits = { concurrency = 1 }",
    )
    .await;
    let s = std::sync::Arc::new(s);
    let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..4 {
        let (s, order) = (s.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            let r = s.post("key-a", "/v1/chat/completions", &chat(false)).await;
            assert_eq!(r.status(), 200, "waits rather than failing");
            order.lock().expect("lock").push(i);
        }));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    for t in tasks {
        t.await.expect("task");
    }
    assert_eq!(*order.lock().expect("lock"), vec![0, 1, 2, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_pass_and_other_routes_only_where_allowed() {
    let s = setup(
        fast_sim(),
        "[tiers.t]\nlimits = { requests_per_minute = 100 }\nallow_routes = [\"/v1/unknown\"]",
    )
    .await;
    let r = s
        .post(
            "key-a",
            "/v1/embeddings",
            &json!({"model": "text-embedding-3-small", "input": "hello"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "99");
    let v: Value = r.json().await.expect("json");
    assert!(v["data"][0]["embedding"].is_array());
    // Allowed to the tier: forwarded, counted as a request.
    let r = s.post("key-a", "/v1/unknown", &json!({})).await;
    assert_eq!(r.status(), 404, "the simulator's own answer");
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "98");
    // Not allowed: refused at the gateway, naming the setting, and free.
    let r = s.post("key-a", "/v1/files", &json!({})).await;
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"]["code"], "route_not_allowed");
    let message = v["error"]["message"].as_str().expect("message");
    assert!(message.contains("allow_routes"), "{message}");
    // A known route by another method (listing stored completions) is refused too.
    let r = s
        .http
        .get(format!("{}/v1/chat/completions", s.url))
        .bearer_auth("key-a")
        .send()
        .await
        .expect("answer");
    assert_eq!(r.status(), 405);
    assert_eq!(header(&r, "allow"), "POST");
    let r = s
        .post(
            "key-a",
            "/v1/embeddings",
            &json!({"model": "text-embedding-3-small", "input": "hello"}),
        )
        .await;
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "97");
    // A body that is not JSON on a known route is the caller's mistake.
    let r = s
        .http
        .post(format!("{}/v1/chat/completions", s.url))
        .bearer_auth("key-a")
        .body("{not json")
        .send()
        .await
        .expect("answer");
    assert_eq!(r.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_with_its_own_account_limits_is_its_own_budget() {
    let s = setup(
        fast_sim(),
        "[tiers.t]\nlimits = { requests_per_minute = 100 }\n[upstreams.sim.model_limits.\"gpt-4o\"]\nrequests_per_minute = 2\n",
    )
    .await;
    let mut big = chat(false);
    big["model"] = json!("gpt-4o");
    for key in ["key-a", "key-b"] {
        let r = s.post(key, "/v1/chat/completions", &big).await;
        assert_eq!(r.status(), 200);
    }
    // The account's 2 a minute for gpt-4o are spent, by two callers together.
    let r = s.post("key-a", "/v1/chat/completions", &big).await;
    assert_eq!(r.status(), 429);
    assert_eq!(
        header(&r, "x-tollgate-quota"),
        "upstream.sim.gpt-4o.requests_per_minute"
    );
    // Other models draw on the account's general budget (none here) and the tier's.
    let r = s.post("key-a", "/v1/chat/completions", &chat(false)).await;
    assert_eq!(r.status(), 200);
    // a's tier counted its gpt-4o call and this one, not the refused one.
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "98");
    // gpt-4o is listed by /v1/models, having limits of its own on this upstream.
    let models = s.get_json("key-a", "/v1/models").await;
    assert!(
        models["data"]
            .as_array()
            .expect("list")
            .iter()
            .any(|m| m["id"] == "gpt-4o")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tier_limits_each_caller_on_one_model_and_a_refusal_costs_nothing() {
    let s = setup(
        fast_sim(),
        "[tiers.t]\nlimits = { requests_per_minute = 4 }\nmodel_limits.\"gpt-4o\" = { requests_per_minute = 2 }\n",
    )
    .await;
    let mut big = chat(false);
    big["model"] = json!("gpt-4o");
    let remaining = |v: &Value, name: &str| {
        v["quotas"]
            .as_array()
            .expect("quotas")
            .iter()
            .find(|q| q["name"] == name)
            .unwrap_or_else(|| panic!("no quota {name} in {v}"))["remaining"]
            .as_u64()
            .expect("a number")
    };
    // a has 2 a minute on gpt-4o, within its 4 a minute overall; the model's binds.
    for left in ["1", "0"] {
        let r = s.post("key-a", "/v1/chat/completions", &big).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-ratelimit-remaining-requests"), left);
    }
    let r = s.post("key-a", "/v1/chat/completions", &big).await;
    assert_eq!(r.status(), 429);
    assert_eq!(
        header(&r, "x-tollgate-quota"),
        "tier.t.model.gpt-4o.requests_per_minute"
    );
    // Other models have the rest of a's 4 (the refused call took none).
    for left in ["1", "0"] {
        let r = s.post("key-a", "/v1/chat/completions", &chat(false)).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-ratelimit-remaining-requests"), left);
    }
    // b's gpt-4o budget is its own.
    let r = s.post("key-b", "/v1/chat/completions", &big).await;
    assert_eq!(r.status(), 200);
    for _ in 0..3 {
        let r = s.post("key-b", "/v1/chat/completions", &chat(false)).await;
        assert_eq!(r.status(), 200);
    }
    // b's model limit admits one more gpt-4o call, its tier refuses it: the model's
    // request is given back, and the call never goes out.
    let before = s.sim.stats().requests;
    let r = s.post("key-b", "/v1/chat/completions", &big).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "x-tollgate-quota"), "tier.t.requests_per_minute");
    assert_eq!(s.sim.stats().requests, before);
    let usage = s.usage("key-b").await;
    assert_eq!(remaining(&usage, "tier.t.requests_per_minute"), 0);
    assert_eq!(
        remaining(&usage, "tier.t.model.gpt-4o.requests_per_minute"),
        1
    );
}

/// A tier that rejects on its own limits while the account's slot makes callers queue,
/// each limit with its own policy: over the account's wait, the 429 names the account;
/// over the caller's own limit, it comes at once and names the caller's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_limit_waits_or_rejects_as_it_says() {
    let sim = SimConfig {
        latency: Duration::from_millis(600),
        ..fast_sim()
    };
    let s = setup(
        sim,
        "limits = { concurrency = { limit = 1, on_limit = \"wait\", max_wait = \"900ms\" } }\n[tiers.t]\nlimits = { requests_per_minute = 2 }\n",
    )
    .await;
    let s = std::sync::Arc::new(s);
    let t = Instant::now();
    let mut tasks = Vec::new();
    for (key, at) in [("key-a", 0), ("key-b", 50), ("key-a", 100)] {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(at)).await;
            let r = s.post(key, "/v1/chat/completions", &chat(false)).await;
            let quota = r
                .headers()
                .get("x-tollgate-quota")
                .map(|v| v.to_str().expect("ascii").to_string());
            (r.status().as_u16(), quota, t.elapsed())
        }));
    }
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await.expect("task"));
    }
    // a1 holds the account's slot for 600 ms; b waits for it (about 550 ms, within the
    // account's 900 ms) instead of being refused as the tier's own policy would say.
    assert_eq!(out[0].0, 200, "{out:?}");
    assert_eq!(out[1].0, 200, "{out:?}");
    assert!(out[1].2 >= Duration::from_millis(1_100), "{out:?}");
    // a's second call would wait until b is done (about 1,100 ms): over the account's
    // 900 ms, it is refused, naming the account's limit, once its wait is spent.
    assert_eq!(out[2].0, 429, "{out:?}");
    assert_eq!(out[2].1.as_deref(), Some("upstream.sim.concurrency"));
    assert!(out[2].2 >= Duration::from_millis(950), "{out:?}");
    // That refusal cost a nothing: it has one of its 2 requests a minute left, and then
    // its own limit refuses at once, naming it.
    let r = s.post("key-a", "/v1/chat/completions", &chat(false)).await;
    assert_eq!(r.status(), 200);
    let t = Instant::now();
    let r = s.post("key-a", "/v1/chat/completions", &chat(false)).await;
    assert_eq!(r.status(), 429);
    assert!(
        t.elapsed() < Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(header(&r, "x-tollgate-quota"), "tier.t.requests_per_minute");
    let retry: u64 = header(&r, "retry-after").parse().expect("seconds");
    assert!((25..=31).contains(&retry), "{retry}");
}

/// A caller's budget in dollars: each request is charged what it cost at the model's
/// price (the estimate while it runs, then the usage the upstream reports), the request
/// that would overspend is refused naming the budget, and a model without a price is
/// refused rather than served for free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_spends_its_budget_at_the_models_prices() {
    let s = setup(
        fast_sim(),
        // $1,000 / $2,000 per million tokens: a token in costs $0.001, out $0.002.
        "[prices]\n\"gpt-4o-mini\" = { input = 1000, output = 2000 }\n[tiers.t]\nlimits = { spend_per_day = 0.5 }\n",
    )
    .await;
    let spend_left = |v: &Value| -> u64 {
        let q = v["quotas"]
            .as_array()
            .expect("quotas")
            .iter()
            .find(|q| q["name"] == "tier.t.spend_per_day")
            .unwrap_or_else(|| panic!("no spend quota in {v}"))
            .clone();
        assert_eq!(q["unit"], "usd_micros");
        assert_eq!(q["limit_usd"], 0.5);
        q["remaining"].as_u64().expect("a number")
    };
    assert_eq!(spend_left(&s.usage("key-a").await), 500_000);
    let mut spent = 0;
    let mut served = 0;
    let refused = loop {
        let r = s.post("key-a", "/v1/chat/completions", &chat(false)).await;
        if r.status() == 429 {
            break r;
        }
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.expect("json");
        let (p, c) = (
            body["usage"]["prompt_tokens"].as_u64().expect("prompt"),
            body["usage"]["completion_tokens"]
                .as_u64()
                .expect("completion"),
        );
        spent += p * 1_000 + c * 2_000;
        served += 1;
        // The settle lands just after the answer.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let left = spend_left(&s.usage("key-a").await);
        // A day's refill is 5.8 µ$ a second: what is left is the budget less the real
        // cost of what was served, give or take the refill.
        assert!(
            left >= 500_000 - spent && left <= 500_000 - spent + 100,
            "{left} left after spending {spent}"
        );
        assert!(served < 20, "the budget never ran out");
    };
    assert!(served >= 3, "only {served} served");
    assert_eq!(header(&refused, "x-tollgate-quota"), "tier.t.spend_per_day");
    let body: Value = refused.json().await.expect("json");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(
        message.contains("Spend limit reached") && message.contains("budget $0.50"),
        "{message}"
    );
    // b's budget is its own.
    let r = s.post("key-b", "/v1/chat/completions", &chat(false)).await;
    assert_eq!(r.status(), 200);
    // A request that could cost more than the whole budget is refused as too costly.
    let mut costly = chat(false);
    costly["max_tokens"] = json!(1_000_000);
    let r = s.post("key-b", "/v1/chat/completions", &costly).await;
    assert_eq!(r.status(), 413);
    let body: Value = r.json().await.expect("json");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(
        message.contains("too costly") && message.contains("the budget holds $0.50"),
        "{message}"
    );
    // A model with no price cannot be served while a spend limit applies.
    let before = s.sim.stats().requests;
    let r = s
        .post(
            "key-b",
            "/v1/embeddings",
            &json!({"model": "text-embedding-3-small", "input": "hello"}),
        )
        .await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "model_not_priced");
    assert_eq!(s.sim.stats().requests, before);
}
