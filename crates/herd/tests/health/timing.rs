//! Health timings read from herd's own event timestamps (`ts`), so a loaded machine cannot
//! make them pass or fail by chance: the socket-activation watchdog (`WATCHDOG=1`), probe
//! timeouts, `--ready message` and `--ready delay:D`, and `--max-age` with its jitter.
//! Fixtures: `fixtures/tests15_worker.py` (socket activation) and `fixtures/app.js` (Node).

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::support::{
    all_healthy, current_workers, env_arg, herd_events, home_of, index_of, is, replacements,
    status, wait_status, who_is, worker_in, Client,
};
use crate::util::{
    get, pid_alive, pid_in, poll_until, start_named_listener, start_named_node, ts_ms, Herd,
    TempDir,
};

fn start_worker(name: &str, instances: usize, extra: &[&str]) -> Herd {
    let mut args = vec!["--ready", "notify"];
    args.extend_from_slice(extra);
    start_named_listener("tests15_worker.py", name, instances, &args)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

fn id_of(w: &Value) -> u64 {
    w["worker_id"].as_u64().expect("worker_id")
}

/// The first worker line of `worker_id` from `from` on that is exactly `line`, waiting for it.
fn line_of(herd: &Herd, from: usize, worker_id: u64, line: &str) -> Value {
    herd.wait_event_after(&format!("worker {worker_id}'s {line:?}"), from, |e| {
        e["worker_id"] == worker_id && e["line"] == line
    })
}

/// Requests `GET /` until worker `pid` answers one (shared balancing: the kernel picks).
fn served_by(port: u16, pid: u32) {
    poll_until(&format!("worker {pid} to answer a request"), || {
        get(port, "/")
            .ok()
            .filter(|r| r.status == 200 && pid_in(r) == pid)
    });
}

// ---- the socket-activation watchdog ----

/// `--watchdog 2s`; the fixture pings every 0.5 s.
const WATCHDOG_MS: i64 = 2000;

#[test]
fn a_socket_activation_worker_that_stops_sending_watchdog_is_hung_and_replaced() {
    let name = "wd-notify";
    let herd = start_worker(name, 2, &["--watchdog", "2s"]);
    herd.wait_ready();
    let port = herd.port();
    let home = home_of(&herd);
    herd.wait_for("both workers pinging", |events| {
        events.iter().filter(|e| e["line"] == "watchdog on").count() == 2
    });

    // Pinging keeps a worker alive: three watchdog periods of traffic, by herd's clock,
    // and nobody is hung.
    let client = Client::start(port, "/", None);
    let pinging_since = herd
        .events()
        .iter()
        .filter(|e| e["line"] == "watchdog on")
        .map(ts_ms)
        .max()
        .expect("seen");
    let window_end = pinging_since + 3 * WATCHDOG_MS;
    poll_until("three watchdog periods to pass", || {
        (now_ms() > window_end).then_some(())
    });
    client.wait_more(5);
    let report = client.finish();
    report.assert_failures_at_most(0, "workers that keep sending WATCHDOG=1");
    assert!(
        !herd.events().iter().any(|e| e["event"] == "hung"),
        "a worker sending WATCHDOG=1 every 0.5 s was declared hung (--watchdog 2s)\n{}",
        herd.dump()
    );

    // One worker stops pinging: hung, killed, replaced.
    let mark = herd.mark();
    let answer = get(port, "/mute").expect("the mute request is answered");
    assert_eq!(answer.status, 200, "{answer:?}");
    let victim = pid_in(&answer);
    let (instance, old_id) = who_is(&herd, victim);
    let stopped = line_of(&herd, mark, old_id, "watchdog stopped");
    let hung = herd.wait_event_after("the hung event", mark, |e| is(e, "hung", old_id));
    assert_eq!(hung["reason"], "hung", "{hung}");
    assert!(
        hung["detail"]
            .as_str()
            .is_some_and(|d| d.contains("WATCHDOG=1")),
        "hung says no WATCHDOG=1 came: {hung}"
    );
    let ms = ts_ms(&hung) - ts_ms(&stopped);
    eprintln!("{name}: hung {ms} ms after the worker stopped pinging");
    // The last ping came at most 0.5 s before `watchdog stopped`; herd checks every 0.5 s.
    assert!(
        ms <= WATCHDOG_MS + 6000,
        "the hang was declared {ms} ms after the last WATCHDOG=1 (--watchdog 2s)\n{}",
        herd.dump()
    );
    let exited = herd.wait_event_after("the hung worker's exit", mark, |e| is(e, "exited", old_id));
    assert_eq!(exited["expected"], false, "{exited}");
    assert!(
        [libc::SIGABRT as i64, libc::SIGKILL as i64]
            .iter()
            .any(|&s| exited["signal"] == s),
        "SIGABRT, or SIGKILL after it: {exited}"
    );
    assert!(!pid_alive(victim), "the hung worker {victim} is gone");
    let ready = herd.wait_event_after("a new worker in the hung one's slot", mark, |e| {
        e["event"] == "ready" && e["instance"] == instance && e["worker_id"] != old_id
    });
    let new_id = ready["worker_id"].as_u64().expect("worker_id");
    line_of(&herd, mark, new_id, "watchdog on");
    served_by(port, ready["pid"].as_u64().expect("pid") as u32);

    let events = herd.events();
    let hung_ids: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "hung")
        .map(|e| &e["worker_id"])
        .collect();
    assert_eq!(hung_ids, [&json!(old_id)], "only the muted worker hung");
    let s = status(&home, name);
    let slot = worker_in(&s, instance, "ready").unwrap_or_else(|| panic!("{s:#}"));
    assert_eq!(slot["restarts_by_reason"], json!({ "hung": 1 }), "{s:#}");
    let other = worker_in(&s, 1 - instance, "ready").unwrap_or_else(|| panic!("{s:#}"));
    assert_eq!(other["restarts_by_reason"], json!({}), "{s:#}");
}

