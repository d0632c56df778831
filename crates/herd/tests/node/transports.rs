//! Node servers other than plain TCP HTTP: HTTPS and unix sockets.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};

use super::start_node;
use crate::util::{get_unix, pid_in, prerequisite_missing, TempDir};

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
        || Command::new(tool)
            .arg("version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

/// A self-signed certificate for localhost in `dir`: (cert, key).
fn self_signed(dir: &TempDir) -> (String, String) {
    let cert = dir.join("cert.pem").to_string_lossy().into_owned();
    let key = dir.join("key.pem").to_string_lossy().into_owned();
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
        ])
        .args(["-days", "1", "-keyout", &key, "-out", &cert])
        .stdin(Stdio::null())
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

fn https_serves(balance: &str) {
    if !have("openssl") || !have("curl") {
        prerequisite_missing("the HTTPS test needs the openssl and curl command-line tools");
        return;
    }
    let dir = TempDir::new();
    let (cert, key) = self_signed(&dir);
    let (cert, key) = (format!("CERT={cert}"), format!("KEY={key}"));
    let herd = start_node(
        2,
        &[
            "--balance",
            balance,
            "-e",
            "HTTPS=1",
            "-e",
            &cert,
            "-e",
            &key,
        ],
    );
    herd.wait_ready();
    let bound = herd.wait_named("bound");
    assert_eq!(bound["balance"], balance, "{bound}");
    let port = herd.port();
    let workers: BTreeSet<u64> = herd.worker_pids().into_iter().map(u64::from).collect();
    let curl = |path: &str| {
        Command::new("curl")
            .args(["-sk", "--max-time", "10"])
            .arg(format!("https://127.0.0.1:{port}{path}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run curl")
    };
    let mut answered = BTreeSet::new();
    let check = |child: std::process::Child, answered: &mut BTreeSet<u64>| {
        let out = child.wait_with_output().expect("curl output");
        assert!(out.status.success(), "curl: {out:?}\n{}", herd.dump());
        let report: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("JSON over HTTPS");
        let pid = report["pid"].as_u64().expect("pid");
        assert!(workers.contains(&pid), "{pid} not in {workers:?}");
        answered.insert(pid);
    };
    for _ in 0..4 {
        check(curl("/"), &mut answered);
    }
    // Shared: the kernel picks; a worker busy in /slow cannot accept, so batches of
    // concurrent slow requests reach both within a few rounds (bounded).
    for _ in 0..15 {
        if answered == workers {
            break;
        }
        let batch: Vec<_> = (0..4).map(|_| curl("/slow?ms=150")).collect();
        for child in batch {
            check(child, &mut answered);
        }
    }
    assert_eq!(answered, workers, "{balance} reaches every worker");
}

#[test]
fn https_serves_in_round_robin() {
    https_serves("round-robin");
}

#[test]
fn https_serves_in_shared() {
    https_serves("shared");
}

#[test]
fn a_node_unix_socket_server_works_in_round_robin_and_is_removed_on_stop() {
    let dir = TempDir::new();
    let sock = dir.join("n.sock");
    let env = format!("SOCK={}", sock.display());
    let mut herd = start_node(2, &["-e", &env]);
    let outcome = herd.wait_event("all_ready or a listen_error", |e| {
        e["event"] == "all_ready" || e["event"] == "listen_error"
    });
    assert_eq!(
        outcome["event"],
        "all_ready",
        "herd refused the worker's listen({}): {outcome}",
        sock.display()
    );
    let bound = herd.wait_named("bound");
    assert_eq!(
        bound["address"],
        format!("unix:{}", sock.display()),
        "{bound}"
    );
    assert_eq!(bound["balance"], "round-robin", "{bound}");
    let mut answered = BTreeSet::new();
    for _ in 0..6 {
        let r = get_unix(&sock, "/").expect("request over the unix socket");
        assert_eq!(r.status, 200);
        answered.insert(pid_in(&r));
    }
    assert_eq!(
        answered.len(),
        2,
        "round-robin reaches both workers: {answered:?}"
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

#[test]
fn a_node_udp_socket_is_shared_by_every_worker() {
    use crate::util::{fixture, port_of, Herd};
    use std::net::UdpSocket;
    use std::time::{Duration, Instant};

    let app = fixture("udp.js");
    let herd = Herd::start(&["-i", "2", &app]);
    herd.wait_ready();
    let bound = herd.wait_event("the UDP bind", |e| {
        e["event"] == "bound" && e["address"].as_str().is_some_and(|a| a.starts_with("udp "))
    });
    assert_eq!(bound["balance"], "shared", "UDP is always shared: {bound}");
    let port = port_of(&bound);
    let expected: BTreeSet<u32> = herd.worker_pids().into_iter().collect();
    let mut pids = BTreeSet::new();
    let deadline = Instant::now() + crate::util::WAIT;
    // The kernel picks the receiving worker; new source ports spread the datagrams.
    while pids != expected && Instant::now() < deadline {
        let client = UdpSocket::bind("127.0.0.1:0").expect("client socket");
        client
            .set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        client.send_to(b"ping", ("127.0.0.1", port)).expect("send");
        let mut buf = [0u8; 256];
        if let Ok(n) = client.recv(&mut buf) {
            let v: serde_json::Value = serde_json::from_slice(&buf[..n]).expect("json answer");
            assert_eq!(v["got"], "ping", "{v}");
            pids.insert(v["pid"].as_u64().expect("pid") as u32);
        }
    }
    assert_eq!(
        pids,
        expected,
        "every worker answered datagrams\n{}",
        herd.dump()
    );
}
