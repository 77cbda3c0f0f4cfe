//! The gateway's guards on its client connections, over real sockets: the header
//! timeout (slowloris), the idle timeout (which never cuts a request waiting for its
//! upstream, nor a stream), the connection cap, the upstream connect timeout, and the
//! token `/metrics` may require.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tollgate_gateway::{Config, Gateway};
use tollgate_sim::{Sim, SimConfig};

struct Running {
    gateway: Gateway,
    addr: SocketAddr,
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// A gateway with the top-level settings `top` and one upstream at `upstream` (open:
/// no callers), plus whatever `tail` adds.
async fn start(top: &str, upstream: &str, tail: &str) -> Running {
    let src = format!("{top}\n[upstreams.u]\nkind = \"sim\"\nurl = \"{upstream}\"\n{tail}");
    let gateway = Gateway::new(Config::parse(&src).expect("a valid config"))
        .await
        .expect("build the gateway");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let g = gateway.clone();
    tokio::spawn(async move {
        g.serve(listener, async {
            stopped.await.ok();
        })
        .await
        .expect("serve");
    });
    Running {
        gateway,
        addr,
        url: format!("http://{addr}"),
        stop: Some(stop),
    }
}

async fn sim(config: SimConfig) -> Sim {
    Sim::start(SocketAddr::from(([127, 0, 0, 1], 0)), config)
        .await
        .expect("start the simulator")
}

fn chat(stream: bool) -> Value {
    json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Hello."}],
        "max_tokens": 20,
        "stream": stream,
    })
}

/// A client that opens a connection per request, so each one meets the cap afresh.
fn fresh_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client")
}

/// Read until the peer closes (0 bytes or an error, a reset); `None` if it is still
/// open after `within`.
async fn closed_within(sock: &mut TcpStream, within: Duration) -> Option<Duration> {
    let t = Instant::now();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()?;
    Some(t.elapsed())
}

