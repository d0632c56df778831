//! `--http ADDR`: metrics, readiness, status, live events and a dashboard, served by the
//! supervisor itself.
//!
//! # How it works
//!
//! An HTTP/1 server (hyper) runs as tasks on the supervisor's single-threaded runtime. It
//! owns no app state: each request asks the supervisor a [`Query`] through the event
//! channel and turns the plain answer into text, so the supervisor's loop does only the
//! reading, and `/live` answers only while that loop runs. `/events` follows a tap on every
//! herd event ([`crate::logs::Logger::set_tap`]).
//!
//! Everything a client can make herd hold is bounded:
//! - at most [`MAX_CONNECTIONS`] connections; one more is closed at once;
//! - a request's head must arrive within [`HEADER_TIMEOUT`] and fit in [`MAX_HEAD`] bytes;
//!   bodies are never read; one request per connection;
//! - an answer must be taken within [`ANSWER_TIMEOUT`]; an event stream whose client stops
//!   reading for [`STALL_TIMEOUT`] is closed, and while it lags it skips events (counted)
//!   instead of queueing them: the tap is a [`EVENT_BACKLOG`]-event broadcast;
//! - at most one query per connection is in the supervisor's channel at a time, and the
//!   kernel keeps at most a 64 KiB send buffer for each connection.
//!
//! Access: loopback by default. Any other address needs `--http-token` (or
//! `HERD_HTTP_TOKEN`), which `/metrics`, `/status`, `/samples` and `/events` then require as
//! `Authorization: Bearer TOKEN` (compared in constant time). `/live`, `/ready` and the
//! dashboard page itself (static, no data) stay open: load balancers and Kubernetes probes
//! cannot easily send a token, and a yes/no is all they learn. Without a token, requests
//! must name a loopback host (`Host: 127.0.0.1:…`, `localhost`), so a web page cannot reach
//! the port through DNS rebinding.

mod metrics;
mod query;
mod sse;

use std::cell::Cell;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{channel::Channel, Either, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::{broadcast, mpsc::UnboundedSender, oneshot};

pub use query::{Query, Readiness, SlotMetrics, Snapshot, WorkerMetrics};

use crate::vocab::Event;

/// Connections served at once; one more is closed unanswered.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client has to send its request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest request head read (hyper's minimum buffer).
pub const MAX_HEAD: usize = 8 * 1024;
/// How long a client has to take an answer (not an event stream).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// An event stream whose client has not read for this long is closed.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// The kernel's send buffer per connection (SO_SNDBUF).
const SEND_BUFFER: usize = 64 * 1024;
/// Events kept for `/events` clients that are behind; older ones are skipped.
pub const EVENT_BACKLOG: usize = 256;
/// How long the supervisor's loop has to answer before `/live` says it does not.
const LOOP_TIMEOUT: Duration = Duration::from_secs(5);

const DASHBOARD: &str = include_str!("dashboard.html");

/// `--http`, `--http-token`, `--ready-min`, checked.
#[derive(Debug, Clone)]
pub struct Config {
    pub addr: SocketAddr,
    token: Option<String>,
    /// `/ready` is 200 with at least this many ready workers.
    pub ready_min: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("--http {0} is not a loopback address: anyone who can reach it would read this app's metrics and status. Pass --http-token TOKEN (or set HERD_HTTP_TOKEN) to require `Authorization: Bearer TOKEN`, or listen on 127.0.0.1")]
    NeedsToken(SocketAddr),
    #[error("--http-token is empty; pass a long random string (e.g. `openssl rand -hex 32`)")]
    EmptyToken,
    #[error("--http-token may only hold visible ASCII characters (it is sent in an HTTP header)")]
    BadToken,
    #[error(
        "cannot listen on --http {addr}: {error}; pick a free port on an address of this host"
    )]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
    },
}

impl Config {
    pub fn new(
        addr: SocketAddr,
        token: Option<String>,
        ready_min: usize,
    ) -> Result<Self, HttpError> {
        if let Some(t) = &token {
            if t.is_empty() {
                return Err(HttpError::EmptyToken);
            }
            if !t.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(HttpError::BadToken);
            }
        }
        if token.is_none() && !addr.ip().is_loopback() {
            return Err(HttpError::NeedsToken(addr));
        }
        Ok(Config {
            addr,
            token,
            ready_min,
        })
    }

    /// Binds the address (before the runtime starts, so a busy port fails the start).
    pub fn bind(&self) -> Result<std::net::TcpListener, HttpError> {
        let bound = std::net::TcpListener::bind(self.addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l));
        bound.map_err(|error| HttpError::Bind {
            addr: self.addr,
            error,
        })
    }
}

