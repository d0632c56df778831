//! `--watchdog`: a Node worker whose event loop stops (a busy loop, or SIGSTOP) is declared
//! hung, killed and restarted, and a client running through it loses nothing beyond the
//! requests the hung worker already held.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::support::{home_of, index_of, is, start_node, status, who_is, worker_in, Client};
use crate::util::{get, pid_alive, pid_in, ts_ms, Herd};

/// `--watchdog 1s`, and herd checks once a second: a hang must be seen within this long of
/// the worker going silent, both moments stamped by herd (the `ts` of the worker's last line
/// and of the `hung` event), so a loaded test machine does not stretch it.
const DETECTED_WITHIN_MS: i64 = 5_000;
/// The same seen from the test's own clock, generous for a loaded machine: a watchdog that
/// never fires still fails the test.
const SEEN_WITHIN: Duration = Duration::from_secs(20);

/// Milliseconds from the worker's last words (`line`, stamped by herd when it read them)
/// to the `hung` event, checked against [`DETECTED_WITHIN_MS`].
fn assert_detected_in_time(herd: &Herd, mark: usize, victim: u32, line: &str, hung: &Value) {
    let last = herd.wait_event_after(&format!("the victim's {line:?}"), mark, |e| {
        e["pid"] == victim && e["line"] == line
    });
    let ms = ts_ms(hung) - ts_ms(&last);
    eprintln!("hung declared {ms} ms after the worker's {line:?}");
    assert!(
        ms <= DETECTED_WITHIN_MS,
        "the hang was declared {ms} ms after the worker went silent (watchdog 1s, at most \
         {DETECTED_WITHIN_MS} ms)\n{}",
        herd.dump()
    );
}

