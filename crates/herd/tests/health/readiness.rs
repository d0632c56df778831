//! `--ready notify` for socket-activation workers: a worker counts as ready on `READY=1`
//! and not before (not even after the 1 s that counts without `--ready`), gets no
//! connection before it, and a reload waits for each new worker's `READY=1` before it stops
//! the old one.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::support::{
    env_arg, home_of, index_of, is, spawn_cli, start_python, status, wait_status, worker_in,
    workers, Client,
};
use crate::util::{get, Herd, TempDir, WAIT};

/// Longer than the 1 s after which a socket-activation worker counts as ready without
/// `--ready notify`.
const WINDOW: Duration = Duration::from_millis(1500);

/// The ids of the workers spawned so far, waiting for `n` of them.
fn spawned_ids(herd: &Herd, n: usize) -> Vec<u64> {
    herd.wait_for(&format!("{n} spawned workers"), |events| {
        events.iter().filter(|e| e["event"] == "spawned").count() >= n
    });
    herd.events()
        .iter()
        .filter(|e| e["event"] == "spawned")
        .map(|e| e["worker_id"].as_u64().expect("worker_id"))
        .collect()
}

#[test]
fn a_worker_is_not_ready_and_gets_no_connection_before_ready_1() {
    let name = "gated";
    let gate = TempDir::new();
    let herd = start_python(
        name,
        2,
        &[
            "--balance",
            "shared",
            "--ready",
            "notify",
            "-e",
            &env_arg("READY_GATE", gate.path()),
        ],
    );
    let port = herd.port();
    let ids = spawned_ids(&herd, 2);
    // Both are up and waiting for their gate.
    herd.wait_for("both workers started", |events| {
        events
            .iter()
            .filter(|e| e["line"].as_str().is_some_and(|l| l.starts_with("fds: ")))
            .count()
            == 2
    });
    let home = home_of(&herd);

    // A request now waits in the listen backlog: no worker accepts before READY=1.
    let started = Instant::now();
    let request = std::thread::spawn(move || (get(port, "/"), started.elapsed()));
    let window_end = Instant::now() + WINDOW;
    while Instant::now() < window_end {
        let s = status(&home, name);
        assert_eq!(s["ready"], 0, "nothing is ready before READY=1: {s:#}");
        assert!(
            workers(&s).iter().all(|w| w["state"] == "starting"),
            "both workers are starting: {s:#}"
        );
        assert!(
            !request.is_finished(),
            "the request was answered before any READY=1"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let events = herd.events();
    assert!(
        !events
            .iter()
            .any(|e| e["event"] == "ready" || e["event"] == "all_ready"),
        "no worker counted ready before READY=1 (after {WINDOW:?})\n{}",
        herd.dump()
    );

    // The first worker sends READY=1: it is ready, and it serves the waiting request.
    let mark = herd.mark();
    std::fs::write(gate.join(&format!("go-{}", ids[0])), b"").expect("open the gate");
    let ready = herd.wait_event_after("the first worker's ready", mark, |e| is(e, "ready", ids[0]));
    assert_eq!(ready["via"], "notify", "{ready}");
    assert!(
        ready["ms"].as_u64() >= Some(WINDOW.as_millis() as u64),
        "ready only once it said so: {ready}"
    );
    let (answer, took) = request.join().expect("the request thread");
    let answer = answer.expect("the waiting request is answered once a worker is ready");
    assert_eq!(answer.status, 200, "{answer:?}");
    let body: Value = answer.json();
    assert_eq!(
        body["pid"], ready["pid"],
        "the ready worker answered: {body}"
    );
    assert!(took >= WINDOW, "answered after {took:?}");
    let line_at = index_of(&herd.events(), 0, |e| {
        e["worker_id"] == ids[0] && e["line"] == "sending READY=1"
    });
    assert!(line_at.is_some(), "the worker said it sent READY=1");

    let s = status(&home, name);
    assert_eq!(s["ready"], 1, "{s:#}");
    assert!(worker_in(&s, 1, "starting").is_some(), "{s:#}");
    assert!(
        !herd.events().iter().any(|e| e["event"] == "all_ready"),
        "not all ready while one still waits"
    );

    std::fs::write(gate.join(&format!("go-{}", ids[1])), b"").expect("open the gate");
    herd.wait_ready();
    let s = wait_status(&home, name, "both ready", |s| s["ready"] == 2);
    assert!(workers(&s).iter().all(|w| w["state"] == "ready"), "{s:#}");
}

#[test]
fn reload_waits_for_each_new_workers_ready_1_before_stopping_the_old_one() {
    const DELAY_MS: u64 = 2000;
    let name = "slowready";
    let herd = start_python(
        name,
        2,
        &[
            "--balance",
            "shared",
            "--ready",
            "notify",
            "-e",
            &format!("READY_DELAY_MS={DELAY_MS}"),
        ],
    );
    herd.wait_ready();
    let port = herd.port();
    let home = home_of(&herd);
    for e in herd.events().iter().filter(|e| e["event"] == "ready") {
        assert!(e["ms"].as_u64() >= Some(DELAY_MS), "{e}");
        assert_eq!(e["via"], "notify", "{e}");
    }
    let s = status(&home, name);
    let old: Vec<(u64, Value)> = (0..2)
        .map(|i| {
            let w = worker_in(&s, i, "ready").unwrap_or_else(|| panic!("{s:#}"));
            (w["worker_id"].as_u64().expect("id"), w["pid"].clone())
        })
        .collect();

    let client = Client::start(port, "/", None);
    client.wait_more(10);
    let mark = herd.mark();
    let reload = spawn_cli(&home, &["reload", name]).finish(WAIT);
    assert_eq!(reload.code, Some(0), "{reload:?}\n{}", herd.dump());
    herd.wait_named_after("reload", mark);
    client.wait_more(10);
    let report = client.finish();
    eprintln!(
        "{name}: reload took {:?}; {} requests, {} failed",
        reload.took,
        report.total(),
        report.failures().len()
    );
    assert!(
        reload.took >= Duration::from_millis(2 * DELAY_MS),
        "two new workers, one after the other, each {DELAY_MS} ms to READY=1: the reload cannot finish in {:?}",
        reload.took
    );

    let events = herd.events();
    let reload_at = index_of(&events, mark, |e| e["event"] == "reload").expect("seen");
    for (instance, (old_id, old_pid)) in old.iter().enumerate() {
        let spawned = index_of(&events, mark, |e| {
            e["event"] == "spawned" && e["instance"] == instance as u64
        })
        .unwrap_or_else(|| panic!("slot {instance} got a new worker\n{}", herd.dump()));
        let new_id = events[spawned]["worker_id"].as_u64().expect("id");
        let ready = index_of(&events, spawned, |e| is(e, "ready", new_id))
            .unwrap_or_else(|| panic!("worker {new_id} became ready\n{}", herd.dump()));
        assert!(
            events[ready]["ms"].as_u64() >= Some(DELAY_MS),
            "{}",
            events[ready]
        );
        assert_eq!(events[ready]["via"], "notify", "{}", events[ready]);
        let exited = index_of(&events, mark, |e| is(e, "exited", *old_id))
            .unwrap_or_else(|| panic!("old worker {old_id} exited\n{}", herd.dump()));
        assert_eq!(events[exited]["pid"], *old_pid);
        assert_eq!(events[exited]["expected"], true, "{}", events[exited]);
        assert!(
            spawned < ready && ready < exited && exited < reload_at,
            "slot {instance}: new worker spawned ({spawned}), then ready ({ready}), then the old one exited ({exited}), then the reload ended ({reload_at})\n{}",
            herd.dump()
        );
    }
    report.assert_failures_at_most(0, "a reload with slow READY=1");
}
