//! examples/counter under herd with a real redis-server: the state every worker must see lives
//! in Redis, and a Redis outage makes the workers answer 503 at once and leave rotation
//! (`{herd: 'unready'}`) instead of hanging or crash-looping.
//!
//! Each test starts its own `redis-server` on a free loopback port and kills it by pid. Without
//! redis-server or `examples/counter/node_modules` (`npm ci --prefix examples/counter`) the
//! tests are skipped, and fail under CI (`util::prerequisite_missing`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::{home_of, poll_until, prerequisite_missing, status, Herd, WAIT};

/// The example's directory.
fn example_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/counter")
}

/// The example's app.js, or None (reported) when redis-server or its node_modules is missing.
fn prerequisites() -> Option<String> {
    let dir = example_dir();
    if !dir.join("node_modules/express").is_dir() || !dir.join("node_modules/redis").is_dir() {
        prerequisite_missing(
            "examples/counter/node_modules (run: npm ci --prefix examples/counter)",
        );
        return None;
    }
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        prerequisite_missing("redis-server (apt-get install redis-server)");
        return None;
    }
    Some(dir.join("app.js").to_string_lossy().into_owned())
}

/// A redis-server of this test's own, on 127.0.0.1:port, no persistence; SIGKILLed by pid on
/// drop.
struct Redis {
    port: u16,
    child: Option<Child>,
}

impl Redis {
    fn start() -> Redis {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let mut redis = Redis { port, child: None };
        redis.restart();
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts redis-server on the same port and waits until it answers PING.
    fn restart(&mut self) {
        assert!(self.child.is_none(), "redis-server is already running");
        let port = self.port.to_string();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        poll_until("redis-server to answer PING", || {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("redis-server on port {port} exited at start: {status}");
                }
            }
            ping(self.port).then_some(())
        });
    }

    /// SIGKILL, like a crash: connections are cut, nothing is said to the clients.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn ping(port: u16) -> bool {
    let dest = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut s) = TcpStream::connect_timeout(&dest, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// `herd run -i 2 … examples/counter/app.js` on port 0 against `redis`, the rate limiter off.
fn start_counter(app: &str, redis: &Redis) -> Herd {
    let herd = spawn_counter(app, redis);
    herd.wait_ready();
    herd
}

/// herd with examples/counter, not waiting for `all_ready` (which a worker that tells herd
/// it is unready at start keeps from coming).
fn spawn_counter(app: &str, redis: &Redis) -> Herd {
    let url = format!("REDIS_URL={}", redis.url());
    Herd::start(&[
        "-i",
        "2",
        "--name",
        "counter",
        "-e",
        "PORT=0",
        "-e",
        &url,
        "-e",
        "RATE_LIMIT=0",
        app,
    ])
}

// ---- a keep-alive HTTP/1.1 client that keeps its cookies ---------------------------------

struct Client {
    port: u16,
    conn: Option<BufReader<TcpStream>>,
    cookies: BTreeMap<String, String>,
}

struct Answer {
    status: u16,
    body: Value,
    took: Duration,
}

impl Client {
    fn new(port: u16) -> Client {
        Client {
            port,
            conn: None,
            cookies: BTreeMap::new(),
        }
    }

    /// One request on the client's connection (opened when there is none); the connection is
    /// kept for the next request.
    fn send(&mut self, method: &str, path: &str) -> io::Result<Answer> {
        let started = Instant::now();
        if self.conn.is_none() {
            let dest = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
            let s = TcpStream::connect_timeout(&dest, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(20)))?;
            s.set_write_timeout(Some(Duration::from_secs(20)))?;
            self.conn = Some(BufReader::new(s));
        }
        let result = self.exchange(method, path);
        if result.is_err() {
            self.conn = None;
        }
        let (status, body) = result?;
        Ok(Answer {
            status,
            body,
            took: started.elapsed(),
        })
    }

    fn exchange(&mut self, method: &str, path: &str) -> io::Result<(u16, Value)> {
        let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
        let cookie: Vec<String> = self
            .cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: counter\r\nContent-Length: 0\r\n");
        if !cookie.is_empty() {
            req.push_str(&format!("Cookie: {}\r\n", cookie.join("; ")));
        }
        req.push_str("\r\n");
        let conn = self.conn.as_mut().expect("connected");
        conn.get_mut().write_all(req.as_bytes())?;
        let mut line = String::new();
        conn.read_line(&mut line)?;
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(format!("no status line: {line:?}")))?;
        let mut length = None;
        loop {
            line.clear();
            conn.read_line(&mut line)?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let Some((name, value)) = header.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value.parse::<usize>().ok();
            } else if name.eq_ignore_ascii_case("set-cookie") {
                if let Some((k, v)) = value.split(';').next().and_then(|c| c.split_once('=')) {
                    self.cookies.insert(k.to_string(), v.to_string());
                }
            }
        }
        let length = length.ok_or_else(|| bad("no Content-Length".into()))?;
        let mut body = vec![0; length];
        conn.read_exact(&mut body)?;
        let body =
            serde_json::from_slice(&body).map_err(|e| bad(format!("body is not JSON: {e}")))?;
        Ok((status, body))
    }
}

