//! `--health-check`: herd GETs each worker on its own (Node: a probe connection handed to
//! that worker; socket activation: a private `health` listener), replaces a worker after
//! `--health-failures` failed probes in a row, and leaves a healthy one alone.

use serde_json::{json, Value};

use super::support::{
    all_healthy, current_workers, env_arg, herd_events, home_of, index_of, is, replacements,
    start_node, start_python, status, wait_status, worker_in, Client,
};
use crate::util::{Herd, TempDir};

const FAILURES: u64 = 3;

fn health_args(dir: &TempDir) -> Vec<String> {
    health_args_with(dir, FAILURES)
}

fn health_args_with(dir: &TempDir, failures: u64) -> Vec<String> {
    vec![
        "-e".into(),
        env_arg("HEALTH_DIR", dir.path()),
        "--health-check".into(),
        "/health".into(),
        "--health-interval".into(),
        "500ms".into(),
        "--health-failures".into(),
        failures.to_string(),
    ]
}

fn id_of(w: &Value) -> u64 {
    w["worker_id"].as_u64().expect("worker_id")
}

/// Two workers, both healthy; then slot 0's worker starts answering 500 on /health. It must
/// be replaced after exactly [`FAILURES`] failed probes, the reload way; slot 1's worker
/// must see no failed probe and no replacement; a client running through it all loses
/// nothing; `herd status` counts one `unhealthy` restart for slot 0 only.
fn unhealthy_worker_is_replaced(herd: &Herd, name: &str, dir: &TempDir) {
    herd.wait_ready();
    let port = herd.port();
    let home = home_of(herd);
    let before = wait_status(&home, name, "both workers probed healthy", |s| {
        all_healthy(s, 2)
    });
    let victim = worker_in(&before, 0, "ready").expect("slot 0 worker");
    let (victim_id, victim_pid) = (id_of(victim), victim["pid"].clone());
    let healthy_id = id_of(worker_in(&before, 1, "ready").expect("slot 1 worker"));

    let client = Client::start(port, "/", None);
    client.wait_more(10);
    let mark = herd.mark();
    let current = current_workers(&herd.events(), mark);
    std::fs::write(dir.join(&format!("fail-{victim_id}")), b"").expect("create the fail file");

    let replacing = herd.wait_event_after("the unhealthy worker's `replacing`", mark, |e| {
        is(e, "replacing", victim_id)
    });
    assert_eq!(replacing["reason"], "unhealthy", "{replacing}");
    assert!(
        replacing["detail"]
            .as_str()
            .is_some_and(|d| d.contains(&format!("{FAILURES} failed probes")) && d.contains("500")),
        "{replacing}"
    );
    herd.wait_named_after("replace", mark);
    wait_status(&home, name, "a new, healthy worker in slot 0", |s| {
        all_healthy(s, 2)
            && worker_in(s, 0, "ready").is_some_and(|w| id_of(w) != victim_id)
            && worker_in(s, 1, "ready").is_some_and(|w| id_of(w) == healthy_id)
    });
    client.wait_more(20);
    let report = client.finish();
    eprintln!(
        "{name}: {} requests, {} failed, slowest {:?}",
        report.total(),
        report.failures().len(),
        report.slowest()
    );

    let events = herd.events();
    let replacing_at = index_of(&events, mark, |e| e == &replacing).expect("seen");
    let failed: Vec<u64> = herd_events(&events, mark)
        .iter()
        .filter(|(i, e)| *i < replacing_at && is(e, "probe_failed", victim_id))
        .map(|(_, e)| e["failures"].as_u64().expect("failures"))
        .collect();
    assert_eq!(
        failed,
        (1..=FAILURES).collect::<Vec<_>>(),
        "replaced after exactly {FAILURES} failed probes in a row\n{}",
        herd.dump()
    );
    let troubled: Vec<&Value> = herd_events(&events, mark)
        .into_iter()
        .map(|(_, e)| e)
        .filter(|e| {
            e["instance"] == 1
                && ["probe_failed", "replacing", "hung", "exited", "spawned"]
                    .iter()
                    .any(|n| e["event"] == *n)
        })
        .collect();
    assert!(
        troubled.is_empty(),
        "the healthy worker was left alone: {troubled:#?}"
    );
    let done = replacements(&events, mark, current);
    assert_eq!(done.len(), 1, "{done:#?}");
    assert_eq!((done[0].instance, done[0].old), (0, victim_id), "{done:#?}");
    let exited = &events[done[0].old_exited];
    assert_eq!(exited["pid"], victim_pid, "{exited}");

    report.assert_failures_at_most(0, &format!("{name}: an unhealthy worker replaced"));

    let s = status(&home, name);
    let slot0 = worker_in(&s, 0, "ready").expect("slot 0");
    assert_eq!(id_of(slot0), done[0].new, "{s:#}");
    assert_eq!(
        slot0["restarts_by_reason"],
        json!({ "unhealthy": 1 }),
        "{s:#}"
    );
    let slot1 = worker_in(&s, 1, "ready").expect("slot 1");
    assert_eq!(slot1["restarts_by_reason"], json!({}), "{s:#}");
    assert_eq!(id_of(slot1), healthy_id, "{s:#}");
}