/// Parses `--http`: `PORT` (on 127.0.0.1), `HOST:PORT` or `[V6]:PORT`, `localhost:PORT`.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    if let Some(port) = s.strip_prefix("localhost:") {
        if let Ok(port) = port.parse::<u16>() {
            return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
        }
    }
    s.parse().map_err(|_| {
        format!("`{s}` is not an address: use PORT, IP:PORT or [IPV6]:PORT (e.g. 9464 or 127.0.0.1:9464)")
    })
}

/// What every connection shares.
struct Server {
    config: Config,
    tx: UnboundedSender<Event>,
    events: broadcast::Sender<Arc<str>>,
    /// Connections closed because [`MAX_CONNECTIONS`] were open.
    refused: Cell<u64>,
    /// Events `/events` clients skipped because they were behind.
    skipped: Rc<Cell<u64>>,
    open: Cell<usize>,
}

/// A tap for [`crate::logs::Logger::set_tap`] and the server that follows it.
pub fn event_tap() -> broadcast::Sender<Arc<str>> {
    broadcast::channel(EVENT_BACKLOG).0
}

/// Serves until aborted.
pub async fn serve(
    listener: std::net::TcpListener,
    config: Config,
    tx: UnboundedSender<Event>,
    events: broadcast::Sender<Arc<str>>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(_) => return,
    };
    let server = Rc::new(Server {
        config,
        tx,
        events,
        refused: Cell::new(0),
        skipped: Rc::new(Cell::new(0)),
        open: Cell::new(0),
    });
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // Out of descriptors, or the like: wait rather than spin.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if server.open.get() >= MAX_CONNECTIONS {
            server.refused.set(server.refused.get() + 1);
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        // What the kernel keeps for a client that does not read is bounded too.
        let _ = socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER);
        server.open.set(server.open.get() + 1);
        let server = Rc::clone(&server);
        tokio::task::spawn_local(async move {
            connection(&server, stream).await;
            server.open.set(server.open.get() - 1);
        });
    }
}

type Body = Either<Full<Bytes>, Channel<Bytes>>;

/// Whether a connection became an event stream, and when that stream gave up on its client.
#[derive(Default)]
struct Streaming {
    on: Cell<bool>,
    ended: tokio::sync::Notify,
}