/// Two round-robin workers, a sequential client; `GET trigger` makes the worker that answers
/// go silent. It must be declared hung within [`DETECTED_WITHIN`], die, and its slot must get
/// a new ready worker that serves; the client may lose at most 2 requests.
fn hung_worker_is_replaced(name: &str, trigger: &str, silent_line: &str, died_by: &[i64]) {
    let herd = start_node(name, 2, &["--watchdog", "1s"]);
    herd.wait_ready();
    let port = herd.port();
    let home = home_of(&herd);
    let client = Client::start(port, "/", None);
    client.wait_more(20);

    let mark = herd.mark();
    let asked = Instant::now();
    let answer = get(port, trigger).expect("the trigger request is answered");
    assert_eq!(answer.status, 200, "{answer:?}");
    let victim = pid_in(&answer);
    let (instance, old_id) = who_is(&herd, victim);

    let hung = herd.wait_event_after("the hung event", mark, |e| is(e, "hung", old_id));
    let detected = asked.elapsed();
    let out_of_routing = client.offset(Instant::now());
    eprintln!("{name}: {trigger} → hung after {detected:?}: {hung}");
    assert!(
        detected <= SEEN_WITHIN,
        "the hang was seen {detected:?} after {trigger} (watchdog 1s)\n{}",
        herd.dump()
    );
    assert_detected_in_time(&herd, mark, victim, silent_line, &hung);
    // Until it is gone, status shows it hung, and it does not count as ready.
    let s = status(&home, name);
    if let Some(w) = s["workers"]
        .as_array()
        .and_then(|ws| ws.iter().find(|w| w["pid"] == victim))
    {
        assert_eq!(w["state"], "hung", "the hung worker in status: {s:#}");
        assert!(
            s["ready"].as_u64() < Some(2),
            "a hung worker is not counted ready: {s:#}"
        );
    }
    assert_eq!(hung["instance"], instance, "{hung}");
    assert_eq!(hung["reason"], "hung", "{hung}");
    assert!(
        hung["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "hung says why: {hung}"
    );

    let exited = herd.wait_event_after("the hung worker's exit", mark, |e| is(e, "exited", old_id));
    assert_eq!(exited["expected"], false, "{exited}");
    assert!(
        died_by.iter().any(|&s| exited["signal"] == s),
        "killed by one of signals {died_by:?}: {exited}"
    );
    assert!(!pid_alive(victim), "the hung worker {victim} is gone");

    let ready = herd.wait_event_after("a new ready worker in the hung one's slot", mark, |e| {
        e["event"] == "ready" && e["instance"] == instance && e["worker_id"] != old_id
    });
    let new_pid = ready["pid"].as_u64().expect("pid") as u32;
    let events = herd.events();
    let hung_at = index_of(&events, mark, |e| is(e, "hung", old_id)).expect("hung seen");
    let ready_at = index_of(&events, mark, |e| e == &ready).expect("ready seen");
    assert!(hung_at < ready_at, "the new worker came after the hang");

    // The client keeps going through the new worker.
    client.wait_more(30);
    let report = client.finish();
    eprintln!(
        "{name}: {} requests, {} failed, slowest {:?}; failures: {:?}",
        report.total(),
        report.failures().len(),
        report.slowest(),
        report.failures()
    );
    // What the hung worker had already taken may fail; nothing sent after it was declared
    // hung may.
    report.assert_failures_at_most(2, &format!("{name}: a worker hung under the client"));
    let late: Vec<_> = report
        .failures()
        .into_iter()
        .filter(|o| o.at >= out_of_routing)
        .collect();
    assert!(
        late.is_empty(),
        "requests sent after the hang was detected (at {out_of_routing:?}) failed: {late:?}"
    );
    assert!(
        report.pids().contains(&new_pid),
        "the new worker {new_pid} served the client: {:?}",
        report.pids()
    );
    let s = status(&home, name);
    let slot = worker_in(&s, instance, "ready").unwrap_or_else(|| panic!("slot {instance}: {s:#}"));
    assert_eq!(
        slot["restarts_by_reason"],
        serde_json::json!({ "hung": 1 }),
        "{s:#}"
    );
    let other = worker_in(&s, 1 - instance, "ready").unwrap_or_else(|| panic!("{s:#}"));
    assert_eq!(
        other["restarts_by_reason"],
        serde_json::json!({}),
        "the other slot was left alone: {s:#}"
    );
}

#[test]
fn a_worker_stuck_in_a_busy_loop_is_declared_hung_and_replaced() {
    // SIGABRT kills a busy loop; SIGKILL follows if it did not.
    hung_worker_is_replaced(
        "hang-loop",
        "/hang",
        "hanging",
        &[libc::SIGABRT as i64, libc::SIGKILL as i64],
    );
}

#[test]
fn a_worker_that_sigstops_itself_is_declared_hung_and_replaced() {
    // A stopped process keeps SIGABRT pending: only SIGKILL ends it.
    hung_worker_is_replaced(
        "hang-stop",
        "/stop",
        "stopping myself",
        &[libc::SIGKILL as i64],
    );
}

#[test]
fn an_idle_hung_worker_is_found_by_the_event_loop_ping() {
    // No traffic after the trigger: only herd's ping through the IPC channel can tell.
    let name = "hang-idle";
    let herd = start_node(name, 2, &["--watchdog", "1s"]);
    herd.wait_ready();
    let port = herd.port();
    let mark = herd.mark();
    let asked = Instant::now();
    let answer = get(port, "/hang").expect("the trigger request is answered");
    let victim = pid_in(&answer);
    let (instance, old_id) = who_is(&herd, victim);
    let hung = herd.wait_event_after("the hung event", mark, |e| is(e, "hung", old_id));
    let detected = asked.elapsed();
    eprintln!("{name}: hung after {detected:?}: {hung}");
    assert!(
        detected <= SEEN_WITHIN,
        "the hang was seen {detected:?} after /hang\n{}",
        herd.dump()
    );
    assert_detected_in_time(&herd, mark, victim, "hanging", &hung);
    // Found through herd's ping (a gated NODE_HANDLE message); herd words it as "a
    // hand-off unanswered", as for a connection.
    assert!(
        hung["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "hung says why: {hung}"
    );
    herd.wait_event_after("a new ready worker in its slot", mark, |e| {
        e["event"] == "ready" && e["instance"] == instance && e["worker_id"] != old_id
    });
    let other = herd.wait_event("the other worker's ready", |e| {
        e["event"] == "ready" && e["instance"] == 1 - instance
    });
    assert!(
        !herd
            .events()
            .iter()
            .any(|e| e["event"] == "hung" && e["worker_id"] == other["worker_id"]),
        "the idle, healthy worker is not hung\n{}",
        herd.dump()
    );
}
