//! The accept loop and each client connection's guards: the header timeout, the idle
//! timeout and the connection cap.
//!
//! Timeouts between keep-alive requests: in hyper 1.12, when an answer has been written
//! and the connection goes back to idle, `proto::h1::conn::State::idle` sets
//! `notify_read` "so we can close the connection if another header isn't received in a
//! timely manner", and the dispatcher's next `poll_read_head` arms the header timer at
//! once, before any byte of the next request arrives. So `header_read_timeout` already
//! closes a keep-alive connection that waits longer than `header_timeout` for its next
//! request's header block (and a fresh connection that sends nothing), and this module
//! does not time that itself. The timer does not run while a request is in flight
//! (the dispatcher does not read a head then), nor while hyper is writing the end of an
//! answer the client does not read: `idle_timeout` covers that, and any other state
//! with no request in flight, by closing a connection with no request in flight and no
//! byte read or written for that long. A keep-alive connection waiting for its next
//! request is therefore closed after the shorter of the two.
//!
//! HTTP/1 only, as before (`axum` is built with `http1` alone): hyper-util's `auto`
//! builder would first read the protocol preface with no timeout at all.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::State;
use crate::metrics::Metrics;

/// The guards of every client connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Guards {
    pub(crate) header_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) max_connections: usize,
}

/// What one connection is doing: its requests in flight and when it last read or
/// wrote a byte.
struct Activity {
    start: Instant,
    /// Nanoseconds from `start` to the last byte read or written, or the last request
    /// finished.
    last: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        let nanos = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.store(nanos, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_nanos(self.last.load(Ordering::Relaxed))
    }

    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    fn enter(self: &Arc<Activity>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }
}

/// One request in flight on a connection, until its answer's body ends or is dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        // The connection is idle from now, not from its last byte.
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A socket that notes when it last read or wrote a byte.
struct Watched<T> {
    io: T,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            this.activity.touch();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.io).poll_write(cx, buf))?;
        if n > 0 {
            this.activity.touch();
        }
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.io).poll_write_vectored(cx, bufs))?;
        if n > 0 {
            this.activity.touch();
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// An answer's body, holding its request in flight until it ends or is dropped (a
/// stream counts until its last chunk).
struct Tracked {
    body: Body,
    guard: Option<InFlight>,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.body).poll_frame(cx));
        match &frame {
            Some(Ok(_)) if !this.body.is_end_stream() => {}
            _ => this.guard = None,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Whether an accept error concerns one connection only (the listener is fine).
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Accept connections on `listener` and serve `app` on each until `shutdown`
/// completes; then stop accepting and let every connection finish its requests in
/// flight (hyper's graceful shutdown) before returning.
pub(crate) async fn serve(
    listener: TcpListener,
    app: axum::Router,
    guards: Guards,
    state: Arc<State>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let app = TowerToHyperService::new(app);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(guards.header_timeout);
    let graceful = GracefulShutdown::new();
    let open = Arc::new(AtomicUsize::new(0));
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = &mut shutdown => break,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of file descriptors, most likely: wait for some to be freed rather
                // than spin.
                tracing::error!(error = %e, "accept failed");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    () = &mut shutdown => break,
                }
            }
        };
        if open.load(Ordering::SeqCst) >= guards.max_connections {
            // Accepted and closed at once: the backlog never fills and the descriptors
            // in use stay bounded.
            drop(tcp);
            state
                .metrics
                .count("tollgate_connections_refused_total", &[], 1);
            continue;
        }
        // Answers go out as they are written, not held back for an acknowledgement of
        // the previous one.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY on a connection");
        }
        open.fetch_add(1, Ordering::SeqCst);
        state.metrics.add_gauge("tollgate_connections_open", &[], 1);
        let conn = connection(tcp, &http, app.clone(), &graceful);
        let open = open.clone();
        let state = state.clone();
        let idle = guards.idle_timeout;
        tokio::spawn(async move {
            conn.run(idle, &state.metrics).await;
            open.fetch_sub(1, Ordering::SeqCst);
            state
                .metrics
                .add_gauge("tollgate_connections_open", &[], -1);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// One connection being served, with what it is doing.
struct Connection<F> {
    conn: F,
    activity: Arc<Activity>,
}

fn connection(
    tcp: TcpStream,
    http: &hyper::server::conn::http1::Builder,
    app: TowerToHyperService<axum::Router>,
    graceful: &GracefulShutdown,
) -> Connection<impl Future<Output = hyper::Result<()>> + Send + use<>> {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        io: tcp,
        activity: activity.clone(),
    });
    let on = activity.clone();
    let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let guard = on.enter();
        let answer = hyper::service::Service::call(&app, req);
        async move {
            let res: Result<http::Response<Body>, Infallible> = answer.await;
            res.map(|r| {
                r.map(|body| Tracked {
                    body,
                    guard: Some(guard),
                })
            })
        }
    });
    Connection {
        conn: graceful.watch(http.serve_connection(io, svc)),
        activity,
    }
}

impl<F: Future<Output = hyper::Result<()>>> Connection<F> {
    /// Serve until the connection ends, or has had no request in flight and no byte
    /// read or written for `idle` (then it is dropped, which closes it).
    async fn run(self, idle: Duration, metrics: &Metrics) {
        let Connection { conn, activity } = self;
        tokio::pin!(conn);
        loop {
            let deadline = if activity.in_flight() > 0 {
                // Looked at again later: a request in flight is never cut here.
                Instant::now() + idle
            } else {
                activity.last() + idle
            };
            tokio::select! {
                r = &mut conn => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "client connection ended");
                    }
                    return;
                }
                () = tokio::time::sleep_until(deadline) => {
                    if activity.in_flight() == 0 && activity.last() + idle <= Instant::now() {
                        metrics.count("tollgate_connections_idle_closed_total", &[], 1);
                        return;
                    }
                }
            }
        }
    }
}
