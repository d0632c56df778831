//! Who may read what: a non-loopback `--http` needs a token; with one, data needs the
//! bearer header while `/live` and `/ready` stay open; without one, only loopback Host
//! names are answered. And clients cannot hold the server or the supervisor.

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use super::{get, request, start_with_http};
use crate::util::{cli, home_of, poll_until, run_to_end};

#[test]
fn a_non_loopback_address_without_a_token_is_refused_at_start() {
    // TEST-NET-1: never bound, whatever happens.
    let app = crate::util::fixture("app.js");
    let (out, _home) = run_to_end(&["--http", "192.0.2.1:9464", "-i", "1", "-e", "PORT=0", &app]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--http-token") && stderr.contains("192.0.2.1:9464"),
        "the error names the address and --http-token: {stderr}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("spawned"),
        "no worker started"
    );
}

#[test]
fn with_a_token_data_needs_the_bearer_header() {
    let token = "t0ken-for-the-test";
    let (herd, addr) = start_with_http("app.js", "http-token", 1, &["--http-token", token]);
    herd.wait_ready();
    for path in ["/metrics", "/status", "/samples", "/events"] {
        let r = request(addr, path, &[]).expect("answers");
        assert_eq!(r.status, 401, "{path} without the header: {r:?}");
        assert!(
            r.head
                .to_ascii_lowercase()
                .contains("www-authenticate: bearer"),
            "{r:?}"
        );
        let r = request(
            addr,
            path,
            &["Authorization: Bearer wrong-token-of-same-len"],
        )
        .expect("answers");
        assert_eq!(r.status, 401, "{path} with a wrong token: {r:?}");
    }
    let bearer = format!("Authorization: Bearer {token}");
    for path in ["/metrics", "/status", "/samples"] {
        let r = request(addr, path, &[&bearer]).expect("answers");
        assert_eq!(r.status, 200, "{path} with the token: {r:?}");
    }
    for path in ["/live", "/ready", "/"] {
        assert_eq!(get(addr, path).status, 200, "{path} stays open");
    }
    // With a token any Host is answered (it may sit behind a proxy).
    let r = request(addr, "/metrics", &[&bearer, "Host: herd.example"]).expect("answers");
    assert_eq!(r.status, 200, "{r:?}");
}

#[test]
fn without_a_token_only_loopback_host_names_are_answered() {
    let (herd, addr) = start_with_http("app.js", "http-host", 1, &[]);
    herd.wait_ready();
    // A page on another site that rebinds its name to 127.0.0.1 sends its own Host.
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.write_all(b"GET /status HTTP/1.1\r\nHost: rebind.example:8080\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut raw = String::new();
    std::io::Read::read_to_string(&mut s, &mut raw).expect("read");
    assert!(raw.starts_with("HTTP/1.1 421"), "{raw}");
    for host in ["Host: localhost:1", "Host: [::1]:1", "Host: 127.0.0.1"] {
        // `request` sends its own Host first; a second one is refused by hyper, so build it.
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        write!(
            s,
            "GET /status HTTP/1.1\r\n{host}\r\nConnection: close\r\n\r\n"
        )
        .expect("write");
        let mut raw = String::new();
        std::io::Read::read_to_string(&mut s, &mut raw).expect("read");
        assert!(raw.starts_with("HTTP/1.1 200"), "{host}: {raw}");
    }
}

#[test]
fn silent_clients_do_not_hold_the_supervisor_or_the_port_for_long() {
    let (herd, addr) = start_with_http("app.js", "http-silent", 1, &[]);
    herd.wait_ready();
    let home = home_of(&herd);
    // More silent connections than the server takes: it refuses the rest and never reads
    // a request from the others.
    let opened = std::time::Instant::now();
    let silent: Vec<TcpStream> = (0..80)
        .filter_map(|_| TcpStream::connect(addr).ok())
        .collect();
    assert!(silent.len() >= 64, "{} connected", silent.len());
    // The supervisor is not held: the control socket answers at once.
    let out = cli(&home, &["status", "http-silent", "--json"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    // After the header timeout (10s) the silent ones are closed and /live answers again.
    poll_until("/live to answer after the silent clients timed out", || {
        let r = request(addr, "/live", &[]).ok()?;
        (r.status == 200).then_some(())
    });
    // The header timeout (10 s) frees them, well before the 30 s any answer may take.
    let took = opened.elapsed();
    assert!(
        took < Duration::from_secs(25),
        "the silent connections held the port for {took:?}"
    );
    let m = request(addr, "/metrics", &[]).expect("metrics");
    assert!(
        m.body
            .contains("herd_http_refused_connections_total{app=\"http-silent\"} 1")
            || m.body
                .lines()
                .any(|l| l.starts_with("herd_http_refused_connections_total")
                    && !l.ends_with(" 0.0")),
        "the refused ones are counted: {}",
        m.body
    );
    drop(silent);
}

#[test]
fn the_token_from_the_environment_is_used_and_not_passed_to_workers() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let token = "env-t0ken-for-the-test";
    let dir = crate::util::TempDir::new();
    let env_out = dir.join("worker.env");
    let mut child = Command::new(crate::util::herd_bin())
        .env("HERD_HOME", dir.join("home"))
        .env("HERD_HTTP_TOKEN", token)
        .env("ENV_OUT", &env_out)
        .args([
            "run",
            "--log-format",
            "json",
            "-i",
            "1",
            "--name",
            "http-env",
        ])
        .args(["--http", "127.0.0.1:0", "--listen", "127.0.0.1:0"])
        .arg(crate::util::fixture("http_env.sh"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start herd");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                let _ = tx.send(v);
            }
        }
    });
    let mut addr = None;
    let mut worker = None;
    let deadline = std::time::Instant::now() + crate::util::WAIT;
    while addr.is_none() || worker.is_none() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let Ok(e) = rx.recv_timeout(left) else { break };
        if e["event"] == "http" {
            addr = e["address"]
                .as_str()
                .and_then(|a| a.parse::<std::net::SocketAddr>().ok());
        }
        if e["event"] == "spawned" {
            worker = e["pid"].as_u64().map(|p| p as u32);
        }
    }
    let result = std::panic::catch_unwind(|| {
        let addr = addr.expect("an http event");
        assert_eq!(request(addr, "/metrics", &[]).expect("answers").status, 401);
        let bearer = format!("Authorization: Bearer {token}");
        assert_eq!(
            request(addr, "/metrics", &[&bearer])
                .expect("answers")
                .status,
            200
        );
        let env = poll_until("the worker's environment", || {
            std::fs::read_to_string(&env_out).ok()
        });
        assert!(env.contains("ENV_OUT="), "{env}");
        assert!(
            !env.contains("HERD_HTTP_TOKEN") && !env.contains(token),
            "the worker got the token: {env}"
        );
    });
    // SAFETY: kill(2) on our own child, then on the worker group herd made for it.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let _ = child.wait();
    if let Some(pid) = worker {
        if crate::util::pid_alive(pid) {
            crate::util::kill(pid, libc::SIGKILL);
        }
    }
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}
