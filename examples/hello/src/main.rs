//! `hello`: the classic clustering demo, as a herd worker.
//!
//! One process, one thread, one core. Under herd, N copies share one listening socket:
//!
//! ```text
//! herd run -l 3000 -i 4 target/release/hello     # 4 workers on :3000
//! curl localhost:3000/                           # answered by one of the 4 pids
//! ```
//!
//! herd passes the socket at fd 3 (`LISTEN_FDS`); [`herd_worker::listeners`] takes it. Started
//! on its own, `hello` binds `127.0.0.1:$PORT` (default 3000) instead.
//!
//! | route | answer |
//! |---|---|
//! | `GET /` | spins the CPU for `WORK_MS` ms (default 0), then `{message, pid, instance, timestamp}` |
//! | `GET /health` | `{status, pid, uptime (s), memory (RSS bytes)}` |
//! | `GET /slow?ms=N` | sleeps N ms (default 1000) without blocking other requests |
//!
//! Readiness: `READY=1` once listening. Stop: on SIGTERM (or SIGINT) it closes its copy of
//! the listener (connections still queued go to the other workers), answers what comes in on
//! its open connections with `Connection: close` for up to `DRAIN_MS` (default 1000) so a
//! keep-alive client's next request is served instead of racing an idle close, then closes
//! what is left once requests in flight finish, and exits 0.

use std::convert::Infallible;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use herd_worker::Socket;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinSet;

type Error = Box<dyn std::error::Error>;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hello: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Error> {
    let app = Arc::new(App::from_env()?);
    // Before the runtime starts threads: `listeners()` edits the environment.
    let sockets = sockets()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(sockets, app))
}

/// The inherited listeners, or `127.0.0.1:$PORT` when not started by herd.
fn sockets() -> Result<Vec<Socket>, Error> {
    match herd_worker::listeners() {
        Ok(listeners) if !listeners.is_empty() => {
            Ok(listeners.into_iter().map(|l| l.socket).collect())
        }
        Ok(_) | Err(herd_worker::Error::NotActivated) => {
            let port = env_number("PORT", 3000)?;
            let addr = ("127.0.0.1", port);
            eprintln!("hello: no sockets from herd (LISTEN_FDS): binding 127.0.0.1:{port}");
            let listener = std::net::TcpListener::bind(addr).map_err(|e| {
                format!("cannot listen on 127.0.0.1:{port}: {e} (set PORT to another port)")
            })?;
            Ok(vec![Socket::Tcp(listener)])
        }
        Err(e) => Err(e.into()),
    }
}

