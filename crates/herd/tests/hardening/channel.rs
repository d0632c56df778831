//! Hardening: the Node IPC channel and connection hand-offs. Each test plays a hostile worker
//! (`fixtures/channel_hostile.js`, which may hand its IPC fd to `fixtures/channel_raw.py` to
//! write raw frames) and checks what herd must never do: grow without bound, let one worker
//! steer another's cluster code, hand one connection to two workers, leave a connection
//! in flight for good, or block on a descriptor a worker chose.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::{cli, fixture, get, home_of, pid_in, Herd};

/// Megabytes a flooding worker sends (it stops after 20 s in any case).
const FLOOD_MB: &str = "FLOOD_MB=200";
/// herd's peak resident size must stay under this while a worker floods it. An unbounded
/// queue holds about what the flood sent (times the workers it fans out to).
const MAX_HWM_KB: u64 = 128 << 10;

fn start(name: &str, instances: usize, env: &[&str]) -> Herd {
    let app = fixture("channel_hostile.js");
    let n = instances.to_string();
    let mut args = vec!["-i", n.as_str(), "-e", "PORT=0", "--name", name];
    for e in env {
        args.extend_from_slice(&["-e", e]);
    }
    args.push(&app);
    Herd::start(&args)
}

/// The peak resident size of `pid` in kB (`VmHWM`: the kernel's high-water mark, not a
/// sample that could miss a spike).
fn vm_hwm_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("herd's status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

/// The pid of the first worker in slot `instance`.
fn pid_of_instance(herd: &Herd, instance: u64) -> u64 {
    let e = herd.wait_event(&format!("instance {instance} spawned"), |e| {
        e["event"] == "spawned" && e["instance"] == instance
    });
    e["pid"].as_u64().expect("pid")
}

fn lines_of(events: &[Value], pid: u64) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["pid"] == pid)
        .filter_map(|e| e["line"].as_str().map(str::to_string))
        .collect()
}

fn assert_hwm_bounded(herd: &Herd) {
    let hwm = vm_hwm_kb(herd.pid());
    eprintln!("herd's peak RSS: {} MiB", hwm >> 10);
    assert!(
        hwm < MAX_HWM_KB,
        "herd's peak RSS reached {} MiB (bound {} MiB)\n{}",
        hwm >> 10,
        MAX_HWM_KB >> 10,
        herd.dump()
    );
}

#[test]
fn a_worker_that_asks_with_huge_keys_and_never_reads_cannot_bloat_herd() {
    let herd = start(
        "chcount",
        1,
        &["MODE=raw", "ACTION=count", "KEY_BYTES=500000", FLOOD_MB],
    );
    herd.wait_ready();
    herd.wait_line_after(0, "flooded ");
    assert_hwm_bounded(&herd);
    let refused = herd.wait_event("the oversized key refused", |e| {
        e["event"] == "ipc_error"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.contains("NODE_SOCKET_GET_COUNT"))
    });
    assert!(
        refused.to_string().len() < 2000,
        "no key in the log: {refused}"
    );
}

#[test]
fn a_worker_that_asks_and_never_reads_is_replaced_before_herd_bloats() {
    let mut herd = start(
        "chstuck",
        1,
        &["MODE=raw", "ACTION=count", "KEY_BYTES=3000", FLOOD_MB],
    );
    herd.wait_ready();
    let flooder = pid_of_instance(&herd, 0);
    herd.wait_event("the flood to end, or the flooder to go", |e| {
        e["line"]
            .as_str()
            .is_some_and(|l| l.starts_with("flooded "))
            || (e["event"] == "exited" && e["pid"] == flooder)
    });
    assert_hwm_bounded(&herd);
    herd.wait_event("the flooder declared stuck", |e| {
        e["event"] == "ipc_error"
            && e["pid"] == flooder
            && e["message"]
                .as_str()
                .is_some_and(|m| m.contains("does not read"))
    });
    herd.wait_event("the flooder gone", |e| {
        e["event"] == "exited" && e["pid"] == flooder
    });
    herd.stop();
}

#[test]
fn broadcasts_to_workers_that_do_not_read_are_dropped_not_hoarded() {
    let herd = start(
        "chbcast",
        4,
        &[
            "MODE=raw",
            "ACTION=broadcast",
            "BLOCK_OTHERS=1",
            "FLOOD_MB=100",
        ],
    );
    herd.wait_ready();
    let sender = pid_of_instance(&herd, 0);
    let blocked: Vec<u64> = (1..4).map(|i| pid_of_instance(&herd, i)).collect();
    herd.wait_line_after(0, "flooded ");
    assert_hwm_bounded(&herd);
    herd.wait_for("drops counted for every blocked worker", |events| {
        blocked.iter().all(|&p| {
            events
                .iter()
                .any(|e| e["event"] == "ipc_dropped" && e["pid"] == p)
        })
    });
    // Every broadcast event says how much, never what (a payload is 500 KB here).
    let events = herd.events();
    let broadcasts: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "broadcast")
        .collect();
    assert!(!broadcasts.is_empty());
    for b in broadcasts {
        assert_eq!(b["pid"], sender);
        let size = b.to_string().len();
        assert!(size < 1000, "a payload in the log: {size} bytes");
    }
    // Not reading is not a crime: the blocked workers are still there.
    let exits = events.iter().filter(|e| e["event"] == "exited").count();
    assert_eq!(exits, 0, "{}", herd.dump());
}