#[test]
fn node_round_robin_worker_failing_its_health_check_is_replaced() {
    let dir = TempDir::new();
    let mut args = health_args(&dir);
    args.extend(["--balance".into(), "round-robin".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let herd = start_node("probe-rr", 2, &args);
    unhealthy_worker_is_replaced(&herd, "probe-rr", &dir);
}

#[test]
fn node_shared_worker_failing_its_health_check_is_replaced() {
    let dir = TempDir::new();
    let mut args = health_args(&dir);
    args.extend(["--balance".into(), "shared".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let herd = start_node("probe-shared", 2, &args);
    unhealthy_worker_is_replaced(&herd, "probe-shared", &dir);
}

#[test]
fn socket_activation_worker_failing_its_health_check_is_replaced() {
    let dir = TempDir::new();
    let args = health_args(&dir);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let herd = start_python("probe-py", 2, &args);
    unhealthy_worker_is_replaced(&herd, "probe-py", &dir);
    // The probes came in on the extra listener, named `health`, passed last.
    let events = herd.events();
    let fds: Vec<&str> = events
        .iter()
        .filter_map(|e| e["line"].as_str())
        .filter(|l| l.starts_with("fds: "))
        .collect();
    assert!(
        !fds.is_empty() && fds.iter().all(|l| *l == "fds: http:health"),
        "every worker got its app listener and then `health`: {fds:?}"
    );
    assert!(
        events.iter().any(|e| e["line"] == "probe on health: 500"),
        "the failing probes reached the health listener"
    );
}

#[test]
fn a_worker_whose_replacement_failed_is_still_probed_and_replaced_later() {
    // The successor of an unhealthy worker fails to start (a transient problem: here a bad
    // release, fixed right after). herd keeps the old worker serving, as a reload would —
    // but the old worker is still unhealthy: herd must keep probing it and replace it once
    // a successor can start.
    let name = "probe-retry";
    let dir = TempDir::new();
    let args = health_args(&dir);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let herd = start_node(name, 2, &args);
    herd.wait_ready();
    let home = home_of(&herd);
    let before = wait_status(&home, name, "both workers probed healthy", |s| {
        all_healthy(s, 2)
    });
    let victim_id = id_of(worker_in(&before, 0, "ready").expect("slot 0 worker"));

    let mark = herd.mark();
    std::fs::write(dir.join("broken"), b"").expect("break the release");
    std::fs::write(dir.join(&format!("fail-{victim_id}")), b"").expect("create the fail file");
    herd.wait_event_after("the unhealthy worker's `replacing`", mark, |e| {
        is(e, "replacing", victim_id)
    });
    let failed = herd.wait_named_after("op_failed", mark);
    eprintln!("{name}: the first replacement failed: {failed}");
    std::fs::remove_file(dir.join("broken")).expect("fix the release");

    let retry = herd.mark();
    herd.wait_event_after(
        "a probe of the still-unhealthy worker after its failed replacement (herd stopped probing it)",
        retry,
        |e| is(e, "probe_failed", victim_id),
    );
    herd.wait_named_after("replace", retry);
    let s = wait_status(&home, name, "a new, healthy worker in slot 0", |s| {
        all_healthy(s, 2) && worker_in(s, 0, "ready").is_some_and(|w| id_of(w) != victim_id)
    });
    let slot0 = worker_in(&s, 0, "ready").expect("slot 0");
    assert_eq!(
        slot0["restarts_by_reason"],
        json!({ "unhealthy": 1 }),
        "{s:#}"
    );
}

#[test]
fn a_worker_that_recovers_before_health_failures_is_kept() {
    // Two failed probes of five allowed, then healthy again: the count starts over, herd
    // says `healthy`, and nothing is replaced.
    let name = "probe-flap";
    let dir = TempDir::new();
    let args = health_args_with(&dir, 5);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let herd = start_node(name, 2, &args);
    herd.wait_ready();
    let home = home_of(&herd);
    let before = wait_status(&home, name, "both workers probed healthy", |s| {
        all_healthy(s, 2)
    });
    let victim_id = id_of(worker_in(&before, 0, "ready").expect("slot 0 worker"));

    let mark = herd.mark();
    let fail = dir.join(&format!("fail-{victim_id}"));
    // The worker fails exactly the next 2 probes and removes the file itself: no window in
    // which the test must act before the 5th failure.
    std::fs::write(&fail, b"2").expect("create the fail file");
    herd.wait_event_after("a second failed probe", mark, |e| {
        is(e, "probe_failed", victim_id) && e["failures"] == 2
    });
    let healthy = herd.wait_event_after("healthy again", mark, |e| is(e, "healthy", victim_id));
    eprintln!("{name}: {healthy}");
    assert!(!fail.exists(), "the worker removed its fail file");
    let s = wait_status(&home, name, "both healthy, same workers", |s| {
        all_healthy(s, 2)
    });
    assert_eq!(
        worker_in(&s, 0, "ready").map(id_of),
        Some(victim_id),
        "kept: {s:#}"
    );
    let events = herd.events();
    let worst = herd_events(&events, mark)
        .iter()
        .filter(|(_, e)| is(e, "probe_failed", victim_id))
        .filter_map(|(_, e)| e["failures"].as_u64())
        .max();
    assert!(worst < Some(5), "never reached 5 failures: {worst:?}");
    assert!(
        !herd_events(&events, mark)
            .iter()
            .any(|(_, e)| e["event"] == "replacing" || e["event"] == "spawned"),
        "nothing replaced\n{}",
        herd.dump()
    );
    assert_eq!(
        worker_in(&s, 0, "ready").map(|w| w["restarts_by_reason"].clone()),
        Some(json!({})),
        "{s:#}"
    );
}
