//! How connections reach Node workers: round-robin, shared, sticky.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use super::start_node;
use crate::util::{get, get_from, kill, pid_in, TempDir};

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

/// One address asked `n` times from `client`: the one (pid, instance) that answered.
fn sticky_ask(port: u16, client: Ipv4Addr, n: usize) -> (u32, String) {
    let answers: BTreeSet<(u32, String)> = (0..n)
        .map(|_| {
            let r = get_from(Some(client), port, "/")
                .unwrap_or_else(|e| panic!("request from {client}: {e}"));
            assert_eq!(r.status, 200);
            let v = r.json();
            let instance = v["herd_instance"].as_str().expect("instance").to_string();
            (pid_in(&r), instance)
        })
        .collect();
    assert_eq!(answers.len(), 1, "{client} reached {answers:?}");
    answers.into_iter().next().expect("one answer")
}

#[test]
fn sticky_keeps_each_client_address_on_one_worker_when_another_dies() {
    let dir = TempDir::new();
    let block = dir.join("block");
    let herd = start_node(
        3,
        &[
            "--balance",
            "sticky",
            "-e",
            &format!("BLOCK_FILE={}", block.display()),
        ],
    );
    herd.wait_ready();
    let port = herd.port();
    // Find client addresses for every slot (which slot an address hashes to is herd's
    // business: ask). 59 addresses over 3 slots leave none empty.
    let mut before: BTreeMap<Ipv4Addr, (u32, String)> = BTreeMap::new();
    for i in 2..=60 {
        let client = Ipv4Addr::new(127, 0, 0, i);
        before.insert(client, sticky_ask(port, client, 3));
        let slots: BTreeSet<&String> = before.values().map(|(_, s)| s).collect();
        let least = ["0", "1", "2"]
            .iter()
            .map(|s| before.values().filter(|(_, i)| i == s).count())
            .min();
        if slots.len() == 3 && least >= Some(2) {
            break;
        }
    }
    eprintln!("sticky: {before:?}");
    let of_slot = |slot: &str| -> Vec<Ipv4Addr> {
        before
            .iter()
            .filter(|(_, (_, s))| s == slot)
            .map(|(&c, _)| c)
            .collect()
    };
    // The victim is slot 0's worker, and it has clients.
    let victims = of_slot("0");
    assert!(victims.len() >= 2, "no clients for slot 0: {before:?}");
    let victim = before[&victims[0]].0;

    // Its replacement will wait on the block file: the slot stays empty until the test
    // removes it.
    std::fs::write(&block, b"").expect("create the block file");
    let mark = herd.mark();
    kill(victim, libc::SIGKILL);
    herd.wait_event_after("the victim's exit", mark, |e| {
        e["event"] == "exited" && e["pid"] == victim
    });
    let spawned = herd.wait_event_after("the replacement", mark, |e| {
        e["event"] == "spawned" && e["instance"] == 0
    });
    let replacement = spawned["pid"].as_u64().expect("pid") as u32;
    herd.wait_event_after("the replacement blocked", mark, |e| {
        e["pid"] == replacement && e["line"] == "blocked"
    });

    // While slot 0 is empty its clients are served by another slot (not queued), each
    // address still by one worker; every other client stays where it was.
    let live: BTreeSet<u32> = before
        .values()
        .map(|(p, _)| *p)
        .filter(|&p| p != victim)
        .collect();
    for (&client, (pid, _)) in &before {
        let (now, slot) = sticky_ask(port, client, 3);
        if *pid == victim {
            assert!(
                live.contains(&now) && slot != "0",
                "{client} (slot 0, empty) went to {now} in slot {slot}, not a live slot {live:?}"
            );
        } else {
            assert_eq!(now, *pid, "{client} moved although its worker lived");
        }
    }
    assert!(
        !herd.events()[mark..]
            .iter()
            .any(|e| e["event"] == "all_ready"),
        "slot 0 counted ready while its worker was blocked\n{}",
        herd.dump()
    );

    // Slot 0 comes back: its clients follow it to the new worker; nobody else moves.
    std::fs::remove_file(&block).expect("remove the block file");
    herd.wait_named_after("all_ready", mark);
    for (&client, (pid, _)) in &before {
        let (now, slot) = sticky_ask(port, client, 3);
        if *pid == victim {
            assert_eq!(
                (now, slot.as_str()),
                (replacement, "0"),
                "{client} follows its slot to the new worker"
            );
        } else {
            assert_eq!(now, *pid, "{client} moved although its worker lived");
        }
    }
}