#[test]
fn a_broadcast_cannot_make_the_other_workers_disconnect() {
    let herd = start("chinject", 3, &[]);
    herd.wait_ready();
    let port = herd.port();
    let mark = herd.mark();
    let attacker = u64::from(pid_in(&get(port, "/inject").expect("inject")));
    let siblings: Vec<u64> = (0..3)
        .map(|i| pid_of_instance(&herd, i))
        .filter(|&p| p != attacker)
        .collect();
    assert_eq!(siblings.len(), 2);
    // Each sibling either logs the marker (sent after the injection, so Node's cluster code
    // has seen the injection by then) or exits.
    herd.wait_for("each sibling to log the marker or exit", |events| {
        siblings.iter().all(|&p| {
            events[mark..].iter().any(|e| {
                e["pid"] == p
                    && (e["event"] == "exited"
                        || e["line"]
                            .as_str()
                            .is_some_and(|l| l.starts_with(r#"got message: {"marker":1}"#)))
            })
        })
    });
    let events = herd.events();
    for &p in &siblings {
        let lines = lines_of(&events[mark..], p);
        assert!(
            lines
                .iter()
                .any(|l| l == r#"got message: {"marker":1} exited=undefined"#),
            "sibling {p} was told to disconnect: {lines:?}\n{}",
            herd.dump()
        );
        assert!(!lines.iter().any(|l| l.contains("NODE_")), "{lines:?}");
    }
    herd.wait_event_after("the injection refused", mark, |e| {
        e["event"] == "ipc_error"
            && e["pid"] == attacker
            && e["message"].as_str().is_some_and(|m| m.contains("NODE_"))
    });
    // `herd send` keeps the same rule.
    let home = home_of(&herd);
    let out = cli(
        &home,
        &[
            "send",
            "chinject",
            r#"{"cmd":"NODE_CLUSTER","act":"disconnect"}"#,
        ],
    );
    assert_ne!(out.code, Some(0), "{out}");
    assert!(out.stderr.contains("NODE_"), "{out}");
    let exits = herd
        .events()
        .iter()
        .filter(|e| e["event"] == "exited")
        .count();
    assert_eq!(exits, 0, "{}", herd.dump());
}

#[test]
fn an_answer_for_a_hand_off_not_yet_delivered_is_ignored() {
    let herd = start("chearly", 2, &["MODE=raw", "ACTION=early"]);
    herd.wait_ready();
    herd.wait_line_after(0, "raw helper in charge");
    let port = herd.port();
    let honest = pid_of_instance(&herd, 1);
    // Connections alternate between the two workers: a few reach the raw helper.
    let mut clients = Vec::new();
    let held = loop {
        assert!(
            clients.len() < 8,
            "the helper never got a connection\n{}",
            herd.dump()
        );
        clients.push(TcpStream::connect(("127.0.0.1", port)).expect("connect"));
        let found = herd.events().iter().find_map(|e| {
            e["line"]
                .as_str()?
                .strip_prefix("holding ")?
                .parse::<u16>()
                .ok()
        });
        if let Some(p) = found {
            break p;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let taken_by_honest = format!("conn {held}");
    let seen = herd.wait_event(
        "the early answer ignored, or the connection re-routed",
        |e| {
            (e["event"] == "ipc_error"
                && e["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("has not received")))
                || (e["pid"] == honest && e["line"] == taken_by_honest.as_str())
        },
    );
    assert_eq!(
        seen["event"],
        "ipc_error",
        "the connection held by one worker was also given to another: {seen}\n{}",
        herd.dump()
    );
    drop(clients);
}

#[test]
fn a_hand_off_refused_past_the_retry_limit_goes_to_another_worker() {
    let herd = start("chnack", 2, &["MODE=raw", "ACTION=nack"]);
    herd.wait_ready();
    herd.wait_line_after(0, "raw helper in charge");
    let port = herd.port();
    let honest = pid_of_instance(&herd, 1);
    // Round-robin sends every other connection to the worker that NACKs every fd.
    for i in 0..4 {
        let r = get(port, "/").unwrap_or_else(|e| panic!("request {i}: {e}\n{}", herd.dump()));
        assert_eq!(u64::from(pid_in(&r)), honest);
    }
    herd.wait_named("handoff_failed");
}

#[test]
fn closing_a_lingering_socket_a_worker_sent_does_not_block_herd() {
    let herd = start("chlinger", 1, &["MODE=raw", "ACTION=linger"]);
    herd.wait_ready();
    herd.wait_line_after(0, "sent");
    // herd closes that socket; a close on herd's own thread would block it for 60 s.
    let home = home_of(&herd);
    let started = Instant::now();
    let out = cli(&home, &["status", "chlinger", "--json"]);
    out.assert_ok();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "herd took {:?} to answer status",
        started.elapsed()
    );
}
