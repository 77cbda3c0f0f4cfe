//! Two gateway instances sharing one Redis enforce one limit, never twice it: per caller
//! and per upstream account.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use tollgate_gateway::config::hash_key;
use tollgate_gateway::{Config, Gateway};
use tollgate_sim::{Sim, SimConfig};

#[path = "../../tollgate/tests/support/mod.rs"]
mod support;
use support::RedisServer;

async fn gateway(src: &str) -> (String, tokio::sync::oneshot::Sender<()>) {
    let g = Gateway::new(Config::parse(src).expect("config"))
        .await
        .expect("gateway on Redis");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        g.serve(listener, async {
            stopped.await.ok();
        })
        .await
        .expect("serve");
    });
    (url, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_redis_enforce_one_limit() {
    let redis = RedisServer::start();
    let sim = Sim::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        SimConfig {
            latency: Duration::from_millis(1),
            output_tokens: 5,
            ..SimConfig::default()
        },
    )
    .await
    .expect("sim");
    let src = format!(
        "redis = \"{}\"\nexpose_account_limits = true\n[upstreams.sim]\nkind = \"sim\"\nurl = \"http://{}\"\nlimits = {{ requests_per_minute = 15 }}\n[tiers.t]\nlimits = {{ requests_per_minute = 10 }}\n[callers.a]\nkey_sha256 = \"{}\"\ntier = \"t\"\n[callers.b]\nkey_sha256 = \"{}\"\ntier = \"t\"\n",
        redis.url(),
        sim.addr(),
        hash_key("key-a"),
        hash_key("key-b"),
    );
    let (one, _stop1) = gateway(&src).await;
    let (two, _stop2) = gateway(&src).await;
    let http = reqwest::Client::new();
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5});
    let admitted = |key: &'static str, n: usize| {
        let (http, body, one, two) = (http.clone(), body.clone(), one.clone(), two.clone());
        async move {
            let mut remaining = Vec::new();
            for i in 0..n {
                let url = if i % 2 == 0 { &one } else { &two };
                let r = http
                    .post(format!("{url}/v1/chat/completions"))
                    .bearer_auth(key)
                    .json(&body)
                    .send()
                    .await
                    .expect("answer");
                match r.status().as_u16() {
                    // What the decision left, read from Redis with the decision itself.
                    200 => remaining.push(
                        r.headers()["x-ratelimit-remaining-requests"]
                            .to_str()
                            .expect("ascii")
                            .parse::<u64>()
                            .expect("a number"),
                    ),
                    429 => {}
                    s => panic!("status {s}"),
                }
            }
            remaining
        }
    };
    // Caller a has 10 a minute whichever instance it reaches, not 10 on each; its own
    // quota binds, and each answer says exactly what is left of it.
    assert_eq!(
        admitted("key-a", 14).await,
        vec![9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    );
    // The account has 15 in all, across callers and instances: 5 are left for b, and
    // now the account binds (its figures shown: `expose_account_limits`).
    assert_eq!(admitted("key-b", 10).await, vec![4, 3, 2, 1, 0]);
    assert_eq!(sim.stats().requests, 15);
}