async fn serve(sockets: Vec<Socket>, app: Arc<App>) -> Result<(), Error> {
    // Installed before READY=1, so a stop that follows at once is a drain, not a kill.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;

    let graceful = Arc::new(GracefulShutdown::new());
    let mut accepting = JoinSet::new();
    for socket in sockets {
        println!("hello: pid {} listening on {socket}", app.pid);
        let acceptor = match socket {
            Socket::Tcp(l) => {
                l.set_nonblocking(true)?;
                Acceptor::Tcp(tokio::net::TcpListener::from_std(l)?)
            }
            Socket::Unix(l) => {
                l.set_nonblocking(true)?;
                Acceptor::Unix(tokio::net::UnixListener::from_std(l)?)
            }
        };
        accepting.spawn(accept_loop(acceptor, app.clone(), graceful.clone()));
    }
    if let Err(e) = herd_worker::notify_ready() {
        eprintln!("hello: {e}");
    }

    let which = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    // Dropping the accept loops closes this worker's copy of each listener.
    accepting.abort_all();
    while accepting.join_next().await.is_some() {}
    let _ = herd_worker::notify_stopping();
    eprintln!(
        "hello: pid {} got {which}: draining {} connection(s)",
        app.pid,
        graceful.count()
    );
    // Closing an idle keep-alive connection now would race with the client's next request
    // on it (the request is lost, the client sees a reset). For a while, every answer
    // carries `Connection: close` instead, so busy connections end after their next answer.
    app.draining.store(true, Ordering::SeqCst);
    let grace = Instant::now() + app.drain;
    while graceful.count() > 0 && Instant::now() < grace {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if let Some(graceful) = Arc::into_inner(graceful) {
        graceful.shutdown().await;
    }
    Ok(())
}

enum Acceptor {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

async fn accept_loop(acceptor: Acceptor, app: Arc<App>, graceful: Arc<GracefulShutdown>) {
    loop {
        let accepted = match &acceptor {
            Acceptor::Tcp(l) => l
                .accept()
                .await
                .map(|(s, _)| spawn_connection(s, &app, &graceful)),
            Acceptor::Unix(l) => l
                .accept()
                .await
                .map(|(s, _)| spawn_connection(s, &app, &graceful)),
        };
        if let Err(e) = accepted {
            // EMFILE and friends: back off instead of spinning.
            eprintln!("hello: accept failed: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn spawn_connection<S>(stream: S, app: &Arc<App>, graceful: &GracefulShutdown)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let app = app.clone();
    let service = service_fn(move |req| {
        let app = app.clone();
        async move {
            let mut response = app.respond(req).await;
            if app.draining.load(Ordering::SeqCst) {
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(response)
        }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new()) // enables the 30 s limit on reading request headers
        .serve_connection(TokioIo::new(stream), service);
    let conn = graceful.watch(conn);
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("hello: connection: {e}");
        }
    });
}

/// What every request needs, read once at start.
struct App {
    pid: u32,
    /// `HERD_INSTANCE`, the worker's slot (a string, as Node's `process.env` gives it).
    instance: Option<String>,
    started: Instant,
    /// `WORK_MS`: CPU time `GET /` burns, to show what clustering buys.
    work: Duration,
    /// `DRAIN_MS`: how long a stopping worker answers with `Connection: close` before it
    /// closes the connections left.
    drain: Duration,
    /// Set once stopping: answers carry `Connection: close`.
    draining: AtomicBool,
}

impl App {
    fn from_env() -> Result<Self, Error> {
        Ok(App {
            pid: std::process::id(),
            instance: std::env::var("HERD_INSTANCE").ok(),
            started: Instant::now(),
            work: Duration::from_millis(env_number("WORK_MS", 0)?),
            drain: Duration::from_millis(env_number("DRAIN_MS", 1000)?),
            draining: AtomicBool::new(false),
        })
    }

    async fn respond(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET {
            return not_found();
        }
        match req.uri().path() {
            "/" => {
                busy(self.work);
                json_response(
                    StatusCode::OK,
                    json!({
                        "message": "hello from herd",
                        "pid": self.pid,
                        "instance": self.instance,
                        "timestamp": unix_ms(),
                    }),
                )
            }
            "/health" => json_response(
                StatusCode::OK,
                json!({
                    "status": "ok",
                    "pid": self.pid,
                    "uptime": self.started.elapsed().as_secs_f64(),
                    "memory": rss_bytes(),
                }),
            ),
            "/slow" => {
                let Some(ms) = query_ms(req.uri().query()) else {
                    let error = json!({"error": "ms must be a number of milliseconds"});
                    return json_response(StatusCode::BAD_REQUEST, error);
                };
                tokio::time::sleep(Duration::from_millis(ms)).await;
                json_response(
                    StatusCode::OK,
                    json!({"message": "slow hello from herd", "pid": self.pid, "ms": ms}),
                )
            }
            _ => not_found(),
        }
    }
}

/// Burns CPU on purpose: a sleep would let the one thread serve others meanwhile.
fn busy(work: Duration) {
    let until = Instant::now() + work;
    while Instant::now() < until {
        std::hint::spin_loop();
    }
}

/// `ms` from `/slow`'s query string; 1000 when absent, `None` when not a number.
fn query_ms(query: Option<&str>) -> Option<u64> {
    let value = query
        .unwrap_or("")
        .split('&')
        .find_map(|pair| pair.strip_prefix("ms="));
    match value {
        None => Some(1000),
        Some(v) => v.parse().ok(),
    }
}

fn unix_ms() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

/// Resident memory in bytes (`VmRSS` in `/proc/self/status`, which is in kB), or null.
fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kb: u64 = line.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

fn env_number<T: std::str::FromStr>(var: &str, default: T) -> Result<T, Error> {
    match std::env::var(var) {
        Err(_) => Ok(default),
        Ok(text) => text
            .parse()
            .map_err(|_| format!("{var}={text:?} is not a valid number").into()),
    }
}

fn json_response(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn not_found() -> Response<Full<Bytes>> {
    json_response(StatusCode::NOT_FOUND, json!({"error": "not found"}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_takes_ms_from_the_query() {
        assert_eq!(query_ms(None), Some(1000));
        assert_eq!(query_ms(Some("ms=250")), Some(250));
        assert_eq!(query_ms(Some("x=1&ms=5")), Some(5));
        assert_eq!(query_ms(Some("ms=soon")), None);
    }

    #[test]
    fn reads_its_own_memory() {
        assert!(rss_bytes().is_some_and(|b| b > 0));
    }
}