fn pid_of(body: &Value) -> u32 {
    body["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no pid in {body}")) as u32
}

/// `count` of an answer body.
fn count_of(body: &Value) -> u64 {
    body["count"]
        .as_u64()
        .unwrap_or_else(|| panic!("no count in {body}"))
}

/// Worker lines from `from` on that contain `text`, per pid.
fn lines_per_pid(herd: &Herd, from: usize, text: &str) -> BTreeMap<u64, usize> {
    let mut per = BTreeMap::new();
    for e in herd.events().iter().skip(from) {
        if e["line"].as_str().is_some_and(|l| l.contains(text)) {
            if let Some(pid) = e["pid"].as_u64() {
                *per.entry(pid).or_default() += 1;
            }
        }
    }
    per
}

/// Whether every one of `pids` has told herd `{"herd": state}` since event `from`: herd logs
/// a message it does not act on as a `message` event with the data; one that acts on it may
/// log an event named after the state instead.
fn told_herd(events: &[Value], from: usize, pids: &BTreeSet<u32>, state: &str) -> bool {
    let told: BTreeSet<u32> = events
        .iter()
        .skip(from)
        .filter(|e| e["data"]["herd"] == state || e["event"] == state)
        .filter_map(|e| e["pid"].as_u64())
        .map(|p| p as u32)
        .collect();
    pids.is_subset(&told)
}

// ---- the tests --------------------------------------------------------------------------------

#[test]
fn two_workers_share_one_counter_and_one_session_in_redis() {
    let Some(app) = prerequisites() else { return };
    let redis = Redis::start();
    let herd = start_counter(&app, &redis);
    let port = herd.port();

    // One client with one session cookie, a new connection per request so that herd's
    // round-robin spreads the requests over both workers.
    let mut client = Client::new(port);
    let n = 20;
    let mut counts = Vec::new();
    let mut pids = BTreeSet::new();
    for i in 1..=n {
        client.conn = None;
        let a = client.send("POST", "/count").expect("POST /count");
        assert_eq!(a.status, 200, "POST /count #{i}: {}", a.body);
        counts.push(count_of(&a.body));
        pids.insert(pid_of(&a.body));
        assert_eq!(
            a.body["session"]["count"].as_u64(),
            Some(i),
            "the session's own count moves with every increment, on whichever worker: {}",
            a.body
        );
    }
    assert!(
        client.cookies.contains_key("counter.sid"),
        "no session cookie: {:?}",
        client.cookies
    );
    assert_eq!(pids.len(), 2, "both workers answered: {pids:?}");
    let expected: Vec<u64> = (1..=n).collect();
    assert_eq!(
        counts, expected,
        "every increment, from both pids, adds up to one counter"
    );

    let total = Client::new(port).send("GET", "/count").expect("GET /count");
    assert_eq!(count_of(&total.body), n);

    // The anti-pattern: each worker has counted only what it served itself.
    let mut memory: BTreeMap<u32, u64> = BTreeMap::new();
    poll_until("both workers to answer GET /memory-count", || {
        let a = Client::new(port).send("GET", "/memory-count").ok()?;
        memory.insert(pid_of(&a.body), count_of(&a.body));
        (memory.len() == 2).then_some(())
    });
    for (pid, m) in &memory {
        assert!(
            *m < n,
            "worker {pid}'s in-memory count {m} should miss the other worker's"
        );
    }
    assert_eq!(
        memory.values().sum::<u64>(),
        n,
        "the in-memory counts split the total: {memory:?}"
    );
}

