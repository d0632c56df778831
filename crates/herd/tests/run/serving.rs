//! Several socket-activation workers serving one port, and a worker replaced after a crash.

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use serde_json::Value;

use super::{start_inherit, start_inherit_on};
use crate::util::{get, get_unix, kill, pid_in, Response, TempDir, WAIT};

/// `n` requests to `/slow?ms=MS` at once. A worker is busy while it sleeps, so the others
/// must accept the rest: this reaches several workers without relying on the kernel's luck.
pub fn concurrent_slow(port: u16, n: usize, ms: u64) -> Vec<Response> {
    let path = format!("/slow?ms={ms}");
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n).map(|_| s.spawn(|| get(port, &path))).collect();
        handles
            .into_iter()
            .map(|h| {
                let r = h.join().expect("request thread").expect("request");
                assert_eq!(r.status, 200, "{r:?}");
                r
            })
            .collect()
    })
}

#[test]
fn two_workers_serve_one_port() {
    let herd = start_inherit(2, &[]);
    herd.wait_ready();
    let port = herd.port();
    let mut pids = BTreeSet::new();
    for _ in 0..20 {
        for r in concurrent_slow(port, 2, 150) {
            pids.insert(pid_in(&r));
        }
        if pids.len() >= 2 {
            break;
        }
    }
    assert_eq!(pids.len(), 2, "answered by {pids:?}\n{}", herd.dump());
    let spawned: BTreeSet<u32> = herd.worker_pids().into_iter().collect();
    assert_eq!(pids, spawned, "answers came from herd's workers");
}

#[test]
fn a_killed_worker_is_replaced_in_the_same_slot_with_a_new_worker_id() {
    let herd = start_inherit(2, &[]);
    herd.wait_ready();
    let port = herd.port();
    let victim = get(port, "/").expect("request").json();
    let victim_pid = victim["pid"].as_u64().expect("pid") as u32;
    let instance: u64 = str_field(&victim, "herd_instance")
        .parse()
        .expect("instance");
    let old_id: u64 = str_field(&victim, "herd_worker_id").parse().expect("id");

    let mark = herd.mark();
    let killed_at = Instant::now();
    kill(victim_pid, libc::SIGKILL);
    let exited = herd.wait_event_after("the victim's exit", mark, |e| {
        e["event"] == "exited" && e["pid"] == victim_pid
    });
    assert_eq!(exited["signal"], 9, "{exited}");
    assert_eq!(exited["expected"], false, "{exited}");
    assert_eq!(exited["instance"], instance, "{exited}");
    let spawned = herd.wait_event_after("the replacement", mark, |e| {
        e["event"] == "spawned" && e["instance"] == instance
    });
    let spawned_after = killed_at.elapsed();
    let new_pid = spawned["pid"].as_u64().expect("pid") as u32;
    let new_id = spawned["worker_id"].as_u64().expect("worker_id");
    herd.wait_event_after("the replacement ready", mark, |e| {
        e["event"] == "ready" && e["pid"] == new_pid
    });
    let ready_after = killed_at.elapsed();
    assert!(
        new_id > old_id,
        "worker ids are never reused: {old_id} → {new_id}"
    );

    // The replacement shares the port with the surviving worker: keep both busy until it
    // answers.
    let deadline = Instant::now() + WAIT;
    let report = loop {
        let found = concurrent_slow(port, 2, 100)
            .into_iter()
            .map(|r| r.json())
            .find(|r| r["pid"] == new_pid);
        if let Some(report) = found {
            break report;
        }
        assert!(
            Instant::now() < deadline,
            "the replacement never answered\n{}",
            herd.dump()
        );
    };
    eprintln!(
        "kill -9 → replacement spawned {spawned_after:?}, ready (READY=1) {ready_after:?}, \
         answering {:?}",
        killed_at.elapsed()
    );
    assert_eq!(str_field(&report, "herd_instance"), instance.to_string());
    assert_eq!(str_field(&report, "herd_worker_id"), new_id.to_string());
    assert_eq!(str_field(&report, "listen_pid"), new_pid.to_string());
}

#[test]
fn a_unix_socket_listener_serves_and_is_removed_on_stop() {
    let dir = TempDir::new();
    let sock = dir.join("s.sock");
    let listen = format!("unix:{}", sock.display());
    let mut herd = start_inherit_on(&listen, 2, &[]);
    herd.wait_ready();
    let bound = herd.wait_named("bound");
    assert_eq!(bound["address"], listen.as_str(), "{bound}");
    let mut pids = HashMap::new();
    for _ in 0..4 {
        let r = get_unix(&sock, "/").expect("request over the unix socket");
        assert_eq!(r.status, 200);
        let report = r.json();
        assert_eq!(report["family"], libc::AF_UNIX, "{report}");
        assert_eq!(
            report["sockname"],
            sock.to_string_lossy().as_ref(),
            "{report}"
        );
        assert_eq!(report["listen_fds"], "1", "{report}");
        assert_eq!(
            report["port"],
            Value::Null,
            "no TCP listener, no PORT: {report}"
        );
        *pids.entry(pid_in(&r)).or_insert(0) += 1;
    }
    // Both workers accept on the one socket: a worker busy in /slow cannot accept, so
    // batches of concurrent slow requests reach both within a few rounds (bounded).
    for _ in 0..20 {
        if pids.len() >= 2 {
            break;
        }
        let answers: Vec<Response> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|_| s.spawn(|| get_unix(&sock, "/slow?ms=150")))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("request thread").expect("request"))
                .collect()
        });
        for r in answers {
            assert_eq!(r.status, 200, "{r:?}");
            *pids.entry(pid_in(&r)).or_insert(0) += 1;
        }
    }
    let spawned: BTreeSet<u32> = herd.worker_pids().into_iter().collect();
    let answered: BTreeSet<u32> = pids.keys().copied().collect();
    assert_eq!(
        answered, spawned,
        "both workers serve the unix socket: {pids:?}"
    );
    let status = herd.stop();
    assert_eq!(status.code(), Some(0), "{}", herd.dump());
    assert!(
        !sock.exists(),
        "{} is left after herd stopped",
        sock.display()
    );
    herd.assert_no_worker_left();
}

fn str_field<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("no string {key} in {v}"))
}
