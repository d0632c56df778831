//! Hardening: see the module list in mod.rs.
//!
//! Probe connections, notify sockets, the run directory and the command line, each attacked
//! from a second process: the test itself plays the local user who opens connections to
//! herd's loopback ports, sends datagrams to a worker's notify socket, or (as `nobody`,
//! through a worker) reshapes the run directory.

use std::collections::BTreeSet;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::util::{
    cli, home_of, kill, run_to_end, spawn_cli, start_named_listener, start_named_node, wait_dead,
    wait_status, workers, Herd, TempDir, WAIT,
};

const NOBODY: u32 = 65534;

// ---- the attacker's tools ----

/// Loopback TCP ports herd itself listens on, from /proc/net/tcp and herd's fd table.
fn herd_loopback_listeners(herd_pid: u32) -> BTreeSet<u16> {
    let mut inodes = BTreeSet::new();
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{herd_pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let t = target.to_string_lossy();
                if let Some(inode) = t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                    inodes.insert(inode.to_string());
                }
            }
        }
    }
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let mut ports = BTreeSet::new();
    for line in table.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 10 || cols[3] != "0A" || !inodes.contains(cols[9]) {
            continue;
        }
        if let Some(("0100007F", port)) = cols[1].split_once(':') {
            if let Ok(port) = u16::from_str_radix(port, 16) {
                ports.insert(port);
            }
        }
    }
    ports
}

/// A non-blocking connect to 127.0.0.1:port, held open by the returned fd.
fn connect_nonblocking(port: u16) -> Option<OwnedFd> {
    // SAFETY: plain socket calls on a fresh fd we own; the sockaddr is fully initialized.
    unsafe {
        let fd = libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        );
        if fd < 0 {
            return None;
        }
        let owned = OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_port = port.to_be();
        addr.sin_addr.s_addr = u32::from_be_bytes([127, 0, 0, 1]).to_be();
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        Some(owned)
    }
}

/// The NOTIFY_SOCKET a worker was given, from its environment (the test runs as its user
/// or root).
fn notify_socket_of(pid: u32) -> PathBuf {
    let env = std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_else(|e| panic!("environ of worker {pid}: {e}"));
    env.split(|&b| b == 0)
        .find_map(|kv| kv.strip_prefix(b"NOTIFY_SOCKET="))
        .map(|v| PathBuf::from(String::from_utf8_lossy(v).into_owned()))
        .unwrap_or_else(|| panic!("worker {pid} has no NOTIFY_SOCKET"))
}

/// One datagram to `path` from this (foreign) process.
fn spoof(path: &Path, text: &str) -> std::io::Result<usize> {
    UnixDatagram::unbound()?.send_to(text.as_bytes(), path)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Root-only tests: loud under CI, skipped (with a note) elsewhere.
fn need_root(test: &str) -> bool {
    if is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test} needs root (it runs workers as nobody)"
    );
    eprintln!("{test}: skipped, not root");
    false
}

/// The notify fixture under the system python (readable and runnable by `nobody`), as
/// socket-activation workers on 127.0.0.1:0.
fn start_notify_fixture(name: &str, extra: &[&str]) -> Herd {
    let script = crate::util::fixture("hardening_health_notify.py");
    let mut args = vec!["-i", "1", "--listen", "127.0.0.1:0", "--name", name];
    args.extend_from_slice(extra);
    args.push("/usr/bin/python3");
    args.push(&script);
    Herd::start(&args)
}