#[test]
fn redis_down_answers_503_at_once_and_leaves_rotation_then_comes_back() {
    let Some(app) = prerequisites() else { return };
    let mut redis = Redis::start();
    let herd = start_counter(&app, &redis);
    let port = herd.port();
    let workers: BTreeSet<u32> = herd.worker_pids().into_iter().collect();
    assert_eq!(workers.len(), 2);

    // A keep-alive connection to each worker, opened while Redis is up: requests on them reach
    // their worker whether or not herd still routes new connections to it.
    let mut clients: BTreeMap<u32, Client> = BTreeMap::new();
    poll_until("a keep-alive connection to each worker", || {
        let mut c = Client::new(port);
        let a = c.send("POST", "/count").ok()?;
        assert_eq!(a.status, 200, "{}", a.body);
        clients.entry(pid_of(&a.body)).or_insert(c);
        (clients.len() == 2).then_some(())
    });

    let mark = herd.mark();
    redis.kill();
    let outage = Instant::now();

    // Every worker: 503 JSON, fast, many times over, on its own connection.
    let mut refused = 0;
    for (pid, c) in clients.iter_mut() {
        poll_until("a 503 once Redis is gone", || {
            let a = c.send("POST", "/count").expect("POST /count in the outage");
            assert_eq!(pid_of(&a.body), *pid);
            (a.status == 503).then_some(())
        });
        for _ in 0..10 {
            let a = c.send("POST", "/count").expect("POST /count in the outage");
            assert_eq!(a.status, 503, "{}", a.body);
            assert_eq!(a.body["error"], "redis unavailable", "{}", a.body);
            assert_eq!(
                a.body["applied"], false,
                "nothing left the process: {}",
                a.body
            );
            assert!(
                a.took < Duration::from_millis(500),
                "a 503 took {:?}: requests must not wait for Redis",
                a.took
            );
            let h = c.send("GET", "/health").expect("GET /health");
            assert_eq!(h.status, 503, "{}", h.body);
            assert_eq!(h.body["redis"], "down", "{}", h.body);
            refused += 1;
        }
    }
    assert_eq!(refused, 20);

    // Both workers left rotation, once each, and stayed alive (not a crash loop).
    herd.wait_for("both workers to tell herd they are not ready", |events| {
        told_herd(events, mark, &workers, "unready")
    });
    let logged = lines_per_pid(&herd, mark, "Redis unreachable");
    assert_eq!(
        logged.values().copied().collect::<Vec<_>>(),
        vec![1, 1],
        "one log line per worker per outage, not one per request: {logged:?}\n{}",
        herd.dump()
    );
    assert!(
        outage.elapsed() < WAIT,
        "the outage checks themselves took {:?}",
        outage.elapsed()
    );

    let mark = herd.mark();
    redis.restart();
    herd.wait_for("both workers to tell herd they are ready again", |events| {
        told_herd(events, mark, &workers, "ready")
    });
    for (pid, c) in clients.iter_mut() {
        let a = poll_until("POST /count to succeed again", || {
            let a = c
                .send("POST", "/count")
                .expect("POST /count after the outage");
            (a.status == 200).then_some(a)
        });
        assert_eq!(pid_of(&a.body), *pid, "the same worker, not a replacement");
    }
    let after: BTreeSet<u32> = herd.worker_pids().into_iter().collect();
    assert_eq!(
        after,
        workers,
        "no worker was replaced over the outage\n{}",
        herd.dump()
    );
    let s = status(&home_of(&herd), "counter");
    assert_eq!(s["ready"], 2, "both workers ready again: {s:#}");
}

#[test]
fn redis_down_at_start_is_not_a_crash_loop_and_unready_comes_after_listening() {
    let Some(app) = prerequisites() else { return };
    let mut redis = Redis::start();
    redis.kill();
    let herd = spawn_counter(&app, &redis);
    // Each worker is ready (listening) and then unready, so `all_ready` never comes.
    herd.wait_for("both workers ready once", |events| {
        events.iter().filter(|e| e["event"] == "ready").count() >= 2
    });
    let port = herd.port();
    let workers: BTreeSet<u32> = herd.worker_pids().into_iter().collect();
    assert_eq!(workers.len(), 2);

    herd.wait_for("both workers to tell herd they are not ready", |events| {
        told_herd(events, 0, &workers, "unready")
    });
    // herd marks a Node worker ready on `listening`: an `unready` sent before it would be
    // overtaken by it. Each worker's comes after its own `ready` event.
    let events = herd.events();
    for pid in &workers {
        let at = |pred: &dyn Fn(&Value) -> bool| {
            events
                .iter()
                .position(|e| e["pid"] == *pid && pred(e))
                .unwrap_or_else(|| panic!("no such event for {pid}\n{}", herd.dump()))
        };
        let ready = at(&|e| e["event"] == "ready");
        let unready = at(&|e| e["data"]["herd"] == "unready" || e["event"] == "unready");
        assert!(
            ready < unready,
            "worker {pid}: unready (event {unready}) before ready (event {ready})\n{}",
            herd.dump()
        );
    }
    let a = Client::new(port)
        .send("POST", "/count")
        .expect("POST /count");
    assert_eq!(a.status, 503, "{}", a.body);

    let mark = herd.mark();
    redis.restart();
    herd.wait_for("both workers to tell herd they are ready", |events| {
        told_herd(events, mark, &workers, "ready")
    });
    let a = Client::new(port)
        .send("POST", "/count")
        .expect("POST /count");
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(count_of(&a.body), 1);
    let after: BTreeSet<u32> = herd.worker_pids().into_iter().collect();
    assert_eq!(after, workers, "no worker was restarted\n{}", herd.dump());
}
