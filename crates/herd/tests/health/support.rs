//! What the health tests need beyond `util/`: starting the health fixtures, the herd CLI
//! against an app's `HERD_HOME` (bounded), `herd status --json`, a sequential client that
//! keeps every outcome, and reading replacements out of herd's event stream.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::{get, start_named_listener, start_named_node, wait_requests, Herd, WAIT};
pub use crate::util::{home_of, spawn_cli, status, wait_status, workers};

// ---- starting the fixtures ----

/// `herd run … -i N -e PORT=0 --name NAME EXTRA… fixtures/health_app.js` (Node).
pub fn start_node(name: &str, instances: usize, extra: &[&str]) -> Herd {
    start_named_node("health_app.js", name, instances, extra)
}

/// `herd run … -i N --listen 127.0.0.1:0 --name NAME EXTRA… fixtures/health_server.py`
/// (socket activation).
pub fn start_python(name: &str, instances: usize, extra: &[&str]) -> Herd {
    start_named_listener("health_server.py", name, instances, extra)
}

/// `-e KEY=VALUE` with a path value.
pub fn env_arg(key: &str, path: &Path) -> String {
    format!("{key}={}", path.display())
}

// ---- status ----

/// The worker a status shows for `instance` in state `state` (the slot's current one when
/// `state` is `ready`).
pub fn worker_in<'a>(status: &'a Value, instance: u64, state: &str) -> Option<&'a Value> {
    workers(status)
        .iter()
        .find(|w| w["instance"] == instance && w["state"] == state)
}

/// Whether every one of `instances` slots shows one ready worker whose last probe passed,
/// and nothing else.
pub fn all_healthy(status: &Value, instances: u64) -> bool {
    let ws = workers(status);
    ws.len() as u64 == instances
        && ws.iter().all(|w| {
            w["state"] == "ready" && w["health"].as_str().is_some_and(|h| h.starts_with("ok"))
        })
}

// ---- a sequential client ----

/// One request the [`Client`] made.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// When it started, since the client started.
    pub at: Duration,
    pub took: Duration,
    /// The worker that answered (a 200 with a pid in its body).
    pub pid: Option<u32>,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// One thread sending `GET path` in a loop, one connection per request and one request at
/// a time, until stopped or `limit` requests are done; every outcome is kept.
pub struct Client {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    thread: Option<JoinHandle<()>>,
    started: Instant,
}

/// Everything a [`Client`] saw.
#[derive(Debug)]
pub struct Report {
    pub outcomes: Vec<Outcome>,
}

impl Report {
    pub fn total(&self) -> usize {
        self.outcomes.len()
    }

    pub fn failures(&self) -> Vec<&Outcome> {
        self.outcomes.iter().filter(|o| o.error.is_some()).collect()
    }

    /// The worker pids that answered.
    pub fn pids(&self) -> BTreeSet<u32> {
        self.outcomes.iter().filter_map(|o| o.pid).collect()
    }

    /// The slowest request.
    pub fn slowest(&self) -> Duration {
        self.outcomes
            .iter()
            .map(|o| o.took)
            .max()
            .unwrap_or_default()
    }

    /// Panics unless at most `allowed` requests failed.
    pub fn assert_failures_at_most(&self, allowed: usize, what: &str) {
        let failures = self.failures();
        assert!(
            failures.len() <= allowed,
            "{what}: {} of {} requests failed (at most {allowed} allowed); first failures:\n{:#?}",
            failures.len(),
            self.total(),
            failures.iter().take(10).collect::<Vec<_>>()
        );
    }
}

impl Client {
    pub fn start(port: u16, path: &'static str, limit: Option<usize>) -> Client {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let (s, d, o) = (stop.clone(), done.clone(), outcomes.clone());
        let started = Instant::now();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) && limit.is_none_or(|l| d.load(Ordering::Relaxed) < l)
            {
                let at = started.elapsed();
                let result = get(port, path);
                let took = started.elapsed() - at;
                let (pid, error) = match result {
                    Ok(r) if r.status == 200 => {
                        let pid = serde_json::from_str::<Value>(&r.body)
                            .ok()
                            .and_then(|v| v["pid"].as_u64())
                            .map(|p| p as u32);
                        (pid, None)
                    }
                    Ok(r) => (None, Some(format!("status {}: {:?}", r.status, r.body))),
                    Err(e) => (None, Some(e.to_string())),
                };
                o.lock().unwrap_or_else(|e| e.into_inner()).push(Outcome {
                    at,
                    took,
                    pid,
                    error,
                });
                d.fetch_add(1, Ordering::Relaxed);
            }
        });
        Client {
            stop,
            done,
            outcomes,
            thread: Some(thread),
            started,
        }
    }

    /// `t` as an offset from the client's start (the clock of [`Outcome::at`]).
    pub fn offset(&self, t: Instant) -> Duration {
        t.saturating_duration_since(self.started)
    }

    /// Requests finished so far (answered or failed).
    pub fn done(&self) -> usize {
        self.done.load(Ordering::Relaxed)
    }

    /// Waits until `n` requests finished (bounded by `timeout`).
    pub fn wait_for(&self, n: usize, timeout: Duration) {
        wait_requests("the client", n, timeout, || self.done());
    }

    /// Waits for `n` more requests than now (bounded by [`WAIT`]).
    pub fn wait_more(&self, n: usize) {
        self.wait_for(self.done() + n, WAIT);
    }

    /// Stops the client (after the request in progress) and returns what it saw.
    pub fn finish(mut self) -> Report {
        self.halt();
        let outcomes =
            std::mem::take(&mut *self.outcomes.lock().unwrap_or_else(|e| e.into_inner()));
        Report { outcomes }
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.halt();
    }
}

// ---- events ----

