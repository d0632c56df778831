//! The recycling limits, `--max-memory` and `--max-requests`: a worker over a limit is
//! replaced the reload way (its successor is ready before it exits), one at a time, and a
//! client running through the app loses no request.

use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};

use super::support::{
    current_workers, herd_events, home_of, replacements, start_node, wait_status, worker_in,
    workers, Client, Replacement,
};
use crate::util::{get, rss_kb, Herd, WAIT};

/// Panics if a worker exited without being asked to (these tests expect no crash).
fn assert_no_crash(herd: &Herd) {
    let crashed: Vec<Value> = herd
        .events()
        .into_iter()
        .filter(|e| e["event"] == "exited" && e["expected"] != true)
        .collect();
    assert!(
        crashed.is_empty(),
        "workers crashed: {crashed:?}\n{}",
        herd.dump()
    );
}

/// Waits until every `replacing` since `mark` has its `replace` (finished) event.
fn wait_replacements_done(herd: &Herd, mark: usize, at_least: usize) {
    herd.wait_for(
        &format!("at least {at_least} replacements, all finished"),
        |events| {
            let count = |name: &str| {
                events
                    .iter()
                    .skip(mark)
                    .filter(|e| e["event"] == name)
                    .count()
            };
            let queued = count("replacing");
            queued >= at_least && count("replace") == queued
        },
    );
}

/// The `replacing` events since `mark`, by old worker id.
fn replacing_events(events: &[Value], mark: usize) -> BTreeMap<u64, Vec<Value>> {
    let mut by_worker: BTreeMap<u64, Vec<Value>> = BTreeMap::new();
    for (_, e) in herd_events(events, mark) {
        if e["event"] == "replacing" {
            let id = e["worker_id"].as_u64().expect("worker_id");
            by_worker.entry(id).or_default().push(e.clone());
        }
    }
    by_worker
}

/// The pid of worker `id`, from its `spawned` event.
fn pid_of(events: &[Value], id: u64) -> u32 {
    events
        .iter()
        .find(|e| e["event"] == "spawned" && e["worker_id"] == id)
        .and_then(|e| e["pid"].as_u64())
        .expect("spawned event") as u32
}

/// Sends `GET /grow?mb=60&pid=PID` until worker `pid` holds at least `mb` megabytes.
/// Round-robin decides who answers; only `pid` grows.
fn grow(port: u16, pid: u32, mb: u64) {
    let path = format!("/grow?mb=60&pid={pid}");
    for _ in 0..100 {
        let r = get(port, &path).expect("GET /grow is answered");
        assert_eq!(r.status, 200, "{r:?}");
        let body = r.json();
        if body["pid"] == pid && body["held_mb"].as_u64() >= Some(mb) {
            return;
        }
    }
    panic!("worker {pid} never answered 100 requests for /grow");
}

#[test]
fn workers_over_max_memory_are_replaced_one_at_a_time_without_a_failed_request() {
    let name = "mem";
    let herd = start_node(name, 2, &["--max-memory", "140M"]);
    herd.wait_ready();
    let port = herd.port();
    let home = home_of(&herd);
    let first = wait_status(&home, name, "both workers ready", |s| {
        workers(s).len() == 2 && workers(s).iter().all(|w| w["state"] == "ready")
    });
    let pids: Vec<u32> = workers(&first)
        .iter()
        .map(|w| w["pid"].as_u64().expect("pid") as u32)
        .collect();
    for &pid in &pids {
        let kb = rss_kb(pid).expect("worker RSS");
        assert!(
            kb + 60 * 1024 < 140 * 1024,
            "worker {pid} starts at {kb} kB: one 60 MB step must stay under --max-memory 140M"
        );
    }

    let client = Client::start(port, "/", None);
    client.wait_more(20);
    let mark = herd.mark();
    let current = current_workers(&herd.events(), mark);
    // Both workers go over the limit (60 MB + 60 MB + Node's own ~45 MB > 140 MB), at
    // about the same time.
    for &pid in &pids {
        grow(port, pid, 120);
    }
    wait_replacements_done(&herd, mark, 2);
    client.wait_more(30);
    let report = client.finish();
    eprintln!(
        "{name}: {} requests, {} failed, slowest {:?}",
        report.total(),
        report.failures().len(),
        report.slowest()
    );
    assert_no_crash(&herd);

    let events = herd.events();
    let done = replacements(&events, mark, current);
    assert_eq!(
        done.len(),
        2,
        "two replacements: {done:#?}\n{}",
        herd.dump()
    );
    let mut instances: Vec<u64> = done.iter().map(|r| r.instance).collect();
    instances.sort_unstable();
    assert_eq!(instances, [0, 1], "each slot replaced once: {done:#?}");
    // The second worker is touched only once the first replacement is over.
    for r in &done {
        assert!(
            r.spawned < r.ready && r.ready < r.old_exited && r.old_exited < r.done,
            "{r:#?}"
        );
    }
    assert!(done[0].done < done[1].spawned, "one at a time: {done:#?}");
    let queued = replacing_events(&events, mark);
    assert_eq!(queued.len(), 2, "one `replacing` per worker: {queued:#?}");
    for (id, es) in &queued {
        assert_eq!(es.len(), 1, "worker {id} announced once: {es:#?}");
        assert_eq!(es[0]["reason"], "memory", "{}", es[0]);
        assert!(
            es[0]["detail"]
                .as_str()
                .is_some_and(|d| d.contains("max-memory")),
            "{}",
            es[0]
        );
        assert!(
            done.iter().any(|r| r.old == *id),
            "worker {id} was replaced"
        );
    }
    report.assert_failures_at_most(0, "workers recycled for memory");

    let s = wait_status(&home, name, "two ready workers", |s| {
        workers(s).len() == 2 && workers(s).iter().all(|w| w["state"] == "ready")
    });
    for instance in 0..2 {
        let w = worker_in(&s, instance, "ready").expect("a ready worker");
        assert_eq!(w["restarts_by_reason"], json!({ "memory": 1 }), "{s:#}");
        assert!(
            !pids.contains(&(w["pid"].as_u64().expect("pid") as u32)),
            "slot {instance} runs a new worker: {s:#}"
        );
    }
}