/// Read one whole answer to `GET /healthz` (`ok\n`) from a raw connection.
async fn healthz_on(sock: &mut TcpStream) {
    sock.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(b"\r\n\r\nok\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf))
            .await
            .expect("an answer")
            .expect("read");
        assert!(n > 0, "closed before the answer: {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200"), "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trickling_its_headers_is_disconnected_after_header_timeout() {
    let g = start(
        "header_timeout = \"500ms\"\nidle_timeout = \"30s\"",
        "http://127.0.0.1:9",
        "",
    )
    .await;
    let mut sock = TcpStream::connect(g.addr).await.expect("connect");
    sock.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let closed = loop {
        tokio::select! {
            r = sock.read(&mut buf) => match r {
                // hyper may answer 408 before closing.
                Ok(0) | Err(_) => break start.elapsed(),
                Ok(_) => {}
            },
            _ = tick.tick() => {
                if sock.write_all(b"a").await.is_err() {
                    break start.elapsed();
                }
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "still connected after 5 s of trickled headers"
        );
    };
    println!("slowloris disconnected after {closed:?} (header_timeout 500 ms)");
    assert!(closed < Duration::from_millis(2_000), "{closed:?}");
    assert!(closed >= Duration::from_millis(400), "{closed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_idle_timeout() {
    let g = start(
        "header_timeout = \"30s\"\nidle_timeout = \"500ms\"",
        "http://127.0.0.1:9",
        "",
    )
    .await;
    let mut sock = TcpStream::connect(g.addr).await.expect("connect");
    healthz_on(&mut sock).await;
    let idle = closed_within(&mut sock, Duration::from_secs(5))
        .await
        .expect("the idle connection is closed within 5 s");
    println!("idle keep-alive connection closed after {idle:?} (idle_timeout 500 ms)");
    assert!(idle >= Duration::from_millis(400), "{idle:?}");
    assert!(idle < Duration::from_millis(2_000), "{idle:?}");
    assert_eq!(
        g.gateway
            .metrics()
            .counter("tollgate_connections_idle_closed_total", &[]),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waiting_longer_than_idle_timeout_for_its_upstream_gets_its_answer() {
    // The upstream answers after 1 s, the idle timeout is 400 ms.
    let s = sim(SimConfig {
        rpm: 1_000_000,
        tpm: 100_000_000,
        latency: Duration::from_millis(1_000),
        ..SimConfig::default()
    })
    .await;
    let g = start(
        "header_timeout = \"30s\"\nidle_timeout = \"400ms\"",
        &format!("http://{}", s.addr()),
        "",
    )
    .await;
    let http = reqwest::Client::new();
    let t = Instant::now();
    let r = http
        .post(format!("{}/v1/chat/completions", g.url))
        .json(&chat(false))
        .send()
        .await
        .expect("an answer");
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.expect("JSON");
    assert_eq!(body["object"], "chat.completion", "{body}");
    assert!(
        t.elapsed() >= Duration::from_millis(800),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(
        g.gateway
            .metrics()
            .counter("tollgate_connections_idle_closed_total", &[]),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_pausing_longer_than_idle_timeout_between_chunks_is_not_cut() {
    // 600 ms between tokens, an idle timeout of 300 ms.
    let s = sim(SimConfig {
        rpm: 1_000_000,
        tpm: 100_000_000,
        latency: Duration::from_millis(1),
        token_latency: Duration::from_millis(600),
        output_tokens: 3,
        ..SimConfig::default()
    })
    .await;
    let g = start(
        "header_timeout = \"30s\"\nidle_timeout = \"300ms\"",
        &format!("http://{}", s.addr()),
        "",
    )
    .await;
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", g.url))
        .json(&chat(true))
        .send()
        .await
        .expect("an answer");
    assert_eq!(r.status(), 200);
    let text = r.text().await.expect("the whole stream");
    assert!(text.contains("data: [DONE]"), "cut short: {text}");
    assert_eq!(
        g.gateway
            .metrics()
            .counter("tollgate_connections_idle_closed_total", &[]),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_max_connections_are_closed_at_once() {
    let g = start(
        "max_connections = 3\nheader_timeout = \"30s\"\nidle_timeout = \"30s\"",
        "http://127.0.0.1:9",
        "",
    )
    .await;
    let open = || g.gateway.metrics().gauge("tollgate_connections_open", &[]);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(g.addr).await.expect("connect"));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while open() < 3 {
        assert!(Instant::now() < deadline, "3 connections never counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut fourth = TcpStream::connect(g.addr).await.expect("connect");
    let _ = fourth
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let closed = closed_within(&mut fourth, Duration::from_secs(2))
        .await
        .expect("the 4th connection is closed at once");
    println!("4th connection closed after {closed:?}");
    assert_eq!(
        g.gateway
            .metrics()
            .counter("tollgate_connections_refused_total", &[]),
        1
    );
    assert_eq!(open(), 3);
    drop(held);
    // Once the gateway has seen them close, /healthz answers again.
    let http = fresh_client();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match http.get(format!("{}/healthz", g.url)).send().await {
            Ok(r) if r.status() == 200 => break,
            other => assert!(
                Instant::now() < deadline,
                "/healthz unreachable 5 s after the held connections closed: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A listener whose accept queue is full and never drained: the kernel drops further
/// SYNs, so a connect to it hangs until its timeout (Linux). `None` if the queue would
/// not fill.
async fn black_hole() -> Option<(SocketAddr, Vec<TcpStream>)> {
    let socket = tokio::net::TcpSocket::new_v4().ok()?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0))).ok()?;
    let listener = socket.listen(1).ok()?;
    let addr = listener.local_addr().ok()?;
    let mut filled = Vec::new();
    for _ in 0..16 {
        match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => filled.push(s),
            Ok(Err(_)) => return None,
            Err(_) => {
                // Leaked on purpose: the listener must stay open, never accepting.
                std::mem::forget(listener);
                return Some((addr, filled));
            }
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_does_not_accept_is_given_up_after_connect_timeout() {
    let (hole, _filled) = black_hole()
        .await
        .expect("a listener whose accept queue is full, so connects to it hang (Linux drops SYNs past the backlog); this test needs one");
    // No retries (max_wait 0 s): the time is the connect timeout's alone.
    let g = start(
        "connect_timeout = \"300ms\"\nopen = true",
        &format!("http://{hole}"),
        "[tiers.default]\nmax_wait = \"0s\"\n",
    )
    .await;
    let t = Instant::now();
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", g.url))
        .json(&chat(false))
        .send()
        .await
        .expect("an answer");
    let took = t.elapsed();
    println!(
        "upstream not accepting, connect_timeout 300 ms: {} after {took:?}",
        r.status()
    );
    assert_eq!(r.status(), 504);
    assert!(took >= Duration::from_millis(250), "{took:?}");
    assert!(took < Duration::from_millis(2_500), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_upstream_is_a_502() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("address");
    // The default tier waits up to 30 s; an upstream that refuses connections is
    // tried once more, not for the whole wait (it took 10.6 s when every failed connect
    // was retried with backoff within the wait).
    let g = start(
        "connect_timeout = \"300ms\"\nopen = true",
        &format!("http://{closed}"),
        "[tiers.default]\n",
    )
    .await;
    let t = Instant::now();
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", g.url))
        .json(&chat(false))
        .send()
        .await
        .expect("an answer");
    let took = t.elapsed();
    println!(
        "down upstream (refused), max_wait 30 s: {} after {took:?}",
        r.status()
    );
    assert_eq!(r.status(), 502);
    assert!(took < Duration::from_secs(3), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_require_a_bearer_token() {
    // `cargo test` sets CARGO_PKG_NAME for the test binary: a variable that is surely
    // set, without setting one here (which would be unsafe).
    let token = std::env::var("CARGO_PKG_NAME").expect("cargo sets CARGO_PKG_NAME");
    let g = start(
        "metrics_token_env = \"CARGO_PKG_NAME\"",
        "http://127.0.0.1:9",
        "",
    )
    .await;
    let http = reqwest::Client::new();
    let metrics = |auth: Option<String>| {
        let mut r = http.get(format!("{}/metrics", g.url));
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        r.send()
    };
    for auth in [
        None,
        Some("Bearer wrong".to_string()),
        Some(format!("Bearer {token}x")),
        Some(format!("Basic {token}")),
        Some(token.clone()),
    ] {
        let r = metrics(auth.clone()).await.expect("an answer");
        assert_eq!(r.status(), 401, "{auth:?}");
        let body: Value = r.json().await.expect("a JSON error");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("Bearer")),
            "{body}"
        );
    }
    for auth in [format!("bearer {token}"), format!("Bearer {token}")] {
        let r = metrics(Some(auth)).await.expect("an answer");
        assert_eq!(r.status(), 200);
        let text = r.text().await.expect("text");
        assert!(
            text.contains("# TYPE tollgate_connections_open gauge"),
            "{text}"
        );
    }
    // Without metrics_token_env, /metrics is open.
    let open = start("", "http://127.0.0.1:9", "").await;
    let r = http
        .get(format!("{}/metrics", open.url))
        .send()
        .await
        .expect("an answer");
    assert_eq!(r.status(), 200);
}
