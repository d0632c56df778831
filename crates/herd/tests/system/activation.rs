//! Socket activation into herd: a service manager (or any holder) binds the port and passes
//! it to herd as `LISTEN_FDS`; herd uses it for the matching `--listen` instead of binding,
//! so the port and its queue outlive a restart of herd itself.

use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::util::system::which;
use crate::util::{fixture, get, prerequisite_missing, Herd, WAIT};

/// A port that was free a moment ago (systemd-socket-activate binds it by number).
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn python() -> String {
    which("python3")
        .expect("python3 in PATH")
        .to_string_lossy()
        .into_owned()
}

/// herd started as a `.socket` unit starts its service: `holder` stays bound and listening
/// in this test; the shim puts it at fd 3 with `LISTEN_PID` = herd's pid and execs herd.
fn start_held(holder: &TcpListener, args: &[&str]) -> Herd {
    let python = python();
    let shim = fixture("system_shim.py");
    Herd::start_wrapped(&[&python, &shim], args, Some(holder.as_raw_fd()))
}

#[test]
fn systemd_socket_activate_hands_herd_its_port() {
    if which("systemd-socket-activate").is_none() {
        prerequisite_missing("systemd-socket-activate (Debian package systemd)");
        return;
    }
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let app = fixture("inherit.py");
    let herd = Herd::start_wrapped(
        &["systemd-socket-activate", "--fdname", "web", "-l", &addr],
        &["-i", "2", "--name", "sys-ssa", "--listen", &addr, &app],
        None,
    );
    // systemd-socket-activate starts herd on the first connection: this request waits in
    // the socket's queue while herd and its workers start, then is served.
    let answer = crate::util::poll_until("the socket bound by systemd-socket-activate", || {
        get(port, "/").ok()
    });
    assert_eq!(answer.status, 200, "{answer:?}\n{}", herd.dump());
    let body = answer.json();
    let pid = body["pid"].as_u64().expect("pid") as u32;
    assert!(herd.worker_pids().contains(&pid), "{body}\n{}", herd.dump());
    // The worker sees herd's own LISTEN_* for itself, not the manager's for herd.
    assert_eq!(body["listen_pid"], pid.to_string(), "{body}");
    assert_eq!(body["listen_fds"], "1", "{body}");
    assert_eq!(body["sockname"][1], port, "{body}");
    herd.wait_ready();
}

/// When herd was stopped, and when the next one was ready (None: not yet).
type Gap = (Instant, Option<Instant>);

#[test]
fn a_held_socket_queues_connections_across_a_herd_restart() {
    let holder = TcpListener::bind("127.0.0.1:0").expect("bind the holder's socket");
    let port = holder.local_addr().expect("addr").port();
    let addr = format!("127.0.0.1:{port}");
    let app = fixture("inherit.py");
    let args = ["-i", "2", "--name", "sys-held", "--listen", &addr, &app];

    // A bounded load: 4 clients, one request at a time each, until told to stop or 4000
    // requests in all. Each failure is kept with its reason.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let gap: Arc<Mutex<Option<Gap>>> = Arc::new(Mutex::new(None));
    let in_gap = Arc::new(AtomicUsize::new(0));
    let mut gen1 = start_held(&holder, &args);
    gen1.wait_ready();
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, ok, failures, gap, in_gap) = (
                Arc::clone(&stop),
                Arc::clone(&ok),
                Arc::clone(&failures),
                Arc::clone(&gap),
                Arc::clone(&in_gap),
            );
            std::thread::spawn(move || {
                for _ in 0..1000 {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let sent = Instant::now();
                    match get(port, "/") {
                        Ok(r) if r.status == 200 => {
                            ok.fetch_add(1, Ordering::SeqCst);
                            let during = gap.lock().expect("gap").is_some_and(|(from, to)| {
                                sent >= from && to.is_none_or(|to| sent <= to)
                            });
                            if during {
                                in_gap.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        Ok(r) => failures
                            .lock()
                            .expect("f")
                            .push(format!("status {}", r.status)),
                        Err(e) => failures.lock().expect("f").push(e.to_string()),
                    }
                }
            })
        })
        .collect();
    let wait_ok =
        |n: usize| crate::util::wait_requests("the clients", n, WAIT, || ok.load(Ordering::SeqCst));
    wait_ok(ok.load(Ordering::SeqCst) + 20);

    // Stop herd entirely; the holder keeps the socket. Connections made now wait.
    let status = gen1.stop();
    assert_eq!(status.code(), Some(0), "{}", gen1.dump());
    *gap.lock().expect("gap") = Some((Instant::now(), None));
    // Let the clients make their connections into the queue while no herd runs.
    std::thread::sleep(Duration::from_millis(300));
    let gen2 = start_held(&holder, &args);
    gen2.wait_ready();
    if let Some((_, to)) = gap.lock().expect("gap").as_mut() {
        *to = Some(Instant::now());
    }
    wait_ok(ok.load(Ordering::SeqCst) + 20);
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().expect("client");
    }
    let failures = failures.lock().expect("f").clone();
    assert!(
        failures.is_empty(),
        "{} requests failed across the restart: {failures:?}\n{}",
        failures.len(),
        gen2.dump()
    );
    assert!(
        in_gap.load(Ordering::SeqCst) > 0,
        "no request was sent while herd was down: the test did not test the gap"
    );
    drop(gen2);
}

#[test]
fn an_inherited_socket_no_listen_names_is_refused_by_name() {
    let holder = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = holder.local_addr().expect("addr").port();
    let app = fixture("inherit.py");
    let mut herd = start_held(
        &holder,
        &[
            "-i",
            "1",
            "--name",
            "sys-unmatched",
            "--listen",
            "127.0.0.1:0",
            &app,
        ],
    );
    let status = herd.expect_exit();
    assert_eq!(status.code(), Some(1), "{}", herd.dump());
    let err = herd.stderr();
    assert!(
        err.contains("fd 3")
            && err.contains(&format!("127.0.0.1:{port}"))
            && err.contains("no --listen"),
        "{err}"
    );
    assert!(
        err.contains("\"web\""),
        "names the socket from LISTEN_FDNAMES: {err}"
    );
}

#[test]
fn node_servers_on_an_inherited_port_use_it() {
    let holder = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = holder.local_addr().expect("addr").port();
    let addr = format!("127.0.0.1:{port}");
    let port_env = format!("PORT={port}");
    let app = fixture("app.js");
    let herd = start_held(
        &holder,
        &[
            "-i", "2", "--name", "sys-node", "--listen", &addr, "-e", &port_env, &app,
        ],
    );
    herd.wait_ready();
    let answer = get(port, "/").expect("a Node worker answers on the held port");
    assert_eq!(answer.status, 200, "{answer:?}");
    let pid = answer.json()["pid"].as_u64().expect("pid") as u32;
    assert!(herd.worker_pids().contains(&pid), "{}", herd.dump());
}