// ---- probe timeouts ----

/// `--health-timeout`: longer than the 1 s health tick, so failures a tick apart cannot
/// pass for timeouts.
const PROBE_TIMEOUT_MS: i64 = 2000;

#[test]
fn a_probe_that_gets_no_answer_fails_after_the_timeout_and_the_worker_is_replaced() {
    let name = "probe-timeout";
    let dir = TempDir::new();
    let herd = start_worker(
        name,
        2,
        &[
            "-e",
            &env_arg("HANG_DIR", dir.path()),
            "--health-check",
            "/health",
            "--health-interval",
            "500ms",
            "--health-timeout",
            "2s",
            "--health-failures",
            "2",
        ],
    );
    herd.wait_ready();
    let home = home_of(&herd);
    let before = wait_status(&home, name, "both workers probed healthy", |s| {
        all_healthy(s, 2)
    });
    let victim_id = id_of(worker_in(&before, 0, "ready").expect("slot 0"));
    let healthy_id = id_of(worker_in(&before, 1, "ready").expect("slot 1"));

    let mark = herd.mark();
    std::fs::write(dir.join(&format!("hang-{victim_id}")), b"").expect("create the hang file");
    let replacing = herd.wait_event_after("the unanswering worker's `replacing`", mark, |e| {
        is(e, "replacing", victim_id)
    });
    assert_eq!(replacing["reason"], "unhealthy", "{replacing}");
    assert!(
        replacing["detail"]
            .as_str()
            .is_some_and(|d| d.contains("2 failed probes") && d.contains("no answer within 2.0s")),
        "{replacing}"
    );
    herd.wait_named_after("replace", mark);
    let s = wait_status(&home, name, "a new, healthy worker in slot 0", |s| {
        all_healthy(s, 2)
            && worker_in(s, 0, "ready").is_some_and(|w| id_of(w) != victim_id)
            && worker_in(s, 1, "ready").is_some_and(|w| id_of(w) == healthy_id)
    });
    assert_eq!(
        worker_in(&s, 0, "ready").map(|w| w["restarts_by_reason"].clone()),
        Some(json!({ "unhealthy": 1 })),
        "{s:#}"
    );

    let events = herd.events();
    let replacing_at = index_of(&events, mark, |e| e == &replacing).expect("seen");
    let failed: Vec<&Value> = herd_events(&events, mark)
        .into_iter()
        .filter(|(i, e)| *i < replacing_at && is(e, "probe_failed", victim_id))
        .map(|(_, e)| e)
        .collect();
    let counts: Vec<u64> = failed
        .iter()
        .filter_map(|e| e["failures"].as_u64())
        .collect();
    assert_eq!(
        counts,
        [1, 2],
        "two timed-out probes, then replaced\n{}",
        herd.dump()
    );
    let held: Vec<&Value> = events[mark..replacing_at]
        .iter()
        .filter(|e| e["worker_id"] == victim_id && e["line"] == "holding probe")
        .collect();
    assert_eq!(
        held.len(),
        2,
        "each probe reached the worker\n{}",
        herd.dump()
    );
    for (k, (f, h)) in failed.iter().zip(&held).enumerate() {
        assert!(
            f["message"]
                .as_str()
                .is_some_and(|m| m.contains("no answer within 2.0s")),
            "probe {k} failed for its timeout: {f}"
        );
        // The worker got the request (herd stamped its line) before herd gave up on it,
        // and herd gave up about the timeout later (never much more).
        let waited = ts_ms(f) - ts_ms(h);
        eprintln!("{name}: probe {k} failed {waited} ms after the worker held it");
        assert!(
            (0..=PROBE_TIMEOUT_MS + 5000).contains(&waited),
            "probe {k} failed {waited} ms after the worker held it (timeout 2s): {f}"
        );
    }
    // The second probe started only once the first had failed, and then waited the whole
    // timeout: the failures are at least the timeout apart.
    let gap = ts_ms(failed[1]) - ts_ms(failed[0]);
    assert!(
        gap >= PROBE_TIMEOUT_MS,
        "the second probe failed {gap} ms after the first: it did not wait --health-timeout 2s\n{}",
        herd.dump()
    );
    assert!(
        !herd_events(&events, mark)
            .iter()
            .any(|(_, e)| e["worker_id"] == healthy_id && e["event"] != "ready"),
        "the answering worker was left alone\n{}",
        herd.dump()
    );
}