/// One connection, one request; bounded in time unless it became an event stream, which
/// ends when its client goes away or stops reading (see [`sse`]).
async fn connection(server: &Rc<Server>, stream: tokio::net::TcpStream) {
    let streaming = Rc::new(Streaming::default());
    let svc = {
        let server = Rc::clone(server);
        let streaming = Rc::clone(&streaming);
        hyper::service::service_fn(move |req| {
            let server = Rc::clone(&server);
            let streaming = Rc::clone(&streaming);
            async move { Ok::<_, Infallible>(answer(&server, req, &streaming).await) }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .keep_alive(false)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = &mut conn => return,
        () = tokio::time::sleep(ANSWER_TIMEOUT) => {}
    }
    if streaming.on.get() {
        // A client that stopped reading cannot take even the stream's end: drop it then.
        tokio::select! {
            _ = &mut conn => {}
            () = streaming.ended.notified() => {}
        }
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    respond(status, "text/plain; charset=utf-8", body)
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut r = Response::new(Either::Left(Full::new(body.into())));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// Asks the supervisor; `None` when its loop did not answer within [`LOOP_TIMEOUT`].
async fn ask<T>(server: &Server, query: impl FnOnce(oneshot::Sender<T>) -> Query) -> Option<T> {
    let (reply, answer) = oneshot::channel();
    server.tx.send(Event::Observe(query(reply))).ok()?;
    tokio::time::timeout(LOOP_TIMEOUT, answer).await.ok()?.ok()
}

fn unavailable() -> Response<Body> {
    text(
        StatusCode::SERVICE_UNAVAILABLE,
        "the supervisor's loop did not answer\n",
    )
}

async fn answer(
    server: &Server,
    req: Request<Incoming>,
    streaming: &Rc<Streaming>,
) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    if server.config.token.is_none() && !loopback_host(&req) {
        return text(
            StatusCode::MISDIRECTED_REQUEST,
            "without --http-token herd answers only requests for a loopback host (Host: 127.0.0.1, [::1] or localhost)\n",
        );
    }
    let path = req.uri().path();
    let open = matches!(path, "/live" | "/ready" | "/" | "/index.html");
    if !open && !authorized(&server.config, &req) {
        let mut r = text(
            StatusCode::UNAUTHORIZED,
            "send the --http-token as `Authorization: Bearer TOKEN`\n",
        );
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    match path {
        "/live" => match ask(server, Query::Readiness).await {
            Some(_) => text(StatusCode::OK, "live\n"),
            None => unavailable(),
        },
        "/ready" => match ask(server, Query::Readiness).await {
            Some(r) => ready(r, server.config.ready_min),
            None => unavailable(),
        },
        "/status" => match ask(server, Query::Status).await {
            Some(status) => respond(
                StatusCode::OK,
                "application/json",
                serde_json::to_string_pretty(&status).unwrap_or_default(),
            ),
            None => unavailable(),
        },
        "/metrics" => match ask(server, Query::Metrics).await {
            Some(snapshot) => {
                let extra = metrics::HttpCounters {
                    refused: server.refused.get(),
                    skipped: server.skipped.get(),
                };
                respond(
                    StatusCode::OK,
                    metrics::CONTENT_TYPE,
                    metrics::render(&snapshot, extra),
                )
            }
            None => unavailable(),
        },
        "/samples" => match ask(server, Query::Samples).await {
            Some(json) => respond(StatusCode::OK, "application/json", json),
            None => unavailable(),
        },
        "/events" => {
            streaming.on.set(true);
            sse::stream(
                server.events.subscribe(),
                &server.skipped,
                Rc::clone(streaming),
            )
        }
        "/" | "/index.html" => {
            let mut r = respond(StatusCode::OK, "text/html; charset=utf-8", DASHBOARD);
            r.headers_mut().insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; frame-ancestors 'none'",
                ),
            );
            r
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; herd serves /, /metrics, /ready, /live, /status, /samples and /events\n",
        ),
    }
}

fn ready(r: Readiness, min: usize) -> Response<Body> {
    if r.stopping {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: stopping (draining)\n",
        );
    }
    let line = format!(
        "{} of {} workers ready (--ready-min {min})\n",
        r.ready, r.desired
    );
    if r.ready >= min {
        text(StatusCode::OK, format!("ready: {line}"))
    } else {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {line}"),
        )
    }
}

/// `Authorization: Bearer TOKEN` with the configured token; anything goes without one.
fn authorized(config: &Config, req: &Request<Incoming>) -> bool {
    let Some(token) = &config.token else {
        return true;
    };
    let Some(given) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
    else {
        return false;
    };
    constant_time_eq(given, token.as_bytes())
}

/// Equal, in a time that depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

/// The request names a loopback host: an IP that is loopback, or `localhost`.
fn loopback_host(req: &Request<Incoming>) -> bool {
    let Some(host) = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
    else {
        // HTTP/1.0 without Host: no browser sends that.
        return true;
    };
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_default_to_loopback() {
        assert_eq!(
            parse_addr("9464"),
            Ok("127.0.0.1:9464".parse().expect("addr"))
        );
        assert_eq!(
            parse_addr("localhost:1"),
            Ok("127.0.0.1:1".parse().expect("addr"))
        );
        assert_eq!(parse_addr("[::1]:2"), Ok("[::1]:2".parse().expect("addr")));
        assert!(parse_addr("example.com:80")
            .unwrap_err()
            .contains("not an address"));
    }

    #[test]
    fn a_public_address_needs_a_token() {
        let public: SocketAddr = "0.0.0.0:9464".parse().expect("addr");
        let err = Config::new(public, None, 1).unwrap_err().to_string();
        assert!(err.contains("--http-token"), "{err}");
        assert!(Config::new(public, Some("s3cret".into()), 1).is_ok());
        assert!(Config::new(public, Some(String::new()), 1).is_err());
        assert!(Config::new(public, Some("a b".into()), 1).is_err());
        assert!(Config::new("127.0.0.1:1".parse().expect("addr"), None, 1).is_ok());
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
    }
}
