//! How connections reach Node workers: round-robin, shared, sticky.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use super::start_node;
use crate::util::{get, get_from, kill, pid_in};

#[test]
fn round_robin_spreads_sequential_requests_evenly() {
    let herd = start_node(2, &[]);
    herd.wait_ready();
    let bound = herd.wait_named("bound");
    assert_eq!(bound["balance"], "round-robin", "{bound}");
    let port = herd.port();
    let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
    for _ in 0..20 {
        let r = get(port, "/").expect("request");
        assert_eq!(r.status, 200);
        *counts.entry(pid_in(&r)).or_default() += 1;
    }
    eprintln!("round-robin, 20 sequential requests: {counts:?}");
    assert_eq!(counts.len(), 2, "every worker answers: {counts:?}");
    for n in counts.values() {
        assert!((9..=11).contains(n), "10/10 ± 1: {counts:?}");
    }
}

#[test]
fn shared_balance_serves_from_every_worker_socket() {
    let herd = start_node(2, &["--balance", "shared"]);
    herd.wait_ready();
    let bound = herd.wait_named("bound");
    assert_eq!(bound["balance"], "shared", "{bound}");
    let port = herd.port();
    let workers: BTreeSet<u32> = herd.worker_pids().into_iter().collect();
    for _ in 0..10 {
        let r = get(port, "/").expect("request");
        assert_eq!(r.status, 200);
        assert!(workers.contains(&pid_in(&r)), "{r:?} not from {workers:?}");
    }
}

#[test]
fn a_node_worker_is_a_cluster_worker_whose_id_is_herd_worker_id() {
    let herd = start_node(2, &[]);
    herd.wait_ready();
    let port = herd.port();
    let mut seen = BTreeSet::new();
    for _ in 0..4 {
        let report = get(port, "/").expect("request").json();
        assert_eq!(report["is_worker"], true, "{report}");
        let id = report["worker_id"].as_u64().expect("cluster.worker.id");
        assert_eq!(report["herd_worker_id"], id.to_string(), "{report}");
        assert_eq!(
            report["herd_instance"], report["node_app_instance"],
            "{report}"
        );
        let spawned = herd.wait_event("its spawned event", |e| {
            e["event"] == "spawned" && e["pid"] == report["pid"]
        });
        assert_eq!(spawned["worker_id"], id, "{spawned}");
        assert_eq!(
            spawned["instance"].to_string(),
            report["herd_instance"].as_str().expect("instance"),
            "{spawned}"
        );
        seen.insert(id);
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
}

#[test]
fn sticky_keeps_each_client_address_on_one_worker_when_another_dies() {
    let herd = start_node(3, &["--balance", "sticky"]);
    herd.wait_ready();
    let port = herd.port();
    let clients: Vec<Ipv4Addr> = (2..=6).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect();
    let ask = |client: Ipv4Addr| -> u32 {
        let pids: BTreeSet<u32> = (0..4)
            .map(|_| {
                let r = get_from(Some(client), port, "/").expect("request");
                assert_eq!(r.status, 200);
                pid_in(&r)
            })
            .collect();
        assert_eq!(pids.len(), 1, "{client} reached {pids:?}");
        pids.into_iter().next().expect("one pid")
    };
    let before: BTreeMap<Ipv4Addr, u32> = clients.iter().map(|&c| (c, ask(c))).collect();
    eprintln!("sticky: {before:?}");

    // Kill the worker with the fewest of these clients (maybe none): the others must stay.
    let workers = herd.worker_pids();
    let victim = *workers
        .iter()
        .min_by_key(|&&w| before.values().filter(|&&p| p == w).count())
        .expect("workers");
    let untouched = before.values().filter(|&&p| p != victim).count();
    assert!(untouched > 0, "{before:?}");
    let mark = herd.mark();
    kill(victim, libc::SIGKILL);
    herd.wait_event_after("the victim's exit", mark, |e| {
        e["event"] == "exited" && e["pid"] == victim
    });
    herd.wait_named_after("all_ready", mark);
    let replacement = herd.wait_event_after("the replacement", mark, |e| e["event"] == "spawned")
        ["pid"]
        .as_u64()
        .expect("pid") as u32;
    for (&client, &pid) in &before {
        let now = ask(client);
        if pid == victim {
            assert_eq!(
                now, replacement,
                "{client} follows its slot to the new worker"
            );
        } else {
            assert_eq!(now, pid, "{client} moved although its worker lived");
        }
    }
}
