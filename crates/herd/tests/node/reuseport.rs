//! Kernel balancing (`--balance hash|sticky`): every worker slot has its own listening socket
//! in one SO_REUSEPORT group, and a BPF program herd attaches picks the slot of each new
//! connection. Node workers get their slot's socket as the listen() handle; socket-activation
//! workers get it as fd 3.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::start_node;
use crate::util::{
    cli, get, get_from, home_of, kill, pid_in, ready_pids, start_named_listener, start_named_node,
    wait_status, Herd, Response, TempDir,
};

fn instance_of(r: &Response) -> String {
    r.json()["herd_instance"]
        .as_str()
        .expect("herd_instance")
        .to_string()
}

/// `n` sequential requests: how many each worker (pid) answered.
fn spread(port: u16, n: usize) -> BTreeMap<u32, usize> {
    let mut counts = BTreeMap::new();
    for i in 0..n {
        let r = get(port, "/").unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(r.status, 200);
        *counts.entry(pid_in(&r)).or_default() += 1;
    }
    counts
}

/// One address asked `n` times: the one (pid, instance) that answered all of them.
fn sticky_ask(port: u16, client: Ipv4Addr, n: usize) -> (u32, String) {
    let answers: BTreeSet<(u32, String)> = (0..n)
        .map(|_| {
            let r = get_from(Some(client), port, "/")
                .unwrap_or_else(|e| panic!("request from {client}: {e}"));
            assert_eq!(r.status, 200);
            (pid_in(&r), instance_of(&r))
        })
        .collect();
    assert_eq!(answers.len(), 1, "{client} reached {answers:?}");
    answers.into_iter().next().expect("one answer")
}

/// The first loopback address (127.0.0.2..) whose connections reach slot `slot`.
fn client_of_slot(port: u16, slot: &str) -> (Ipv4Addr, u32) {
    for i in 2..=120 {
        let client = Ipv4Addr::new(127, 0, 0, i);
        let (pid, instance) = sticky_ask(port, client, 2);
        if instance == slot {
            return (client, pid);
        }
    }
    panic!("no address of 127.0.0.2..120 reaches slot {slot}");
}

/// A connection with a request written, whose answer is read later.
struct Waiting(TcpStream);

impl Waiting {
    fn send(from: Option<Ipv4Addr>, port: u16) -> Waiting {
        let dest = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        if let Some(src) = from {
            socket
                .bind(&SocketAddr::from((src, 0)).into())
                .expect("bind source");
        }
        socket
            .connect_timeout(&dest.into(), Duration::from_secs(5))
            .expect("connect");
        let mut stream = TcpStream::from(socket);
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .expect("write the request");
        Waiting(stream)
    }