// ---- --ready message / delay:D ----

/// A request sent while no worker is ready, answered on its own thread: the response and
/// the wall clock (ms since the epoch) when it came.
type Waiting = std::thread::JoinHandle<(std::io::Result<crate::util::Response>, i64)>;

fn request_in_background(port: u16) -> Waiting {
    std::thread::spawn(move || {
        let r = get(port, "/");
        (r, now_ms())
    })
}

#[test]
fn ready_message_counts_only_once_the_worker_sends_ready() {
    let name = "ready-msg";
    let gate_dir = TempDir::new();
    let gate = gate_dir.join("go");
    let herd = start_named_node(
        "app.js",
        name,
        1,
        &["--ready", "message", "-e", &env_arg("READY_GATE", &gate)],
    );
    let listening = herd.wait_line_after(0, "listening");
    let port = herd.port();
    let home = home_of(&herd);
    let request = request_in_background(port);

    // Listening is not ready: not after 1.5 s of herd's clock either.
    let window_end = ts_ms(&listening) + 1500;
    poll_until("1.5 s after listening", || {
        let s = status(&home, name);
        assert_eq!(s["ready"], 0, "nothing is ready before 'ready': {s:#}");
        assert!(!request.is_finished(), "answered before any 'ready'");
        (now_ms() > window_end).then_some(())
    });

    let opened = now_ms();
    std::fs::write(&gate, b"").expect("open the gate");
    let ready = herd.wait_named("ready");
    assert_eq!(ready["via"], "message", "{ready}");
    assert!(
        ts_ms(&ready) >= opened,
        "ready at {} but the worker could send 'ready' only from {opened} on\n{}",
        ts_ms(&ready),
        herd.dump()
    );
    let (answer, at) = request.join().expect("request thread");
    let answer = answer.expect("the waiting request is answered once the worker is ready");
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.json()["ready_sent"], true, "{answer:?}");
    assert!(at >= ts_ms(&ready), "answered at {at}, before ready");
}

/// `--ready delay:4s`.
const DELAY_MS: i64 = 4000;

#[test]
fn ready_delay_counts_only_after_the_delay() {
    let name = "ready-delay";
    let herd = start_named_node("app.js", name, 2, &["--ready", "delay:4s"]);
    let listening = herd.wait_line_after(0, "listening");
    let port = herd.port();
    let request = request_in_background(port);
    herd.wait_ready();
    let events = herd.events();
    let readies: Vec<&Value> = events.iter().filter(|e| e["event"] == "ready").collect();
    assert_eq!(readies.len(), 2, "{}", herd.dump());
    for ready in readies {
        let id = ready["worker_id"].as_u64().expect("worker_id");
        let spawned = events
            .iter()
            .find(|e| is(e, "spawned", id))
            .expect("spawned before ready");
        let after = ts_ms(ready) - ts_ms(spawned);
        eprintln!("{name}: worker {id} ready {after} ms after it was spawned");
        assert_eq!(ready["via"], "started", "{ready}");
        assert!(
            after >= DELAY_MS && ready["ms"].as_i64() >= Some(DELAY_MS),
            "worker {id} counted ready {after} ms after it was spawned (delay:4s): {ready}"
        );
    }
    let first_ready = events
        .iter()
        .filter(|e| e["event"] == "ready")
        .map(ts_ms)
        .min()
        .expect("a ready");
    let (answer, at) = request.join().expect("request thread");
    assert_eq!(answer.expect("answered").status, 200);
    assert!(
        at >= first_ready,
        "a request sent at `listening` ({}) was answered at {at}, before any worker was ready ({first_ready})",
        ts_ms(&listening)
    );
}

