//! `herd status NAME --json`: the stable fields, memory as /proc sees it, and CPU of a busy
//! worker.

use std::collections::BTreeSet;

use serde_json::Value;

use super::support::{
    cli, home_of, ready_pids, settled, start_node, start_python, status, wait_status, workers,
};
use crate::util::{get, pid_alive, rss_kb};

fn field<'a>(v: &'a Value, key: &str) -> &'a Value {
    v.get(key)
        .unwrap_or_else(|| panic!("no field `{key}` in {v:#}"))
}

fn number(v: &Value, key: &str) -> f64 {
    field(v, key)
        .as_f64()
        .unwrap_or_else(|| panic!("`{key}` is not a number in {v:#}"))
}

#[test]
fn status_json_has_the_documented_fields() {
    let name = "ctl-fields";
    let herd = start_node(name, 2, &[]);
    herd.wait_ready();
    let home = home_of(&herd);
    let s = wait_status(&home, name, "every worker ready", |s| settled(s, 2));

    assert_eq!(field(&s, "name"), name);
    assert_eq!(field(&s, "state"), "running");
    assert_eq!(field(&s, "balance"), "round-robin");
    assert_eq!(field(&s, "kind"), "node");
    assert_eq!(field(&s, "pid"), herd.pid());
    assert_eq!(field(&s, "desired"), 2);
    assert_eq!(field(&s, "ready"), 2);
    assert!(number(&s, "uptime_ms") > 0.0, "{s:#}");
    let listen = field(&s, "listen").as_array().expect("listen is an array");
    assert_eq!(listen.len(), 1, "{s:#}");
    let mut instances = BTreeSet::new();
    let mut ids = BTreeSet::new();
    for w in workers(&s) {
        instances.insert(field(w, "instance").as_u64().expect("instance"));
        ids.insert(field(w, "worker_id").as_u64().expect("worker_id"));
        let pid = field(w, "pid").as_u64().expect("pid") as u32;
        assert!(pid_alive(pid), "{w}");
        assert_eq!(field(w, "state"), "ready");
        assert!(number(w, "uptime_ms") > 0.0, "{w}");
        assert_eq!(field(w, "restarts"), 0);
        assert!(number(w, "cpu_percent") >= 0.0, "{w}");
        assert!(number(w, "memory_bytes") > 0.0, "{w}");
        assert!(number(w, "connections") >= 0.0, "{w}");
    }
    assert_eq!(instances, BTreeSet::from([0, 1]), "{s:#}");
    assert_eq!(ids.len(), 2, "{s:#}");
    assert!(ids.iter().all(|&id| id >= 1), "{s:#}");

    // Round-robin: herd hands each connection over, and counts it.
    let port = herd.port();
    for _ in 0..6 {
        assert_eq!(get(port, "/").expect("request").status, 200);
    }
    let s = status(&home, name);
    let handed: u64 = workers(&s)
        .iter()
        .map(|w| w["connections"].as_u64().expect("connections"))
        .sum();
    assert!(handed >= 6, "connections counts the hand-overs: {s:#}");

    // memory_bytes is the worker's resident memory: VmRSS read around the same moment.
    for attempt in 0.. {
        let before: Vec<(u32, u64)> = ready_pids(&s)
            .into_iter()
            .map(|p| (p, rss_kb(p).expect("VmRSS") * 1024))
            .collect();
        let s = status(&home, name);
        let mut off = Vec::new();
        for (pid, rss_before) in before {
            let rss_after = rss_kb(pid).expect("VmRSS") * 1024;
            let w = workers(&s)
                .iter()
                .find(|w| w["pid"] == pid)
                .expect("same workers");
            let reported = number(w, "memory_bytes");
            let (lo, hi) = (rss_before.min(rss_after), rss_before.max(rss_after));
            let slack = (lo as f64 * 0.2).max(4.0 * 1024.0 * 1024.0);
            if reported < lo as f64 - slack || reported > hi as f64 + slack {
                off.push(format!(
                    "pid {pid}: memory_bytes {reported} vs VmRSS {rss_before}..{rss_after}"
                ));
            }
        }
        if off.is_empty() {
            break;
        }
        assert!(attempt < 3, "memory_bytes is VmRSS: {off:?}\n{s:#}");
    }
    let total: f64 = workers(&s).iter().map(|w| number(w, "memory_bytes")).sum();
    assert!(
        (number(&s, "memory_bytes") - total).abs() < 64.0 * 1024.0 * 1024.0,
        "{s:#}"
    );
    assert!(number(&s, "supervisor_memory_bytes") > 0.0, "{s:#}");

    // The text form shows the same app.
    let text = cli(&home, &["status", name]);
    text.assert_ok();
    assert!(text.stdout.contains("2 of 2 ready"), "{text}");
    for pid in ready_pids(&s) {
        assert!(text.stdout.contains(&pid.to_string()), "{text}");
    }
}

#[test]
fn status_of_socket_activation_workers() {
    let name = "ctl-fields-sa";
    let herd = start_python(name, 2, &[]);
    herd.wait_ready();
    let home = home_of(&herd);
    let s = wait_status(&home, name, "every worker ready", |s| settled(s, 2));
    assert_eq!(s["kind"], "socket-activation", "{s:#}");
    assert_eq!(s["balance"], "shared", "{s:#}");
    let port = herd.port();
    let listen = s["listen"][0].as_str().expect("listen");
    assert!(listen.ends_with(&format!(":{port}")), "{s:#}");
    let out = cli(&home, &["send", name, r#"{"x":1}"#]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("no message channel"), "{out}");
}

#[test]
fn cpu_percent_of_a_busy_worker_is_above_zero() {
    let name = "ctl-cpu";
    let herd = start_node(name, 1, &[]);
    herd.wait_ready();
    let port = herd.port();
    let home = home_of(&herd);
    let first = wait_status(&home, name, "ready", |s| settled(s, 1));
    let pid = *ready_pids(&first).first().expect("a worker");
    // This reading is the baseline: the next one covers the busy time only.
    for _ in 0..4 {
        let r = get(port, "/work?ms=250").expect("busy request");
        assert_eq!(r.status, 200);
    }
    let s = status(&home, name);
    let w = &workers(&s)[0];
    assert_eq!(w["pid"], pid, "{s:#}");
    let cpu = number(w, "cpu_percent");
    eprintln!("busy worker: cpu_percent {cpu}");
    assert!(cpu > 0.0, "a worker that just burnt 1 s of CPU: {s:#}");
    assert!(number(&s, "cpu_percent") > 0.0, "{s:#}");
}
