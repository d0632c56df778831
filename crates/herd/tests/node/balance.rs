//! How connections reach Node workers: round-robin, shared (sticky and hash: reuseport.rs).

use std::collections::{BTreeMap, BTreeSet};

use super::start_node;
use crate::util::{get, pid_in};

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
    assert_eq!(workers.len(), 2, "{workers:?}");
    // In shared mode the kernel picks the worker. A worker busy in `/slow` cannot accept,
    // so batches of concurrent slow requests reach both within a few rounds (bounded).
    let mut answered = BTreeSet::new();
    for _ in 0..20 {
        let batch: Vec<_> = (0..4)
            .map(|_| std::thread::spawn(move || get(port, "/slow?ms=150")))
            .collect();
        for h in batch {
            let r = h.join().expect("request thread").expect("request");
            assert_eq!(r.status, 200);
            answered.insert(pid_in(&r));
        }
        if answered.len() == 2 {
            break;
        }
    }
    assert_eq!(
        answered,
        workers,
        "both workers accept on the shared socket\n{}",
        herd.dump()
    );
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
fn round_robin_serves_a_burst_larger_than_one_accept_batch() {
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, SocketAddr, TcpStream};
    use std::time::Duration;

    // Connections opened faster than herd takes them wait in the listener's backlog and are
    // accepted in batches of at most 32; every one must reach a worker and be answered.
    let herd = start_node(2, &[]);
    herd.wait_ready();
    let port = herd.port();
    let dest = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let streams: Vec<TcpStream> = (0..150)
        .map(|_| {
            let s = TcpStream::connect_timeout(&dest, Duration::from_secs(5)).expect("connect");
            s.set_read_timeout(Some(crate::util::WAIT))
                .expect("timeout");
            s
        })
        .collect();
    let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
    for mut s in streams {
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .expect("request");
        let mut answer = String::new();
        s.read_to_string(&mut answer).expect("answer");
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "{answer}\n{}",
            herd.dump()
        );
        let pid = answer
            .split("\"pid\":")
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        *counts.entry(pid).or_default() += 1;
    }
    eprintln!("round-robin, a burst of 150 connections: {counts:?}");
    assert_eq!(counts.values().sum::<usize>(), 150);
    assert_eq!(counts.len(), 2, "both workers took a share: {counts:?}");
}