    /// Whether an answer (or EOF) has arrived, without waiting.
    fn answered(&self) -> bool {
        self.0.set_nonblocking(true).expect("nonblocking");
        let mut b = [0u8; 1];
        let r = self.0.peek(&mut b);
        self.0.set_nonblocking(false).expect("blocking");
        !matches!(r, Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// How it ended: the answer's JSON body, or the error or close without an answer.
    fn outcome(mut self) -> Result<serde_json::Value, String> {
        let mut raw = Vec::new();
        self.0.read_to_end(&mut raw).map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&raw);
        let (_, body) = text
            .split_once("\r\n\r\n")
            .ok_or("closed without an answer")?;
        serde_json::from_str(body).map_err(|e| e.to_string())
    }

    /// The answer's JSON body.
    fn answer(mut self) -> serde_json::Value {
        let mut raw = Vec::new();
        self.0.read_to_end(&mut raw).expect("read the answer");
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text.split_once("\r\n\r\n").expect("a response");
        assert!(head.starts_with("HTTP/1.1 200"), "{text}");
        serde_json::from_str(body).expect("JSON body")
    }
}

#[test]
fn hash_spreads_connections_over_every_node_worker() {
    let herd = start_node(2, &["--balance", "hash"]);
    herd.wait_ready();
    let bound = herd.wait_named("bound");
    assert_eq!(bound["balance"], "hash", "{bound}");
    let counts = spread(herd.port(), 200);
    eprintln!("hash, 200 sequential connections: {counts:?}");
    assert_eq!(counts.len(), 2, "both workers answer: {counts:?}");
    for n in counts.values() {
        assert!(*n >= 60, "each worker gets a fair share: {counts:?}");
    }
}

#[test]
fn sticky_keeps_each_client_address_on_one_slot() {
    let herd = start_node(3, &["--balance", "sticky"]);
    herd.wait_ready();
    let port = herd.port();
    let mut slots = BTreeSet::new();
    for i in 2..=25 {
        let (_, instance) = sticky_ask(port, Ipv4Addr::new(127, 0, 0, i), 3);
        slots.insert(instance);
    }
    assert_eq!(slots.len(), 3, "24 addresses reach every slot: {slots:?}");
}

#[test]
fn sticky_clients_wait_for_their_slots_replacement_instead_of_moving() {
    let dir = TempDir::new();
    let block = dir.join("block");
    let herd = start_node(
        2,
        &[
            "--balance",
            "sticky",
            "--sticky-wait",
            "30s",
            "-e",
            &format!("BLOCK_FILE={}", block.display()),
        ],
    );
    herd.wait_ready();
    let port = herd.port();
    let (mine, victim) = client_of_slot(port, "0");
    let (other, survivor) = client_of_slot(port, "1");

    // The replacement waits on the block file: slot 0 stays empty until the test says.
    std::fs::write(&block, b"").expect("create the block file");
    let mark = herd.mark();
    kill(victim, libc::SIGKILL);
    let spawned = herd.wait_event_after("the replacement", mark, |e| {
        e["event"] == "spawned" && e["instance"] == 0
    });
    let replacement = spawned["pid"].as_u64().expect("pid") as u32;
    herd.wait_event_after("the replacement blocked", mark, |e| {
        e["pid"] == replacement && e["line"] == "blocked"
    });

    // Slot 0's client waits in slot 0's queue; slot 1's client is served as before.
    let waiting = Waiting::send(Some(mine), port);
    assert_eq!(sticky_ask(port, other, 3).0, survivor);
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        assert!(
            !waiting.answered(),
            "slot 0's client was served by another worker instead of waiting\n{}",
            herd.dump()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // The replacement comes: it serves the waiting connection, and the client stays.
    std::fs::remove_file(&block).expect("remove the block file");
    let answer = waiting.answer();
    assert_eq!(answer["pid"], replacement, "{answer}");
    assert_eq!(answer["herd_instance"], "0", "{answer}");
    assert_eq!(sticky_ask(port, mine, 3), (replacement, "0".to_string()));
    assert_eq!(sticky_ask(port, other, 3).0, survivor);
}

#[test]
fn sticky_moves_an_empty_slots_clients_once_sticky_wait_is_over() {
    let dir = TempDir::new();
    let block = dir.join("block");
    let herd = start_node(
        2,
        &[
            "--balance",
            "sticky",
            "--sticky-wait",
            "200ms",
            "-e",
            &format!("BLOCK_FILE={}", block.display()),
        ],
    );
    herd.wait_ready();
    let port = herd.port();
    let (mine, victim) = client_of_slot(port, "0");
    let (_, survivor) = client_of_slot(port, "1");
    std::fs::write(&block, b"").expect("create the block file");
    let mark = herd.mark();
    kill(victim, libc::SIGKILL);
    let moved = herd.wait_event_after("slot 0's clients moved", mark, |e| {
        e["event"] == "sticky_moved" && e["instance"] == 0
    });
    eprintln!("{moved}");
    assert_eq!(sticky_ask(port, mine, 3), (survivor, "1".to_string()));
    // Back once the slot is: the address returns to slot 0.
    std::fs::remove_file(&block).expect("remove the block file");
    herd.wait_named_after("all_ready", mark);
    assert_eq!(sticky_ask(port, mine, 3).1, "0");
}

#[test]
fn scaling_adds_and_retires_slots() {
    let name = "rp-scale";
    let herd = start_named_node("app.js", name, 2, &["--balance", "hash"]);
    herd.wait_ready();
    let port = herd.port();
    let home = home_of(&herd);
    let settled = |s: &serde_json::Value, n: usize| s["desired"] == n && ready_pids(s).len() == n;

    let out = cli(&home, &["scale", name, "3"]);
    assert_eq!(out.code, Some(0), "{out}\n{}", herd.dump());
    let s = wait_status(&home, name, "3 ready", |s| settled(s, 3));
    let counts = spread(port, 150);
    assert_eq!(
        counts.keys().copied().collect::<BTreeSet<_>>(),
        ready_pids(&s),
        "the new slot gets connections too: {counts:?}"
    );

    let out = cli(&home, &["scale", name, "1"]);
    assert_eq!(out.code, Some(0), "{out}\n{}", herd.dump());
    let s = wait_status(&home, name, "1 ready", |s| settled(s, 1));
    let counts = spread(port, 60);
    assert_eq!(
        counts.keys().copied().collect::<BTreeSet<_>>(),
        ready_pids(&s),
        "retired slots get nothing: {counts:?}"
    );
}

#[test]
fn connections_queued_for_a_dead_hash_slot_are_served_by_a_live_worker() {
    let dir = TempDir::new();
    let block = dir.join("block");
    let herd = start_node(
        2,
        &[
            "--balance",
            "hash",
            "-e",
            &format!("BLOCK_FILE={}", block.display()),
        ],
    );
    herd.wait_ready();
    let port = herd.port();
    let mut by_slot = BTreeMap::new();
    for _ in 0..200 {
        let r = get(port, "/").expect("request");
        by_slot.insert(instance_of(&r), pid_in(&r));
        if by_slot.len() == 2 {
            break;
        }
    }
    let (victim, survivor) = (by_slot["0"], by_slot["1"]);
    // Slot 0's worker stops accepting; connections pile up in both queues.
    kill(victim, libc::SIGSTOP);
    let waiting: Vec<Waiting> = (0..16).map(|_| Waiting::send(None, port)).collect();
    // It dies without accepting them, and its replacement cannot listen.
    std::fs::write(&block, b"").expect("create the block file");
    let mark = herd.mark();
    kill(victim, libc::SIGKILL);
    herd.wait_event_after("the victim's exit", mark, |e| {
        e["event"] == "exited" && e["pid"] == victim
    });
    for w in waiting {
        let answer = w.answer();
        assert_eq!(answer["pid"], survivor, "{answer}");
    }
}

// ---- socket activation (fixtures/control_server.py: fd 3, READY=1) ----

fn start_python(name: &str, instances: usize, balance: &str) -> Herd {
    start_named_listener(
        "control_server.py",
        name,
        instances,
        &[
            "--ready",
            "notify",
            "--balance",
            balance,
            "--kill-timeout",
            "300ms",
        ],
    )
}

#[test]
fn socket_activation_hash_gives_each_worker_its_own_socket() {
    let herd = start_python("rp-sa-hash", 2, "hash");
    herd.wait_ready();
    let counts = spread(herd.port(), 200);
    eprintln!("socket activation, hash: {counts:?}");
    assert_eq!(counts.len(), 2, "{counts:?}");
    for n in counts.values() {
        assert!(*n >= 60, "{counts:?}");
    }
}

#[test]
fn socket_activation_sticky_keeps_addresses_and_queued_connections_wait_for_the_replacement() {
    let herd = start_python("rp-sa-sticky", 2, "sticky");
    herd.wait_ready();
    let port = herd.port();
    let ask = |client: Ipv4Addr| -> u32 {
        let pids: BTreeSet<u32> = (0..3)
            .map(|_| pid_in(&get_from(Some(client), port, "/").expect("request")))
            .collect();
        assert_eq!(pids.len(), 1, "{client}: {pids:?}");
        pids.into_iter().next().expect("a pid")
    };
    let mut of: BTreeMap<u32, Vec<Ipv4Addr>> = BTreeMap::new();
    for i in 2..=30 {
        let client = Ipv4Addr::new(127, 0, 0, i);
        of.entry(ask(client)).or_default().push(client);
    }
    assert_eq!(of.len(), 2, "addresses reach both workers: {of:?}");
    let (&victim, clients) = of.iter().next().expect("a worker");
    // The worker stops; its clients' connections queue in its slot; it dies; the
    // replacement takes them from the same socket.
    kill(victim, libc::SIGSTOP);
    let waiting: Vec<Waiting> = clients
        .iter()
        .take(4)
        .map(|&c| Waiting::send(Some(c), port))
        .collect();
    let mark = herd.mark();
    kill(victim, libc::SIGKILL);
    let spawned = herd.wait_event_after("the replacement", mark, |e| {
        e["event"] == "spawned" && e["pid"] != victim
    });
    for w in waiting {
        let answer = w.answer();
        assert_eq!(answer["pid"], spawned["pid"], "{answer}");
    }
}

#[test]
fn a_reload_under_hash_keeps_every_slot_socket_and_drops_no_request() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let name = "rp-reload";
    let herd = start_named_node("app.js", name, 2, &["--balance", "hash"]);
    herd.wait_ready();
    let port = herd.port();
    let home = home_of(&herd);
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0usize, Vec::new());
                // Bounded: stops when told, or after 20,000 requests.
                while !stop.load(Ordering::Relaxed) && ok + failed.len() < 20_000 {
                    match get(port, "/") {
                        Ok(r) if r.status == 200 => ok += 1,
                        Ok(r) => failed.push(format!("status {}", r.status)),
                        Err(e) => failed.push(e.to_string()),
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let before = ready_pids(&wait_status(&home, name, "2 ready", |s| {
        ready_pids(s).len() == 2
    }));
    let out = cli(&home, &["reload", name]);
    assert_eq!(out.code, Some(0), "{out}\n{}", herd.dump());
    let after = spread(port, 40);
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let (ok, failed) = c.join().expect("client thread");
        assert!(ok > 0 && failed.is_empty(), "{ok} ok, failed: {failed:?}");
    }
    let now: BTreeSet<u32> = after.keys().copied().collect();
    assert_eq!(now.len(), 2, "both new workers serve: {after:?}");
    assert!(now.is_disjoint(&before), "{before:?} → {now:?}");
}

#[test]
fn socket_activation_connections_queued_for_a_retired_slot_are_closed_not_stranded() {
    let name = "rp-sa-retire";
    let herd = start_python(name, 2, "hash");
    herd.wait_ready();
    let port = herd.port();
    let home = home_of(&herd);
    let s = wait_status(&home, name, "2 ready", |s| ready_pids(s).len() == 2);
    let retired = crate::util::workers(&s)
        .iter()
        .find(|w| w["instance"] == 1)
        .and_then(|w| w["pid"].as_u64())
        .expect("slot 1's pid") as u32;
    // Slot 1's worker stops accepting: about half the connections queue in its socket.
    kill(retired, libc::SIGSTOP);
    let waiting: Vec<Waiting> = (0..12).map(|_| Waiting::send(None, port)).collect();
    let out = cli(&home, &["scale", name, "1"]);
    assert_eq!(out.code, Some(0), "{out}\n{}", herd.dump());
    let started = Instant::now();
    let outcomes: Vec<_> = waiting.into_iter().map(Waiting::outcome).collect();
    let closed = outcomes.iter().filter(|o| o.is_err()).count();
    eprintln!("after scaling away a slot with a queue: {outcomes:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "queued connections waited {:?}",
        started.elapsed()
    );
    assert!(
        closed >= 1,
        "none of 12 connections was queued in slot 1: {outcomes:?}"
    );
    for o in outcomes.iter().flatten() {
        assert_ne!(o["pid"], retired, "{o}");
    }
}
