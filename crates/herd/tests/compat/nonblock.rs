//! A worker shares its listening socket's open file description with herd, and with it the
//! O_NONBLOCK flag. Where herd accepts from such a socket itself (a dead slot's queue under
//! `--balance hash|sticky`), a worker that clears the flag must not be able to block herd.
//! Fixture: `fixtures/compat_blocking.js`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use crate::util::{home_of, kill, spawn_cli, start_named_node, status, workers, TempDir};

/// A connection with a request written, whose answer is read later.
fn send(port: u16) -> TcpStream {
    let dest = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&dest, Duration::from_secs(5)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write the request");
    stream
}

fn answer(mut stream: TcpStream) -> serde_json::Value {
    let mut raw = Vec::new();
    let read = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    let body = read
        .as_ref()
        .ok()
        .and(text.split_once("\r\n\r\n"))
        .map(|(_, b)| b)
        .unwrap_or_else(|| panic!("no answer: {read:?} {text:?}"));
    serde_json::from_str(body).expect("JSON body")
}

#[test]
fn a_worker_that_makes_its_slot_socket_blocking_cannot_freeze_herd() {
    let dir = TempDir::new();
    let block = dir.join("block");
    let name = "compat-nonblock";
    let herd = start_named_node(
        "compat_blocking.js",
        name,
        2,
        &[
            "--balance",
            "hash",
            "-e",
            "CLEAR_INSTANCE=0",
            "-e",
            &format!("BLOCK_FILE={}", block.display()),
        ],
    );
    herd.wait_ready();
    herd.wait_line_after(0, "cleared O_NONBLOCK");
    let port = herd.port();
    let home = home_of(&herd);
    let s = status(&home, name);
    let pid_of = |instance: u64| {
        workers(&s)
            .iter()
            .find(|w| w["instance"] == instance)
            .and_then(|w| w["pid"].as_u64())
            .unwrap_or_else(|| panic!("no worker in slot {instance}: {s:#}")) as u32
    };
    let (attacker, survivor) = (pid_of(0), pid_of(1));

    // The attacker stops taking connections; some queue in its slot's socket (hash).
    kill(attacker, libc::SIGSTOP);
    let waiting: Vec<TcpStream> = (0..16).map(|_| send(port)).collect();
    // It dies; its replacement never listens, so herd takes slot 0's queue itself.
    std::fs::write(&block, b"").expect("create the block file");
    let mark = herd.mark();
    kill(attacker, libc::SIGKILL);
    herd.wait_event_after("the attacker's exit", mark, |e| {
        e["event"] == "exited" && e["pid"] == attacker
    });

    // Every queued client is served by the survivor, and herd still answers.
    for w in waiting {
        let a = answer(w);
        assert_eq!(a["pid"], survivor, "{a}\n{}", herd.dump());
    }
    let out = spawn_cli(&home, &["status", name, "--json"]).finish(Duration::from_secs(10));
    assert_eq!(
        out.code,
        Some(0),
        "status must answer: {out}\n{}",
        herd.dump()
    );
    for _ in 0..4 {
        let a = answer(send(port));
        assert_eq!(a["pid"], survivor, "{a}");
    }
}
