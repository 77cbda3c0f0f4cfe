//! The gateway paces to what the provider says: an upstream with no limits configured
//! is paced to the limits its answers report, starting from what is really left (a key
//! half spent by someone else), each caller's own key can be passed through and paced as
//! its own account, and a base URL written as SDKs write it (`.../v1`) is not doubled.
//! All against `tollgate sim`, which 404s a doubled `/v1` and 429s anything over its
//! limits, as a provider does.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tollgate_gateway::{Config, Gateway};
use tollgate_sim::{Sim, SimConfig};

/// A simulator and an open gateway (no callers) in front of it; `upstream` is the rest
/// of the upstream's table, `url` its URL (`{sim}` is replaced by the sim's address).
async fn start(sim: SimConfig, url: &str, upstream: &str) -> (Sim, String) {
    let sim = Sim::start(SocketAddr::from(([127, 0, 0, 1], 0)), sim)
        .await
        .expect("start the simulator");
    let url = url.replace("{sim}", &sim.addr().to_string());
    let src = format!(
        "open = true\n[upstreams.sim]\nkind = \"openai-compatible\"\nurl = \"{url}\"\n{upstream}\n[tiers.default]\non_limit = \"wait\"\nmax_wait = \"60s\"\n"
    );
    let gateway = Gateway::new(Config::parse(&src).expect("a valid config"))
        .await
        .expect("build the gateway");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = gateway.serve(listener, std::future::pending()).await;
    });
    (sim, addr)
}

fn sim(rpm: u64, start_fill: f64, keys: &[&str]) -> SimConfig {
    SimConfig {
        rpm,
        tpm: 1_000_000,
        latency: Duration::from_millis(5),
        start_fill,
        keys: keys.iter().map(|k| (*k).to_string()).collect(),
        ..SimConfig::default()
    }
}

async fn chat(url: &str, key: Option<&str>) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({"model": "gpt-4o-mini", "max_tokens": 5,
            "messages": [{"role": "user", "content": "hi"}]}));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let r = request.send().await.expect("an answer");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// `n` chat calls at once; their statuses and how long the last took.
async fn at_once(url: &str, key: Option<&str>, n: usize) -> (Vec<u16>, Duration) {
    let started = Instant::now();
    let calls: Vec<_> = (0..n)
        .map(|_| {
            let (url, key) = (url.to_string(), key.map(str::to_string));
            tokio::spawn(async move { chat(&url, key.as_deref()).await.0 })
        })
        .collect();
    let mut statuses = Vec::new();
    for c in calls {
        statuses.push(c.await.expect("task"));
    }
    (statuses, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_base_url_ending_in_v1_is_not_doubled() {
    for url in ["http://{sim}/v1", "http://{sim}/v1/", "http://{sim}"] {
        let (sim, gw) = start(sim(600, 1.0, &[]), url, "").await;
        let (status, body) = chat(&gw, None).await;
        assert_eq!(status, 200, "{url}: {body}");
        assert_eq!(sim.stats().admitted, 1, "{url}");
    }
}

/// The key is half spent by someone else: 6 of its 60 a minute are left. The gateway
/// has no limits configured: the first request looks, its answer's headers say 60 a
/// minute with 5 left, and every other request is paced to that, waiting its turn,
/// instead of 429s at the provider.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_without_limits_is_paced_to_what_its_headers_say_is_left() {
    let (sim, gw) = start(sim(60, 0.1, &[]), "http://{sim}", "").await;
    let (statuses, took) = at_once(&gw, None, 12).await;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    let stats = sim.stats();
    assert_eq!(
        stats.rate_limited, 0,
        "the provider refused none: {stats:?}"
    );
    assert_eq!(stats.admitted, 12);
    // 6 at once, then one a second (and the burst keeps one in hand).
    assert!(
        took >= Duration::from_secs(5),
        "paced to the provider's limits, not burst: {took:?}"
    );
    assert!(took < Duration::from_secs(12), "{took:?}");
}

/// No key of the gateway's own: each caller's key goes through, and each key is paced
/// as its own account. One caller queueing behind its spent key does not hold another
/// back; a caller without a key gets the provider's 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_own_keys_go_through_and_each_is_its_own_account() {
    let (sim, gw) = start(
        sim(60, 0.05, &["sk-a", "sk-b"]),
        "http://{sim}/v1",
        "forward_caller_key = true",
    )
    .await;
    let busy = {
        let gw = gw.clone();
        tokio::spawn(async move { at_once(&gw, Some("sk-a"), 6).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let (status, body) = chat(&gw, Some("sk-b")).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "b's own account has room: {:?}",
        started.elapsed()
    );
    let (statuses, took) = busy.await.expect("task");
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert!(
        took >= Duration::from_secs(2),
        "a's 3 left, then 1 a second: {took:?}"
    );
    let stats = sim.stats();
    assert_eq!(stats.rate_limited, 0, "{stats:?}");
    let (status, body) = chat(&gw, None).await;
    assert_eq!(status, 401, "the provider's answer to no key: {body}");
    assert_eq!(body["error"]["code"], "invalid_api_key");
}

/// `forward_caller_key` only where no caller's key is the gateway's own secret.
#[test]
fn forwarding_callers_keys_is_refused_where_it_would_leak_or_clash() {
    let base = "[upstreams.u]\nkind = \"openai\"\nurl = \"https://api.openai.com/v1\"\nforward_caller_key = true\n";
    assert!(Config::parse(base).is_ok());
    let with_key = format!("{base}api_key = \"sk-x\"\n");
    let e = Config::parse(&with_key).expect_err("two keys").to_string();
    assert!(
        e.contains("forward_caller_key") && e.contains("key of its own"),
        "{e}"
    );
    let with_callers = format!(
        "{base}[tiers.t]\n[callers.a]\nkey_sha256 = \"{}\"\ntier = \"t\"\n",
        tollgate_gateway::config::hash_key("k")
    );
    let e = Config::parse(&with_callers)
        .expect_err("callers")
        .to_string();
    assert!(e.contains("must never reach an upstream"), "{e}");
}
