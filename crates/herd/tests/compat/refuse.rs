//! Socket activation, `--balance shared`: while no worker is ready for longer than
//! `--listen-timeout`, herd refuses new connections quickly (accepts and closes them on its
//! accept thread) instead of leaving them hanging, and stops once a worker is ready; and a
//! "ready" worker that serves its own port instead of herd's is reported.
//! Fixture: `fixtures/compat_server.py`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::util::{get, home_of, kill, start_named_listener, status, workers, TempDir};

/// Connects and sends a request; returns how long until the connection ended without an
/// answer, or None if it was answered or still open after `limit`.
fn refused_within(port: u16, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let dest = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut s) = TcpStream::connect_timeout(&dest, limit) else {
        return Some(started.elapsed());
    };
    s.set_read_timeout(Some(limit)).expect("timeout");
    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut buf = Vec::new();
    match s.read_to_end(&mut buf) {
        Ok(_) if buf.is_empty() => Some(started.elapsed()),
        Ok(_) => None,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Some(started.elapsed()),
        Err(_) => None,
    }
}

#[test]
fn connections_are_refused_quickly_while_no_worker_is_ready_and_served_once_one_is() {
    let dir = TempDir::new();
    let crash = dir.join("crash");
    let name = "compat-refuse";
    let herd = start_named_listener(
        "compat_server.py",
        name,
        1,
        &[
            "--listen-timeout",
            "1s",
            "--restart-delay",
            "200ms",
            "--max-restarts",
            "1000",
            "-e",
            &format!("CRASH_FILE={}", crash.display()),
        ],
    );
    herd.wait_ready();
    let port = herd.port();
    let pid = crate::util::pid_in(&get(port, "/").expect("served"));

    // The app served; now it crash-loops.
    std::fs::write(&crash, b"").expect("create the crash file");
    let mark = herd.mark();
    kill(pid, libc::SIGKILL);
    herd.wait_event_after("herd starts refusing", mark, |e| {
        e["event"] == "refusing" && e["active"] == true
    });
    let took = refused_within(port, Duration::from_secs(5));
    assert!(
        took.is_some_and(|t| t < Duration::from_secs(2)),
        "refused quickly, not left hanging: {took:?}\n{}",
        herd.dump()
    );

    // A worker is ready again: herd stops refusing and the app serves.
    let mark = herd.mark();
    std::fs::remove_file(&crash).expect("remove the crash file");
    herd.wait_event_after("herd stops refusing", mark, |e| {
        e["event"] == "refusing" && e["active"] == false
    });
    for _ in 0..5 {
        let r = get(port, "/").expect("served again");
        assert_eq!(r.status, 200, "{}", herd.dump());
    }
}

#[test]
fn a_ready_worker_that_serves_its_own_port_is_reported() {
    let name = "compat-ownport";
    let herd = start_named_listener("compat_server.py", name, 1, &["-e", "OWN_PORT=1"]);
    herd.wait_ready();
    let port = herd.port();
    let own = herd.wait_line_after(0, "own port ")["line"].clone();
    // Clients queue on herd's port; nobody accepts them.
    let dest = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let _waiting: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect_timeout(&dest, Duration::from_secs(5)).expect("connect"))
        .collect();
    let warned = herd.wait_event("the report", |e| {
        e["event"] == "warning"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.contains("no worker accepts"))
    });
    let message = warned["message"].as_str().unwrap_or_default();
    let own_port = own
        .as_str()
        .and_then(|l| l.strip_prefix("own port "))
        .unwrap_or("?");
    assert!(
        message.contains(&format!(":{own_port}")),
        "names the worker's own port {own_port}: {message}"
    );
    let s = status(&home_of(&herd), name);
    let text = workers(&s)[0]["status_text"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(text.contains("own port"), "status says it too: {s:#}");
}