#[test]
fn max_requests_recycles_workers_one_at_a_time_without_a_failed_request() {
    const REQUESTS: usize = 600;
    let name = "maxreq";
    let herd = start_node(name, 2, &["--max-requests", "100"]);
    herd.wait_ready();
    let port = herd.port();
    let mark = herd.mark();
    let current = current_workers(&herd.events(), mark);

    let client = Client::start(port, "/", Some(REQUESTS));
    client.wait_for(REQUESTS, WAIT * 2);
    let report = client.finish();
    // Only this client connects, so a worker that answered it 100 times was handed 100
    // connections and must be recycled. Round-robin alternates, so both first workers
    // are; how many more depends on how fast successors start (the old worker serves
    // until its successor is ready).
    let mut answered: BTreeMap<u32, usize> = BTreeMap::new();
    for pid in report.outcomes.iter().filter_map(|o| o.pid) {
        *answered.entry(pid).or_default() += 1;
    }
    let heavy: BTreeSet<u32> = answered
        .iter()
        .filter(|(_, &n)| n >= 100)
        .map(|(&pid, _)| pid)
        .collect();
    eprintln!(
        "{name}: {} requests, {} failed, answers per worker {answered:?}, slowest {:?}",
        report.total(),
        report.failures().len(),
        report.slowest()
    );
    assert!(
        heavy.len() >= 2,
        "both first workers took 100: {answered:?}"
    );
    wait_replacements_done(&herd, mark, heavy.len());
    assert_no_crash(&herd);

    let events = herd.events();
    let done: Vec<Replacement> = replacements(&events, mark, current);
    let queued = replacing_events(&events, mark);
    assert_eq!(
        queued.values().map(Vec::len).sum::<usize>(),
        done.len(),
        "every `replacing` led to one replacement: {queued:#?}\n{done:#?}"
    );
    let mut recycled = BTreeSet::new();
    for (id, es) in &queued {
        assert_eq!(es.len(), 1, "worker {id} announced once: {es:#?}");
        assert_eq!(es[0]["reason"], "requests", "{}", es[0]);
        assert!(
            done.iter().any(|r| r.old == *id),
            "worker {id} was replaced"
        );
        recycled.insert(es[0]["pid"].as_u64().expect("pid") as u32);
    }
    assert_eq!(
        recycled, heavy,
        "exactly the workers that took 100 requests were recycled (answers per worker: {answered:?})\n{}",
        herd.dump()
    );
    report.assert_failures_at_most(0, "workers recycled by --max-requests");
    assert_eq!(report.total(), REQUESTS);
    assert!(
        done.iter()
            .all(|r| answered.contains_key(&pid_of(&events, r.old))),
        "every recycled worker served"
    );
}

#[test]
fn health_probes_do_not_count_toward_max_requests() {
    // `--max-requests 10` is about the app's requests: herd's own GET /health probes (handed
    // to a Node worker like connections) must not bring the recycling forward.
    const MAX: usize = 10;
    const PROBES: usize = 5;
    let name = "probe-maxreq";
    let dir = crate::util::TempDir::new();
    let max = MAX.to_string();
    let herd = start_node(
        name,
        1,
        &[
            "--max-requests",
            &max,
            "--health-check",
            "/health",
            "--health-interval",
            "500ms",
            "-e",
            &super::support::env_arg("HEALTH_DIR", dir.path()),
        ],
    );
    herd.wait_ready();
    let port = herd.port();
    let home = home_of(&herd);
    herd.wait_for(&format!("{PROBES} health probes"), |events| {
        events
            .iter()
            .filter(|e| e["line"] == "health probe 200")
            .count()
            >= PROBES
    });
    let first = herd.wait_named("ready")["worker_id"].clone();
    for n in 1..MAX {
        let r = get(port, "/").expect("request");
        assert_eq!(r.status, 200, "{r:?}");
        // The supervisor answers status after it handled the hand-off.
        let s = super::support::status(&home, name);
        assert!(
            s["state"] == "running"
                && workers(&s).len() == 1
                && workers(&s)[0]["worker_id"] == first,
            "after {n} requests (< --max-requests {MAX}) and {PROBES}+ probes the worker is already being replaced: {s:#}\n{}",
            herd.dump()
        );
    }
    let mark = herd.mark();
    get(port, "/").expect("request");
    let replacing = herd.wait_named_after("replacing", mark);
    assert_eq!(replacing["reason"], "requests", "{replacing}");
}