/// herd's own events (not worker lines) in `events[from..]`, with their index in `events`.
pub fn herd_events(events: &[Value], from: usize) -> Vec<(usize, &Value)> {
    events
        .iter()
        .enumerate()
        .skip(from)
        .filter(|(_, e)| e.get("event").is_some())
        .collect()
}

/// The index of the first event in `events[from..]` that matches.
pub fn index_of(events: &[Value], from: usize, pred: impl Fn(&Value) -> bool) -> Option<usize> {
    events
        .iter()
        .enumerate()
        .skip(from)
        .find(|(_, e)| pred(e))
        .map(|(i, _)| i)
}

/// Whether `e` is herd event `name` about worker `worker_id`.
pub fn is(e: &Value, name: &str, worker_id: u64) -> bool {
    e["event"] == name && e["worker_id"] == worker_id
}

/// The slot and worker id of worker `pid`, from its `spawned` event.
pub fn who_is(herd: &Herd, pid: u32) -> (u64, u64) {
    let spawned = herd.wait_event(&format!("the spawned event of pid {pid}"), |e| {
        e["event"] == "spawned" && e["pid"] == pid
    });
    (
        spawned["instance"].as_u64().expect("instance"),
        spawned["worker_id"].as_u64().expect("worker_id"),
    )
}

/// Each slot's current worker after `events[..upto]`: the last one that became ready.
pub fn current_workers(events: &[Value], upto: usize) -> BTreeMap<u64, u64> {
    let mut current = BTreeMap::new();
    for e in &events[..upto] {
        if e["event"] == "ready" {
            current.insert(
                e["instance"].as_u64().expect("instance"),
                e["worker_id"].as_u64().expect("worker_id"),
            );
        }
    }
    current
}

/// One replacement read from the events: slot, the worker it replaced and its successor,
/// and the indexes of each step.
#[derive(Debug, Clone)]
pub struct Replacement {
    pub instance: u64,
    pub old: u64,
    pub new: u64,
    pub spawned: usize,
    pub ready: usize,
    pub old_exited: usize,
    /// herd's `replace` event: the operation finished.
    pub done: usize,
}

/// A replacement whose `replace` event has not come yet.
struct InProgress {
    instance: u64,
    old: u64,
    new: u64,
    spawned: usize,
    ready: Option<usize>,
    old_exited: Option<usize>,
}

/// Reads the replacements in `events[from..]` and checks how each went, panicking with the
/// events on a violation:
/// - one at a time: no replacement worker is spawned before the previous replacement's
///   `replace` (finished) event;
/// - the successor's `ready` comes before the old worker's `exited`, which is `expected`;
/// - every `replace` event closes a replacement whose old worker is gone.
///
/// Every `spawned` in the range must be a replacement (the caller makes sure nothing
/// crashed). `current` is each slot's worker at `from` (see [`current_workers`]).
pub fn replacements(
    events: &[Value],
    from: usize,
    mut current: BTreeMap<u64, u64>,
) -> Vec<Replacement> {
    let fail = |what: String| -> ! {
        let shown: Vec<String> = herd_events(events, from)
            .iter()
            .map(|(i, e)| format!("{i}: {e}"))
            .collect();
        panic!("{what}\n--- herd events ---\n{}", shown.join("\n"));
    };
    let mut done = Vec::new();
    let mut open: Option<InProgress> = None;
    for (i, e) in herd_events(events, from) {
        let id = e["worker_id"].as_u64();
        match e["event"].as_str() {
            Some("spawned") => {
                let instance = e["instance"].as_u64().expect("instance");
                let id = id.expect("worker_id");
                if let Some(other) = &open {
                    fail(format!(
                        "event {i}: worker {id} for slot {instance} was spawned while the replacement of slot {} was still in progress: two replacements at once",
                        other.instance
                    ));
                }
                let Some(&old) = current.get(&instance) else {
                    fail(format!(
                        "event {i}: slot {instance} had no worker to replace"
                    ));
                };
                open = Some(InProgress {
                    instance,
                    old,
                    new: id,
                    spawned: i,
                    ready: None,
                    old_exited: None,
                });
            }
            Some("ready") => {
                if let Some(r) = open.as_mut().filter(|r| id == Some(r.new)) {
                    r.ready = Some(i);
                }
            }
            Some("exited") => {
                let Some(r) = &mut open else {
                    fail(format!("event {i}: a worker exited outside a replacement"));
                };
                if id != Some(r.old) {
                    fail(format!(
                        "event {i}: worker {id:?} exited during the replacement of slot {}",
                        r.instance
                    ));
                }
                if r.ready.is_none() {
                    fail(format!(
                        "event {i}: the old worker {} of slot {} exited before its successor {} was ready",
                        r.old, r.instance, r.new
                    ));
                }
                if e["expected"] != true {
                    fail(format!("event {i}: worker {} exited unexpectedly", r.old));
                }
                r.old_exited = Some(i);
            }
            Some("replace") => {
                let Some(r) = open.take() else {
                    fail(format!(
                        "event {i}: a `replace` with no replacement running"
                    ));
                };
                let (Some(ready), Some(old_exited)) = (r.ready, r.old_exited) else {
                    fail(format!(
                        "event {i}: slot {}'s replacement finished before {} was ready and {} had exited",
                        r.instance, r.new, r.old
                    ));
                };
                current.insert(r.instance, r.new);
                done.push(Replacement {
                    instance: r.instance,
                    old: r.old,
                    new: r.new,
                    spawned: r.spawned,
                    ready,
                    old_exited,
                    done: i,
                });
            }
            _ => {}
        }
    }
    if let Some(r) = open {
        fail(format!(
            "the replacement of slot {} did not finish",
            r.instance
        ));
    }
    done
}
