//! A bare reverse proxy on the gateway's own HTTP stack (axum's server, hyper-util's
//! pooled client, mimalloc) that does nothing else: no authentication, no estimate, no
//! limits, no headers of its own, no metrics. It is the floor the gateway is measured
//! against (`python3 scripts/bench_gateway.py --bare`): what any proxy on this stack
//! adds, so the rest is what tollgate's work costs. Not for serving anything.
//!
//! ```sh
//! cargo run --release -p tollgate-gateway --example bare_proxy -- 127.0.0.1:8081 http://127.0.0.1:8080
//! ```

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Clone)]
struct Upstream {
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// Forward a request as it came (its `host` header aside) and return the answer.
async fn forward(State(up): State<Upstream>, req: Request) -> Response {
    let (mut parts, body) = req.into_parts();
    let Ok(body) = axum::body::to_bytes(body, 16 << 20).await else {
        return StatusCode::PAYLOAD_TOO_LARGE.into_response();
    };
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let Ok(uri) = format!("{}{target}", up.base).parse() else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    parts.uri = uri;
    parts.headers.remove(axum::http::header::HOST);
    let Ok(answer) = up
        .client
        .request(Request::from_parts(parts, Full::new(body)))
        .await
    else {
        return StatusCode::BAD_GATEWAY.into_response();
    };
    let (parts, body) = answer.into_parts();
    match body.collect().await {
        Ok(b) => Response::from_parts(parts, Body::from(b.to_bytes())),
        Err(_) => StatusCode::BAD_GATEWAY.into_response(),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(base)) = (args.next(), args.next()) else {
        return Err("usage: bare_proxy LISTEN_ADDR UPSTREAM_URL".into());
    };
    let mut tcp = HttpConnector::new();
    tcp.set_nodelay(true);
    let client = Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build(tcp);
    let app = axum::Router::new().fallback(forward).with_state(Upstream {
        base: base.trim_end_matches('/').to_owned(),
        client,
    });
    // As the gateway does: answers go out as written.
    let listener =
        axum::serve::ListenerExt::tap_io(tokio::net::TcpListener::bind(&listen).await?, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
    axum::serve(listener, app).await?;
    Ok(())
}