fn health_flags(interval: &'static str) -> Vec<&'static str> {
    vec![
        "--health-check",
        "/health",
        "--health-interval",
        interval,
        "--health-timeout",
        "1s",
        "--health-failures",
        "2",
    ]
}

fn wait_all_healthy(herd: &Herd, name: &str, n: usize) {
    wait_status(&home_of(herd), name, "every worker healthy", |s| {
        let ws = workers(s);
        ws.len() == n
            && ws.iter().all(|w| {
                w["state"] == "ready" && w["health"].as_str().is_some_and(|h| h.starts_with("ok"))
            })
    });
}

// ---- (1) the probe connection ----

/// Another local process connects (and disconnects) again and again to every loopback port
/// herd listens on besides the app's own. Healthy workers must stay healthy: no failed probe,
/// no replacement. Before the fix herd kept one probe listener open for good and took the
/// first connection in its queue as the probe: the foreign ones made every probe fail and
/// healthy workers were replaced in a loop.
#[test]
fn foreign_connections_to_herds_ports_do_not_fail_probes() {
    let name = "hh-foreign";
    let herd = start_named_node("health_app.js", name, 2, &health_flags("250ms"));
    herd.wait_ready();
    let app_port = herd.port();
    wait_all_healthy(&herd, name, 2);
    let mark = herd.mark();

    let stop = Arc::new(AtomicBool::new(false));
    let found = Arc::new(AtomicUsize::new(0));
    let attacker = {
        let (stop, found) = (Arc::clone(&stop), Arc::clone(&found));
        let herd_pid = herd.pid();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            let deadline = Instant::now() + WAIT;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                for port in herd_loopback_listeners(herd_pid) {
                    if port == app_port {
                        continue;
                    }
                    found.fetch_add(1, Ordering::Relaxed);
                    // Six that close again, one that stays (bounded).
                    for _ in 0..6 {
                        drop(connect_nonblocking(port));
                    }
                    if held.len() < 16 {
                        held.extend(connect_nonblocking(port));
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    // Twenty probes answered while the attacker runs (about 2.5 s), or a failure.
    let bad_event = |e: &serde_json::Value| {
        matches!(
            e["event"].as_str(),
            Some("probe_failed" | "replacing" | "hung")
        )
    };
    herd.wait_for("20 probes during the attack", |events| {
        let probes = events[mark..]
            .iter()
            .filter(|e| {
                e["line"]
                    .as_str()
                    .is_some_and(|l| l.contains("health probe"))
            })
            .count();
        probes >= 20 || events[mark..].iter().any(bad_event)
    });
    stop.store(true, Ordering::Relaxed);
    attacker.join().expect("attacker thread");
    let bad: Vec<_> = herd.events()[mark..]
        .iter()
        .filter(|e| bad_event(e))
        .cloned()
        .collect();
    assert!(
        bad.is_empty(),
        "foreign connections (found herd's probe port {} times) failed probes: {bad:#?}",
        found.load(Ordering::Relaxed)
    );
}

/// Another local process holds 200 connections on every loopback port herd listens on
/// besides the app's. herd must keep answering `herd status` and obey SIGTERM. Before the
/// fix the probe's blocking connect() to its own full listener froze the runtime thread.
#[test]
fn a_full_backlog_on_herds_ports_does_not_freeze_herd() {
    let name = "hh-backlog";
    let mut herd = start_named_node("health_app.js", name, 1, &health_flags("200ms"));
    herd.wait_ready();
    let app_port = herd.port();
    wait_all_healthy(&herd, name, 1);

    // Look for herd's extra listeners for a second, and fill each found.
    let mut held = Vec::new();
    let mut filled = BTreeSet::new();
    let look_until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < look_until {
        for port in herd_loopback_listeners(herd.pid()) {
            if port != app_port && filled.insert(port) {
                held.extend((0..200).filter_map(|_| connect_nonblocking(port)));
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // Probes run every 200ms: a frozen supervisor shows within a few status calls.
    let home = home_of(&herd);
    for _ in 0..5 {
        let out = spawn_cli(&home, &["status", name, "--json"]).finish(Duration::from_secs(5));
        assert_eq!(
            out.code,
            Some(0),
            "status while {} connections fill herd's ports {filled:?}\n{out}",
            held.len()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    herd.signal(libc::SIGTERM);
    assert!(
        herd.wait_exit(Duration::from_secs(10)).is_some(),
        "herd ignored SIGTERM while its ports {filled:?} were full\n{}",
        herd.dump()
    );
    drop(held);
}

// ---- notify datagrams from strangers ----

/// A process outside the worker's process group sends `READY=1` to the worker's notify
/// socket: herd must not count the worker ready. Then the worker itself sends `STATUS=…`,
/// which herd must take (so the foreign datagram was read before it).
#[test]
fn ready_from_a_stranger_is_ignored() {
    let name = "hh-ready";
    let herd = start_named_listener(
        "hardening_health_notify.py",
        name,
        1,
        &[
            "--ready",
            "notify",
            "--listen-timeout",
            "120s",
            "-e",
            "HARDENING_MODE=quiet",
        ],
    );
    herd.wait_line_after(0, "notify fixture up");
    let pid = herd.worker_pids()[0];
    let path = notify_socket_of(pid);
    spoof(&path, "READY=1\nSTATUS=spoofed").expect("send to the notify socket");
    kill(pid, libc::SIGUSR1);
    let s = wait_status(&home_of(&herd), name, "the worker's own STATUS", |s| {
        workers(s)[0]["status_text"] == "genuine" || workers(s)[0]["state"] == "ready"
    });
    assert_eq!(
        workers(&s)[0]["state"],
        "starting",
        "a stranger's READY=1 made the worker ready: {s:#}"
    );
    assert!(
        !herd.events().iter().any(|e| e["event"] == "ready"),
        "{}",
        herd.dump()
    );
}

/// A hung worker (no WATCHDOG=1 after READY=1) must be found hung even while another process
/// keeps sending WATCHDOG=1 to its notify socket.
#[test]
fn watchdog_pings_from_a_stranger_do_not_hide_a_hang() {
    let name = "hh-watchdog";
    let herd = start_named_listener(
        "hardening_health_notify.py",
        name,
        1,
        &["--watchdog", "1s", "-e", "HARDENING_MODE=silent"],
    );
    herd.wait_event("worker 1 ready", |e| {
        e["event"] == "ready" && e["worker_id"] == 1
    });
    let pid = herd.worker_pids()[0];
    let path = notify_socket_of(pid);
    let stop = Arc::new(AtomicBool::new(false));
    let attacker = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let deadline = Instant::now() + WAIT + Duration::from_secs(5);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let _ = spoof(&path, "WATCHDOG=1");
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    herd.wait_event("worker 1 declared hung", |e| {
        e["event"] == "hung" && e["worker_id"] == 1
    });
    stop.store(true, Ordering::Relaxed);
    attacker.join().expect("attacker thread");
}

// ---- the run directory of --user workers ----

/// As root with `--user nobody`: the first worker (as nobody) tries to move its notify
/// directory away and put a symlink to a root-owned directory in its place, then exits so herd
/// starts another. herd must not chown (or create sockets in) the symlink's target, and the
/// run directory must be root's, not writable by the worker, with an unpredictable name.
/// Before the fix the directory was `herd-NAME-PID`, chowned to the worker, and the next
/// launch chowned whatever the path then named: the victim became nobody's.
#[test]
fn a_user_worker_cannot_redirect_the_run_directory() {
    if !need_root("a_user_worker_cannot_redirect_the_run_directory") {
        return;
    }
    let name = "hh-hijack";
    let victim = TempDir::new();
    let victim_arg = format!("VICTIM={}", victim.path().display());
    let herd = start_notify_fixture(
        name,
        &[
            "--user",
            "nobody",
            "-e",
            "HARDENING_MODE=hijack",
            "-e",
            &victim_arg,
        ],
    );
    let attempt = herd.wait_line_after(0, "hijack ");
    let second = herd.wait_event("worker 2 ready", |e| {
        e["event"] == "ready" && e["worker_id"] == 2
    });
    let pid = second["pid"].as_u64().expect("pid") as u32;
    let socket = notify_socket_of(pid);
    let run_dir = socket
        .parent()
        .expect("socket in a directory")
        .to_path_buf();

    // Undo a successful hijack before asserting, so nothing is left in /tmp.
    let moved = PathBuf::from(format!("{}.moved", run_dir.display()));
    let hijacked = std::fs::symlink_metadata(&run_dir).is_ok_and(|m| m.file_type().is_symlink());
    let victim_meta = std::fs::metadata(victim.path()).expect("victim dir");
    let victim_entries: Vec<_> = std::fs::read_dir(victim.path())
        .expect("read victim")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    if hijacked {
        let _ = std::fs::remove_file(&run_dir);
        let _ = std::fs::remove_dir_all(&moved);
    }
    assert!(
        !hijacked && victim_meta.uid() == 0 && victim_entries.is_empty(),
        "worker hijack {attempt}: the run dir became a symlink ({hijacked}); victim owned by \
         uid {} with entries {victim_entries:?}",
        victim_meta.uid()
    );

    let dir_meta = std::fs::symlink_metadata(&run_dir).expect("run dir");
    assert!(dir_meta.is_dir(), "{}", run_dir.display());
    assert_eq!(dir_meta.uid(), 0, "the run dir stays root's");
    assert_eq!(
        dir_meta.mode() & 0o022,
        0,
        "the run dir is writable by others: {:o}",
        dir_meta.mode()
    );
    let sock_meta = std::fs::symlink_metadata(&socket).expect("notify socket");
    assert_eq!(
        sock_meta.uid(),
        NOBODY,
        "the worker's socket is the worker's"
    );
    assert_eq!(sock_meta.mode() & 0o077, 0, "nobody else may write to it");
    let predictable = format!("herd-{name}-{}", herd.pid());
    let dir_name = run_dir.file_name().expect("name").to_string_lossy();
    assert!(
        dir_name != predictable && !dir_name.ends_with(&format!("-{}", herd.pid())),
        "predictable run dir name {dir_name}"
    );
}

/// `herd run` killed with SIGKILL leaves its run directory; the next herd of the same user
/// removes it, but neither follows a symlink that looks like one nor removes a directory of
/// another user.
#[test]
fn run_dirs_left_by_a_killed_herd_are_removed_safely() {
    if !need_root("run_dirs_left_by_a_killed_herd_are_removed_safely") {
        return;
    }
    let args = [
        "--user",
        "nobody",
        "-e",
        "HARDENING_MODE=silent",
        "--ready",
        "notify",
    ];
    let mut first = start_notify_fixture("hh-stale", &args);
    first.wait_ready();
    let worker = first.worker_pids()[0];
    let stale = notify_socket_of(worker)
        .parent()
        .expect("run dir")
        .to_path_buf();
    first.signal(libc::SIGKILL);
    assert!(first.wait_exit(WAIT).is_some(), "herd killed");
    assert!(wait_dead(worker, WAIT), "the worker dies with herd");
    assert!(stale.exists(), "SIGKILL left {}", stale.display());

    // Look-alikes: a symlink to a victim directory, and a directory of another user.
    let victim = TempDir::new();
    std::fs::write(victim.join("keep"), "x").expect("victim file");
    let look_alike = |c: char| {
        let mut s = stale.to_string_lossy().into_owned();
        let last = s.pop().expect("non-empty");
        s.push(if last == c { 'a' } else { c });
        PathBuf::from(s)
    };
    let link = look_alike('0');
    let foreign = look_alike('1');
    std::os::unix::fs::symlink(victim.path(), &link).expect("plant symlink");
    std::fs::create_dir(&foreign).expect("foreign dir");
    std::fs::write(foreign.join("keep"), "x").expect("foreign file");
    std::os::unix::fs::chown(&foreign, Some(NOBODY), Some(NOBODY)).expect("chown foreign");

    let second = start_notify_fixture("hh-stale2", &args);
    second.wait_ready();
    let stale_left = stale.exists();
    let victim_ok = victim.join("keep").exists();
    let foreign_ok = foreign.join("keep").exists();
    let link_ok = std::fs::symlink_metadata(&link).is_ok();
    // Clean up before asserting.
    if stale_left {
        let _ = std::fs::remove_dir_all(&stale);
    }
    let _ = std::fs::remove_file(&link);
    let _ = std::fs::remove_dir_all(&foreign);
    drop(second);
    assert!(victim_ok, "a look-alike symlink was followed");
    assert!(
        foreign_ok,
        "another user's look-alike directory was touched"
    );
    assert!(link_ok, "the look-alike symlink itself is left alone");
    assert!(
        !stale_left,
        "the run dir of the killed herd was left: {}",
        stale.display()
    );
}

// ---- the command line ----

#[test]
fn zero_and_negative_values_are_refused_clearly() {
    let cases: [(&[&str], &str, &str); 6] = [
        (&["--watchdog", "0s"], "--watchdog", "greater than 0"),
        (
            &["--health-interval", "0ms"],
            "--health-interval",
            "greater than 0",
        ),
        (
            &["--health-timeout", "0s"],
            "--health-timeout",
            "greater than 0",
        ),
        (&["-i", "-3"], "--instances", "at least 1"),
        (&["--max-restarts", "-1"], "--max-restarts", "negative"),
        (&["--kill-timeout", "-5s"], "--kill-timeout", "negative"),
    ];
    for (flags, flag, says) in cases {
        let mut args = flags.to_vec();
        args.push("/no/such/app");
        let (out, _home) = run_to_end(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {stderr}");
        assert!(
            stderr.contains(flag) && stderr.contains(says) && !stderr.contains("unexpected"),
            "{flags:?} should name {flag} and say {says:?}: {stderr}"
        );
    }
    // The control CLI too.
    let home = TempDir::new();
    let out = cli(home.path(), &["logs", "x", "-n", "-2"]);
    assert!(
        out.code == Some(2) && out.stderr.contains("--lines") && out.stderr.contains("negative"),
        "{out}"
    );
}
