//! Listen addresses and the workers' user, end to end: an IPv6 listener beside an IPv4 one
//! (a socket-activation worker gets both, fds 3 and 4, named in `LISTEN_FDNAMES`, and
//! serves on each), and `--user nobody` (the worker really runs as uid 65534 and serves).
//! Fixture: `fixtures/tests15_worker.py`.

use std::io::{Read, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;

use crate::util::{fixture, get, port_of, prerequisite_missing, Herd, Response, TempDir};

/// `GET /` on `addr` (any family), the response body as JSON.
fn get_json(addr: SocketAddr) -> Value {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut raw = String::new();
    stream.read_to_string(&mut raw).expect("read the answer");
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP answer from {addr}: {raw:?}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{raw:?}");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"))
}

fn ipv6_loopback() -> bool {
    std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).is_ok()
}

#[test]
fn an_ipv4_and_an_ipv6_listener_reach_the_worker_as_fds_3_and_4() {
    if !ipv6_loopback() {
        prerequisite_missing("IPv6 on the loopback interface (::1)");
        return;
    }
    let app = fixture("tests15_worker.py");
    let herd = Herd::start(&[
        "-i",
        "2",
        "--name",
        "two-listeners",
        "--ready",
        "notify",
        "--listen",
        "127.0.0.1:0",
        "--listen",
        "[::1]:0",
        &app,
    ]);
    herd.wait_ready();
    let bound: Vec<Value> = herd
        .events()
        .into_iter()
        .filter(|e| e["event"] == "bound")
        .collect();
    let addresses: Vec<&str> = bound
        .iter()
        .map(|e| e["address"].as_str().expect("address"))
        .collect();
    assert_eq!(addresses.len(), 2, "{addresses:?}\n{}", herd.dump());
    assert!(addresses[0].starts_with("127.0.0.1:"), "{addresses:?}");
    assert!(addresses[1].starts_with("[::1]:"), "{addresses:?}");
    let (v4, v6) = (port_of(&bound[0]), port_of(&bound[1]));
    assert_ne!(v4, 0);
    assert_ne!(v6, 0);

    let on_v4 = get_json(SocketAddr::from(([127, 0, 0, 1], v4)));
    let on_v6 = get_json(SocketAddr::from((Ipv6Addr::LOCALHOST, v6)));
    for body in [&on_v4, &on_v6] {
        assert_eq!(body["listen_fds"], "2", "{body}");
        let names: Vec<&str> = body["listen_fdnames"]
            .as_str()
            .expect("LISTEN_FDNAMES")
            .split(':')
            .collect();
        assert_eq!(names.len(), 2, "a name per fd: {body}");
    }
    // The first --listen is fd 3, the second fd 4, each with its own address and name.
    assert_eq!(on_v4["fd"], 3, "{on_v4}");
    assert_eq!(
        on_v4["sockname"],
        serde_json::json!(["127.0.0.1", v4]),
        "{on_v4}"
    );
    assert_eq!(on_v6["fd"], 4, "{on_v6}");
    assert_eq!(on_v6["sockname"], serde_json::json!(["::1", v6]), "{on_v6}");
    let names = |b: &Value| -> Vec<String> {
        b["listen_fdnames"]
            .as_str()
            .unwrap_or_default()
            .split(':')
            .map(str::to_string)
            .collect()
    };
    assert_eq!(on_v4["listener"].as_str(), Some(names(&on_v4)[0].as_str()));
    assert_eq!(on_v6["listener"].as_str(), Some(names(&on_v6)[1].as_str()));
}

/// The `Uid:` or `Gid:` line of /proc/PID/status: real, effective, saved, filesystem.
fn ids(pid: u32, field: &str) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .split_whitespace()
        .map(|n| n.parse().expect("an id"))
        .collect()
}

#[test]
fn user_nobody_runs_the_workers_as_uid_65534_and_they_serve() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        prerequisite_missing("--user needs herd to run as root");
        return;
    }
    // The python3 on the test's PATH may sit under root's home (pyenv), which nobody
    // cannot enter: use a system one.
    let Some(python) = ["/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
    else {
        prerequisite_missing("a python3 outside root's home, for a worker running as nobody");
        return;
    };
    let app = fixture("tests15_worker.py");
    let cwd = TempDir::new();
    let herd = Herd::start(&[
        "-i",
        "2",
        "--name",
        "as-nobody",
        "--user",
        "nobody",
        "--interpreter",
        python,
        "--cwd",
        &cwd.path().display().to_string(),
        "--ready",
        "notify",
        "--listen",
        "127.0.0.1:0",
        &app,
    ]);
    herd.wait_ready();
    let port = herd.port();
    for pid in herd.worker_pids() {
        assert_eq!(ids(pid, "Uid:"), [65534; 4], "worker {pid}'s uids");
        assert_eq!(ids(pid, "Gid:"), [65534; 4], "worker {pid}'s gids");
        let groups = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .expect("status")
            .lines()
            .find_map(|l| l.strip_prefix("Groups:").map(|g| g.trim().to_string()))
            .expect("Groups:");
        assert!(
            groups.split_whitespace().all(|g| g != "0"),
            "worker {pid} kept root's group: {groups:?}"
        );
    }
    let answer: Response = get(port, "/").expect("a worker running as nobody serves");
    assert_eq!(answer.status, 200, "{answer:?}");
    let pid = answer.json()["pid"].as_u64().expect("pid") as u32;
    assert!(herd.worker_pids().contains(&pid), "{answer:?}");
    assert_eq!(ids(pid, "Uid:"), [65534; 4]);
    // herd itself stays root (it must, to start the next worker as nobody).
    assert_eq!(ids(herd.pid(), "Uid:"), [0; 4]);
}