// ---- --max-age and its jitter ----

/// `--max-age 2s --max-age-jitter 2s`.
const AGE_MS: i64 = 2000;
const JITTER_MS: i64 = 2000;
/// herd reads ages once a second; a loaded machine may add more.
const AGE_LATE_MS: i64 = 1000 + 4000;

/// `2.5s` or `800ms` (herd's `human`) as milliseconds.
fn human_ms(text: &str) -> i64 {
    let parsed = if let Some(ms) = text.strip_suffix("ms") {
        ms.parse::<f64>().ok()
    } else {
        text.strip_suffix('s')
            .and_then(|s| s.parse::<f64>().ok())
            .map(|s| s * 1000.0)
    };
    parsed.unwrap_or_else(|| panic!("not a duration: {text:?}")) as i64
}

#[test]
fn max_age_replaces_workers_one_at_a_time_within_age_and_jitter() {
    let name = "max-age";
    let herd = start_worker(name, 2, &["--max-age", "2s", "--max-age-jitter", "2s"]);
    herd.wait_ready();
    let port = herd.port();
    let client = Client::start(port, "/", None);
    let start = index_of(&herd.events(), 0, |e| e["event"] == "all_ready").expect("all ready");
    // The two first workers and one successor.
    herd.wait_for("three replacements", |events| {
        events[start..]
            .iter()
            .filter(|e| e["event"] == "replace")
            .count()
            >= 3
    });
    client.wait_more(5);
    let report = client.finish();
    let events = herd.events();
    let last = events
        .iter()
        .enumerate()
        .filter(|(i, e)| *i >= start && e["event"] == "replace")
        .map(|(i, _)| i)
        .nth(2)
        .expect("three replaces");
    let events = &events[..=last];
    let done = replacements(events, start, current_workers(events, start));
    assert_eq!(done.len(), 3, "{done:#?}");

    let spawned_at: BTreeMap<u64, i64> = events
        .iter()
        .filter(|e| e["event"] == "spawned")
        .map(|e| (e["worker_id"].as_u64().expect("id"), ts_ms(e)))
        .collect();
    let mut limits = Vec::new();
    for r in &done {
        let replacing = events
            .iter()
            .find(|e| is(e, "replacing", r.old))
            .unwrap_or_else(|| panic!("worker {} was announced as replaced", r.old));
        assert_eq!(replacing["reason"], "age", "{replacing}");
        let detail = replacing["detail"].as_str().expect("detail");
        let limit = detail
            .rsplit_once("--max-age ")
            .map(|(_, l)| human_ms(l))
            .unwrap_or_else(|| panic!("the limit in {detail:?}"));
        let age = ts_ms(replacing) - spawned_at[&r.old];
        eprintln!(
            "{name}: worker {} replaced at {age} ms (its limit {limit} ms)",
            r.old
        );
        assert!(
            (AGE_MS..=AGE_MS + JITTER_MS).contains(&limit),
            "worker {}'s limit {limit} ms is outside --max-age 2s + jitter 0..2s: {replacing}",
            r.old
        );
        // `human` rounds the limit to 0.1 s.
        assert!(
            age >= AGE_MS && age + 50 >= limit,
            "worker {} was replaced {age} ms after it started, before its limit {limit} ms",
            r.old
        );
        assert!(
            age <= limit + 50 + AGE_LATE_MS,
            "worker {} was replaced {age} ms after it started, long after its limit {limit} ms",
            r.old
        );
        limits.push(limit);
    }
    assert!(
        limits.iter().any(|&l| l != limits[0]),
        "the jitter spreads the workers' limits: {limits:?}"
    );
    report.assert_failures_at_most(0, "workers replaced for their age");
}
